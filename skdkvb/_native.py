"""Small native CPU kernels, compiled once per machine and loaded with ctypes.

Two hot loops of DKVB are memory-bound in a way that a chain of torch ops
cannot avoid (each op writes its result to memory for the next to read back):

* ``skdkvb_nearest``: the nearest-key search (see :mod:`skdkvb._search`);
* ``skdkvb_gather_rows`` / ``skdkvb_scatter_rows``: reading and updating the
  selected value rows in an SGD step (see
  :meth:`skdkvb.DiscreteKeyValueBottleneck.sgd_step`), head by head so that
  one head's block of the value table stays in cache.

The C++ source below is compiled with the system compiler (``-O3
-march=native``, falling back to a portable build), cached under
``~/.cache/skdkvb`` (or ``$SKDKVB_CACHE_DIR``) keyed by the source and the CPU,
and written atomically so that concurrent processes never load a half-written
library. Without a working compiler, or with ``SKDKVB_NATIVE=0``, every caller
falls back to its pure-torch path.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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

#define PREFETCH 8
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* row[0:K] += c * v[0:K]. With AVX-512 and K <= 16 a row is one masked
   vector load/FMA/store instead of K scalar steps. */
static inline void axpy_row(float *row, const float *v, float c, int64_t K)
{
#if defined(__AVX512F__)
    if (K <= 16) {
        __mmask16 m = (__mmask16)((1u << K) - 1u);
        __m512 r = _mm512_maskz_loadu_ps(m, row);
        __m512 x = _mm512_maskz_loadu_ps(m, v);
        _mm512_mask_storeu_ps(row, m, _mm512_fmadd_ps(_mm512_set1_ps(c), x, r));
        return;
    }
#endif
    for (int64_t k = 0; k < K; k++) row[k] += c * v[k];
}

/* SGD update of the mean decoder: for every sample i and selection s,
   table[flat[i, s], :] += alpha * coef[i, s] * g[i, :] (coef = 1 when NULL).
   Loops run selection-major: selections of one head index one head's block
   of the table (M * K floats, 160 KB at the paper's size), which then stays
   in L2 while all samples of the batch update it; sample-major order would
   jump across the whole table (tens of MB) on every row. Selections
   [s0, s1) must cover whole heads so that threads own disjoint rows. */
extern "C" void skdkvb_scatter_rows(float *table, int64_t K, const int32_t *flat,
                                    int64_t B, int64_t S, const float *g,
                                    const float *coef, float alpha,
                                    int64_t s0, int64_t s1)
{
    for (int64_t s = s0; s < s1; s++) {
        for (int64_t i = 0; i < B; i++) {
            /* rows are random within the head's block: fetch ahead so that
               several cache misses are in flight at once */
            if (i + PREFETCH < B) __builtin_prefetch(table + (int64_t)flat[(i + PREFETCH) * S + s] * K, 1);
            float c = coef ? alpha * coef[i * S + s] : alpha;
            float *row = table + (int64_t)flat[i * S + s] * K;
            axpy_row(row, g + i * K, c, K);
        }
    }
}

/* out[i, :] = sum_s coef[i, s] * table[flat[i, s], :] (coef = 1 when NULL),
   selection-major for the same cache reason. out must be zeroed. */
extern "C" void skdkvb_gather_rows(const float *table, int64_t K, const int32_t *flat,
                                   int64_t B, int64_t S, const float *coef, float *out)
{
    for (int64_t s = 0; s < S; s++) {
        for (int64_t i = 0; i < B; i++) {
            if (i + PREFETCH < B) __builtin_prefetch(table + (int64_t)flat[(i + PREFETCH) * S + s] * K, 0);
            float c = coef ? coef[i * S + s] : 1.0f;
            const float *row = table + (int64_t)flat[i * S + s] * K;
            axpy_row(out + i * K, row, c, K);
        }
    }
}
"""


lock = threading.Lock()
#: ``nearest``/``scatter``/``gather``: the loaded functions (None when unavailable); ``error``: why.
state: dict = {}


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
            raise RuntimeError(f"compiling the native kernels failed: {res.stderr[-500:]}")
        os.replace(lib, path)  # atomic: concurrent processes never load a half-written file


def _load() -> None:
    """Compile (once) and load the library into :data:`state`; never raises."""
    if "nearest" in state:
        return
    nearest = scatter = gather = None
    try:
        key = hashlib.sha256((_KERNEL_SOURCE + _cpu_signature()).encode()).hexdigest()[:16]
        path = _cache_dir() / f"kernels_{key}.so"
        if not path.exists():
            _compile(path)
        lib = ctypes.CDLL(str(path))
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        nearest = lib.skdkvb_nearest
        nearest.argtypes = [p, i64, ctypes.c_int, p, p, i64, p, i64, i64, i64, i64]
        nearest.restype = None
        scatter = lib.skdkvb_scatter_rows
        scatter.argtypes = [p, i64, p, i64, i64, p, p, ctypes.c_float, i64, i64]
        scatter.restype = None
        gather = lib.skdkvb_gather_rows
        gather.argtypes = [p, i64, p, i64, i64, p, p]
        gather.restype = None
    except Exception as exc:  # no compiler, read-only cache, foreign platform...
        state["error"] = repr(exc)
        nearest = scatter = gather = None
    state["nearest"] = nearest
    state["scatter"] = scatter
    state["gather"] = gather


def _function(name):
    if os.environ.get("SKDKVB_NATIVE", "1") == "0":
        return None
    with lock:
        _load()
        return state[name]


def nearest_fn():
    """The compiled search kernel, or ``None`` where disabled or unavailable."""
    return _function("nearest")


def scatter_fn():
    """The compiled row-scatter kernel, or ``None`` where disabled or unavailable."""
    return _function("scatter")


def gather_fn():
    """The compiled row-gather kernel, or ``None`` where disabled or unavailable."""
    return _function("gather")


_pool: ThreadPoolExecutor | None = None


def run_split(fn, args, ranges) -> None:
    """Call ``fn(*args, *r)`` for every range ``r``, one worker thread per range.

    ctypes releases the GIL during the call, so the ranges run in parallel.
    A single range runs inline (no hand-off cost).
    """
    global _pool
    if len(ranges) == 1:
        fn(*args, *ranges[0])
        return
    with lock:
        if _pool is None or _pool._max_workers < len(ranges):
            _pool = ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="skdkvb-native")
        pool = _pool
    for future in [pool.submit(fn, *args, *r) for r in ranges]:
        future.result()
