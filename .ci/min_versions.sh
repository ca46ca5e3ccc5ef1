#!/usr/bin/env bash
# Minimum-versions job: install the oldest versions that pyproject.toml
# declares, in a fresh virtual environment, and run the fast part of the suite
# (-m "not slow") against them. tests/test_min_dependencies.py checks that the
# MIN_PINS below are exactly pyproject's minimums.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

PYTHON=${PYTHON:-python3}
VENV=${SKDKVB_MIN_VENV:-$(mktemp -d)/venv}

# One "name==version" per line, each the ">=" bound of a dependency or of a
# runtime extra (plot, pandas, skops, dask) in pyproject.toml.
MIN_PINS="
numpy==1.24.0
scipy==1.10.0
scikit-learn==1.6.1
torch==2.14.1
timm==1.0.10
tqdm==4.60.0
safetensors==0.4.4
matplotlib==3.7.0
pandas==2.0.0
skops==0.11.0
dask-ml==2025.1.0
"

# Not ours to declare, but needed for the minimums to resolve to a working set:
# - timm imports torchvision, and the only torchvision that imports here is
#   the one built for the torch above (pip takes both from the local disk);
# - dask[dataframe] pulls the newest pyarrow, which needs NumPy >= 2;
# - timm 1.0.20 and older cannot use huggingface_hub 2.x (they import names
#   it removed), so the hub comes from timm 1.0.10's time.
# (timm 1.0.10 is our minimum: the tests' tiny test_convnext arrived in it.)
HELPER_PINS="
torchvision==0.29.1
pyarrow==17.0.0
huggingface_hub==0.25.2
"

echo "min-versions venv: $VENV"
if [ "${SKDKVB_MIN_SYSTEM_SITE:-0}" = 1 ]; then
    # CI: see the calling environment's packages, so that its torch (the pinned
    # version, a 6 GB CUDA build) is reused instead of copied (saves about two
    # minutes); every pin below is installed in the venv and shadows the rest.
    "$PYTHON" -m venv --system-site-packages "$VENV"
else
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC2086  # word splitting of the pin lists is intended
"$VENV/bin/python" -m pip install -q $MIN_PINS $HELPER_PINS \
    "dask[array,dataframe]==2025.2.0" "distributed==2025.2.0" pytest hypothesis
"$VENV/bin/python" -m pip install -q --no-deps -e .

# What the tests will import must be exactly the pins, and the pins must
# satisfy every requirement skdkvb declares (its runtime extras included).
MIN_PINS="$MIN_PINS" "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import os

from packaging.requirements import Requirement

pins = dict(line.split("==") for line in os.environ["MIN_PINS"].split())
bad = [f"{name}: pinned {want}, installed {md.version(name)}" for name, want in pins.items() if md.version(name) != want]
for text in md.requires("skdkvb"):
    req = Requirement(text)
    extras = ("plot", "pandas", "skops", "dask")
    if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
        continue
    have = md.version(req.name)
    if not req.specifier.contains(have, prereleases=True):
        bad.append(f"skdkvb requires {req}, installed {req.name} {have}")
print("\n".join(f"{name}=={md.version(name)}" for name in pins))
if bad:
    raise SystemExit("minimum versions not in place:\n  " + "\n  ".join(bad))
PY

"$VENV/bin/python" -m pytest -m "not slow" -q -p no:cacheprovider "$@"
