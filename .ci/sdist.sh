#!/usr/bin/env bash
# Source-distribution round trip: build the sdist, install it in a fresh venv, run a fast part of its tests.
#
# The venv reuses the already installed dependencies (torch, scikit-learn, pytest, ...) through
# --system-site-packages and installs only the sdist itself (--no-deps). The tests run from the
# unpacked sdist, against the installed package (python -P keeps the unpacked source off sys.path),
# so a file missing from MANIFEST.in (tests/conftest.py, a kernel source, ...) fails here.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
PYTHON=${PYTHON:-python}
work=$(mktemp -d "${TMPDIR:-/tmp}/skdkvb-sdist.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- build (PyPI's `build`; --no-isolation reuses the installed setuptools and wheel) ---
# Without --sdist/--wheel, `build` makes the sdist and then the wheel *from that sdist*,
# as pip does when it installs an sdist.
"$PYTHON" -m pip install -q "build>=1"
"$PYTHON" -m build --no-isolation --outdir "$work/dist" . > "$work/build.log" 2>&1 || {
    tail -n 40 "$work/build.log"; exit 1; }
sdist=$(ls "$work"/dist/skdkvb-*.tar.gz)
wheel=$(ls "$work"/dist/skdkvb-*.whl)
echo "built $(basename "$sdist") and, from it, $(basename "$wheel")"

# --- what the tests and the docs need must be inside ---
tar -tzf "$sdist" > "$work/contents.txt"
for need in LICENSE README.md pyproject.toml tests/conftest.py docs/index.rst examples/README.rst; do
    grep -q "^skdkvb-[^/]*/$need\$" "$work/contents.txt" || { echo "sdist lacks $need"; exit 1; }
done
for src in skdkvb/_kernels/*; do
    [ -e "$src" ] || continue
    grep -q "^skdkvb-[^/]*/$src\$" "$work/contents.txt" || { echo "sdist lacks $src"; exit 1; }
done

# --- install what the sdist builds in a fresh venv, without touching the dependencies ---
"$PYTHON" -m venv --system-site-packages "$work/venv"
venv_python="$work/venv/bin/python"
"$venv_python" -m pip install -q --no-deps "$wheel"
mkdir "$work/src" && tar -xzf "$sdist" -C "$work/src"
unpacked=$(ls -d "$work"/src/skdkvb-*)
cd "$unpacked"
installed=$("$venv_python" -P -c "import skdkvb, os; print(os.path.dirname(skdkvb.__file__))")
case "$installed" in
    "$work/venv/"*) echo "testing the installed package in $installed" ;;
    *) echo "the venv imports skdkvb from $installed, not from the sdist it installed"; exit 1 ;;
esac
for src in skdkvb/_kernels/*; do
    [ -e "$src" ] || continue
    [ -e "$installed/${src#skdkvb/}" ] || { echo "the installed package lacks ${src#skdkvb/}"; exit 1; }
done

# --- a fast part of the sdist's own tests, against the installed package ---
"$venv_python" -P -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/test_plotting.py tests/test_benchmark_cli.py tests/test_metrics.py
