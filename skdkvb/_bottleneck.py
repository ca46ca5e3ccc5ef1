"""The torch module of the Discrete Key-Value Bottleneck.

``z (n, D) -> queries (n, C, d) -> key indices (n, C, k) -> values -> logits (n, K)``

Only the values are trained. Because the decoder is the mean of the selected
values, the logits are linear in the values and a sample touches exactly
``C * k`` value rows. :meth:`DiscreteKeyValueBottleneck.sgd_step` uses this to
apply the exact cross-entropy gradient to the touched rows only (an
``index_add_`` on the flattened value table), so untouched rows stay
bit-for-bit identical and a step costs ``O(batch * C * k * K)`` instead of the
``O(C * M * K)`` of a dense autograd update.

The module holds only the tables its decoder reads (``skdkvb._tables``): the
count decoders ``vote`` and ``logp`` keep the exact per-key class counts
``n[c, m, y]`` in a :class:`~skdkvb._tables.CountTable` (dense while small,
sparse beyond; its row totals are the usage that decides which keys are pruned
at prediction time) and decode by gathering the counts of the selected keys;
``sgd`` keeps its values in a :class:`~skdkvb._tables.ValueTable` (class blocks,
grown without copying) and a float64 usage vector. Memory formulas: the Memory
page of the user guide.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import _native
from ._search import key_scores_bias, nearest_keys
from ._tables import CountTable, ValueTable
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

# Entries of CountTable.state_dict() that are plain values (kept in config(), not as arrays).
_COUNT_META = ("layout", "auto", "dense_max_cells", "shape", "switch_cap")


def _add_dense_counts(table: CountTable, counts: torch.Tensor) -> None:
    """Add a dense (n_rows, K) float64 count array into ``table`` (its nonzero cells only)."""
    if bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
        raise ValueError("counts must be finite and >= 0.")
    r, c = torch.nonzero(counts, as_tuple=True)
    if r.numel():
        table.add(r.view(-1, 1), c, counts[r, c])


def _to_numpy(x) -> np.ndarray:
    """A numpy array of ``x`` (a view where possible); bfloat16 tensors as their int16 bit patterns."""
    if isinstance(x, np.ndarray):
        return x
    t = torch.as_tensor(x).detach().cpu()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _np_rows(block: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU block (bfloat16 as its int16 bits)."""
    return (block.view(torch.int16) if block.dtype == torch.bfloat16 else block).numpy()


