"""Key initialisation: where the frozen keys of each head come from.

Two methods are offered:

* ``"random"``: keys are queries of randomly drawn samples. Cheap, and already
  places keys where the data lives.
* ``"kmeans"``: EMA k-means as in VQ-VAE (decay 0.95, Laplace smoothing), the
  method of the DKVB paper. Keys that no sample selected during a whole epoch
  are re-seeded with random queries once per epoch. (Checking per batch, as the
  reference code does, re-seeds a large share of the keys every epoch when the
  number of keys is much larger than the batch, because most keys legitimately
  receive nothing from any single batch.)

Both take a ``query_fn(rows) -> Tensor (b, C, d)`` so the caller decides how
inputs are projected (dense or sparse, on which device) and no ``n x C x d``
query tensor has to be materialised.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ._search import nearest_keys

QueryFn = Callable[[np.ndarray], torch.Tensor]


#: A key further than this many robust radii from its head's median query is an
#: outlier's copy and gets re-seeded on a typical query.
_FAR = 20.0


def _robust_radius(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (C, M) of the rows of ``out`` (C, M, d) to their head's median, and their median (C, 1, 1)."""
    center = out.median(dim=1, keepdim=True).values
    dist = (out - center).norm(dim=-1)  # (C, M)
    return dist, dist.median(dim=1).values.view(-1, 1, 1)


def _sample_queries(query_fn: QueryFn, n: int, n_keys: int, rng: np.random.RandomState):
    """Queries of ``n_keys`` samples per head, drawn independently per head.

    Robust to outliers: the jitter that separates duplicated samples is scaled
    by the median distance to the median (not the standard deviation, which a
    single extreme sample inflates), and keys that land far from every typical
    query (copies of an outlier) are re-seeded on typical queries.
    """
    replace = n < n_keys
    # One draw of rows for all heads keeps this a single projection pass; heads
    # then differ through their projections.
    rows = rng.choice(n, size=n_keys, replace=replace)
    q = query_fn(rows)  # (M, C, d)
    out = q.transpose(0, 1).contiguous()  # (C, M, d)
    gen = torch.Generator().manual_seed(int(rng.randint(2**31 - 1)))
    dist, radius = _robust_radius(out)
    radius = radius.clamp_min(1e-12)
    far = dist > _FAR * radius.view(-1, 1)  # (C, M)
    if bool(far.any()):
        # Replace each far key by a typical one (the nearest-to-median rows, cycled).
        order = dist.argsort(dim=1)  # (C, M), most typical first
        n_typical = (~far).sum(dim=1, keepdim=True).clamp_min(1)
        pick = order.gather(1, torch.arange(out.shape[1], device=out.device).view(1, -1) % n_typical)
        typical = out.gather(1, pick.unsqueeze(-1).expand_as(out))
        out = torch.where(far.unsqueeze(-1), typical, out)
        replace = True  # the copies need the jitter below
    if replace:
        # Duplicated rows would give identical keys; a tiny jitter keeps them
        # distinct without moving them off the data.
        noise = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
        out = out + noise * (radius * 1e-3)
    return out


def init_keys_random(query_fn: QueryFn, n: int, n_keys: int, rng: np.random.RandomState):
    """Keys drawn from the queries of random samples.

    Parameters
    ----------
    query_fn : callable
        Maps an integer array of row indices to queries of shape (b, C, d).
    n : int
        Number of available samples.
    n_keys : int
        Keys per head (M).
    rng : numpy.random.RandomState

    Returns
    -------
    Tensor of shape (C, M, d)
    """
    return _sample_queries(query_fn, n, n_keys, rng)


