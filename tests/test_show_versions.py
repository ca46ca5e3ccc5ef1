"""show_versions(): every section present, and each value read from its real source."""

import importlib.metadata
import io

import torch

import skdkvb._native
from skdkvb import _show_versions
from skdkvb._show_versions import _collect, show_versions

SECTIONS = [
    "System",
    "Python dependencies",
    "Environment variables",
    "Torch",
    "Threadpool libraries",
    "Search backend",
    "Device",
]


def test_sections_and_dependency_versions(monkeypatch):
    monkeypatch.setattr(_show_versions, "_DEPENDENCIES", ("numpy", "torch", "no-such-dist-skdkvb"))
    info = _collect()
    assert list(info) == SECTIONS
    deps = info["Python dependencies"]
    assert deps == {
        "numpy": importlib.metadata.version("numpy"),
        "torch": importlib.metadata.version("torch"),
        "no-such-dist-skdkvb": None,
    }


def test_environment_variables_in_effect(monkeypatch):
    monkeypatch.setenv("SKDKVB_CACHE_DIR", "/some/cache")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = _collect()["Environment variables"]
    assert env["SKDKVB_CACHE_DIR"] == "/some/cache"
    assert env["OMP_NUM_THREADS"] is None


def test_torch_threads_and_device_are_live_values():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _collect()["Torch"]["intra-op threads"] == 1
    finally:
        torch.set_num_threads(before)
    device = _collect()["Device"]
    assert device["cuda available"] is torch.cuda.is_available()
    assert ("cuda devices" in device) is torch.cuda.is_available()


def test_threadpool_section_lists_loaded_libraries():
    pools = _collect()["Threadpool libraries"]
    # numpy/scipy's BLAS is always loaded once torch and numpy are imported.
    assert any(pool["user_api"] == "blas" for pool in pools)
    assert all(isinstance(pool["num_threads"], int) and pool["num_threads"] >= 1 for pool in pools)


def test_search_backend_reports_disabled_kernels(monkeypatch):
    monkeypatch.setenv("SKDKVB_NATIVE", "0")
    backend = _collect()["Search backend"]
    assert backend["backend"] == "torch"
    assert "SKDKVB_NATIVE" in backend["error"]


def test_search_backend_failure_is_reported_not_raised(monkeypatch):
    def broken():
        raise OSError("cache folder is read-only")

    monkeypatch.setattr(skdkvb._native, "backend_info", broken)
    backend = _collect()["Search backend"]
    assert backend == {"backend": "unknown", "error": "OSError: cache folder is read-only"}


def test_printed_report_has_every_section_and_dependency():
    out = io.StringIO()
    assert show_versions(file=out) is None
    text = out.getvalue()
    for title in SECTIONS:
        assert f"\n{title}:\n" in text
    for name in _show_versions._DEPENDENCIES:
        assert f" {name}: " in text
    assert f"numpy: {importlib.metadata.version('numpy')}\n" in text


def test_prints_to_stdout_by_default(capsys):
    show_versions()
    assert "Search backend:" in capsys.readouterr().out
