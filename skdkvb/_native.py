"""Native CPU kernels: build ``_kernels/*.cpp``, verify and cache the library, load it, run it on threads.

Three hot loops of DKVB are memory-bound in a way that a chain of torch ops
cannot avoid (each op writes its result to memory for the next to read back):

* ``skdkvb_nearest``: the nearest-key search (see :mod:`skdkvb._search`), and
  ``skdkvb_nearest_topk`` for the k nearest keys;
* ``skdkvb_gather_rows`` / ``skdkvb_scatter_rows``: reading and updating the
  selected value rows in an SGD step (see
  :meth:`skdkvb.DiscreteKeyValueBottleneck.sgd_step`), head by head so that
  one head's block of the value table stays in cache.

The C++ sources (``skdkvb/_kernels/*.cpp``, shipped as package data) are
compiled once per machine with the system C++ compiler (``-O3
-march=native``, falling back to a portable build) into one shared library,
cached under a key made of the sources, the compiler, the flags and the CPU.
The library is written atomically next to a sidecar file holding its size and
SHA-256; before loading a cached library both are checked, and a missing,
empty, truncated or altered file is rebuilt instead of loaded.

When the kernels cannot be used (no compiler, a compiler error, an unwritable
cache folder), every caller falls back to its pure-torch path, 2-10x slower,
and a :class:`NativeUnavailableWarning` says once why and how to fix it.
:func:`backend_info` reports the back-end, compiler, flags, CPU features and
cache path (``skdkvb.show_versions()`` prints it).

Environment variables
---------------------
``SKDKVB_NATIVE``
    ``0`` disables the native kernels (no warning: the choice is explicit).
``SKDKVB_CACHE_DIR``
    Folder of the compiled library (default ``$XDG_CACHE_HOME/skdkvb`` or
    ``~/.cache/skdkvb``). It must be writable the first time.
``CXX``
    The C++ compiler to use (default: ``c++``, ``g++`` or ``clang++`` on the PATH).
``SKDKVB_NATIVE_PORTABLE``
    ``1`` builds without ``-march=native`` (the code paths for CPUs without
    AVX-512/AVX2; used by the CI to test them on any machine).
``SKDKVB_NATIVE_FLAGS``
    Extra compiler flags, e.g. ``-fsanitize=address,undefined`` (CI only).
``SKDKVB_SEARCH_PRECISION``
    ``int8`` (default) / ``int16`` run an integer VNNI shortlist
    (``vpdpbusd`` / ``vpdpwssd``) + float32 re-check where the build and the
    CPU have AVX-512 VNNI (detected at run time; elsewhere the float32 kernel
    runs); ``float32`` always runs the float32 kernel. The selected keys are
    identical either way.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

from ._interrupts import defer_sigint

#: Folder of the kernel sources (package data).
KERNEL_DIR = Path(__file__).resolve().parent / "_kernels"


class NativeUnavailableWarning(RuntimeWarning):
    """The native kernels could not be built or loaded; skdkvb runs its slower pure-torch code."""


lock = threading.Lock()
#: ``nearest``/``scatter``/``gather``: the loaded functions (None when unavailable); ``error``: why;
#: ``lib``: the loaded library; ``path``, ``compiler``, ``flags``: how it was built.
state: dict = {}
_warned = False


#: Bumped when the cache layout (library + sidecar record) changes.
_CACHE_FORMAT = "2"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on, so that a shared cache never serves a foreign CPU."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return platform.machine() + platform.system() + flags


def _cache_dir() -> Path:
    root = os.environ.get("SKDKVB_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "skdkvb"


def _sources() -> list[Path]:
    return sorted(KERNEL_DIR.glob("*.cpp"))


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _flag_sets() -> list[list[str]]:
    """Compiler flag sets to try, best first."""
    base = [
        "-O3",
        "-ffp-contract=fast",
        "-shared",
        "-fPIC",
        "-std=c++17",
        f"-I{KERNEL_DIR}",
    ]
    base += shlex.split(os.environ.get("SKDKVB_NATIVE_FLAGS", ""))
    if os.environ.get("SKDKVB_NATIVE_PORTABLE", "0") == "1":
        return [base]
    # -march=native first (AVX-512/AVX2); a compiler that rejects it still gets a portable build.
    return [base + ["-march=native"], base]


def _library_path(compiler: str) -> Path:
    h = hashlib.sha256(_CACHE_FORMAT.encode())
    for src in _sources() + sorted(KERNEL_DIR.glob("*.h")):
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    h.update((compiler + "\0" + repr(_flag_sets()) + "\0" + _cpu_signature()).encode())
    return _cache_dir() / f"kernels_{h.hexdigest()[:16]}.so"


def _digest(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _verified(path: Path) -> dict | None:
    """The build record of ``path`` if the file matches the size and SHA-256 recorded when it was built, else None."""
    try:
        record = json.loads(_sidecar(path).read_text())
        data = path.read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not data or {k: record.get(k) for k in ("size", "sha256")} != _digest(data):
        return None
    return record


def _compile(path: Path, compiler: str) -> list[str]:
    """Build the library into ``path`` (atomically), with its sidecar; returns the flags used."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        lib = Path(tmp) / path.name
        errors = []
        for flags in _flag_sets():
            cmd = [compiler, *flags, *map(str, _sources()), "-o", str(lib)]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
            if res.returncode == 0:
                break
            errors.append(res.stderr.strip()[-600:] or f"exit status {res.returncode}")
        else:
            raise RuntimeError(f"the C++ compiler {compiler!r} failed: {errors[-1]}")
        data = lib.read_bytes()
        side = Path(tmp) / "sidecar.json"
        side.write_text(json.dumps({**_digest(data), "flags": flags}))
        # Atomic renames: concurrent processes never see a half-written file. The
        # library goes first; a reader that sees it before its sidecar rebuilds.
        os.replace(lib, path)
        os.replace(side, _sidecar(path))
    return flags


