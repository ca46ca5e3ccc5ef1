"""The torch module of the Discrete Key-Value Bottleneck.

``z (n, D) -> queries (n, C, d) -> key indices (n, C, k) -> values -> logits (n, K)``

Only the values are trained. Because the decoder is the mean of the selected
values, the logits are linear in the values and a sample touches exactly
``C * k`` value rows. :meth:`DiscreteKeyValueBottleneck.sgd_step` uses this to
apply the exact cross-entropy gradient to the touched rows only (an
``index_add_`` on the flattened value table), so untouched rows stay
bit-for-bit identical and a step costs ``O(batch * C * k * K)`` instead of the
``O(C * M * K)`` of a dense autograd update.

Besides the values, the module keeps per-key class counts ``n[c, m, y]`` (the
sufficient statistic of the count decoders ``vote`` and ``logp``, and the
usage that decides which keys are pruned at prediction time).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import _native
from ._search import key_scores_bias, nearest_keys
from ._threads import cap_torch_threads

# Never run more torch threads than the CPUs this process may use (affinity,
# cgroup quota): oversubscribed cores made small ops 2-30x slower under load.
# Runs once, when the core is first imported; SKDKVB_NUM_THREADS=N sets the
# cap, 0 leaves torch alone, and a later torch.set_num_threads wins.
cap_torch_threads()

DECODERS = ("sgd", "vote", "logp")
VALUES_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROJECTIONS = ("random", "chunk")

#: Rows searched (and decoded) per block: bounds the memory of predict/fit in n.
BLOCK_ROWS = 8192


def random_projection(n_features: int, n_heads: int, key_dim: int, generator: torch.Generator):
    """Gaussian projections ``D -> d`` for each head with L2-normalised columns.

    Returns
    -------
    Tensor of shape (D, C * d)
        Column ``c * d + j`` is the ``j``-th direction of head ``c``.
    """
    proj = torch.randn((n_features, n_heads * key_dim), generator=generator, dtype=torch.float32)
    return proj / proj.norm(dim=0, keepdim=True).clamp_min(1e-12)


def _unique_inverse(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(x, return_inverse=True)`` of a 1-D integer tensor.

    On CPU this goes through :func:`numpy.unique`: with more than one torch
    thread, ``torch.sort``/``torch.unique`` of the ~65 000 indices of a batch
    took 100x longer than single-threaded (140 ms against 1.4 ms on 2 busy
    cores), which made it the bulk of every SGD step.
    """
    if x.device.type == "cpu":
        rows, inverse = np.unique(x.numpy(), return_inverse=True)
        return torch.from_numpy(rows), torch.from_numpy(inverse.reshape(-1))
    return torch.unique(x, return_inverse=True)


def _native_applies(table) -> bool:
    return table.device.type == "cpu" and table.dtype == torch.float32 and table.is_contiguous()


def _gather_rows_native(table, flat, mask):
    """``sum_s mask[i, s] * table[flat[i, s]]`` (b, K) with the native kernel, or None.

    ``flat`` must be a contiguous int32 tensor (the kernels take 32-bit rows).
    """
    fn = _native.gather_fn() if _native_applies(table) else None
    if fn is None:
        return None
    coef = None if mask is None else mask.to(torch.float32).contiguous()
    out = torch.zeros((flat.shape[0], table.shape[1]), dtype=torch.float32)
    fn(table.data_ptr(), table.shape[1], flat.data_ptr(), flat.shape[0], flat.shape[1],
       None if coef is None else coef.data_ptr(), out.data_ptr())  # fmt: skip
    return out


def _scatter_rows_native(table, flat, g, mask, alpha) -> bool:
    """``table[flat[i, s]] += alpha * mask[i, s] * g[i]`` with the native kernel.

    Returns False (and does nothing) where the kernel does not apply: not a
    contiguous float32 CPU table, or no compiler. ``flat`` is contiguous int32.
    """
    fn = _native.scatter_fn() if _native_applies(table) else None
    if fn is None:
        return False
    g = g.to(torch.float32).contiguous()
    coef = None if mask is None else mask.to(torch.float32).contiguous()
    b, n_sel = flat.shape
    args = (
        table.data_ptr(), table.shape[1], flat.data_ptr(), b, n_sel, g.data_ptr(),
        None if coef is None else coef.data_ptr(), float(alpha),
    )  # fmt: skip
    # One thread: the update is bound by cache latency, and splitting heads
    # over threads measured no faster on 2 cores.
    fn(*args, 0, n_sel)
    return True


