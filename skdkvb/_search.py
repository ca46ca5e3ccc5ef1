"""Nearest-key search: the hot path of DKVB.

Every query of every head is compared with all keys of that head. The squared
Euclidean distance ``||q||^2 - 2 q.k + ||k||^2`` is computed as one batched
matrix product per block of samples (``torch.baddbmm`` over heads), and
``||q||^2`` is dropped because it does not change the arg-min. Pruned keys get
an infinite norm so that they can never win, which costs nothing extra.

Work is split into blocks of samples so that the ``heads x block x keys``
distance tensor stays within a fixed memory budget whatever ``n`` is.
"""

from __future__ import annotations

import torch

#: Bytes that one block of the (heads, samples, keys) distance tensor may use.
DEFAULT_BLOCK_BYTES = 32 * 2**20


def block_size_for(n_heads: int, n_keys: int, budget: int = DEFAULT_BLOCK_BYTES) -> int:
    """Samples per block so that the distance block fits ``budget`` bytes."""
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
    """
    bias = keys.pow(2).sum(-1)
    if valid is not None:
        bias = bias.masked_fill(~valid, float("inf"))
    return bias


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
        ``||k||^2`` per key (see :func:`key_scores_bias`); computed when omitted.
    top_k : int, default=1
        Number of keys per head, nearest first.
    block_size : int, optional
        Samples per block; by default sized to a 32 MiB distance block.

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
    if bias is None:
        bias = key_scores_bias(keys)
    if top_k > n_keys:
        raise ValueError(f"top_k={top_k} exceeds the number of keys ({n_keys}).")
    if block_size is None:
        block_size = block_size_for(n_heads, n_keys)
    keys_t = keys.transpose(1, 2)  # (C, d, M)
    bias3 = bias.unsqueeze(1)  # (C, 1, M)
    out = torch.empty((n, n_heads, top_k), dtype=torch.long, device=queries.device)
    for start in range(0, n, block_size):
        q = queries[start : start + block_size].transpose(0, 1)  # (C, b, d)
        # bias - 2 q.k  (the ||q||^2 term does not move the arg-min)
        dist = torch.baddbmm(bias3, q, keys_t, beta=1.0, alpha=-2.0)  # (C, b, M)
        if top_k == 1:
            idx = dist.argmin(dim=-1, keepdim=True)
        else:
            idx = dist.topk(top_k, dim=-1, largest=False, sorted=True).indices
        out[start : start + block_size] = idx.transpose(0, 1)
    return out