def _bind(lib) -> dict:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    nearest = lib.skdkvb_nearest
    nearest.argtypes = [p, i64, i32, p, p, i64, p, i64, i64, i64, i64]
    nearest.restype = i32
    scatter = lib.skdkvb_scatter_rows
    scatter.argtypes = [p, i64, p, i64, i64, p, p, ctypes.c_float, i64, i64]
    scatter.restype = None
    gather = lib.skdkvb_gather_rows
    gather.argtypes = [p, i64, p, i64, i64, p, p]
    gather.restype = None
    nearest_topk = lib.skdkvb_nearest_topk
    nearest_topk.argtypes = [p, i64, i32, p, p, i64, p, i32, i64, i64, i64, i64]
    nearest_topk.restype = i32
    nearest_lp = lib.skdkvb_nearest_lp
    nearest_lp.argtypes = [p, i64, i32, p, p, i64, p, i64, i64, i64, i64, p, i32]
    nearest_lp.restype = i32
    lib.skdkvb_lp_available.restype = i32
    fma = lib.skdkvb_fma_loop
    fma.argtypes = [i64]
    fma.restype = ctypes.c_float
    for name in ("skdkvb_build_isa", "skdkvb_cpu_features"):
        getattr(lib, name).restype = ctypes.c_char_p
    lib.skdkvb_lanes.restype = i32
    return {
        "nearest": nearest,
        "nearest_topk": nearest_topk,
        "nearest_lp": nearest_lp if lib.skdkvb_lp_available() else None,
        "scatter": scatter,
        "gather": gather,
        "fma_loop": fma,
    }


_FIX = (
    "Install a C++ compiler (g++ or clang++, or name one in $CXX) and make sure $SKDKVB_CACHE_DIR "
    "(default ~/.cache/skdkvb) is writable; set SKDKVB_NATIVE=0 to use the torch code without this warning."
)


def _load() -> None:
    """Compile (once), verify and load the library into :data:`state`; never raises."""
    if "nearest" in state:
        return
    funcs: dict = {}
    try:
        compiler = _compiler()
        if compiler is None:
            raise RuntimeError("no C++ compiler found (looked for $CXX, c++, g++, clang++)")
        state["compiler"] = compiler
        path = _library_path(compiler)
        state["path"] = str(path)
        record = _verified(path)
        if record is None:
            _compile(path, compiler)
            record = _verified(path)
            if record is None:
                raise RuntimeError(f"the freshly built library {path} does not match its recorded hash")
        state["flags"] = record.get("flags")
        lib = ctypes.CDLL(str(path))
        funcs = _bind(lib)
        state["lib"] = lib
    except Exception as exc:  # any failure (no compiler, read-only cache, foreign platform) means fallback
        state["error"] = f"{type(exc).__name__}: {exc}"
        funcs = {}
    for name in ("nearest", "nearest_topk", "nearest_lp", "scatter", "gather", "fma_loop"):
        state[name] = funcs.get(name)


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"skdkvb's native CPU kernels are unavailable ({state.get('error')}); falling back to the "
            f"pure-torch code, which is 2-10x slower. {_FIX}",
            NativeUnavailableWarning,
            stacklevel=4,
        )