class DiscreteKeyValueBottleneck(nn.Module):
    """C heads of M frozen keys with trainable values and a mean decoder.

    Parameters
    ----------
    n_features : int
        Dimension D of the (encoded) input.
    n_heads : int
        Number of heads C.
    n_keys : int
        Keys per head M.
    key_dim : int
        Key dimension d. With ``projection="chunk"`` it must equal ``D // C``.
    n_classes : int, default=0
        Initial number of value columns; grown with :meth:`add_classes`.
    projection : {"random", "chunk"}, default="random"
        A fixed random projection per head, or equal slices of the input.
    top_k : int, default=1
        Keys selected per head.
    values_dtype : {"float32", "float16", "bfloat16"}, default="float32"
        Storage of the value table (C * M * K numbers, the largest tensor with
        many classes). Gradients and softmax are computed in float32.
    generator : torch.Generator, optional
        Source of the random projection.

    Attributes
    ----------
    projection : Tensor of shape (D, C*d) or None
        Fixed projection (``None`` in chunk mode).
    keys : Tensor of shape (C, M, d)
        Frozen keys (a buffer, never trained).
    values : Parameter of shape (C, M, K)
        Trainable values, zero-initialised.
    counts : Tensor of shape (C, M, K)
        Sample-weighted class counts per key.

    Examples
    --------
    >>> import torch
    >>> from skdkvb._bottleneck import DiscreteKeyValueBottleneck
    >>> m = DiscreteKeyValueBottleneck(8, n_heads=4, n_keys=16, key_dim=2, n_classes=3,
    ...                                generator=torch.Generator().manual_seed(0))
    >>> m.set_keys(torch.randn(4, 16, 2, generator=torch.Generator().manual_seed(1)))
    >>> m(torch.randn(5, 8)).shape
    torch.Size([5, 3])
    """

    def __init__(
        self,
        n_features: int,
        n_heads: int,
        n_keys: int,
        key_dim: int,
        n_classes: int = 0,
        projection: str = "random",
        top_k: int = 1,
        values_dtype: str = "float32",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if values_dtype not in VALUES_DTYPES:
            raise ValueError(f"values_dtype must be one of {tuple(VALUES_DTYPES)}, got {values_dtype!r}.")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}.")
        if projection == "chunk" and n_features != n_heads * key_dim:
            raise ValueError(
                f"projection='chunk' splits the {n_features} input features into "
                f"{n_heads} heads, which needs n_features == n_heads * key_dim "
                f"({n_heads} * {key_dim} = {n_heads * key_dim})."
            )
        self.n_features = n_features
        self.n_heads = n_heads
        self.n_keys = n_keys
        self.key_dim = key_dim
        self.projection_mode = projection
        self.top_k = top_k
        self.values_dtype = values_dtype
        if projection == "random":
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            self.register_buffer("projection", random_projection(n_features, n_heads, key_dim, gen))
        else:
            self.register_buffer("projection", None)
        self.register_buffer("keys", torch.zeros((n_heads, n_keys, key_dim), dtype=torch.float32))
        self.values = nn.Parameter(
            torch.zeros((n_heads, n_keys, n_classes), dtype=VALUES_DTYPES[values_dtype]), requires_grad=False
        )
        # float64: sums of integer weights are exact and order-independent (merge == sequential).
        self.register_buffer("counts", torch.zeros((n_heads, n_keys, n_classes), dtype=torch.float64))
        self._journal = None

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        """Constructor arguments (plain values) that rebuild this module.

        Returns
        -------
        dict
            Keyword arguments of the constructor.
        """
        return {
            "n_features": self.n_features,
            "n_heads": self.n_heads,
            "n_keys": self.n_keys,
            "key_dim": self.key_dim,
            "n_classes": self.n_classes,
            "projection": self.projection_mode,
            "top_k": self.top_k,
            "values_dtype": self.values_dtype,
        }

    @classmethod
    def from_state(cls, config: dict, state: dict, device="cpu") -> DiscreteKeyValueBottleneck:
        """Rebuild a module from :meth:`config` and a ``state_dict`` on ``device``.

        Parameters
        ----------
        config : dict
            The output of :meth:`config`.
        state : dict
            Tensors named as in ``state_dict()``, with the shapes ``config`` implies.
        device : str or torch.device, default="cpu"
            Where the module goes.

        Returns
        -------
        DiscreteKeyValueBottleneck
            The rebuilt module.
        """
        module = cls(**config)
        expected = {k: v for k, v in module.state_dict().items()}
        if set(state) != set(expected):
            raise ValueError(f"bottleneck state has tensors {sorted(state)}, expected {sorted(expected)}.")
        for k, v in expected.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(
                    f"bottleneck tensor {k!r} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}."
                )
        module.load_state_dict({k: torch.as_tensor(state[k]).to(expected[k].dtype) for k in expected}, strict=True)
        return module.to(device)

    @property
    def n_classes(self) -> int:
        """Number of value (and count) columns."""
        return self.values.shape[-1]

    # -------------------------------------------------------------- structure
    def set_keys(self, keys: torch.Tensor) -> None:
        """Install (frozen) keys.

        Parameters
        ----------
        keys : Tensor of shape (C, M, d)
            The keys of every head.
        """
        expected = (self.n_heads, self.n_keys, self.key_dim)
        if tuple(keys.shape) != expected:
            raise ValueError(f"keys must have shape {expected}, got {tuple(keys.shape)}.")
        self.keys.copy_(keys.to(self.keys))

    def add_classes(self, n_new: int) -> None:
        """Append ``n_new`` zero value columns (and count columns).

        New tensors are built, so the previous ones stay intact (a rollback
        simply puts them back).

        Parameters
        ----------
        n_new : int
            Columns to add; nothing happens when <= 0.
        """
        if n_new <= 0:
            return
        pad = (0, n_new)
        self.values = nn.Parameter(F.pad(self.values.data, pad), requires_grad=False)
        self.counts = F.pad(self.counts, pad)

    # ------------------------------------------------------------ transactions
    # The storage interface the estimator uses (``add_classes``, ``add_counts``,
    # ``usage``, ``decode``, ``values_view``) keeps the count and value tables
    # swappable; the journal below makes a training call all-or-nothing without
    # copying the tables: growth builds new tensors (the old ones stay intact),
    # in-place updates first save the rows they will touch.
    def begin(self) -> None:
        """Start recording what the next updates change (see :meth:`rollback`)."""
        self._journal = {"tensors": (self.values, self.counts), "undo": []}

    def save_rows(self, name: str, rows: torch.Tensor) -> None:
        """Record the current content of some rows of a table, for :meth:`rollback`.

        Parameters
        ----------
        name : {"values", "counts"}
            The table.
        rows : Tensor
            Rows of the table flattened to ``(C * M, K)``; duplicates allowed.
        """
        if self._journal is None:
            return
        table = getattr(self, name).data
        flat = table.view(-1, table.shape[-1])
        # Unique rows: the record is bounded by the table, whatever the batch size.
        rows = _unique_inverse(rows.reshape(-1))[0].long()
        self._journal["undo"].append((flat, rows, flat[rows].clone()))

    def commit(self) -> None:
        """Forget the journal: the updates since :meth:`begin` stay."""
        self._journal = None

    def rollback(self) -> None:
        """Undo every update since :meth:`begin` (class growth, counts, SGD steps)."""
        journal, self._journal = self._journal, None
        if journal is None:
            return
        for flat, rows, old in reversed(journal["undo"]):
            flat[rows] = old
        self.values, self.counts = journal["tensors"]

    def values_view(self) -> torch.Tensor:
        """The value table as rows of the flattened heads.

        Returns
        -------
        Tensor of shape (C * M, K)
            A view (no copy) of the values.
        """
        return self.values.data.view(-1, self.n_classes)

    @property
    def usage(self) -> torch.Tensor:
        """Total (weighted) number of training samples that selected each key, (C, M)."""
        return self.counts.sum(-1)

    # ----------------------------------------------------------------- lookup
    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Queries of every head.

        Parameters
        ----------
        z : Tensor of shape (n, D)
            Inputs, dense or sparse CSR.

        Returns
        -------
        Tensor of shape (n, C, d)
            The queries.
        """
        if self.projection is None:
            return z.reshape(z.shape[0], self.n_heads, self.key_dim)
        return (z @ self.projection).view(z.shape[0], self.n_heads, self.key_dim)

    def search_bias(self, prune: bool) -> torch.Tensor:
        """Per-key bias of the nearest-key search.

        Parameters
        ----------
        prune : bool
            Make never-trained keys unselectable (unless a head has none trained).

        Returns
        -------
        Tensor of shape (C, M)
            ``||k||^2`` per key, ``inf`` for pruned keys.
        """
        valid = None
        if prune:
            valid = self.usage > 0
            # A head with no trained key at all keeps all keys selectable.
            valid = valid | ~valid.any(dim=1, keepdim=True)
        return key_scores_bias(self.keys, valid)

    def lookup(self, queries: torch.Tensor, *, prune: bool = False, bias=None) -> torch.Tensor:
        """Indices of the nearest keys of each head.

        Parameters
        ----------
        queries : Tensor of shape (n, C, d)
            The queries.
        prune : bool, default=False
            Skip never-trained keys.
        bias : Tensor of shape (C, M), optional
            A precomputed :meth:`search_bias` (then ``prune`` is ignored).

        Returns
        -------
        Tensor of shape (n, C, k)
            Key indices in ``[0, M)``.
        """
        if bias is None:
            bias = self.search_bias(prune)
        return nearest_keys(queries, self.keys, bias, top_k=self.top_k)

    def flat_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows of the flattened tables selected by per-head key indices.

        Parameters
        ----------
        idx : Tensor of shape (n, C, k)
            Per-head key indices.

        Returns
        -------
        Tensor of shape (n, C * k)
            Rows in ``[0, C * M)`` (int64).
        """
        offset = torch.arange(self.n_heads, device=idx.device, dtype=torch.int64).view(1, -1, 1) * self.n_keys
        return (idx.long() + offset).reshape(idx.shape[0], -1)

    # ----------------------------------------------------------------- decode
    def decode(
        self,
        idx: torch.Tensor,
        decoder: str = "sgd",
        *,
        smoothing: float = 0.1,
        block_size: int = 4096,
    ) -> torch.Tensor:
        """Scores (n, K) from key indices (n, C, k).

        ``sgd``: mean of the selected values (the paper's decoder).
        ``vote``: mean over the selected keys of their smoothed class frequencies.
        ``logp``: sum over the selected keys of their log smoothed class frequencies.

        Parameters
        ----------
        idx : Tensor of shape (n, C, k)
            Per-head key indices.
        decoder : {"sgd", "vote", "logp"}, default="sgd"
            The decoder.
        smoothing : float, default=0.1
            Additive smoothing of the count decoders.
        block_size : int, default=4096
            Rows decoded at a time.

        Returns
        -------
        Tensor of shape (n, K)
            float32 scores.
        """
        n = idx.shape[0]
        n_classes = self.n_classes
        # Scores are float32 whatever the value storage: the counts (and the
        # summed logs of logp) must not be rounded to a half-precision table's dtype.
        out = torch.empty((n, n_classes), device=self.keys.device, dtype=torch.float32)
        if decoder == "sgd":
            table = self.values.reshape(-1, n_classes)
            mode = "mean"
        else:
            counts = self.counts.reshape(-1, n_classes)
            freq = (counts + smoothing) / (counts.sum(-1, keepdim=True) + n_classes * smoothing)
            if decoder == "vote":
                table, mode = freq, "mean"
            elif decoder == "logp":
                table, mode = freq.log(), "sum"
            else:
                raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}.")
        for start in range(0, n, block_size):
            flat = self.flat_index(idx[start : start + block_size])
            # embedding_bag reduces the C*k selected rows without materialising
            # the (n, C*k, K) gather.
            out[start : start + block_size] = F.embedding_bag(flat, table, mode=mode)
        return out

    def forward(self, z: torch.Tensor, decoder: str = "sgd", prune: bool = False, smoothing: float = 0.1):
        """Scores of inputs: project, look up, decode.

        Parameters
        ----------
        z : Tensor of shape (n, D)
            Inputs.
        decoder : {"sgd", "vote", "logp"}, default="sgd"
            The decoder.
        prune : bool, default=False
            Skip never-trained keys.
        smoothing : float, default=0.1
            Additive smoothing of the count decoders.

        Returns
        -------
        Tensor of shape (n, K)
            float32 scores.
        """
        return self.decode(self.lookup(self.project(z), prune=prune), decoder, smoothing=smoothing)

    # ----------------------------------------------- batch-level core API
    # The estimator validates inputs, labels, parameters and the device, and
    # owns the rollback; the core offers "key indices / scores of this batch"
    # and "learn from this batch". ``queries_of(rows: slice) -> (b, C, d)``
    # maps a block of rows to queries (the estimator's input transform and
    # sparse handling live there).
    def search_blocks(self, queries_of, n: int, *, prune: bool, verbose: int = 0):
        """Yield ``(rows, idx)``: each block's slice and its key indices (b, C, k).

        Only one block's queries and indices exist at a time, so memory is
        bounded by :data:`BLOCK_ROWS` whatever ``n`` is.

        Parameters
        ----------
        queries_of : callable
            Maps a slice of rows to their queries, a tensor of shape (b, C, d).
        n : int
            Number of rows.
        prune : bool
            Skip never-trained keys.
        verbose : int, default=0
            Show a progress bar when > 0.

        Yields
        ------
        rows : slice
            The block's rows.
        idx : Tensor of shape (b, C, k)
            Their key indices.
        """
        bias = self.search_bias(prune)
        starts = range(0, n, BLOCK_ROWS)
        with torch.no_grad():
            for start in tqdm(starts, desc="key search", disable=not verbose, leave=False):
                rows = slice(start, start + BLOCK_ROWS)
                yield rows, self.lookup(queries_of(rows), bias=bias)

    def batch_indices(self, queries_of, n: int, *, prune: bool, verbose: int = 0) -> torch.Tensor:
        """Key indices of all rows, searched block by block.

        Parameters
        ----------
        queries_of : callable
            Maps a slice of rows to their queries, a tensor of shape (b, C, d).
        n : int
            Number of rows.
        prune : bool
            Skip never-trained keys.
        verbose : int, default=0
            Show a progress bar when > 0.

        Returns
        -------
        Tensor of shape (n, C, k)
            int32 key indices.
        """
        out = torch.empty((n, self.n_heads, self.top_k), dtype=torch.int32, device=self.keys.device)
        for rows, idx in self.search_blocks(queries_of, n, prune=prune, verbose=verbose):
            out[rows] = idx.to(torch.int32)
        return out

    def batch_scores(
        self, queries_of, n: int, decoder: str, *, smoothing: float, prune: bool, verbose: int = 0
    ) -> torch.Tensor:
        """Decoded scores of all rows, searched and decoded block by block.

        Parameters
        ----------
        queries_of : callable
            Maps a slice of rows to their queries, a tensor of shape (b, C, d).
        n : int
            Number of rows.
        decoder : {"sgd", "vote", "logp"}
            The decoder.
        smoothing : float
            Additive smoothing of the count decoders.
        prune : bool
            Skip never-trained keys.
        verbose : int, default=0
            Show a progress bar when > 0.

        Returns
        -------
        Tensor of shape (n, K)
            float32 scores.
        """
        out = torch.empty((n, self.n_classes), dtype=torch.float32, device=self.keys.device)
        for rows, idx in self.search_blocks(queries_of, n, prune=prune, verbose=verbose):
            out[rows] = self.decode(idx, decoder, smoothing=smoothing)
        return out

    def learn(
        self,
        idx: torch.Tensor,
        y: torch.Tensor,
        weight: np.ndarray,
        *,
        decoder: str,
        epochs: int,
        rng: np.random.RandomState,
        lr: float,
        label_smoothing: float,
        batch_size: int,
        grad_clip: float | None,
        dropout: float,
        shuffle: bool,
        call: str = "partial_fit",
        verbose: int = 0,
    ) -> list[dict]:
        """Learn from one validated batch: count it, then (``sgd``) run the epochs over its cached indices.

        ``idx`` (n, C, k) are the batch's key indices, ``y`` (n,) int64 class
        positions, ``weight`` (n,) float64 host weights; all already checked by
        the caller (this is the unchecked fast path). ``rng`` drives shuffling
        and the dropout seed. Every in-place update is journaled when a
        transaction is open (:meth:`begin`).

        Parameters
        ----------
        idx : Tensor of shape (n, C, k)
            Key indices of the batch.
        y : Tensor of shape (n,)
            Class positions (int64) in ``[0, K)``.
        weight : ndarray of shape (n,)
            Sample weights (float64, on the host).
        decoder : {"sgd", "vote", "logp"}
            Only ``sgd`` trains the values; every decoder counts.
        epochs : int
            SGD passes over the batch.
        rng : numpy.random.RandomState
            Shuffling and dropout seed.
        lr : float
            SGD learning rate.
        label_smoothing : float
            Label smoothing of the cross-entropy.
        batch_size : int
            Mini-batch size.
        grad_clip : float or None
            Maximum gradient norm per step.
        dropout : float
            Probability of dropping a selected value.
        shuffle : bool
            Shuffle between epochs.
        call : str, default="partial_fit"
            Name recorded in the history rows.
        verbose : int, default=0
            Show a progress bar when > 0.

        Returns
        -------
        list of dict
            History rows, one per epoch (``loss`` None for the count decoders).
        """
        device = self.keys.device
        n = idx.shape[0]
        self._add_counts_unchecked(idx, y, torch.as_tensor(weight, device=device, dtype=torch.float64))
        if decoder != "sgd":
            return [{"call": call, "epoch": 0, "n_samples": n, "loss": None}]
        w = torch.as_tensor(weight, device=device, dtype=torch.float32)
        # Rows of the flattened value table, once per call (C * M < 2**31).
        flat = self.flat_index(idx).to(torch.int32)
        self.save_rows("values", flat)  # the undo record: only the rows this call can touch
        keep = 1.0 - dropout
        mask_gen = None
        if dropout:
            mask_gen = torch.Generator(device=device).manual_seed(int(rng.randint(2**31 - 1)))
        n_sel = self.n_heads * self.top_k
        w_sq = np.asarray(weight, dtype=np.float64) ** 2  # per-batch sums feed the clip bound without a sync
        rows = []
        for epoch in tqdm(range(epochs), desc=call, disable=not verbose):
            order = rng.permutation(n) if shuffle else np.arange(n)
            order_t = torch.as_tensor(order, device=device)
            total = torch.zeros((), device=device, dtype=torch.float32)
            sq = w_sq[order]
            for start in range(0, n, batch_size):
                b = order_t[start : start + batch_size]
                mask = None
                if mask_gen is not None:
                    draw = torch.rand((len(b), n_sel), generator=mask_gen, device=device, dtype=torch.float32)
                    mask = (draw < keep).float() / keep
                total += len(b) * self._sgd_step_unchecked(
                    flat[b],
                    y[b],
                    w[b],
                    lr=lr,
                    label_smoothing=label_smoothing,
                    grad_clip=grad_clip,
                    head_mask=mask,
                    weight_sq_sum=float(sq[start : start + batch_size].sum()),
                    mask_scale=1.0 / keep,
                )
            # One host sync per epoch, not per step.
            rows.append({"call": call, "epoch": epoch, "n_samples": n, "loss": float(total) / max(n, 1)})
        return rows

    # --------------------------------------------------------------- training
    def _check_batch(self, idx: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> None:
        """Shapes and bounds of a batch given to a public training method."""
        n_sel = self.n_heads * self.top_k
        b = idx.shape[0]
        if idx.dim() == 3 and tuple(idx.shape[1:]) == (self.n_heads, self.top_k):
            bound = self.n_keys
        elif idx.dim() == 2 and idx.shape[1] == n_sel:
            bound = self.n_heads * self.n_keys
        else:
            raise ValueError(
                f"idx must have shape (b, {self.n_heads}, {self.top_k}) or (b, {n_sel}), got {tuple(idx.shape)}."
            )
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise TypeError(f"idx must be an integer tensor, got {idx.dtype}.")
        if b and (int(idx.min()) < 0 or int(idx.max()) >= bound):
            raise IndexError(f"idx holds key indices outside [0, {bound}).")
        if tuple(y.shape) != (b,) or tuple(weight.shape) != (b,):
            raise ValueError(f"y and weight must have shape ({b},), got {tuple(y.shape)} and {tuple(weight.shape)}.")
        if b and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
            raise IndexError(f"y holds class positions outside [0, {self.n_classes}).")
        if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
            raise ValueError("weight must be finite and non-negative.")

    @torch.no_grad()
    def add_counts(self, idx: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> None:
        """Add each sample's weight to the count of its class at its selected keys.

        Shapes and bounds are checked; the estimator's validated loop calls
        :meth:`_add_counts_unchecked`.

        Parameters
        ----------
        idx : Tensor of shape (b, C, k)
            Per-head key indices in ``[0, M)``.
        y : Tensor of shape (b,)
            Class positions in ``[0, K)``.
        weight : Tensor of shape (b,)
            Non-negative sample weights.
        """
        self._check_batch(idx, y, weight)
        if idx.dim() == 2:
            raise ValueError("add_counts takes per-head indices of shape (b, C, k).")
        self._add_counts_unchecked(idx, y, weight)

    def _add_counts_unchecked(self, idx, y, weight) -> None:
        n_classes = self.n_classes
        flat = self.flat_index(idx)  # (n, C*k)
        cells = (flat * n_classes + y.view(-1, 1).long()).reshape(-1)
        w = weight.to(self.counts.dtype).view(-1, 1).expand(flat.shape).reshape(-1)
        counts = self.counts.view(-1)
        if self._journal is not None:
            # The cells' values before the update; duplicated cells restore the same value.
            self._journal["undo"].append((counts.view(-1, 1), cells, counts[cells].view(-1, 1).clone()))
        counts.index_add_(0, cells, w)

    @torch.no_grad()
    def sgd_step(
        self,
        idx: torch.Tensor,
        y: torch.Tensor,
        weight: torch.Tensor,
        *,
        lr: float,
        label_smoothing: float = 0.0,
        grad_clip: float | None = 1.0,
        head_mask: torch.Tensor | None = None,
        weight_sq_sum: float | None = None,
        mask_scale: float | None = None,
    ) -> torch.Tensor:
        """One SGD step of the mean decoder on a batch; returns the batch loss (0-d tensor).

        The loss is the weighted mean cross-entropy with label smoothing,
        ``sum_i w_i CE_i / batch``. Its gradient with respect to a value row is
        ``sum over (i, c, j) selecting that row of w_i (p_i - t_i) * mask / (batch * C * k)``,
        applied only to the rows the batch selected. The gradient norm over all
        values is clipped to ``grad_clip`` as ``clip_grad_norm_`` would.

        Parameters
        ----------
        idx : LongTensor (b, C, k), or (b, C*k) rows of the flattened table
            The selected keys per head, or already flattened rows (int32 or
            int64; :meth:`flat_index`), which callers running many epochs
            compute once.
        y : LongTensor (b,)
            Class positions in ``[0, K)``.
        weight : Tensor (b,)
            Non-negative sample weights.
        lr, label_smoothing, grad_clip
            SGD learning rate, CE label smoothing, max gradient norm (None: off).
        head_mask : Tensor (b, C*k), optional
            Dropout mask over the selected values, already scaled by 1/(1-p).
        weight_sq_sum, mask_scale : float, optional
            ``sum(weight**2)`` and the mask's largest entry, when the caller
            knows them on the host (saves a device sync per step on GPU).

        Returns
        -------
        Tensor
            The batch loss (0-d).
        """
        self._check_batch(idx, y, weight)
        if head_mask is not None and tuple(head_mask.shape) != (idx.shape[0], self.n_heads * self.top_k):
            raise ValueError(f"head_mask must have shape {(idx.shape[0], self.n_heads * self.top_k)}.")
        return self._sgd_step_unchecked(
            idx, y, weight, lr=lr, label_smoothing=label_smoothing, grad_clip=grad_clip,
            head_mask=head_mask, weight_sq_sum=weight_sq_sum, mask_scale=mask_scale,
        )  # fmt: skip

    @torch.no_grad()
    def _sgd_step_unchecked(
        self, idx, y, weight, *, lr, label_smoothing=0.0, grad_clip=1.0, head_mask=None,
        weight_sq_sum=None, mask_scale=None,
    ):  # fmt: skip
        """:meth:`sgd_step` without the bounds checks (the estimator's validated loop)."""
        b = idx.shape[0]
        n_classes = self.n_classes
        n_sel = self.n_heads * self.top_k
        table = self.values.data.view(-1, n_classes)
        # (b, S) rows of the flattened table: given directly by callers that
        # flattened once per call (int32), or computed from (b, C, k).
        flat = idx if idx.dim() == 2 else self.flat_index(idx)
        flat32 = flat.to(torch.int32).contiguous() if _native_applies(table) else None
        logits = _gather_rows_native(table, flat32, head_mask)
        if logits is None:
            # embedding_bag reduces the selected rows without materialising (b, S, K).
            flat = flat.long()
            mask = None if head_mask is None else head_mask.to(table.dtype)
            logits = F.embedding_bag(flat, table, per_sample_weights=mask, mode="sum").float()
        logits = logits / n_sel
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.full_like(logp, label_smoothing / n_classes)
        hit = torch.full((b, 1), 1.0 - label_smoothing, device=logp.device, dtype=logp.dtype)
        target.scatter_add_(1, y.view(-1, 1), hit)
        w = weight.to(logp.dtype)
        loss = -(w.unsqueeze(1) * target * logp).sum() / b
        # d loss / d logits, then spread over the selected rows.
        g_logits = (logp.exp() - target) * (w / b).unsqueeze(1)  # (b, K)
        clip_free = grad_clip is None or self._clip_cannot_trigger(
            weight, head_mask, grad_clip, n_sel, weight_sq_sum=weight_sq_sum, mask_scale=mask_scale
        )
        # No clipping possible: every occurrence goes straight into the table
        # (duplicates accumulate), with no sort and no host sync.
        if clip_free and _scatter_rows_native(table, flat32, g_logits, head_mask, -lr / n_sel):
            return loss
        flat = flat.long()
        g_sel = g_logits.unsqueeze(1).expand(b, n_sel, n_classes) / n_sel
        if head_mask is not None:
            g_sel = g_sel * head_mask.unsqueeze(-1)
        if clip_free:
            cells = (flat.unsqueeze(-1) * n_classes + torch.arange(n_classes, device=flat.device)).reshape(-1)
            self.values.data.view(-1).index_add_(0, cells, g_sel.reshape(-1).to(table.dtype), alpha=-lr)
            return loss
        rows, inverse = _unique_inverse(flat.reshape(-1))
        grad = torch.zeros((rows.numel(), n_classes), device=table.device, dtype=g_sel.dtype)
        grad.index_add_(0, inverse, g_sel.reshape(-1, n_classes))
        scale = lr
        norm = float(grad.norm())
        if norm > grad_clip:
            scale = lr * grad_clip / (norm + 1e-6)
        table.index_add_(0, rows, grad.to(table.dtype), alpha=-scale)
        return loss

    @staticmethod
    def _clip_cannot_trigger(weight, head_mask, grad_clip, n_sel, *, weight_sq_sum=None, mask_scale=None) -> bool:
        """Whether the gradient norm is provably below ``grad_clip``.

        With ``g_i = (p_i - t_i) w_i / b`` and ``||p_i - t_i||^2 <= 2``, a row
        receives at most one occurrence per sample, so by Cauchy-Schwarz
        ``||grad||^2 <= 2 m^2 sum_i w_i^2 / (b * n_sel)`` (``m`` the largest
        dropout scale). For the paper's 256 heads and unit weights the bound is
        0.09, far below the clip of 1, and the exact (sorting) path is skipped.
        """
        b = weight.shape[0]
        # Callers that know these on the host pass them: no device sync per step.
        if mask_scale is None:
            mask_scale = 1.0 if head_mask is None else float(head_mask.max())
        if weight_sq_sum is None:
            weight_sq_sum = float(weight.double().pow(2).sum())
        bound2 = 2.0 * mask_scale * mask_scale * weight_sq_sum / (b * n_sel)
        return bound2 <= grad_clip * grad_clip
