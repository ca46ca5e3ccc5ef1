"""Owns ``show_versions()``: the environment report to paste into a bug report."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
from typing import Any, TextIO

__all__ = ["show_versions"]

# Distributions reported, in this order: the required ones, then the optional
# extras and the build tools. Looked up by distribution metadata, so nothing
# is imported just to read its version.
_DEPENDENCIES = (
    "skdkvb",
    "numpy",
    "scipy",
    "scikit-learn",
    "torch",
    "torchvision",
    "timm",
    "huggingface_hub",
    "safetensors",
    "tqdm",
    "joblib",
    "threadpoolctl",
    "skops",
    "matplotlib",
    "pandas",
    "dask",
    "distributed",
    "dask-ml",
    "pip",
    "setuptools",
)


# Environment variables that change what skdkvb or its thread pools do.
_ENV_PREFIXES = ("SKDKVB_",)
_ENV_NAMES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE")


def _environment_info() -> dict[str, Any]:
    names = sorted(k for k in os.environ if k.startswith(_ENV_PREFIXES)) + list(_ENV_NAMES)
    return {name: os.environ.get(name) for name in names}


def _system_info() -> dict[str, Any]:
    return {
        "python": sys.version.replace("\n", " "),
        "executable": sys.executable,
        "machine": platform.platform(),
        "processor": platform.machine(),
    }


def _dependencies_info() -> dict[str, Any]:
    deps: dict[str, Any] = {}
    for name in _DEPENDENCIES:
        try:
            deps[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            deps[name] = None
    return deps


def _torch_info() -> dict[str, Any]:
    import torch

    parallel = torch.__config__.parallel_info()
    backend = next(
        (line.split(":", 1)[1].strip() for line in parallel.splitlines() if line.startswith("ATen parallel backend")),
        None,
    )
    settings = dict(re.findall(r"\b(BLAS_INFO|LAPACK_INFO)=([^,\s]+)", torch.__config__.show()))
    get_capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return {
        "intra-op threads": torch.get_num_threads(),
        "inter-op threads": torch.get_num_interop_threads(),
        "parallel backend": backend,
        "blas": settings.get("BLAS_INFO"),
        "lapack": settings.get("LAPACK_INFO"),
        "cpu capability": get_capability() if get_capability is not None else None,
        "default dtype": str(torch.get_default_dtype()).replace("torch.", ""),
    }


def _device_info() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "cuda available": cuda,
        "cuda version": torch.version.cuda,
    }
    if cuda:
        info["cuda devices"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    mps = getattr(torch.backends, "mps", None)
    info["mps available"] = bool(mps is not None and mps.is_available())
    return info


def _threadpool_info() -> list[dict[str, Any]]:
    # torch is imported first so that its BLAS and OpenMP libraries are loaded
    # and therefore visible to threadpoolctl.
    import torch  # noqa: F401
    from threadpoolctl import threadpool_info

    keep = ("user_api", "internal_api", "version", "num_threads", "threading_layer", "architecture", "filepath")
    return [{k: pool[k] for k in keep if k in pool} for pool in threadpool_info()]


def _search_backend_info() -> dict[str, Any]:
    try:
        from ._native import backend_info
    except ImportError as exc:  # an older or partial install without the kernels module
        return {"backend": "torch", "error": f"skdkvb._native.backend_info unavailable ({exc})"}
    try:
        return dict(backend_info())
    except Exception as exc:  # a report must not fail: say what went wrong instead
        return {"backend": "unknown", "error": f"{type(exc).__name__}: {exc}"}


def _collect() -> dict[str, Any]:
    """Every section of the report as plain data (what ``show_versions`` prints)."""
    return {
        "System": _system_info(),
        "Python dependencies": _dependencies_info(),
        "Environment variables": _environment_info(),
        "Torch": _torch_info(),
        "Threadpool libraries": _threadpool_info(),
        "Search backend": _search_backend_info(),
        "Device": _device_info(),
    }


def show_versions(file: TextIO | None = None) -> None:
    """Print the versions, threads, search backend and device, for bug reports.

    The report lists the platform and Python, the versions of skdkvb's
    dependencies (``None`` when not installed), the environment variables
    that change skdkvb's behaviour (``SKDKVB_*``, thread counts; ``None``
    when unset), torch's thread settings, the
    BLAS and OpenMP libraries loaded (from ``threadpoolctl``), the native
    search backend (compiler, build flags, CPU features, or why it is not in
    use) and the accelerators torch can see. Reading the search backend builds
    the native kernels if they are not cached yet, unless ``SKDKVB_NATIVE=0``.

    Parameters
    ----------
    file : file-like object, default=None
        Where to write the report; ``sys.stdout`` if None.

    Returns
    -------
    None
        The report is printed, not returned.

    Examples
    --------
    >>> import io
    >>> from skdkvb._show_versions import show_versions
    >>> out = io.StringIO()
    >>> show_versions(file=out)
    >>> "scikit-learn" in out.getvalue() and "Search backend:" in out.getvalue()
    True
    """
    out = sys.stdout if file is None else file
    for title, section in _collect().items():
        print(f"\n{title}:", file=out)
        if isinstance(section, dict):
            width = max((len(k) for k in section), default=0)
            for key, value in section.items():
                print(f"{key:>{width + 4}}: {value}", file=out)
        else:
            for pool in section:
                print(file=out)
                width = max((len(k) for k in pool), default=0)
                for key, value in pool.items():
                    print(f"{key:>{width + 4}}: {value}", file=out)