def _take_rows(block: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of ``block[rows]``. On the CPU through numpy: torch's row gather measured 10 ms
    against 0.06 ms for 5,000 rows of a 2**20-row table on 2 busy cores."""
    if block.device.type != "cpu":
        return block[rows].clone()
    out = torch.from_numpy(_np_rows(block)[rows.numpy()])
    return out.view(torch.bfloat16) if block.dtype == torch.bfloat16 else out


def _put_rows(block: torch.Tensor, rows: torch.Tensor, old: torch.Tensor) -> None:
    """``block[rows] = old`` (numpy on the CPU, see :func:`_take_rows`)."""
    if block.device.type != "cpu":
        block[rows] = old
        return
    _np_rows(block)[rows.numpy()] = _np_rows(old)


def _write_values(table: ValueTable, values: torch.Tensor) -> None:
    """Copy a dense (n_rows, K) value array into the segments of ``table``."""
    for start, stop, block in table.segments():
        block[:, : stop - start] = values[:, start:stop].to(block.dtype)


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
    """C heads of M frozen keys with the tables of one decoder.

    The tables follow the decoder (see the Memory page of the user guide):

    * ``logp`` / ``vote``: a :class:`~skdkvb._tables.CountTable` of exact per-key
      class counts (dense float64 while small, an exact sparse store once the
      classes grow) and nothing else; predictions gather the counts of the
      selected keys only.
    * ``sgd``: a :class:`~skdkvb._tables.ValueTable` of trainable values (class
      blocks, allocated lazily and grown geometrically, never copied) and a
      float64 per-key usage vector for pruning.

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
        Initial number of classes; grown with :meth:`add_classes`.
    projection : {"random", "chunk"}, default="random"
        A fixed random projection per head, or equal slices of the input.
    top_k : int, default=1
        Keys selected per head.
    values_dtype : {"float32", "float16", "bfloat16"}, default="float32"
        Storage of the value table of ``decoder="sgd"`` (unused otherwise).
        Gradients and softmax are computed in float32.
    decoder : {"logp", "vote", "sgd"}, default="logp"
        Decides which tables exist: counts for ``logp``/``vote`` (which share
        them), values and usage for ``sgd``.
    generator : torch.Generator, optional
        Source of the random projection.

    Attributes
    ----------
    projection : Tensor of shape (D, C*d) or None
        Fixed projection (``None`` in chunk mode).
    keys : Tensor of shape (C, M, d)
        Frozen keys (a buffer, never trained).
    count_table : CountTable or None
        Class counts of the count decoders (rows ``c * M + m``).
    value_table : ValueTable or None
        Values of ``sgd`` (rows ``c * M + m``).

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
        decoder: str = "logp",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if values_dtype not in VALUES_DTYPES:
            raise ValueError(f"values_dtype must be one of {tuple(VALUES_DTYPES)}, got {values_dtype!r}.")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}.")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}.")
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
        self.decoder = decoder
        if projection == "random":
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            self.register_buffer("projection", random_projection(n_features, n_heads, key_dim, gen))
        else:
            self.register_buffer("projection", None)
        self.register_buffer("keys", torch.zeros((n_heads, n_keys, key_dim), dtype=torch.float32))
        n_rows = n_heads * n_keys
        self.count_table = None
        self.value_table = None
        self._usage = None
        if decoder == "sgd":
            self.value_table = ValueTable(n_rows, n_classes, dtype=VALUES_DTYPES[values_dtype])
            # float64: sums of integer weights are exact and order-independent (merge == sequential).
            self._usage = torch.zeros(n_rows, dtype=torch.float64)
        else:
            self.count_table = CountTable(n_rows, n_classes)
        self._journal = None

    @property
    def counts_based(self) -> bool:
        """Whether this module holds class counts (``logp``/``vote``) rather than values (``sgd``)."""
        return self.count_table is not None

    def _apply(self, fn, recurse=True):
        # Module.to / .cuda / .cpu move the buffers; the tables follow the keys' device.
        super()._apply(fn, recurse)
        dev = self.keys.device
        if self.count_table is not None and self.count_table.device != dev:
            self.count_table = self.count_table.to(dev)
        if self.value_table is not None and self.value_table.device != dev:
            self.value_table = self.value_table.to(dev)
        if self._usage is not None and self._usage.device != dev:
            self._usage = self._usage.to(dev)
        return self

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        """Constructor arguments (plain values) that rebuild this module, and the tables' layout.

        Returns
        -------
        dict
            Keyword arguments of the constructor, plus ``"table"``: plain
            values describing the table layout (read by :meth:`from_state`).
        """
        cfg = {
            "n_features": self.n_features,
            "n_heads": self.n_heads,
            "n_keys": self.n_keys,
            "key_dim": self.key_dim,
            "n_classes": self.n_classes,
            "projection": self.projection_mode,
            "top_k": self.top_k,
            "values_dtype": self.values_dtype,
            "decoder": self.decoder,
        }
        if self.count_table is not None:
            d = self.count_table.state_dict()
            cfg["table"] = {
                "kind": "counts",
                "layout": str(d["layout"]),
                "auto": bool(d["auto"]),
                "dense_max_cells": int(d["dense_max_cells"]),
                "switch_cap": int(d["switch_cap"]),
            }
        else:
            cfg["table"] = {"kind": "values", "max_block_bytes": int(self.value_table.max_block_bytes)}
        return cfg

    def arrays(self) -> dict:
        """The module's numeric state as named numpy arrays, views of the live tensors on the CPU.

        No table is copied (on other devices each tensor is copied to the host
        once). Used by pickle, :mod:`skdkvb.persistence` and tests; treat the
        arrays as read only.

        Returns
        -------
        dict of str to numpy.ndarray
            ``projection`` (random projection only), ``keys``, then either
            ``counts.<name>`` (the :class:`CountTable` arrays) or ``usage``
            and ``values.block_<i>`` (bfloat16 blocks as their int16 bit patterns).
        """
        out = {}
        if self.projection is not None:
            out["projection"] = self.projection.detach().cpu().numpy()
        out["keys"] = self.keys.detach().cpu().numpy()
        if self.count_table is not None:
            for k, v in self.count_table.state_dict().items():
                if k not in _COUNT_META:
                    out[f"counts.{k}"] = v
        else:
            out["usage"] = self._usage.detach().cpu().numpy()
            for k, v in self.value_table.state_dict().items():
                if k.startswith("block_"):
                    out[f"values.{k}"] = v
        return out

    @classmethod
    def from_state(cls, config: dict, state: dict, device="cpu", *, copy: bool = True) -> DiscreteKeyValueBottleneck:
        """Rebuild a module from :meth:`config` and :meth:`arrays` on ``device``.

        Also reads the state of earlier versions: a config without
        ``decoder``/``table`` with dense ``values`` and ``counts`` of shape
        (C, M, K) (pass the estimator's decoder in ``config["decoder"]``).

        Parameters
        ----------
        config : dict
            The output of :meth:`config`.
        state : dict of str to array or Tensor
            Arrays named as in :meth:`arrays`.
        device : str or torch.device, default="cpu"
            Where the module goes.
        copy : bool, default=True
            Copy the arrays; False lets the module use writable, contiguous
            CPU arrays in place (unpickling fresh arrays).

        Returns
        -------
        DiscreteKeyValueBottleneck
            The rebuilt module.
        """
        config = dict(config)
        table = config.pop("table", None)
        decoder = config.setdefault("decoder", "logp")
        n_classes = int(config.pop("n_classes"))
        module = cls(**config)
        state = {k: _to_numpy(v) for k, v in state.items()}
        expected = {"keys"} | ({"projection"} if module.projection is not None else set())
        for name in expected:
            if name not in state:
                raise ValueError(f"bottleneck state lacks the tensor {name!r}.")
            want = tuple(getattr(module, name).shape)
            if tuple(state[name].shape) != want:
                raise ValueError(f"bottleneck tensor {name!r} has shape {tuple(state[name].shape)}, expected {want}.")
            getattr(module, name).copy_(torch.as_tensor(np.asarray(state[name])).to(torch.float32))
        n_rows = module.n_heads * module.n_keys
        rest = {k: v for k, v in state.items() if k not in expected}
        if table is None:  # an earlier version: dense (C, M, K) values and counts
            module._load_dense(rest, n_classes)
        elif table.get("kind") == "counts" and decoder != "sgd":
            sd = {k[len("counts.") :]: v for k, v in rest.items() if k.startswith("counts.")}
            if len(sd) != len(rest):
                raise ValueError(f"bottleneck state has tensors {sorted(rest)} outside the count table.")
            sd.update(
                layout=np.array(table["layout"]),
                auto=np.array(bool(table["auto"])),
                dense_max_cells=np.array(int(table["dense_max_cells"]), dtype=np.int64),
                switch_cap=np.array(int(table["switch_cap"]), dtype=np.int64),
                shape=np.array([n_rows, n_classes], dtype=np.int64),
            )
            module.count_table = CountTable._from_state(sd, "cpu", copy=copy)
        elif table.get("kind") == "values" and decoder == "sgd":
            sd = {k[len("values.") :]: v for k, v in rest.items() if k.startswith("values.")}
            if set(rest) != {f"values.{k}" for k in sd} | {"usage"}:
                raise ValueError(f"bottleneck state has tensors {sorted(rest)}, expected usage and value blocks.")
            sd.update(
                shape=np.array([n_rows, n_classes], dtype=np.int64),
                dtype=np.array(str(VALUES_DTYPES[module.values_dtype])),
            )
            vt = ValueTable._from_state(sd, "cpu", copy=copy)
            vt.max_block_bytes = int(table.get("max_block_bytes", vt.max_block_bytes))
            usage = np.asarray(rest["usage"])
            if usage.shape != (n_rows,):
                raise ValueError(f"bottleneck tensor 'usage' has shape {usage.shape}, expected ({n_rows},).")
            module.value_table = vt
            module._usage = torch.as_tensor(np.array(usage, dtype=np.float64, copy=True))
        else:
            raise ValueError(f"bottleneck table kind {table.get('kind')!r} does not match decoder={decoder!r}.")
        return module.to(device)

    def _load_dense(self, state: dict, n_classes: int) -> None:
        """Fill the tables from the dense (C, M, K) ``values`` and ``counts`` of earlier versions."""
        if set(state) != {"values", "counts"}:
            raise ValueError(f"bottleneck state has tensors {sorted(state)}, expected ['counts', 'values'].")
        shape = (self.n_heads, self.n_keys, n_classes)
        for name in ("values", "counts"):
            if tuple(state[name].shape) != shape:
                raise ValueError(f"bottleneck tensor {name!r} has shape {tuple(state[name].shape)}, expected {shape}.")
        counts = torch.as_tensor(np.asarray(state["counts"])).to(torch.float64).reshape(-1, n_classes)
        if self.count_table is not None:
            self.count_table.add_classes(n_classes)
            _add_dense_counts(self.count_table, counts)
        else:
            values = torch.as_tensor(np.asarray(state["values"]))
            if values.dtype == torch.int16 and self.values_dtype == "bfloat16":
                values = values.view(torch.bfloat16)
            self.value_table.add_classes(n_classes)
            _write_values(self.value_table, values.reshape(-1, n_classes))
            self._usage = counts.sum(1)

    def with_decoder(self, decoder: str) -> DiscreteKeyValueBottleneck:
        """A new module with this one's projection and keys and empty tables for ``decoder``.

        Parameters
        ----------
        decoder : {"logp", "vote", "sgd"}
            The decoder of the new module.

        Returns
        -------
        DiscreteKeyValueBottleneck
            A new module (this one is unchanged); only valid before any class was added.
        """
        if self.n_classes:
            raise ValueError("with_decoder needs a module without classes; refit to change the decoder.")
        cfg = self.config()
        del cfg["table"], cfg["n_classes"]
        cfg["decoder"] = decoder
        new = type(self)(**cfg)
        if self.projection is not None:
            new.projection.copy_(self.projection)
        new.keys.copy_(self.keys)
        return new.to(self.keys.device)

    @property
    def n_classes(self) -> int:
        """Number of classes (columns of the table)."""
        table = self.count_table if self.count_table is not None else self.value_table
        return table.n_classes

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
        """Append ``n_new`` empty classes: amortised O(1), no copy of the existing columns.

        Parameters
        ----------
        n_new : int
            Columns to add; nothing happens when <= 0.
        """
        if n_new <= 0:
            return
        table = self.count_table if self.count_table is not None else self.value_table
        table.add_classes(int(n_new))

    # ------------------------------------------------------------ transactions
    # A training call is all-or-nothing without copying the tables: the count
    # table takes an O(1) snapshot (restore undoes counts, growth and a layout
    # switch); for sgd, the usage vector is replaced (never updated in place),
    # the rows an update will touch are saved first, and a class growth is undone
    # by truncating the value table.
    def begin(self) -> None:
        """Start recording what the next updates change (see :meth:`rollback`)."""
        if self._journal is not None:
            self.commit()
        journal = {"n_classes": self.n_classes, "usage": self._usage, "undo": [], "token": None}
        if self.count_table is not None:
            journal["token"] = (self.count_table, self.count_table.snapshot())
        self._journal = journal

    def save_rows(self, rows: torch.Tensor) -> None:
        """Record the current content of some rows of the value table, for :meth:`rollback`.

        Parameters
        ----------
        rows : Tensor
            Rows (``c * M + m``) of the value table; duplicates allowed.
        """
        if self._journal is None or self.value_table is None:
            return
        # Unique rows: the record is bounded by the table, whatever the batch size.
        rows = _unique_inverse(rows.reshape(-1))[0].long().to(self.keys.device)
        for _, _, block in self.value_table.segments():
            self._journal["undo"].append((block, rows, _take_rows(block, rows)))

    def commit(self) -> None:
        """Forget the journal: the updates since :meth:`begin` stay."""
        journal, self._journal = self._journal, None
        if journal is not None and journal["token"] is not None:
            table, token = journal["token"]
            with contextlib.suppress(ValueError):  # the table was replaced meanwhile: nothing to keep
                table.release(token)

    def rollback(self) -> None:
        """Undo every update since :meth:`begin` (class growth, counts, usage, SGD steps)."""
        journal = self._journal
        if journal is None:
            return
        if journal["token"] is not None:
            table, token = journal["token"]
            table.restore(token)
            self.count_table = table
        else:
            for block, rows, old in reversed(journal["undo"]):
                _put_rows(block, rows, old)
            self.value_table.truncate_classes(journal["n_classes"])
            self._usage = journal["usage"]
        self._journal = None

    # ------------------------------------------------- compatibility views
    @property
    def usage(self) -> torch.Tensor:
        """Total (weighted) number of training samples that selected each key, (C, M) float64 (read only)."""
        u = self.count_table.usage() if self.count_table is not None else self._usage
        return u.reshape(self.n_heads, self.n_keys)

    @property
    def counts(self) -> torch.Tensor:
        """Dense (C, M, K) float64 class counts, built on demand (a copy: small models and tests only).

        Only the count decoders keep counts; an ``sgd`` module raises
        AttributeError. Assigning a dense (C, M, K) tensor replaces the counts.
        """
        if self.count_table is None:
            raise AttributeError("an sgd bottleneck keeps no class counts (only per-key usage, see .usage).")
        return self.count_table.to_dense().view(self.n_heads, self.n_keys, self.n_classes)

    @counts.setter
    def counts(self, dense: torch.Tensor) -> None:
        self.set_counts(dense)

    def set_counts(self, dense: torch.Tensor) -> None:
        """Replace the class counts by a dense (C, M, K) table (tests and small models).

        Parameters
        ----------
        dense : Tensor of shape (C, M, K)
            Non-negative finite counts; K becomes the number of classes.
        """
        if self.count_table is None:
            raise AttributeError("an sgd bottleneck keeps no class counts.")
        dense = torch.as_tensor(dense)
        if dense.dim() != 3 or tuple(dense.shape[:2]) != (self.n_heads, self.n_keys):
            raise ValueError(f"counts must have shape ({self.n_heads}, {self.n_keys}, K), got {tuple(dense.shape)}.")
        table = CountTable(
            self.n_heads * self.n_keys, dense.shape[2], device=self.keys.device,
            dense_max_cells=self.count_table.dense_max_cells,
        )  # fmt: skip
        _add_dense_counts(table, dense.to(device=self.keys.device, dtype=torch.float64).reshape(-1, dense.shape[2]))
        self.count_table = table

    @property
    def values(self) -> torch.Tensor:
        """The values (C, M, K) of ``sgd``: a view when the table has one block, else a copy (read only)."""
        if self.value_table is None:
            raise AttributeError(f"a {self.decoder!r} bottleneck keeps no value table (only class counts).")
        return self.value_table.view().reshape(self.n_heads, self.n_keys, self.n_classes)

    def values_view(self) -> torch.Tensor:
        """The value table as rows of the flattened heads.

        Returns
        -------
        Tensor of shape (C * M, K)
            A view when the table has one block, else a copy.
        """
        return self.value_table.view()

    def nbytes(self) -> int:
        """Bytes held by the tensors of the module (projection, keys, tables, usage).

        Returns
        -------
        int
            Total bytes.
        """
        total = sum(t.numel() * t.element_size() for t in (self.projection, self.keys) if t is not None)
        if self.count_table is not None:
            return total + self.count_table.nbytes()
        return total + self.value_table.nbytes() + self._usage.numel() * self._usage.element_size()

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
        # ||k||^2 of the frozen keys, cached per keys tensor and version (C * M * d work per call
        # otherwise: 0.1 s at the paper size on a busy 2-core machine).
        keys = self.keys
        cached = self.__dict__.get("_norms")
        if cached is None or cached[0] is not keys or cached[1] != keys._version:
            cached = (keys, keys._version, key_scores_bias(keys))
            self.__dict__["_norms"] = cached
        bias = cached[2]
        if not prune:
            return bias
        valid = self.usage > 0
        # A head with no trained key at all keeps all keys selectable.
        valid = valid | ~valid.any(dim=1, keepdim=True)
        return bias.masked_fill(~valid, float("inf"))

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
        decoder: str | None = None,
        *,
        smoothing: float = 0.1,
        block_size: int = 4096,
    ) -> torch.Tensor:
        """Scores (n, K) from key indices (n, C, k).

        ``sgd``: mean of the selected values (the paper's decoder).
        ``vote``: mean over the selected keys of their smoothed class frequencies.
        ``logp``: sum over the selected keys of their log smoothed class frequencies.
        The count decoders gather the counts of the selected keys only (never a
        ``C x M x K`` table).

        Parameters
        ----------
        idx : Tensor of shape (n, C, k)
            Per-head key indices.
        decoder : {"sgd", "vote", "logp"}, default=None
            The decoder (None: the module's). ``vote`` and ``logp`` need a
            count module, ``sgd`` an sgd module.
        smoothing : float, default=0.1
            Additive smoothing of the count decoders.
        block_size : int, default=4096
            Rows decoded at a time.

        Returns
        -------
        Tensor of shape (n, K)
            float32 scores.
        """
        decoder = self.decoder if decoder is None else decoder
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}.")
        if (decoder == "sgd") == (self.count_table is not None):
            raise ValueError(
                f"decoder={decoder!r} cannot read a bottleneck built for decoder={self.decoder!r}: "
                f"{'sgd needs a value table' if decoder == 'sgd' else 'the count decoders need class counts'}. "
                "Refit with the decoder you want."
            )
        n = idx.shape[0]
        n_classes = self.n_classes
        if decoder != "sgd":
            # float32 scores, computed from float64 counts by the table, block by block.
            return self.count_table.scores(self.flat_index(idx), decoder, smoothing)
        out = torch.empty((n, n_classes), device=self.keys.device, dtype=torch.float32)
        segments = self.value_table.segments()
        for start in range(0, n, block_size):
            flat = self.flat_index(idx[start : start + block_size])
            # embedding_bag reduces the C*k selected rows without materialising
            # the (n, C*k, K) gather; each block is read as a whole (row length = width).
            for lo, hi, block in segments:
                out[start : start + block_size, lo:hi] = F.embedding_bag(flat, block, mode="mean")[:, : hi - lo]
        return out

    def forward(self, z: torch.Tensor, decoder: str | None = None, prune: bool = False, smoothing: float = 0.1):
        """Scores of inputs: project, look up, decode.

        Parameters
        ----------
        z : Tensor of shape (n, D)
            Inputs.
        decoder : {"sgd", "vote", "logp"}, default=None
            The decoder (None: the module's).
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
            ``sgd`` trains the values (and counts the key usage); the count
            decoders add the batch to the class counts. Must match the module.
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
        if (decoder == "sgd") == (self.count_table is not None):
            raise ValueError(f"decoder={decoder!r} cannot train a bottleneck built for decoder={self.decoder!r}.")
        self._add_counts_unchecked(idx, y, torch.as_tensor(weight, device=device, dtype=torch.float64))
        if decoder != "sgd":
            return [{"call": call, "epoch": 0, "n_samples": n, "loss": None}]
        w = torch.as_tensor(weight, device=device, dtype=torch.float32)
        # Rows of the flattened value table, once per call (C * M < 2**31).
        flat = self.flat_index(idx).to(torch.int32)
        self.save_rows(flat)  # the undo record: only the rows this call can touch
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

        Count modules update their class counts; an ``sgd`` module keeps only
        the per-key usage (the sample totals), which this updates. Shapes and
        bounds are checked; the estimator's validated loop calls
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
        flat = self.flat_index(idx)  # (n, C*k)
        w = weight.to(device=flat.device, dtype=torch.float64)
        if self.count_table is not None:
            self.count_table.add(flat, y, w)  # all-or-nothing; the snapshot of begin() undoes it
            return
        # sgd: only the key usage (pruning). A new tensor, published by one assignment.
        self._usage = self._usage.index_add(0, flat.reshape(-1), w.view(-1, 1).expand(flat.shape).reshape(-1))

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
        segments = self.value_table.segments()
        native = all(_native_applies(block) for _, _, block in segments)
        # (b, S) rows of the flattened table: given directly by callers that
        # flattened once per call (int32), or computed from (b, C, k).
        flat = idx if idx.dim() == 2 else self.flat_index(idx)
        flat32 = flat.to(torch.int32).contiguous() if native else None
        logits = torch.empty((b, n_classes), dtype=torch.float32, device=self.keys.device)
        for lo, hi, block in segments:
            part = _gather_rows_native(block, flat32, head_mask) if native else None
            if part is None:
                # embedding_bag reduces the selected rows without materialising (b, S, K).
                mask = None if head_mask is None else head_mask.to(block.dtype)
                part = F.embedding_bag(flat.long(), block, per_sample_weights=mask, mode="sum")
            logits[:, lo:hi] = part[:, : hi - lo]
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

        def padded(g, lo, hi, width):
            """Columns [lo, hi) of ``g`` with zero padding up to the block width (padding stays 0)."""
            if hi - lo == width:
                return g[:, lo:hi]
            out = torch.zeros((g.shape[0], width), dtype=g.dtype, device=g.device)
            out[:, : hi - lo] = g[:, lo:hi]
            return out

        # No clipping possible: every occurrence goes straight into the table
        # (duplicates accumulate), with no sort and no host sync.
        if clip_free and native and _native.scatter_fn() is not None:
            for lo, hi, block in segments:
                _scatter_rows_native(block, flat32, padded(g_logits, lo, hi, block.shape[1]), head_mask, -lr / n_sel)
            return loss
        flat = flat.long()
        if clip_free:
            for lo, hi, block in segments:
                k = hi - lo
                g_sel = g_logits[:, lo:hi].unsqueeze(1).expand(b, n_sel, k) / n_sel
                if head_mask is not None:
                    g_sel = g_sel * head_mask.unsqueeze(-1)
                cells = (flat.unsqueeze(-1) * block.shape[1] + torch.arange(k, device=flat.device)).reshape(-1)
                block.view(-1).index_add_(0, cells, g_sel.reshape(-1).to(block.dtype), alpha=-lr)
            return loss
        g_sel = g_logits.unsqueeze(1).expand(b, n_sel, n_classes) / n_sel
        if head_mask is not None:
            g_sel = g_sel * head_mask.unsqueeze(-1)
        rows, inverse = _unique_inverse(flat.reshape(-1))
        rows = rows.to(flat.device)
        grad = torch.zeros((rows.numel(), n_classes), device=flat.device, dtype=g_sel.dtype)
        grad.index_add_(0, inverse.to(flat.device), g_sel.reshape(-1, n_classes))
        scale = lr
        norm = float(grad.norm())
        if norm > grad_clip:
            scale = lr * grad_clip / (norm + 1e-6)
        for lo, hi, block in segments:
            block.index_add_(0, rows, padded(grad, lo, hi, block.shape[1]).to(block.dtype), alpha=-scale)
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
