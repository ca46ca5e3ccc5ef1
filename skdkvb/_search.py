"""Nearest-key search, the hot path of DKVB: which key of each head is nearest to each query.

Every query of every head is compared with all keys of that head through the
squared distance ``||q||^2 - 2 q.k + ||k||^2``; ``||q||^2`` is dropped because
it does not move the arg-min, and pruned keys get an infinite ``||k||^2`` so
they can never win. With ``d = 14`` a distance costs 14 multiply-adds and is
then only compared once, so writing the ``(n, C, M)`` distances to memory and
reading them back for the arg-min costs more than computing them. Two
back-ends avoid most of that traffic:

* **native** (CPU, float32, ``top_k=1``): a small C++ kernel
  (``skdkvb/_kernels/search.cpp``, built by :mod:`skdkvb._native`). For each
  head it packs the keys once into a private buffer (blocks of one vector of
  keys holding ``-2 k`` lane by lane, then ``||k||^2``; 240 KB at the paper's
  size, so it stays in L2), then runs a register tile of 10 queries x 16 keys
  (AVX-512; 4 x 8 on AVX2) over it: the
  distances are fused multiply-adds (the key dimension 14 is unrolled at
  compile time) folded into a running per-lane minimum, so no distance ever
  leaves the registers. Heads are split over ``min(torch.get_num_threads(),
  usable CPUs)`` worker threads (ctypes releases the GIL). Nothing is cached
  between calls, so modified keys can never be served stale. Set
  ``SKDKVB_NATIVE=0`` to disable it. For ``1 < top_k <= 64`` a sibling
  kernel (``skdkvb_nearest_topk``) runs the same tiles and keeps each
  query's k best in registers (k in {2, 3, 4, 8}: per-lane sorted lists
  updated by masked shifts, merged at the end) or in a small sorted list:
  the k nearest, nearest first, ties to the lowest index; about 4x torch's
  ``bmm`` + ``topk`` at top-4.
* **native int8 / int16** (int8 by default; ``SKDKVB_SEARCH_PRECISION=int16``
  or ``float32`` to choose, CPUs with AVX-512 VNNI, detected at run time): an integer
  shortlist pass (``vpdpbusd``: 4 instructions per 16 keys instead of 14
  FMAs) with a rigorous error bound, then a float32 re-check of the
  shortlisted key blocks with the float32 kernel's own arithmetic, so the
  selected keys are bit-identical to the float32 kernel's
  (``skdkvb/_kernels/search_lp.h``). The bound takes each key's distance to
  the query into account, so few blocks are re-checked: 1.43-1.46x the
  float32 kernel on Gaussian data and 1.35x on Fashion-MNIST at the paper's
  size (quiet machine, see ``docs/performance.md``).
* **torch** (everything else, and the fallback when no compiler works): one
  ``bmm`` per tile of heads x samples against keys augmented with their norm
  (``[q, 1] . [-2k, ||k||^2]``), written into a preallocated tile buffer small
  enough to stay in cache, followed by ``argmin``/``topk`` on that tile.

Both give the brute-force answer up to floating-point rounding: results can
only differ where two distances are equal or within a few ulps.
"""

from __future__ import annotations

import torch

from . import _native
from ._threads import available_cpus

#: Bytes that one tile of the (heads, samples, keys) distance tensor may use on the torch path.
DEFAULT_BLOCK_BYTES = 32 * 2**20
#: Bytes of one cache-resident distance tile on the torch path (CPU).
TILE_BYTES = 8 * 2**20
#: Keys per vector of the native kernel (at most), for the threading threshold.
_LANES = 16