def enabled() -> bool:
    """Whether the native kernels are allowed (``SKDKVB_NATIVE`` is not ``0``).

    Returns
    -------
    bool
        False when the environment variable is ``0``.
    """
    return os.environ.get("SKDKVB_NATIVE", "1") != "0"


def _function(name):
    if not enabled():
        return None
    with lock:
        _load()
        fn = state[name]
    if fn is None:
        _warn_once()
    return fn


def nearest_fn():
    """The compiled search kernel, or ``None`` where disabled or unavailable.

    Returns
    -------
    ctypes function or None
        ``None`` when ``SKDKVB_NATIVE=0`` or the kernels could not be built
        (then a :class:`NativeUnavailableWarning` was given once).
    """
    return _function("nearest")


def nearest_topk_fn():
    """The compiled top-k search kernel (``skdkvb_nearest_topk``), or ``None`` where unavailable.

    Returns
    -------
    ctypes function or None
        ``None`` when ``SKDKVB_NATIVE=0`` or the kernels could not be built.
    """
    return _function("nearest_topk")


#: Search arithmetic when ``SKDKVB_SEARCH_PRECISION`` is unset. int8: its selected
#: keys are the float32 kernel's, bit for bit (the integer pass only shortlists),
#: and it ran 1.35-1.46x faster on Gaussian and Fashion-MNIST data at the paper's
#: size (docs/performance.md). CPUs without AVX-512 VNNI get float32.
DEFAULT_SEARCH_PRECISION = "int8"


def search_precision() -> str:
    """The arithmetic of the native nearest-key search: ``"int8"``, ``"int16"`` or ``"float32"``.

    ``"int8"``/``"int16"`` where the kernels run, the CPU has AVX-512 VNNI
    (detected at run time) and ``SKDKVB_SEARCH_PRECISION`` is unset (int8) or
    asks for it. Either way
    the selected keys are the same, bit for bit: the int8 pass only shortlists
    the keys that the float32 arithmetic then decides between.

    Returns
    -------
    str
        ``"int8"``, ``"int16"`` or ``"float32"``.

    Raises
    ------
    ValueError
        When ``SKDKVB_SEARCH_PRECISION`` holds another value.
    """
    if nearest_lp_fn() is None:
        return "float32"
    return _precision_choice()


def _precision_choice() -> str:
    choice = os.environ.get("SKDKVB_SEARCH_PRECISION", DEFAULT_SEARCH_PRECISION).lower()
    if choice not in ("int8", "int16", "float32"):
        raise ValueError(
            f"SKDKVB_SEARCH_PRECISION={choice!r} is not one of 'int8', 'int16', 'float32'; unset it or pick one."
        )
    return choice


def nearest_lp_fn():
    """The int8/int16 (VNNI) search kernel with float32 re-check, or ``None``.

    ``None`` when the native kernels are unavailable or disabled, when the CPU
    or the build lacks AVX-512 VNNI, or when ``SKDKVB_SEARCH_PRECISION`` is
    ``float32``.

    Returns
    -------
    ctypes function or None
        Same arguments as :func:`nearest_fn` plus a pointer to 5 int64
        counters (or ``None``) and the bits (8 or 16) of the shortlist pass.

    Raises
    ------
    ValueError
        When ``SKDKVB_SEARCH_PRECISION`` is not ``int8``, ``int16`` or ``float32``.
    """
    if _precision_choice() == "float32" or nearest_fn() is None:
        return None
    return state.get("nearest_lp")


def scatter_fn():
    """The compiled row-scatter kernel, or ``None`` where disabled or unavailable.

    Returns
    -------
    ctypes function or None
        ``None`` when ``SKDKVB_NATIVE=0`` or the kernels could not be built
        (then a :class:`NativeUnavailableWarning` was given once).
    """
    return _function("scatter")


def gather_fn():
    """The compiled row-gather kernel, or ``None`` where disabled or unavailable.

    Returns
    -------
    ctypes function or None
        ``None`` when ``SKDKVB_NATIVE=0`` or the kernels could not be built
        (then a :class:`NativeUnavailableWarning` was given once).
    """
    return _function("gather")