def init_keys_kmeans(
    query_fn: QueryFn,
    n: int,
    n_keys: int,
    rng: np.random.RandomState,
    *,
    epochs: int = 10,
    batch_size: int = 1024,
    decay: float = 0.95,
    eps: float = 1e-5,
    verbose: int = 0,
) -> tuple[torch.Tensor, dict]:
    """EMA k-means (VQ-VAE style) over the queries of all heads at once.

    Parameters
    ----------
    query_fn : callable
        Maps an integer array of row indices to queries of shape (b, C, d).
    n : int
        Number of available samples.
    n_keys : int
        Keys per head (M).
    rng : numpy.random.RandomState
        Source of all randomness (initial keys, batch order, re-seeding).
    epochs : int, default=10
        Passes over the ``n`` samples.
    batch_size : int, default=1024
    decay : float, default=0.95
        EMA decay of the per-key counts and sums.
    eps : float, default=1e-5
        Laplace smoothing of the counts.
    verbose : int, default=0
        Show a progress bar over epochs when > 0.

    Returns
    -------
    keys : Tensor of shape (C, M, d)
    info : dict
        ``reseeded`` (keys re-seeded per epoch), ``usage`` (fraction of keys
        selected in the last epoch).
    """
    keys = _sample_queries(query_fn, n, n_keys, rng)
    if n <= n_keys:
        # Every sample is (a jittered copy of) a key already: k-means cannot
        # improve on that, and the keys beyond the n samples stay wasted.
        return keys.contiguous(), {"reseeded": [], "usage": n / n_keys, "skipped": "fewer samples than keys"}
    n_heads, _, key_dim = keys.shape
    device, dtype = keys.device, keys.dtype
    # Each key starts as a cluster holding one sample (itself): with zero
    # initial counts the first EMA steps would divide a decayed initial sum by
    # a tiny count and throw keys far away from the data.
    ema_count = torch.ones((n_heads, n_keys), device=device, dtype=dtype)
    ema_sum = keys.clone()
    head_offset = (torch.arange(n_heads, device=device, dtype=torch.int64) * n_keys).unsqueeze(0)  # (1, C)
    reseeded: list[int] = []
    usage_frac = 0.0
    for _ in tqdm(range(epochs), desc="key init", disable=not verbose):
        used = torch.zeros(n_heads * n_keys, device=device, dtype=torch.bool)
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            q = query_fn(rows)  # (b, C, d)
            idx = nearest_keys(q, keys)[:, :, 0]  # (b, C)
            flat = (idx + head_offset).reshape(-1)
            counts = torch.zeros(n_heads * n_keys, device=device, dtype=dtype)
            counts.index_add_(0, flat, torch.ones_like(flat, dtype=dtype))
            sums = torch.zeros((n_heads * n_keys, key_dim), device=device, dtype=dtype)
            sums.index_add_(0, flat, q.reshape(-1, key_dim))
            used[flat] = True
            ema_count.mul_(decay).add_(counts.view(n_heads, n_keys), alpha=1 - decay)
            ema_sum.mul_(decay).add_(sums.view(n_heads, n_keys, key_dim), alpha=1 - decay)
            total = ema_count.sum(dim=1, keepdim=True)
            smoothed = (ema_count + eps) / (total + n_keys * eps) * total
            keys = ema_sum / smoothed.unsqueeze(-1)
        dead = ~used.view(n_heads, n_keys)
        n_dead = int(dead.sum())
        reseeded.append(n_dead)
        usage_frac = 1.0 - n_dead / (n_heads * n_keys)
        if n_dead:
            fresh = _sample_queries(query_fn, n, n_keys, rng)  # (C, M, d)
            keys = torch.where(dead.unsqueeze(-1), fresh, keys)
            # A re-seeded key starts as a cluster of one average sample.
            mean_count = ema_count[~dead].mean() if n_dead < dead.numel() else torch.tensor(1.0, dtype=dtype)
            ema_count = torch.where(dead, mean_count.to(dtype), ema_count)
            ema_sum = torch.where(dead.unsqueeze(-1), fresh * ema_count.unsqueeze(-1), ema_sum)
    return keys.contiguous(), {"reseeded": reseeded, "usage": usage_frac}