def block_size_for(n_heads: int, n_keys: int, budget: int = DEFAULT_BLOCK_BYTES) -> int:
    """Samples per block so that a ``(n_heads, block, n_keys)`` float32 block fits ``budget`` bytes.

    Parameters
    ----------
    n_heads : int
        Number of heads C.
    n_keys : int
        Keys per head M.
    budget : int, default=DEFAULT_BLOCK_BYTES
        Bytes the block may use.

    Returns
    -------
    int
        At least 1.

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
        The keys of every head.
    valid : bool Tensor of shape (C, M), optional
        Keys that may be selected. ``None`` means all.

    Returns
    -------
    Tensor of shape (C, M)
        ``||k||^2``, ``+inf`` where ``valid`` is False.

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


#: Largest ``top_k`` the native top-k kernel takes: it keeps each query's k best in a
#: sorted list, so its cost grows with k; torch's ``topk`` handles larger k.
NATIVE_MAX_TOP_K = 64


def search_backend(queries: torch.Tensor | None = None, top_k: int = 1) -> str:
    """Name of the back-end that :func:`nearest_keys` uses: ``"native"`` or ``"torch"``.

    Parameters
    ----------
    queries : Tensor, optional
        The queries to search for; only their device and dtype matter (the
        native kernel takes float32 CPU tensors).
    top_k : int, default=1
        Keys per head; the native kernels take up to
        :data:`NATIVE_MAX_TOP_K` (the nearest one, or the k nearest).

    Returns
    -------
    str
        ``"native"`` or ``"torch"``.

    Examples
    --------
    >>> import torch
    >>> search_backend(torch.zeros(1, 1, 2, dtype=torch.float64))
    'torch'
    """
    if queries is not None and (queries.device.type != "cpu" or queries.dtype != torch.float32):
        return "torch"
    if top_k == 1:
        return "native" if _native.nearest_fn() is not None else "torch"
    if top_k > NATIVE_MAX_TOP_K:
        return "torch"
    return "native" if _native.nearest_topk_fn() is not None else "torch"


def _native_search(fn, queries, keys, bias, *, lowp=None, stats=None, bits=None, top_k=None):
    """Run the native kernel, heads (or, with fewer heads than threads, samples) split over threads.

    ``top_k``: ``fn`` is the top-k kernel (``skdkvb_nearest_topk``) and the
    result has shape (n, C, top_k); None: the top-1 kernel, shape (n, C).

    ``lowp``: the integer kernel (``skdkvb_nearest_lp``) to use instead of ``fn``,
    with ``bits`` 8 or 16 (default: from :func:`skdkvb._native.search_precision`);
    ``stats``: an int64 tensor of 5 counters it adds to (see :func:`lowp_stats`).
    """
    n, n_heads, key_dim = queries.shape
    n_keys = keys.shape[1]
    q = queries.contiguous()
    k = keys.contiguous()
    b = bias.contiguous()
    out = torch.empty((n, n_heads) if top_k is None else (n, n_heads, top_k), dtype=torch.long)
    args = (q.data_ptr(), n_heads, key_dim, k.data_ptr(), b.data_ptr(), n_keys, out.data_ptr())
    if top_k is not None:
        args = (*args, top_k)
    n_threads = max(1, min(torch.get_num_threads(), available_cpus()))
    padded = -(-n_keys // _LANES) * _LANES
    # Too little work to pay for a thread hand-off: run inline. Packing a head's
    # keys costs about as much as searching 16 queries against them.
    if n_threads == 1 or (n + 16) * n_heads * padded < 2**22:
        cuts = [(0, n_heads, 0, n)]
    elif n_heads >= n_threads:  # split heads: each thread keeps its own heads' keys in cache
        cuts = [(n_heads * t // n_threads, n_heads * (t + 1) // n_threads, 0, n) for t in range(n_threads)]
    else:
        cuts = [(0, n_heads, n * t // n_threads, n * (t + 1) // n_threads) for t in range(n_threads)]
    if lowp is not None:
        # one row of counters per thread (no shared writes), summed afterwards
        counters = torch.zeros((len(cuts), 5), dtype=torch.int64)
        if bits is None:
            bits = 16 if _native.search_precision() == "int16" else 8
        cuts = [(*cut, counters[i].data_ptr(), bits) for i, cut in enumerate(cuts)]
        fn = lowp
    status = []
    _native.run_split(lambda *a: status.append(fn(*a)), args, cuts)
    if any(status):
        raise MemoryError(f"the native search could not allocate its {(key_dim + 1) * padded * 4} byte key buffer")
    if lowp is not None and stats is not None:
        stats += counters.sum(0)
    return out


def lowp_stats(queries: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None = None, *, bits: int = 8) -> dict:
    """Search with the integer (int8/int16) kernel and report how much float32 re-checking it needed.

    A diagnostic for benchmarks: the indices are those of :func:`nearest_keys`.

    Parameters
    ----------
    queries : Tensor of shape (n, C, d)
        float32 CPU queries.
    keys : Tensor of shape (C, M, d)
        The codebook of each head.
    bias : Tensor of shape (C, M), optional
        As for :func:`nearest_keys`.
    bits : {8, 16}, default=8
        Precision of the shortlist pass.

    Returns
    -------
    dict
        ``indices`` (LongTensor (n, C)), ``int8`` (query-heads searched in
        int8), ``blocks_rechecked`` (blocks of 16 keys re-computed in float32),
        ``fallback_queries`` and ``fallback_heads`` (sent to the float32
        kernel whole), ``blocks_shortlisted`` (blocks kept by the int8 pass's
        running threshold), ``blocks_per_query`` (mean re-checked blocks per int8
        query-head).

    Raises
    ------
    RuntimeError
        When the integer kernel is unavailable (see :func:`skdkvb._native.search_precision`).
    """
    fp = _native.nearest_fn()
    lowp = _native.state.get("nearest_lp") if fp is not None else None  # whatever SKDKVB_SEARCH_PRECISION says
    if lowp is None:
        raise RuntimeError("the integer search kernel is unavailable (no native kernels or no AVX-512 VNNI)")
    if bias is None:
        bias = key_scores_bias(keys)
    stats = torch.zeros(5, dtype=torch.int64)
    idx = _native_search(fp, queries, keys.float(), bias.float(), lowp=lowp, stats=stats, bits=bits)
    s = stats.tolist()
    return {
        "indices": idx,
        "int8": s[0],
        "blocks_rechecked": s[1],
        "fallback_queries": s[2],
        "fallback_heads": s[3],
        "blocks_shortlisted": s[4],
        "blocks_per_query": s[1] / max(1, s[0]),
    }


def _torch_search(queries, keys, bias, top_k, block_size):
    n, n_heads, _ = queries.shape
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
        Key indices per sample and head, nearest first; ties go to the lowest index.

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
        if top_k > 1:
            return _native_search(_native.nearest_topk_fn(), queries, keys.float(), bias.float(), top_k=top_k)
        fn, lowp = _native.nearest_fn(), _native.nearest_lp_fn()
        return _native_search(fn, queries, keys.float(), bias.float(), lowp=lowp).unsqueeze(-1)
    return _torch_search(queries, keys, bias, top_k, block_size)
