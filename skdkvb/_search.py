"""Nearest-key search: the hot path of DKVB.

Every query of every head is compared with all keys of that head through the
squared distance ``||q||^2 - 2 q.k + ||k||^2``; ``||q||^2`` is dropped because
it does not move the arg-min, and pruned keys get an infinite ``||k||^2`` so
they can never win. With ``d = 14`` a distance costs 14 multiply-adds and is
then only compared once, so writing the ``(n, C, M)`` distances to memory and
reading them back for the arg-min costs more than computing them. Two
back-ends avoid most of that traffic:

* **native** (CPU, float32, ``top_k=1``): a small C++ kernel, compiled once
  per machine with the system compiler and loaded with :mod:`ctypes`. It keeps
  a register tile of 8 queries x 16 keys, computes the distances with fused
  multiply-adds and folds them into a running per-lane minimum, so no distance
  ever leaves the registers; a head's transposed keys (``d x M`` floats,
  230 KB at the paper's size) stay in L2 while all queries stream past them.
  Heads are split over ``torch.get_num_threads()`` Python threads (ctypes
  releases the GIL). Set ``SKDKVB_NATIVE=0`` to disable it.
* **torch** (everything else, and the fallback when no compiler works): one
  ``bmm`` per tile of heads x samples against keys augmented with their norm
  (``[q, 1] . [-2k, ||k||^2]``), written into a preallocated tile buffer small
  enough to stay in cache, followed by ``argmin``/``topk`` on that tile.

Both give the brute-force answer up to floating-point rounding: results can
only differ where two distances are equal or within a few ulps.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

#: Bytes that one tile of the (heads, samples, keys) distance tensor may use on the torch path.
DEFAULT_BLOCK_BYTES = 32 * 2**20
#: Bytes of one cache-resident distance tile on the torch path (CPU).
TILE_BYTES = 8 * 2**20
#: Keys are padded to a multiple of the kernel's vector width.
_LANES = 16


def block_size_for(n_heads: int, n_keys: int, budget: int = DEFAULT_BLOCK_BYTES) -> int:
    """Samples per block so that a ``(n_heads, block, n_keys)`` float32 block fits ``budget`` bytes.

    Examples
    --------
    >>> block_size_for(256, 4096)
    8
    >>> block_size_for(4, 16)
    131072
    """
    return max(1, budget // (4 * n_heads * n_keys))


def key_scores_bias(keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-key additive term ``||k||^2`` of the distance, ``+inf`` for pruned keys.

    Parameters
    ----------
    keys : Tensor of shape (C, M, d)
    valid : bool Tensor of shape (C, M), optional
        Keys that may be selected. ``None`` means all.

    Returns
    -------
    Tensor of shape (C, M)

    Examples
    --------
    >>> import torch
    >>> keys = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    >>> key_scores_bias(keys, torch.tensor([[True, False]])).tolist()
    [[25.0, inf]]
    """
    bias = keys.pow(2).sum(-1)
    if valid is not None:
        bias = bias.masked_fill(~valid, float("inf"))
    return bias


# --------------------------------------------------------------- native kernel
_KERNEL_SOURCE = r"""
#include <stdint.h>
#include <math.h>
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

/* R queries of one head against all mp keys: running per-lane minimum of
   bias[m] + sum_j q[s, j] * kt[j, m]  (kt holds -2 k, bias ||k||^2). */
#define DEFINE_TILE(R)                                                              \
static void tile##R(const float *q, int64_t qs, const float *kt, const float *bias,   \
                    int d, int64_t mp, int64_t *out, int64_t os)                    \
{                                                                                   \
    v16f best[R]; v16i bidx[R]; v16i cur;                                           \
    for (int l = 0; l < 16; l++) cur[l] = l;                                        \
    for (int s = 0; s < R; s++) { best[s] = (v16f){} + INFINITY; bidx[s] = (v16i){}; } \
    for (int64_t m = 0; m < mp; m += 16) {                                          \
        v16f b = *(const v16f *)(bias + m);                                         \
        v16f acc[R];                                                                \
        for (int s = 0; s < R; s++) acc[s] = b;                                     \
        for (int j = 0; j < d; j++) {                                               \
            v16f k = *(const v16f *)(kt + j * mp + m);                              \
            for (int s = 0; s < R; s++) acc[s] += k * q[s * qs + j];                \
        }                                                                           \
        for (int s = 0; s < R; s++) {                                               \
            v16i lt = acc[s] < best[s];                                             \
            best[s] = lt ? acc[s] : best[s];                                        \
            bidx[s] = lt ? cur : bidx[s];                                           \
        }                                                                           \
        cur += 16;                                                                  \
    }                                                                               \
    for (int s = 0; s < R; s++) {                                                   \
        float bv = best[s][0]; int32_t bi = bidx[s][0];                             \
        for (int l = 1; l < 16; l++) {                                              \
            float v = best[s][l]; int32_t i = bidx[s][l];                           \
            /* lowest index among equal minima, as torch.argmin */                  \
            if (v < bv || (v == bv && i < bi)) { bv = v; bi = i; }                  \
        }                                                                           \
        out[s * os] = bi;                                                           \
    }                                                                               \
}
DEFINE_TILE(1)
DEFINE_TILE(8)

/* Queries [i0, i1) x heads [c0, c1). q (n, C, d) contiguous, kt (C, d, mp),
   bias (C, mp) with +inf on padding and pruned keys, out (n, C). Head-major
   so that one head's keys stay in cache while its queries stream past. */
extern "C" void skdkvb_nearest(const float *q, int64_t C, int d, const float *kt,
                               const float *bias, int64_t mp, int64_t *out,
                               int64_t c0, int64_t c1, int64_t i0, int64_t i1)
{
    for (int64_t c = c0; c < c1; c++) {
        const float *ktc = kt + c * d * mp, *bc = bias + c * mp;
        int64_t i = i0;
        for (; i + 8 <= i1; i += 8)
            tile8(q + (i * C + c) * d, C * d, ktc, bc, d, mp, out + i * C + c, C);
        for (; i < i1; i++)
            tile1(q + (i * C + c) * d, C * d, ktc, bc, d, mp, out + i * C + c, C);
    }
}
"""

