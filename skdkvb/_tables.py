"""Growing per-key tables of the bottleneck: exact class counts (dense or sparse) and the sgd value table.

Layout choice (``CountTable(layout="auto")``): the counts stay a dense float64 array while
``n_rows * capacity <= dense_max_cells`` (2**24 cells = 128 MiB by default: every toy, digits and
FMNIST configuration with 10 classes), and switch once to an exact sparse store when the classes grow
past it. Both layouts hold the same numbers; scores agree to float rounding.

Dense layout: one ``(n_rows, 1 + capacity)`` buffer whose column 0 is the row total, so that an
update of the counts and of the totals is a single in-place ``index_add_`` (atomic: an exception or
a KeyboardInterrupt cannot leave one updated without the other).

Sparse layout: a log-structured store. Every ``add`` turns its cells into a small sorted run of
unique ``row << 32 | class`` codes with their summed weights; runs are merged geometrically (the
newest run is merged into the previous one while that one is not larger, as in a binary counter),
so an add costs amortised O(batch * log(n / batch)) and there are at most ``log2(n / batch) + 1``
runs. A cell may appear in several runs; its count is the sum. The sums are exact and
order-independent for integer weights (float64 adds of integers below 2**53).

Scoring reads all runs. ``logp`` is ``sum_s log(a / (N_r + K a)) + sum_s log1p(n[r, y] / a)``: a
per-row scalar plus a correction over the nonzero cells only, which does not depend on ``K``, so
adding a class invalidates nothing. Each run caches its correction as a telescoping difference
``log1p((T + v) / a) - log1p(T / a)`` (``T`` = the cell's count in the older runs), so that the
corrections of all runs add up to the cell's ``log1p(n / a)``; merges add the corrections of the
merged runs, and a full compaction recomputes them. Reads amortise a full compaction: once the
queried rows since the last one reach the number of stored cells, the runs are merged into one.

Scoring memory is bounded by blocks: at most ``_QUERY_BLOCK`` selected rows and ``_BLOCK_CELLS``
gathered cells (and block x classes) at a time. On the CPU the store maintenance and the scoring run
in numpy (sorts, gathers, ``bincount``, SIMD logs); other devices run the same algorithm in torch.

Every mutation builds new tensors and publishes them with one attribute assignment (or one
in-place ``index_add_`` for the dense layout), as the last statement executed, so ``add``,
``add_table``, ``add_classes``, ``truncate_classes``, ``compact`` and ``restore`` either fully happen
or leave the table exactly as before, even if an exception (a KeyboardInterrupt) arrives between two
statements. ``truncate_classes`` undoes a class growth (restoring the dense layout if the growth
switched to sparse); ``snapshot``/``restore`` roll back anything (O(1) for the sparse store, whose
runs are never modified in place).

Value table (``ValueTable``): the columns live in a list of class blocks, each a contiguous
``(n_rows, width)`` buffer; a new block is ``max(16, capacity // 4)`` columns wide, so adding a class
allocates at most a quarter of the table and at most ``max_block_bytes`` (64 MiB), never a copy of
the existing columns (peak during growth <= 1.25 x the table); the blocks grow geometrically until they
reach that cap (16 columns at 2**20 rows in float32), then linearly. Memory:
``n_rows * capacity * itemsize`` with ``capacity <= n_classes + max(16, min(n_classes / 4, cap columns))``.

Pickling streams the live tensors as numpy views (``__getstate__``): with pickle protocol 5 or
joblib no second copy of a table is made.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

__all__ = ["CountTable", "ValueTable"]

_SHIFT = 32  # cell code = row << 32 | column
_MASK = (1 << _SHIFT) - 1
_BLOCK_CELLS = 1 << 22  # bound on gathered cells (and on block * n_classes) per scoring block
_QUERY_BLOCK = 1 << 18  # bound on selected rows (samples * S) per scoring block
# CPU tensors are processed with numpy: its sorts, gathers and SIMD logs are several times faster than
# torch's here, and single-threaded, so a busy second core does not stall them
_NUMPY_ON_CPU = True


def _as_long(x, device) -> torch.Tensor:
    return torch.as_tensor(x, device=device).to(torch.int64)


def _host_tensor(x, copy: bool) -> torch.Tensor:
    """A CPU tensor of a state array: its own memory when ``copy``, else the array's when it can be."""
    x = np.asarray(x)
    if copy or not x.flags.writeable or not x.flags.c_contiguous:
        x = np.array(x, order="C", copy=True)
    return torch.from_numpy(x)


def _cpu(t: torch.Tensor) -> bool:
    """Whether ``t`` takes the numpy path (the CPU; tests switch it off to run the torch path)."""
    return _NUMPY_ON_CPU and t.device.type == "cpu"


