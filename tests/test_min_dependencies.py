"""The minimum-versions CI job installs exactly the minimums that pyproject.toml declares."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
MIN_JOB = ROOT / ".ci" / "min_versions.sh"
# Extras whose packages the library imports at run time; test, docs, lint and
# bench are tooling, installed at their newest versions.
RUNTIME_EXTRAS = ("plot", "pandas", "skops", "dask")

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(>=|==)\s*([0-9][0-9A-Za-z.+\-]*)\s*$")


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirement(req: str) -> tuple[str, str, str] | None:
    """``(normalised name, operator, version)`` of a ``>=``/``==`` requirement, None for others."""
    match = REQUIREMENT.match(req)
    if match is None:
        return None
    name, _extras, op, version = match.groups()
    return _name(name), op, version


def declared_minimums() -> dict[str, str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in RUNTIME_EXTRAS:
        reqs += project["optional-dependencies"][extra]
    minimums = {}
    for req in reqs:
        parsed = parse_requirement(req)
        assert parsed is not None, f"{req!r}: every runtime requirement needs a '>=' or '==' bound"
        name, op, version = parsed
        if op == ">=":
            minimums[name] = version
    return minimums


def min_job_pins() -> dict[str, str]:
    block = re.search(r'^MIN_PINS="\n(.*?)^"', MIN_JOB.read_text(), flags=re.MULTILINE | re.DOTALL)
    assert block is not None, "MIN_PINS block not found in .ci/min_versions.sh"
    pins = {}
    for line in block.group(1).split():
        parsed = parse_requirement(line)
        assert parsed is not None and parsed[1] == "==", f"{line!r} in MIN_PINS is not 'name==version'"
        assert parsed[0] not in pins, f"{parsed[0]} is pinned twice"
        pins[parsed[0]] = parsed[2]
    return pins


def test_min_job_pins_are_the_declared_minimums():
    assert min_job_pins() == declared_minimums()


def test_parse_requirement():
    assert parse_requirement("dask[array,dataframe]==2025.2.0") == ("dask", "==", "2025.2.0")
    assert parse_requirement("Scikit_Learn>=1.6.1") == ("scikit-learn", ">=", "1.6.1")
    assert parse_requirement("numpy") is None
    assert parse_requirement("torch>=2.14,<3") is None


def test_version_has_one_source():
    import skdkvb

    pyproject = tomllib.loads(PYPROJECT.read_text())
    assert "version" in pyproject["project"]["dynamic"]
    assert "version" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "skdkvb.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", skdkvb.__version__)


def test_extras_reuse_each_other():
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    # The test extra installs every runtime extra through skdkvb[...], re-pinning none of them.
    test = extras["test"]
    self_ref = next(req for req in test if req.startswith("skdkvb["))
    assert set(self_ref[len("skdkvb[") : -1].split(",")) == set(RUNTIME_EXTRAS)
    runtime_names = {parse_requirement(req)[0] for extra in RUNTIME_EXTRAS for req in extras[extra]}
    test_names = {parse_requirement(req)[0] for req in test if not req.startswith("skdkvb[")}
    assert not runtime_names & test_names


@pytest.mark.slow  # a fresh interpreter imports torch: 3-6 s
def test_optional_extras_are_not_imported_by_the_core():
    # skops, matplotlib and dask are extras: importing the package and its core
    # modules must not need them. (pandas is left out: scikit-learn itself
    # imports it whenever it is installed.)
    code = (
        "import sys, skdkvb, skdkvb.persistence, skdkvb.merge, skdkvb.continual, skdkvb.continual.metrics; "
        "print(','.join(m for m in ('skops', 'matplotlib', 'dask', 'distributed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""