_native_lock = threading.Lock()
_native_state: dict = {}
_pool: ThreadPoolExecutor | None = None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on, so a shared cache never serves a foreign CPU."""
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


def _compile(path: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src = Path(tmp) / "kernel.cpp"
        src.write_text(_KERNEL_SOURCE)
        lib = Path(tmp) / path.name
        base = [compiler, "-O3", "-ffp-contract=fast", "-shared", "-fPIC", str(src), "-o", str(lib)]
        # -march=native first (AVX-512/AVX2); a compiler that rejects it still gets a portable build.
        for extra in (["-march=native"], []):
            res = subprocess.run(base[:1] + extra + base[1:], capture_output=True, text=True, timeout=120)
            if res.returncode == 0:
                break
        else:
            raise RuntimeError(f"compiling the search kernel failed: {res.stderr[-500:]}")
        os.replace(lib, path)  # atomic: concurrent processes never load a half-written file


def _native():
    """The compiled kernel function, or ``None`` where it is disabled or unavailable."""
    if os.environ.get("SKDKVB_NATIVE", "1") == "0":
        return None
    with _native_lock:
        if "fn" not in _native_state:
            fn = None
            try:
                key = hashlib.sha256((_KERNEL_SOURCE + _cpu_signature()).encode()).hexdigest()[:16]
                path = _cache_dir() / f"search_{key}.so"
                if not path.exists():
                    _compile(path)
                fn = ctypes.CDLL(str(path)).skdkvb_nearest
                p, i64 = ctypes.c_void_p, ctypes.c_int64
                fn.argtypes = [p, i64, ctypes.c_int, p, p, i64, p, i64, i64, i64, i64]
                fn.restype = None
            except Exception as exc:  # no compiler, read-only cache, foreign platform...
                _native_state["error"] = repr(exc)
                fn = None
            _native_state["fn"] = fn
        return _native_state["fn"]


def search_backend(queries: torch.Tensor | None = None, top_k: int = 1) -> str:
    """Name of the back-end that :func:`nearest_keys` uses: ``"native"`` or ``"torch"``.

    Examples
    --------
    >>> import torch
    >>> search_backend(torch.zeros(1, 1, 2, dtype=torch.float64))
    'torch'
    """
    if queries is not None and (queries.device.type != "cpu" or queries.dtype != torch.float32):
        return "torch"
    if top_k != 1:
        return "torch"
    return "native" if _native() is not None else "torch"


_kt_cache: dict = {}


def _transposed_keys(keys, padded):
    """``-2 k`` laid out (C, d, M_padded), cached while the same keys tensor is unchanged.

    Predicting in blocks calls the search many times with the same keys; the
    cache holds a weak reference and the tensor's version counter, so new or
    modified keys are never served stale.
    """
    ref = _kt_cache.get("keys")
    if ref is not None and ref() is keys and _kt_cache["version"] == keys._version and _kt_cache["padded"] == padded:
        return _kt_cache["kt"]
    n_heads, n_keys, key_dim = keys.shape
    kt = torch.zeros((n_heads, key_dim, padded), dtype=torch.float32)
    kt[:, :, :n_keys] = keys.transpose(1, 2) * -2.0
    _kt_cache.update(keys=weakref.ref(keys), version=keys._version, padded=padded, kt=kt)
    return kt


def _native_search(fn, queries, keys, bias):
    global _pool
    n, n_heads, key_dim = queries.shape
    n_keys = keys.shape[1]
    padded = -(-n_keys // _LANES) * _LANES
    q = queries.contiguous()
    kt = _transposed_keys(keys, padded)
    b = torch.full((n_heads, padded), float("inf"), dtype=torch.float32)
    b[:, :n_keys] = bias
    out = torch.empty((n, n_heads), dtype=torch.long)
    args = (q.data_ptr(), n_heads, key_dim, kt.data_ptr(), b.data_ptr(), padded, out.data_ptr())
    n_threads = max(1, torch.get_num_threads())
    # Too little work to pay for a thread hand-off: run inline.
    if n_threads == 1 or n * n_heads * padded < 2**22:
        fn(*args, 0, n_heads, 0, n)
        return out
    if n_heads >= n_threads:  # split heads: each thread keeps its own heads' keys in cache
        cuts = [(n_heads * t // n_threads, n_heads * (t + 1) // n_threads, 0, n) for t in range(n_threads)]
    else:
        cuts = [(0, n_heads, n * t // n_threads, n * (t + 1) // n_threads) for t in range(n_threads)]
    with _native_lock:
        if _pool is None or _pool._max_workers < n_threads:
            _pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="skdkvb-search")
        pool = _pool
    futures = [pool.submit(fn, *args, *cut) for cut in cuts]
    for f in futures:
        f.result()
    return out


def _torch_search(queries, keys, bias, top_k, block_size):
    n, n_heads, key_dim = queries.shape
    n_keys = keys.shape[1]
    dtype = queries.dtype
    # [q, 1] . [-2k, ||k||^2] folds the bias into the product: one pass over the tile, not two.
    keys_aug = torch.cat([keys.to(dtype) * -2.0, bias.to(dtype).unsqueeze(-1)], -1).transpose(1, 2)  # (C, d+1, M)
    keys_aug = keys_aug.contiguous()
    item = torch.finfo(dtype).bits // 8
    if block_size is None:
        if queries.device.type == "cpu":
            # A tile of heads x samples small enough to be re-read from cache by argmin.
            block_size = min(64, max(1, n))
        else:
            block_size = block_size_for(n_heads, n_keys)
    budget = TILE_BYTES if queries.device.type == "cpu" else DEFAULT_BLOCK_BYTES
    head_chunk = max(1, min(n_heads, budget // (item * block_size * n_keys)))
    out = torch.empty((n, n_heads, top_k), dtype=torch.long, device=queries.device)
    ones = torch.ones((n_heads, min(block_size, n), 1), dtype=dtype, device=queries.device)
    buf = torch.empty((head_chunk, min(block_size, n), n_keys), dtype=dtype, device=queries.device)
    for start in range(0, n, block_size):
        q = queries[start : start + block_size].transpose(0, 1)  # (C, b, d)
        b = q.shape[1]
        q_aug = torch.cat([q, ones[:, :b]], -1)  # (C, b, d+1)
        for c0 in range(0, n_heads, head_chunk):
            c1 = min(n_heads, c0 + head_chunk)
            dist = buf[: c1 - c0, :b]
            torch.bmm(q_aug[c0:c1], keys_aug[c0:c1], out=dist)
            if top_k == 1:
                idx = dist.argmin(dim=-1, keepdim=True)
            else:
                idx = dist.topk(top_k, dim=-1, largest=False, sorted=True).indices
            out[start : start + b, c0:c1] = idx.transpose(0, 1)
    return out


def nearest_keys(
    queries: torch.Tensor,
    keys: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    top_k: int = 1,
    block_size: int | None = None,
) -> torch.Tensor:
    """Indices of the ``top_k`` nearest keys of each head for each query.

    Parameters
    ----------
    queries : Tensor of shape (n, C, d)
        One query per sample and head.
    keys : Tensor of shape (C, M, d)
        The codebook of each head.
    bias : Tensor of shape (C, M), optional
        ``||k||^2`` per key, ``+inf`` for keys that must never be selected
        (see :func:`key_scores_bias`); computed when omitted.
    top_k : int, default=1
        Number of keys per head, nearest first.
    block_size : int, optional
        Samples per block on the torch back-end; by default sized so that a
        distance tile stays in cache (CPU) or within 32 MiB (GPU). Ignored by
        the native kernel, which never materialises distances.

    Returns
    -------
    LongTensor of shape (n, C, top_k)

    Examples
    --------
    >>> import torch
    >>> keys = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])      # 1 head, 2 keys
    >>> q = torch.tensor([[[0.9, 0.8]], [[0.1, -0.2]]])       # 2 samples
    >>> nearest_keys(q, keys).flatten().tolist()
    [1, 0]
    """
    n, n_heads, _ = queries.shape
    n_keys = keys.shape[1]
    if top_k > n_keys:
        raise ValueError(f"top_k={top_k} exceeds the number of keys ({n_keys}).")
    if bias is None:
        bias = key_scores_bias(keys)
    if n == 0:
        return torch.empty((0, n_heads, top_k), dtype=torch.long, device=queries.device)
    if search_backend(queries, top_k) == "native" and keys.device.type == "cpu":
        return _native_search(_native(), queries, keys.float(), bias.float()).unsqueeze(-1)
    return _torch_search(queries, keys, bias, top_k, block_size)