def _sort_reduce(codes: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsorted codes and weights -> sorted unique codes and their float64 sums (zero sums dropped)."""
    if codes.numel() == 0:
        return codes.new_zeros(0), w.new_zeros(0)
    if _cpu(codes):  # numpy's sort is ~50x faster than torch's on the CPU
        c, v = codes.contiguous().numpy(), w.contiguous().numpy()
        order = np.argsort(c)
        c, v = c[order], v[order]
        start = np.flatnonzero(np.concatenate(([True], c[1:] != c[:-1])))
        u, s = c[start], np.add.reduceat(v, start)
        keep = s != 0
        if not keep.all():
            u, s = u[keep], s[keep]
        return torch.from_numpy(np.ascontiguousarray(u)), torch.from_numpy(np.ascontiguousarray(s))
    u, inv = torch.unique(codes, sorted=True, return_inverse=True)
    s = torch.zeros(u.shape[0], dtype=torch.float64, device=codes.device).index_add_(0, inv, w)
    keep = s != 0
    return u[keep], s[keep]


def _lookup(codes: torch.Tensor, vals: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Value of each query code in a sorted unique store (0 where absent)."""
    if codes.numel() == 0:
        return torch.zeros(query.shape[0], dtype=vals.dtype, device=vals.device)
    if _cpu(codes):
        c, v, qn = codes.numpy(), vals.numpy(), query.numpy()
        pos = np.minimum(np.searchsorted(c, qn), c.shape[0] - 1)
        return torch.from_numpy(np.where(c[pos] == qn, v[pos], 0.0))
    pos = torch.searchsorted(codes, query).clamp_max_(codes.shape[0] - 1)
    hit = codes[pos] == query
    return torch.where(hit, vals[pos], torch.zeros((), dtype=vals.dtype, device=vals.device))


def _merge_sorted(a_codes, a_vals: list, b_codes, b_vals: list, n_add: int):
    """Merge two sorted unique stores (new arrays). The first ``n_add`` value arrays of a shared cell
    are added (a + b); the others are functions of the cell (kept from a)."""
    if b_codes.numel() == 0:
        return a_codes, a_vals
    if a_codes.numel() == 0:
        return b_codes, b_vals
    if _cpu(a_codes):  # numpy: searchsorted with sorted keys and fancy scatters, ~10x faster than torch here
        a, b = a_codes.numpy(), b_codes.numpy()
        pos = np.searchsorted(a, b)
        hit = a[np.minimum(pos, a.shape[0] - 1)] == b
        miss = ~hit
        n_miss = int(miss.sum())
        n = a.shape[0] + n_miss
        if n_miss:  # destinations of a's and of b's new cells, shared by every array
            dest_b = pos[miss] + np.arange(n_miss)
            is_b = np.zeros(n, dtype=bool)
            is_b[dest_b] = True
            dest_a = np.flatnonzero(~is_b)
        hpos = pos[hit]
        if n_miss:
            hpos = dest_a[hpos]  # where the shared cells land

        def put(x, y):
            if not n_miss:
                return x.copy()
            o = np.empty(n, dtype=x.dtype)
            o[dest_a], o[dest_b] = x, y[miss]
            return o

        outs = []
        for i, (av, bv) in enumerate(zip(a_vals, b_vals)):
            av, bv = av.numpy(), bv.numpy()
            if i < n_add:
                o = put(av, bv)
                o[hpos] += bv[hit]  # unique positions: an exact elementwise add
            else:
                o = put(av, bv) if n_miss else av
            outs.append(torch.from_numpy(o))
        return torch.from_numpy(put(a, b) if n_miss else a), outs
    pos = torch.searchsorted(a_codes, b_codes)
    hit = a_codes[pos.clamp_max(a_codes.shape[0] - 1)] == b_codes
    if bool(hit.any()):
        hp = pos[hit]
        a_vals = [av.index_add(0, hp, bv[hit]) if i < n_add else av for i, (av, bv) in enumerate(zip(a_vals, b_vals))]
        miss = ~hit
        pos, b_codes, b_vals = pos[miss], b_codes[miss], [bv[miss] for bv in b_vals]
    if b_codes.numel() == 0:
        return a_codes, a_vals
    n_a, n_b = a_codes.shape[0], b_codes.shape[0]
    dev = a_codes.device
    dest_a = torch.arange(n_a, device=dev) + torch.bincount(pos, minlength=n_a + 1).cumsum(0)[:n_a]
    dest_b = pos + torch.arange(n_b, device=dev)

    def put(x, y):
        out = torch.empty(n_a + n_b, dtype=x.dtype, device=dev)
        out[dest_a], out[dest_b] = x, y
        return out

    return put(a_codes, b_codes), [put(av, bv) for av, bv in zip(a_vals, b_vals)]


def _pieces(ln_cumsum, n_total: int):
    """Query cut points such that each piece gathers at most _BLOCK_CELLS cells."""
    if n_total <= _BLOCK_CELLS:
        return [(0, len(ln_cumsum))]
    marks = np.arange(_BLOCK_CELLS, n_total, _BLOCK_CELLS)
    cuts = [0, *(int(x) for x in np.searchsorted(np.asarray(ln_cumsum), marks, side="right")), len(ln_cumsum)]
    return [(q0, q1) for q0, q1 in itertools.pairwise(cuts) if q1 > q0]


def _sparse_block_np(rows, usage, runs, crows, cols, tables, k, a, decoder):
    """float64 numpy (bb, K) scores of one block (numpy: CPU only)."""
    r = rows.numpy()
    bb, n_sel = r.shape
    q = r.reshape(-1)
    denom = usage.numpy()[q] + k * a
    if decoder == "logp":
        inv = None
        base = np.log(a / denom).reshape(bb, n_sel).sum(1)
    else:
        inv = 1.0 / denom
        base = (a * inv).reshape(bb, n_sel).sum(1)
    # row order, so that the gathers walk the store forwards: sort (row << bits | position) values,
    # which is faster than an argsort
    bits = max(1, int(q.shape[0] - 1).bit_length())
    packed = np.sort((q << bits) | np.arange(q.shape[0], dtype=np.int64))
    order = packed & ((1 << bits) - 1)
    qs, tag = packed >> bits, (order // n_sel) * k
    if inv is not None:
        inv = inv[order]
    acc = None
    pending, n_pending = [], 0  # (dest, w) pieces of the runs, summed by one bincount when they fit

    def flush():
        nonlocal acc, pending, n_pending
        if pending:
            dest = pending[0][0] if len(pending) == 1 else np.concatenate([d for d, _ in pending])
            w = pending[0][1] if len(pending) == 1 else np.concatenate([x for _, x in pending])
            part = np.bincount(dest, weights=w, minlength=bb * k)
            if acc is None:
                acc = part
            else:
                acc += part
        pending, n_pending = [], 0

    for run, crow, col, table in zip(runs, crows, cols, tables):
        if crow is not None:
            c = crow.numpy()
            lo = c[qs]
            ln = c[qs + 1] - lo
        else:
            codes = run.codes.numpy()
            lo = np.searchsorted(codes, qs << _SHIFT)
            ln = np.searchsorted(codes, (qs + 1) << _SHIFT) - lo
        ends = np.cumsum(ln)
        n_total = int(ends[-1]) if ends.size else 0
        if not n_total:
            continue
        col, table = col.numpy(), table.numpy()
        for q0, q1 in _pieces(ends, n_total):
            l_ = ln[q0:q1]
            before = int(ends[q0 - 1]) if q0 else 0
            n = int(ends[q1 - 1]) - before
            if not n:
                continue
            idx = np.repeat(lo[q0:q1] - (ends[q0:q1] - l_ - before), l_)
            idx += np.arange(n)
            dest = np.repeat(tag[q0:q1], l_)
            dest += np.take(col, idx)
            w = np.take(table, idx)
            if inv is not None:
                w *= np.repeat(inv[q0:q1], l_)
            if n_pending + n > _BLOCK_CELLS:
                flush()
            pending.append((dest, w))
            n_pending += n
    flush()
    acc = np.zeros((bb, k), dtype=np.float64) if acc is None else acc.reshape(bb, k)
    acc += base[:, None]
    if decoder == "vote":
        acc /= n_sel
    return acc


def _sparse_block_torch(rows, usage, runs, crows, cols, tables, k, a, decoder):
    """float64 (bb, K) scores of one block with torch ops (any device)."""
    bb, n_sel = rows.shape
    dev = rows.device
    q = rows.reshape(-1)
    denom = usage[q] + k * a
    if decoder == "logp":
        inv = None
        base = torch.log(a / denom).view(bb, n_sel).sum(1)
    else:
        inv = 1.0 / denom
        base = (a * inv).view(bb, n_sel).sum(1)
    flat = base.unsqueeze(1).repeat(1, k).view(-1)
    tag = torch.arange(bb, device=dev).repeat_interleave(n_sel) * k
    for run, crow, col, table in zip(runs, crows, cols, tables):
        if crow is not None:
            lo = crow[q]
            ln = crow[q + 1] - lo
        else:
            lo = torch.searchsorted(run.codes, q << _SHIFT)
            ln = torch.searchsorted(run.codes, (q + 1) << _SHIFT) - lo
        ends = torch.cumsum(ln, 0)
        n_total = int(ends[-1]) if ends.numel() else 0
        if not n_total:
            continue
        for q0, q1 in _pieces(ends.cpu(), n_total):
            l_ = ln[q0:q1]
            before = int(ends[q0 - 1]) if q0 else 0
            n = int(ends[q1 - 1]) - before
            if not n:
                continue
            idx = torch.repeat_interleave(lo[q0:q1] - (ends[q0:q1] - l_ - before), l_, output_size=n)
            idx += torch.arange(n, device=dev)
            dest = torch.repeat_interleave(tag[q0:q1], l_, output_size=n) + col.index_select(0, idx)
            w = table.index_select(0, idx)
            if inv is not None:
                w = w * torch.repeat_interleave(inv[q0:q1], l_, output_size=n)
            flat.index_add_(0, dest, w)
    blk = flat.view(bb, k)
    return blk / n_sel if decoder == "vote" else blk


class _Run:
    """One sorted run of the sparse store: unique codes and their counts (never modified in place).

    ``crow`` (row pointers) and ``corr`` (``(smoothing, telescoped logp correction)``) are caches
    filled lazily by the readers; they are derived data, so filling them is not a mutation.
    """

    __slots__ = ("codes", "cols", "corr", "crow", "max_col", "vals")

    def __init__(self, codes, vals, cols=None, max_col=None, corr=None):
        self.codes, self.vals = codes, vals
        if cols is None:  # int32 columns, for the scoring gathers
            if _cpu(codes):
                cols = torch.from_numpy((codes.numpy() & _MASK).astype(np.int32))
            else:
                cols = (codes & _MASK).to(torch.int32)
        self.cols = cols
        if max_col is None:
            max_col = -1 if not codes.numel() else int(cols.numpy().max() if _cpu(cols) else cols.max())
        self.max_col = int(max_col)
        self.crow = None  # cache: row pointers
        self.corr = corr

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    def nbytes(self) -> int:
        ts = [self.codes, self.vals, self.crow, self.cols, self.corr[1] if self.corr is not None else None]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def to(self, device, copy=False):
        def mv(t):
            t = t.to(device)
            return t.clone() if copy else t

        corr = None if self.corr is None else (self.corr[0], mv(self.corr[1]))
        return _Run(mv(self.codes), mv(self.vals), mv(self.cols), self.max_col, corr)


def _merge_runs(older: _Run, newer: _Run) -> _Run:
    both = older.corr is not None and newer.corr is not None and older.corr[0] == newer.corr[0]
    a_vals, b_vals = [older.vals], [newer.vals]
    if both:
        a_vals.append(older.corr[1])
        b_vals.append(newer.corr[1])
    codes, vals = _merge_sorted(older.codes, [*a_vals, older.cols], newer.codes, [*b_vals, newer.cols], len(a_vals))
    corr = (older.corr[0], vals[1]) if both else None
    return _Run(codes, vals[0], vals[-1], max(older.max_col, newer.max_col), corr)


def _settle(runs: list) -> list:
    """Geometric merging: merge the newest run into the previous one while that one is not larger."""
    while len(runs) >= 2 and runs[-2].n <= runs[-1].n:
        newer = runs.pop()
        runs[-1] = _merge_runs(runs[-1], newer)
    return runs


class _Store:
    """Immutable snapshot of a CountTable's state, published with one assignment.

    ``dense`` is the ``(n_rows, 1 + capacity)`` buffer of the dense layout (column 0: row totals);
    it is the only tensor ever modified in place (one ``index_add_`` per update).
    ``usage`` is the row totals (a view of ``dense[:, 0]`` in the dense layout).
    ``switch_cap`` is the dense capacity before ``"auto"`` switched to sparse (for truncation).
    """

    __slots__ = ("dense", "layout", "n_classes", "runs", "switch_cap", "usage")

    def __init__(self, layout, n_classes, usage, dense=None, runs=(), switch_cap=None):
        self.layout, self.n_classes, self.usage = layout, int(n_classes), usage
        self.dense, self.runs, self.switch_cap = dense, tuple(runs), switch_cap

    def replace(self, **kw) -> _Store:
        d = {k: getattr(self, k) for k in self.__slots__}
        d.update(kw)
        return _Store(**d)


class CountTable:
    """Weighted class counts per row (row = head * n_keys + key), accumulated in float64.

    Parameters
    ----------
    n_rows : int
        Number of rows (heads times keys).
    n_classes : int, default=0
        Initial number of classes.
    layout : {"auto", "dense", "sparse"}, default="auto"
        Storage. ``"auto"`` is dense while ``n_rows * capacity <= dense_max_cells`` and switches
        once to sparse when the classes grow past it.
    device : str or torch.device, default="cpu"
        Device of the tensors.
    dense_max_cells : int, default=2**24
        Largest dense table (in cells) that ``"auto"`` keeps.

    Attributes
    ----------
    layout : str
        Resolved layout, ``"dense"`` or ``"sparse"``.
    n_rows : int
        Number of rows.
    n_classes : int
        Logical number of classes (the dense column capacity is hidden).

    Examples
    --------
    >>> import torch
    >>> t = CountTable(4, 2)
    >>> t.add(torch.tensor([[0, 1]]), torch.tensor([1]), torch.tensor([2.0]))
    >>> t.to_dense()[:, 1].tolist()
    [2.0, 2.0, 0.0, 0.0]
    """

    def __init__(
        self, n_rows: int, n_classes: int = 0, *, layout: str = "auto", device="cpu", dense_max_cells: int = 2**24
    ) -> None:
        if layout not in ("auto", "dense", "sparse"):
            raise ValueError(f"layout must be 'auto', 'dense' or 'sparse', got {layout!r}.")
        if n_rows < 0 or n_rows >= 2**31 or n_classes < 0:
            raise ValueError(f"n_rows must be in [0, 2**31) and n_classes >= 0, got {n_rows}, {n_classes}.")
        self.n_rows = int(n_rows)
        self.dense_max_cells = int(dense_max_cells)
        self._auto = layout == "auto"
        self.device = torch.device(device)
        self._queries = 0  # rows read since the last full compaction (amortises it)
        self._a = None  # smoothing of the cached logp corrections
        self._journals: list = []  # open rollback points (snapshot); the dense layout records into them
        if layout == "sparse":
            self._s = _Store("sparse", 0, torch.zeros(self.n_rows, dtype=torch.float64, device=self.device))
        else:
            dense = torch.zeros((self.n_rows, 1), dtype=torch.float64, device=self.device)
            self._s = _Store("dense", 0, dense[:, 0], dense=dense)
        if n_classes:
            self.add_classes(n_classes)

    @property
    def n_classes(self) -> int:
        """Logical number of classes."""
        return self._s.n_classes

    @property
    def layout(self) -> str:
        """Resolved layout, ``"dense"`` or ``"sparse"``."""
        return self._s.layout

    @property
    def capacity(self) -> int:
        """Allocated class columns (dense layout; the sparse store has no column capacity)."""
        s = self._s
        return s.dense.shape[1] - 1 if s.layout == "dense" else s.n_classes

    @property
    def n_runs(self) -> int:
        """Number of sorted runs of the sparse store (0 for the dense layout)."""
        return len(self._s.runs)

    # ------------------------------------------------------------------ growth
    def add_classes(self, n_new: int) -> None:
        """Append ``n_new`` empty classes (amortised O(1): capacity grows geometrically).

        Parameters
        ----------
        n_new : int
            Number of classes to add (>= 0).
        """
        n_new = int(n_new)
        if n_new < 0:
            raise ValueError(f"n_new must be >= 0, got {n_new}.")
        s = self._s
        k = s.n_classes + n_new
        if k >= 2**_SHIFT:
            raise ValueError(f"at most 2**32 - 1 classes, got {k}.")
        new = s.replace(n_classes=k)  # the logp correction does not depend on K: no cache to drop
        if s.layout == "dense" and k > s.dense.shape[1] - 1:
            old_cap = s.dense.shape[1] - 1
            cap = max(k, math.ceil(1.5 * old_cap), 8)
            if self._auto and self.n_rows * cap > self.dense_max_cells:
                run = self._dense_run(s)
                usage = s.dense[:, 0].clone()
                new = _Store("sparse", k, usage, runs=(run,) if run.n else (), switch_cap=old_cap)
            else:
                dense = torch.zeros((self.n_rows, 1 + cap), dtype=torch.float64, device=self.device)
                dense[:, : 1 + s.n_classes] = s.dense[:, : 1 + s.n_classes]
                new = _Store("dense", k, dense[:, 0], dense=dense)
        self._s = new  # the only mutation, last

    def truncate_classes(self, n_classes: int) -> None:
        """Drop the classes ``>= n_classes`` (they must hold no counts): undoes a class growth.

        If the growth being undone switched the ``"auto"`` layout from dense to sparse, the dense
        layout is restored with its former capacity (the counts are kept bit for bit).

        Parameters
        ----------
        n_classes : int
            New number of classes, in ``[0, self.n_classes]``.
        """
        n_classes = int(n_classes)
        s = self._s
        if not 0 <= n_classes <= s.n_classes:
            raise ValueError(f"n_classes must lie in [0, {s.n_classes}], got {n_classes}.")
        msg = f"classes >= {n_classes} hold counts; truncate_classes only undoes a growth before any add."
        new = s.replace(n_classes=n_classes)
        if s.layout == "dense":
            if bool(s.dense[:, 1 + n_classes : 1 + s.n_classes].ne(0).any()):
                raise ValueError(msg)
        elif any(r.max_col >= n_classes for r in s.runs):
            raise ValueError(msg)
        elif s.switch_cap is not None and n_classes <= s.switch_cap:
            dense = torch.zeros((self.n_rows, 1 + s.switch_cap), dtype=torch.float64, device=self.device)
            dense[:, 0] = s.usage
            r, c, v = self._cells(s)
            dense[:, 1:].index_put_((r, c), v, accumulate=True)
            new = _Store("dense", n_classes, dense[:, 0], dense=dense)
        self._s = new  # the only mutation, last

    def snapshot(self) -> object:
        """Start a rollback point: a token for :meth:`restore` (undo) or :meth:`release` (keep).

        O(1). The sparse store needs nothing more (its runs are never modified in place); in the
        dense layout, each later ``add`` records the previous values of the cells it touches
        (O(batch)) until the token is restored or released. Tokens may nest.

        Returns
        -------
        token : object
            Pass it to :meth:`restore` or :meth:`release` of this table.
        """
        journal: list = []
        token = (self, self._s, journal)
        self._journals = [*self._journals, journal]
        return token

    def _token(self, token) -> tuple:
        ok = isinstance(token, tuple) and len(token) == 3 and token[0] is self and isinstance(token[1], _Store)
        if not ok or not any(j is token[2] for j in self._journals):
            raise ValueError("token must come from snapshot() of this table and not be released or restored yet.")
        return token

    def release(self, token: object) -> None:
        """Keep the updates since :meth:`snapshot` and stop recording for ``token``.

        Parameters
        ----------
        token : object
            A token returned by :meth:`snapshot` of this table.
        """
        journal = self._token(token)[2]
        self._journals = [j for j in self._journals if j is not journal]

    def restore(self, token: object) -> None:
        """Undo every update since :meth:`snapshot` (counts, class growth, layout switch), all-or-nothing.

        The restored table is built aside (in the dense layout: a copy of the buffer with the recorded
        cells put back, O(table)) and published with one assignment; then ``token`` is released.

        Parameters
        ----------
        token : object
            A token returned by :meth:`snapshot` of this table.
        """
        _, s, journal = self._token(token)
        if s.layout == "dense":  # the live buffer may have been updated in place since
            dense = s.dense.clone()
            flat = dense.view(-1)
            for buffer, cells, old in reversed(journal):
                if buffer is s.dense:
                    flat[cells] = old
            s = _Store("dense", s.n_classes, dense[:, 0], dense=dense, switch_cap=s.switch_cap)
        self._s = s  # the table's only mutation
        self._journals = [j for j in self._journals if j is not journal]

    def _dense_run(self, s: _Store) -> _Run:
        d = s.dense[:, 1 : 1 + s.n_classes]
        r, c = torch.nonzero(d, as_tuple=True)  # row-major order, so codes come out sorted
        return _Run((r << _SHIFT) | c, d[r, c].clone())

    # ---------------------------------------------------------------- updates
    def _check_add(self, rows, y, weight):
        rows = _as_long(rows, self.device)
        y = _as_long(y, self.device)
        weight = torch.as_tensor(weight, device=self.device).to(torch.float64)
        if rows.dim() != 2 or y.shape != (rows.shape[0],) or weight.shape != (rows.shape[0],):
            raise ValueError(
                f"add takes rows (n, S), y (n,) and weight (n,), got {tuple(rows.shape)}, "
                f"{tuple(y.shape)}, {tuple(weight.shape)}."
            )
        if _cpu(self._s.usage):  # numpy: single-threaded, unaffected by a busy second core
            r, c, w = rows.numpy(), y.numpy(), weight.numpy()
            finite = bool(np.isfinite(w).all())
        else:
            r, c, w = rows, y, weight
            finite = bool(torch.isfinite(w).all())
        if rows.numel() and (int(r.min()) < 0 or int(r.max()) >= self.n_rows):
            raise ValueError(f"rows must lie in [0, {self.n_rows}).")
        if y.numel() and (int(c.min()) < 0 or int(c.max()) >= self.n_classes):
            raise ValueError(f"y must lie in [0, {self.n_classes}); call add_classes first.")
        if not finite or bool((w < 0).any()):
            raise ValueError("weight must be finite and >= 0.")
        return rows, y, weight

    def add(self, rows: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> None:
        """Add ``weight[i]`` to cell ``(rows[i, s], y[i])`` for every ``s`` (all-or-nothing).

        Parameters
        ----------
        rows : Tensor of shape (n, S)
            Rows in ``[0, n_rows)``.
        y : Tensor of shape (n,)
            Classes in ``[0, n_classes)``.
        weight : Tensor of shape (n,)
            Non-negative sample weights.
        """
        rows, y, weight = self._check_add(rows, y, weight)
        n_sel = rows.shape[1]
        if _cpu(self._s.usage):
            flat_rows = rows.reshape(-1)
            cols = torch.from_numpy(np.repeat(y.numpy(), n_sel))
            w = torch.from_numpy(np.repeat(weight.numpy(), n_sel))
        else:
            flat_rows = rows.reshape(-1)
            cols = y.view(-1, 1).expand(rows.shape).reshape(-1)
            w = weight.view(-1, 1).expand(rows.shape).reshape(-1)
        self._add_cells(flat_rows, cols, w)

    def _add_cells(self, flat_rows: torch.Tensor, cols: torch.Tensor, w: torch.Tensor) -> None:
        s = self._s
        if s.layout == "dense":
            width = s.dense.shape[1]
            cells = torch.cat([flat_rows * width + 1 + cols, flat_rows * width])  # counts, then row totals
            if self._journals:  # rollback points: record the previous values first
                record = (s.dense, cells, s.dense.view(-1)[cells])
                for journal in self._journals:
                    journal.append(record)
            s.dense.view(-1).index_add_(0, cells, torch.cat([w, w]))  # the single in-place step, last
        else:
            if _cpu(self._s.usage):
                r = flat_rows.numpy()
                usage = torch.from_numpy(s.usage.numpy() + np.bincount(r, weights=w.numpy(), minlength=self.n_rows))
                codes, vals = _sort_reduce(torch.from_numpy((r << _SHIFT) | cols.numpy()), w)
            else:
                usage = s.usage.index_add(0, flat_rows, w)
                codes, vals = _sort_reduce((flat_rows << _SHIFT) | cols, w)
            runs = list(s.runs)
            if codes.numel():
                runs.append(_Run(codes, vals))
                if self._a is not None:  # keep the logp corrections incremental through the merges
                    self._corr(runs, len(runs) - 1, self._a)
                runs = _settle(runs)
            self._s = s.replace(usage=usage, runs=tuple(runs))  # one assignment publishes the update, last

    def add_table(self, other: CountTable, columns) -> None:
        """Add ``other``'s counts into columns ``columns`` of this table (all-or-nothing).

        Parameters
        ----------
        other : CountTable
            Table with the same ``n_rows``.
        columns : array-like of int of shape (other.n_classes,)
            Column of this table receiving each of ``other``'s classes.
        """
        columns = _as_long(columns, self.device)
        if other.n_rows != self.n_rows or columns.shape != (other.n_classes,):
            raise ValueError("add_table needs the same n_rows and one target column per class of other.")
        if columns.numel() and (int(columns.min()) < 0 or int(columns.max()) >= self.n_classes):
            raise ValueError(f"columns must lie in [0, {self.n_classes}).")
        r, c, v = other._cells()
        self._add_cells(r.to(self.device), columns[c.to(self.device)], v.to(self.device))

    def compact(self) -> None:
        """Merge the sparse runs into one (logically a no-op; scoring then reads a single run)."""
        s = self._s
        if s.layout == "sparse" and len(s.runs) > 1:
            runs = list(s.runs)
            a = next((r.corr[0] for r in runs if r.corr is not None), None)
            while len(runs) > 1:
                newer = runs.pop()
                runs[-1] = _merge_runs(runs[-1], newer)
            run = runs[0]
            if a is not None:  # fresh corrections (no telescoped rounding)
                v = run.vals
                corr = torch.from_numpy(np.log1p(v.numpy() / a)) if _cpu(v) else torch.log1p(v / a)
                run = _Run(run.codes, run.vals, run.cols, run.max_col, (a, corr))
            self._queries = 0
            self._s = s.replace(runs=(run,))  # logically a no-op; published last

    def _cells(self, s: _Store | None = None):
        """Nonzero cells as (rows, cols, values); a cell may repeat in the sparse layout (add them)."""
        s = self._s if s is None else s
        if s.layout == "dense":
            d = s.dense[:, 1 : 1 + s.n_classes]
            r, c = torch.nonzero(d, as_tuple=True)
            return r, c, d[r, c]
        if not s.runs:
            z = torch.zeros(0, dtype=torch.int64, device=self.device)
            return z, z, torch.zeros(0, dtype=torch.float64, device=self.device)
        codes = torch.cat([r.codes for r in s.runs]) if len(s.runs) > 1 else s.runs[0].codes
        vals = torch.cat([r.vals for r in s.runs]) if len(s.runs) > 1 else s.runs[0].vals
        return codes >> _SHIFT, codes & _MASK, vals

    # ---------------------------------------------------------------- reading
    def usage(self) -> torch.Tensor:
        """Row totals.

        Returns
        -------
        usage : Tensor of shape (n_rows,)
            float64 sum of each row's counts, maintained incrementally (read only; in the dense
            layout a strided view of the table).
        """
        return self._s.usage

    def to_dense(self) -> torch.Tensor:
        """The counts as a dense array (for tests and small models).

        Returns
        -------
        counts : Tensor of shape (n_rows, n_classes)
            float64 counts.
        """
        s = self._s
        if s.layout == "dense":
            return s.dense[:, 1 : 1 + s.n_classes].clone()
        out = torch.zeros((self.n_rows, s.n_classes), dtype=torch.float64, device=self.device)
        r, c, v = self._cells(s)
        out.view(-1).index_add_(0, r * s.n_classes + c, v)
        return out

    @property
    def nnz(self) -> int:
        """Number of nonzero cells (compacts a sparse store of several runs)."""
        s = self._s
        if s.layout == "dense":
            return int(torch.count_nonzero(s.dense[:, 1:]))
        if len(s.runs) > 1:
            self.compact()
            s = self._s
        return s.runs[0].n if s.runs else 0

    def nbytes(self) -> int:
        """Bytes held by the store, the row totals and the scoring caches.

        Returns
        -------
        nbytes : int
            Total bytes.
        """
        s = self._s
        if s.layout == "dense":
            return s.dense.numel() * s.dense.element_size()
        return s.usage.numel() * s.usage.element_size() + sum(r.nbytes() for r in s.runs)

    def _corr(self, runs, j: int, a: float) -> torch.Tensor:
        """Telescoped logp correction of run ``j``: ``log1p((T + v) / a) - log1p(T / a)``, T = older runs."""
        run = runs[j]
        if run.corr is not None and run.corr[0] == a:
            return run.corr[1]
        before = None
        for older in runs[:j]:
            t = _lookup(older.codes, older.vals, run.codes)
            before = t if before is None else torch.from_numpy(before.numpy() + t.numpy()) if _cpu(t) else before + t
        if _cpu(self._s.usage):  # numpy's log1p is ~5x faster than torch's here
            v = run.vals.numpy()
            if before is None:
                corr = torch.from_numpy(np.log1p(v / a))
            else:
                b = before.numpy()
                corr = torch.from_numpy(np.log1p((b + v) / a) - np.log1p(b / a))
        elif before is None:
            corr = torch.log1p(run.vals / a)
        else:
            corr = torch.log1p((before + run.vals) / a) - torch.log1p(before / a)
        run.corr = (a, corr)
        return corr

    def _crow(self, run: _Run) -> torch.Tensor:
        if run.crow is None:
            if _cpu(run.codes):
                crow = np.zeros(self.n_rows + 1, dtype=np.int64)
                np.cumsum(np.bincount(run.codes.numpy() >> _SHIFT, minlength=self.n_rows), out=crow[1:])
                run.crow = torch.from_numpy(crow)
            else:
                crow = torch.zeros(self.n_rows + 1, dtype=torch.int64, device=self.device)
                torch.cumsum(torch.bincount(run.codes >> _SHIFT, minlength=self.n_rows), 0, out=crow[1:])
                run.crow = crow
        return run.crow

    def scores(self, rows: torch.Tensor, decoder: str, smoothing: float) -> torch.Tensor:
        """Scores of the count decoders for the selected rows, computed block by block.

        ``vote``: ``mean_s (n[r, y] + a) / (N_r + K a)``; ``logp``: ``sum_s log((n[r, y] + a) / (N_r + K a))``,
        with ``a = smoothing``, ``N_r`` the row total and ``K = n_classes``. Never builds an
        ``(n_rows, n_classes)`` table: memory is O(block * (S + K) + touched nonzeros).

        Parameters
        ----------
        rows : Tensor of shape (b, S)
            Selected rows of each sample.
        decoder : {"vote", "logp"}
            Count decoder.
        smoothing : float
            Additive smoothing ``a`` (> 0).

        Returns
        -------
        scores : Tensor of shape (b, n_classes)
            float32 scores.
        """
        if decoder not in ("vote", "logp"):
            raise ValueError(f"decoder must be 'vote' or 'logp', got {decoder!r}.")
        if not smoothing > 0:
            raise ValueError(f"smoothing must be > 0, got {smoothing!r}.")
        rows = _as_long(rows, self.device)
        if rows.dim() != 2:
            raise ValueError(f"rows must have shape (b, S), got {tuple(rows.shape)}.")
        s = self._s
        b, n_sel = rows.shape
        k, a = s.n_classes, float(smoothing)
        out = torch.empty((b, k), dtype=torch.float32, device=self.device)
        if b == 0 or k == 0:
            return out
        r = rows.numpy() if _cpu(s.usage) else rows
        if rows.numel() and (int(r.min()) < 0 or int(r.max()) >= self.n_rows):
            raise ValueError(f"rows must lie in [0, {self.n_rows}).")
        if s.layout == "dense":
            step = max(1, _BLOCK_CELLS // max(1, n_sel * s.dense.shape[1]))
            use_np = _cpu(self._s.usage)
            counts, usage = s.dense[:, 1 : 1 + k], s.dense[:, 0]
            for start in range(0, b, step):
                r = rows[start : start + step]
                if use_np:  # numpy: one row gather, SIMD log, single-threaded
                    g = s.dense.numpy()[r.numpy().reshape(-1)]  # (bb * S, 1 + capacity)
                    if decoder == "logp":
                        f = np.log(g[:, 1 : 1 + k] + a)
                        f -= np.log(g[:, :1] + k * a)
                    else:
                        f = (g[:, 1 : 1 + k] + a) / (g[:, :1] + k * a)
                    f = f.reshape(r.shape[0], n_sel, k)
                    out.numpy()[start : start + step] = f.sum(1) if decoder == "logp" else f.mean(1)
                else:
                    f = (counts[r] + a) / (usage[r].unsqueeze(-1) + k * a)  # (bb, S, K) float64
                    out[start : start + step] = f.log().sum(1) if decoder == "logp" else f.mean(1)
            return out
        self._queries += b * n_sel
        total = sum(r.n for r in s.runs)
        if len(s.runs) > 1 and self._queries >= total:  # amortised: the compaction costs <= the reads
            self.compact()
            s = self._s
        runs = s.runs
        if decoder == "logp":
            tables = [self._corr(runs, j, a) for j in range(len(runs))]
            self._a = a
        else:
            tables = [r.vals for r in runs]
        # row pointers (O(n_rows) once per run) pay off against binary searches for large reads
        # (large runs live long: their row pointers are reused by many reads)
        use_crow = [r.crow is not None or 8 * r.n >= self.n_rows or 16 * b * n_sel >= self.n_rows for r in runs]
        crows = [self._crow(r) if ok else None for r, ok in zip(runs, use_crow)]
        cols = [r.cols for r in runs]
        step = max(1, min(_QUERY_BLOCK // max(1, n_sel), _BLOCK_CELLS // k))
        use_np = _cpu(self._s.usage)
        fn = _sparse_block_np if use_np else _sparse_block_torch
        out_np = out.numpy() if use_np else None
        for start in range(0, b, step):
            blk = fn(rows[start : start + step], s.usage, runs, crows, cols, tables, k, a, decoder)
            if use_np:
                out_np[start : start + step] = blk  # numpy's float64 -> float32 cast
            else:
                out[start : start + step] = blk
        return out

    # ------------------------------------------------------------- integrity
    def check(self) -> None:
        """Raise ``ValueError`` if an invariant is broken (shapes, finite, >= 0, usage == row sums)."""
        s = self._s
        if s.usage.shape != (self.n_rows,):
            raise ValueError("usage has the wrong shape.")
        if s.layout == "dense":
            if s.dense.shape[0] != self.n_rows or s.dense.shape[1] < 1 + s.n_classes:
                raise ValueError("dense table has the wrong shape.")
            if bool(s.dense[:, 1 + s.n_classes :].ne(0).any()):
                raise ValueError("padding columns of the dense table must be 0.")
        else:
            for run in s.runs:
                if run.codes.shape != run.vals.shape:
                    raise ValueError("sparse codes and values differ in length.")
                if run.n > 1 and not bool((run.codes[1:] > run.codes[:-1]).all()):
                    raise ValueError("sparse codes must be strictly increasing within a run.")
                if run.n and (int(run.codes[-1] >> _SHIFT) >= self.n_rows or int(run.cols.max()) > run.max_col):
                    raise ValueError("sparse cell outside the table.")
                if run.max_col >= s.n_classes:
                    raise ValueError("sparse cell outside the table.")
        # row sums, finiteness and signs block by block (no copy of the table)
        sums = torch.zeros(self.n_rows, dtype=torch.float64, device=self.device)
        ok = bool(torch.isfinite(s.usage).all())
        if s.layout == "dense":
            step = max(1, _BLOCK_CELLS // max(1, s.dense.shape[1]))
            for start in range(0, self.n_rows, step):
                blk = s.dense[start : start + step, 1 : 1 + s.n_classes]
                ok = ok and bool(torch.isfinite(blk).all()) and not bool((blk < 0).any())
                sums[start : start + step] = blk.sum(1)
        else:
            for run in s.runs:
                ok = ok and bool(torch.isfinite(run.vals).all()) and not bool((run.vals < 0).any())
                sums.index_add_(0, run.codes >> _SHIFT, run.vals)
        if not ok:
            raise ValueError("counts must be finite and >= 0.")
        if not torch.allclose(sums, s.usage, rtol=1e-9, atol=1e-9):
            raise ValueError("usage differs from the row sums of the counts.")

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Numpy state: views of the live tensors where the device is the CPU (no second copy).

        Returns
        -------
        state : dict of str to numpy.ndarray
            ``layout``, ``auto``, ``dense_max_cells``, ``shape``, ``switch_cap``, and either
            ``buffer`` (the dense ``(n_rows, 1 + capacity)`` table, row totals in column 0) or
            ``usage`` and one ``codes_<i>`` / ``values_<i>`` pair per sparse run. Treat it as read only.
        """
        s = self._s

        def np_(t):
            return t.detach().cpu().numpy()

        d = {
            "layout": np.array(s.layout),
            "auto": np.array(self._auto),
            "dense_max_cells": np.array(self.dense_max_cells, dtype=np.int64),
            "shape": np.array([self.n_rows, s.n_classes], dtype=np.int64),
            "switch_cap": np.array(-1 if s.switch_cap is None else s.switch_cap, dtype=np.int64),
        }
        if s.layout == "dense":
            d["buffer"] = np_(s.dense)
        else:
            d["usage"] = np_(s.usage)
            for i, run in enumerate(s.runs):
                d[f"codes_{i}"], d[f"values_{i}"] = np_(run.codes), np_(run.vals)
        return d

    @classmethod
    def from_state_dict(cls, d: dict, device="cpu") -> CountTable:
        """Rebuild a table from :meth:`state_dict` (a copy: the table does not share the arrays).

        Parameters
        ----------
        d : dict of str to numpy.ndarray
            The state.
        device : str or torch.device, default="cpu"
            Device of the new table.

        Returns
        -------
        table : CountTable
            The rebuilt table.
        """
        return cls._from_state(d, device, copy=True)

    @classmethod
    def _from_state(cls, d: dict, device, *, copy: bool) -> CountTable:
        def t_(x, dtype):
            return _host_tensor(x, copy).to(device=device, dtype=dtype)

        n_rows, n_classes = (int(x) for x in d["shape"])
        layout = str(d["layout"])
        if layout not in ("dense", "sparse"):
            raise ValueError(f"state layout must be 'dense' or 'sparse', got {layout!r}.")
        t = cls(n_rows, 0, layout=layout, device=device, dense_max_cells=int(d["dense_max_cells"]))
        t._auto = bool(d["auto"])
        sc = int(d.get("switch_cap", -1))
        switch_cap = None if sc < 0 else sc
        if layout == "dense":
            if "buffer" in d:
                dense = t_(d["buffer"], torch.float64)
            else:  # older format: counts and usage apart
                counts = np.asarray(d["dense"])
                dense = torch.zeros((n_rows, 1 + counts.shape[1]), dtype=torch.float64, device=t.device)
                dense[:, 0] = torch.as_tensor(np.asarray(d["usage"]), dtype=torch.float64)
                dense[:, 1:] = torch.as_tensor(counts, dtype=torch.float64)
            if dense.dim() != 2 or dense.shape[0] != n_rows or dense.shape[1] < 1 + n_classes:
                raise ValueError(
                    f"dense state has shape {tuple(dense.shape)}, expected ({n_rows}, >= {1 + n_classes})."
                )
            t._s = _Store("dense", n_classes, dense[:, 0], dense=dense)
        else:
            usage = t_(d["usage"], torch.float64)
            runs = []
            if "codes" in d:  # older format: one run
                runs.append(_Run(t_(d["codes"], torch.int64), t_(d["values"], torch.float64)))
            i = 0
            while f"codes_{i}" in d:
                runs.append(_Run(t_(d[f"codes_{i}"], torch.int64), t_(d[f"values_{i}"], torch.float64)))
                i += 1
            t._s = _Store("sparse", n_classes, usage, runs=[r for r in runs if r.n], switch_cap=switch_cap)
        t.check()
        return t

    def __getstate__(self) -> dict:
        return {"state": self.state_dict(), "device": str(self.device)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(CountTable._from_state(state["state"], state["device"], copy=False).__dict__)

    def empty_like(self) -> CountTable:
        """An empty table with this one's rows, classes, layout rule and device.

        Returns
        -------
        table : CountTable
            A new table holding no counts.
        """
        layout = "auto" if self._auto else self.layout
        return CountTable(
            self.n_rows, self.n_classes, layout=layout, device=self.device, dense_max_cells=self.dense_max_cells
        )

    def cells(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The nonzero cells, each once.

        Returns
        -------
        rows, cols : Tensor of shape (nnz,)
            Row and class of each cell (int64).
        values : Tensor of shape (nnz,)
            Their counts (float64).
        """
        self.compact()  # one sorted run: every cell once
        return self._cells()

    def copy(self) -> CountTable:
        """Deep copy.

        Returns
        -------
        table : CountTable
            An independent copy.
        """
        return self._moved(self.device, copy=True)

    def to(self, device) -> CountTable:
        """This table on ``device`` (a new object; tensors are shared when already there).

        Parameters
        ----------
        device : str or torch.device
            Target device.

        Returns
        -------
        table : CountTable
            The moved table.
        """
        return self._moved(device, copy=False)

    def _moved(self, device, *, copy: bool) -> CountTable:
        new = object.__new__(CountTable)
        new.__dict__.update(self.__dict__)
        new.device = torch.device(device)
        new._journals = []
        s = self._s

        def mv(t):
            t = t.to(new.device)
            return t.clone() if copy else t

        if s.layout == "dense":
            dense = mv(s.dense)
            new._s = s.replace(dense=dense, usage=dense[:, 0])
        else:
            new._s = s.replace(usage=mv(s.usage), runs=tuple(r.to(new.device, copy) for r in s.runs))
        return new


class ValueTable:
    """Trainable values of the sgd decoder, grown in class blocks without copying existing columns.

    Each block is a contiguous ``(n_rows, width)`` buffer holding the columns
    ``[start, start + width)``; only the last block has padding columns (kept exactly 0).
    Adding classes past the capacity allocates one block of ``min(max(16, capacity // 4), max_block_bytes /
    column bytes)`` columns (or what is needed), so growth peaks at <= 1.25 x the table (plus 16 columns),
    never copies existing columns, and zeroes at most ``max_block_bytes`` per growth step.

    Parameters
    ----------
    n_rows : int
        Number of rows (heads times keys).
    n_classes : int, default=0
        Initial number of classes (0: nothing is allocated).
    dtype : torch.dtype, default=torch.float32
        Storage dtype (float32, float16 or bfloat16).
    device : str or torch.device, default="cpu"
        Device.
    max_block_bytes : int, default=2**26
        Cap on a new block's bytes (64 MiB: 16 columns at the paper's 2**20 rows), so that adding a
        class zeroes at most that much memory; blocks stay at least 16 columns wide when that fits.

    Examples
    --------
    >>> import torch
    >>> v = ValueTable(3, 2)
    >>> v.add_classes(1)
    >>> tuple(v.view().shape)
    (3, 3)
    """

    def __init__(
        self, n_rows: int, n_classes: int = 0, *, dtype=torch.float32, device="cpu", max_block_bytes: int = 2**26
    ) -> None:
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}.")
        self.n_rows = int(n_rows)
        self.n_classes = 0
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_block_bytes = int(max_block_bytes)
        self.blocks: list[torch.Tensor] = []  # contiguous (n_rows, width) buffers
        if n_classes:
            self.add_classes(n_classes)

    @property
    def capacity(self) -> int:
        """Allocated columns."""
        return sum(b.shape[1] for b in self.blocks)

    def add_classes(self, n_new: int) -> None:
        """Append ``n_new`` zero columns.

        Parameters
        ----------
        n_new : int
            Number of classes to add (>= 0).
        """
        if n_new < 0:
            raise ValueError(f"n_new must be >= 0, got {n_new}.")
        k = self.n_classes + int(n_new)
        cap = self.capacity
        if k > cap:
            per_column = self.n_rows * torch.empty(0, dtype=self.dtype).element_size()
            width = max(k - cap, min(max(16, cap // 4), max(1, self.max_block_bytes // max(1, per_column))))
            block = torch.zeros((self.n_rows, width), dtype=self.dtype, device=self.device)
            self.blocks, self.n_classes = self.blocks + [block], k  # published together
            return
        self.n_classes = k

    def truncate_classes(self, n_classes: int) -> None:
        """Drop the classes ``>= n_classes`` (undoes a class growth).

        Blocks that lie wholly past ``n_classes`` are released; the dropped columns of the last kept
        block are zeroed (they are padding again). If an exception interrupts it, the call can be
        repeated: it only zeroes columns that the table no longer exposes.

        Parameters
        ----------
        n_classes : int
            New number of classes, in ``[0, self.n_classes]``.
        """
        n_classes = int(n_classes)
        if not 0 <= n_classes <= self.n_classes:
            raise ValueError(f"n_classes must lie in [0, {self.n_classes}], got {n_classes}.")
        keep, start = [], 0
        for b in self.blocks:
            if start >= n_classes and keep:
                break
            keep.append(b)
            start += b.shape[1]
        if not n_classes:
            keep = []
        if keep:
            last_start = start - keep[-1].shape[1]
            keep[-1][:, n_classes - last_start :].zero_()  # idempotent; padding must stay 0
        self.n_classes, self.blocks = n_classes, keep

    def segments(self) -> list[tuple[int, int, torch.Tensor]]:
        """Column segments for the gather / scatter kernels.

        Returns
        -------
        segments : list of (start, stop, buffer)
            ``buffer`` is a contiguous ``(n_rows, width)`` tensor; its first ``stop - start``
            columns are the classes ``[start, stop)``; kernels index rows with row length ``width``
            and must leave (and ignore in the softmax) the padding columns.
        """
        out, start = [], 0
        for b in self.blocks:
            stop = min(self.n_classes, start + b.shape[1])
            if stop > start:
                out.append((start, stop, b))
            start += b.shape[1]
        return out

    def view(self) -> torch.Tensor:
        """Logical ``(n_rows, n_classes)`` table.

        Returns
        -------
        values : Tensor of shape (n_rows, n_classes)
            A strided view sharing memory when there is one block, else a concatenated copy
            (use :meth:`segments` on hot paths).
        """
        segs = self.segments()
        if not segs:
            return torch.zeros((self.n_rows, 0), dtype=self.dtype, device=self.device)
        if len(segs) == 1:
            return segs[0][2][:, : segs[0][1] - segs[0][0]]
        return torch.cat([b[:, : stop - start] for start, stop, b in segs], 1)

    def nbytes(self) -> int:
        """Bytes allocated.

        Returns
        -------
        nbytes : int
            Total bytes of the blocks.
        """
        return sum(b.numel() * b.element_size() for b in self.blocks)

    def state_dict(self) -> dict:
        """Numpy state: one array per block, views of the live blocks on the CPU (no copy).

        bfloat16 blocks, which numpy lacks, are given as their int16 bit patterns (still views).

        Returns
        -------
        state : dict of str to numpy.ndarray
            ``shape``, ``dtype`` and ``block_<i>``. Treat it as read only.
        """
        d = {"shape": np.array([self.n_rows, self.n_classes], dtype=np.int64), "dtype": np.array(str(self.dtype))}
        for i, b in enumerate(self.blocks):
            b = b.detach().cpu()
            d[f"block_{i}"] = (b.view(torch.int16) if b.dtype == torch.bfloat16 else b).numpy()
        return d

    @classmethod
    def from_state_dict(cls, d: dict, device="cpu") -> ValueTable:
        """Rebuild from :meth:`state_dict` (a copy: the table does not share the arrays).

        Parameters
        ----------
        d : dict of str to numpy.ndarray
            The state.
        device : str or torch.device, default="cpu"
            Device of the new table.

        Returns
        -------
        table : ValueTable
            The rebuilt table.
        """
        return cls._from_state(d, device, copy=True)

    @classmethod
    def _from_state(cls, d: dict, device, *, copy: bool) -> ValueTable:
        dtype = getattr(torch, str(d["dtype"]).replace("torch.", ""))
        n_rows, n_classes = (int(x) for x in d["shape"])
        t = cls(n_rows, 0, dtype=dtype, device=device)
        i, blocks = 0, []
        while f"block_{i}" in d:
            b = _host_tensor(d[f"block_{i}"], copy)
            if dtype == torch.bfloat16 and b.dtype == torch.int16:
                b = b.view(torch.bfloat16)
            if b.dim() != 2 or b.shape[0] != n_rows:
                raise ValueError(f"block_{i} has shape {tuple(b.shape)}, expected ({n_rows}, width).")
            blocks.append(b.to(device=device, dtype=dtype))
            i += 1
        t.blocks = blocks
        if n_classes > t.capacity:
            raise ValueError(f"state has {n_classes} classes but only {t.capacity} columns.")
        t.n_classes = n_classes
        return t

    def __getstate__(self) -> dict:
        return {"state": self.state_dict(), "device": str(self.device), "max_block_bytes": self.max_block_bytes}

    def __setstate__(self, state: dict) -> None:
        t = ValueTable._from_state(state["state"], state["device"], copy=False)
        t.max_block_bytes = int(state["max_block_bytes"])
        self.__dict__.update(t.__dict__)

    def to(self, device) -> ValueTable:
        """This table on ``device``.

        Parameters
        ----------
        device : str or torch.device
            Target device.

        Returns
        -------
        table : ValueTable
            A new object (tensors shared when already there).
        """
        new = object.__new__(ValueTable)
        new.__dict__.update(self.__dict__)
        new.device = torch.device(device)
        new.blocks = [b.to(new.device) for b in self.blocks]
        return new