def fma_loop_fn():
    """The register-resident FMA loop used to measure the machine's peak, or ``None``.

    Returns
    -------
    ctypes function or None
        ``fn(iters)`` performs ``iters * 12 * lanes * 2`` float32 FLOPs, where
        ``lanes`` is :func:`backend_info`'s ``vector_lanes``.
    """
    return _function("fma_loop")


def _compiler_version(compiler: str | None) -> str | None:
    if compiler is None:
        return None
    try:
        res = subprocess.run(
            [compiler, "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return compiler
    first = res.stdout.strip().splitlines()
    return f"{compiler} ({first[0]})" if first else compiler


def backend_info() -> dict:
    """What the native kernels are, for bug reports and ``skdkvb.show_versions()``.

    Loads (and if needed builds) the kernels, unless ``SKDKVB_NATIVE=0``.

    Returns
    -------
    dict
        ``backend`` (``"native"`` or ``"torch"``), ``enabled`` (``SKDKVB_NATIVE``),
        ``compiler`` (path and version), ``flags`` (of the build, when built in
        this process), ``build_isa`` (instruction set compiled for),
        ``vector_lanes`` (float32 lanes per vector of that build),
        ``cpu_features`` (detected at run time), ``search_precision``
        (``"int8"`` or ``"float32"``, see :func:`search_precision`),
        ``cache_path`` (the library
        file), ``threads`` (CPUs this process may use) and ``error`` (why the
        kernels are unavailable, or ``None``).

    Examples
    --------
    >>> from skdkvb._native import backend_info
    >>> sorted(backend_info())[:3]
    ['backend', 'build_isa', 'cache_path']
    """
    from ._threads import available_cpus

    on = enabled()
    if on:
        with lock:
            _load()
    lib = state.get("lib") if on else None
    features = lib.skdkvb_cpu_features().decode() if lib is not None else _proc_features()
    return {
        "backend": "native" if lib is not None else "torch",
        "enabled": on,
        "compiler": _compiler_version(state.get("compiler") or _compiler()),
        "flags": " ".join(state["flags"]) if state.get("flags") else None,
        "build_isa": lib.skdkvb_build_isa().decode() if lib is not None else None,
        "vector_lanes": lib.skdkvb_lanes() if lib is not None else None,
        "cpu_features": features,
        "search_precision": search_precision() if lib is not None else None,
        "cache_path": state.get("path"),
        "threads": available_cpus(),
        "error": state.get("error") if on else "disabled by SKDKVB_NATIVE=0",
    }


def _proc_features() -> str:
    wanted = (
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
    )
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(f for f in wanted if f in have)
    except OSError:
        pass
    return ""


# --- worker threads ---------------------------------------------------------

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_size = 0


def _reset_after_fork() -> None:
    """In a forked child the parent's worker threads do not exist: forget the pool (and a held lock)."""
    global _pool, _pool_size, lock
    _pool, _pool_size = None, 0
    lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _wait_all(futures) -> None:
    """Wait until every future is done, even through repeated KeyboardInterrupts; re-raise the first."""
    interrupt = None
    pending = set(futures)
    while pending:
        try:
            _, pending = concurrent.futures.wait(pending)
        except BaseException as exc:  # a second Ctrl-C must not cut the wait short
            interrupt = interrupt or exc
    if interrupt is not None:
        raise interrupt


def run_split(fn, args, ranges) -> None:
    """Call ``fn(*args, *r)`` for every range ``r``, one worker thread per range.

    ctypes releases the GIL during the call, so the ranges run in parallel; a
    single range runs inline. The call returns (or raises) only once every
    range has finished, even when the waiting thread is interrupted, so that
    no worker writes into buffers the caller has released.

    Parameters
    ----------
    fn : callable
        Usually a ctypes function.
    args : tuple
        Leading arguments shared by every call.
    ranges : list of tuple
        Trailing arguments, one tuple per call.

    Raises
    ------
    BaseException
        The first exception of a worker, or an interrupt of the waiting thread,
        re-raised after all workers finished.
    """
    global _pool, _pool_size
    if len(ranges) == 1:
        fn(*args, *ranges[0])
        return
    with lock:
        if _pool is None or _pool_size < len(ranges):
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="skdkvb-native")
            _pool_size = len(ranges)
        pool = _pool
    futures = []
    try:
        # A Ctrl-C between a worker's start and its future being recorded would
        # let the wait below miss that worker: hold it back until all are recorded.
        with defer_sigint():
            for r in ranges:
                futures.append(pool.submit(fn, *args, *r))
    finally:
        _wait_all(futures)
    for future in futures:
        future.result()
