"""Growing per-key tables of the bottleneck: exact class counts (dense or sparse) and the sgd value table.

Layout choice (``CountTable(layout="auto")``): the counts stay a dense ``(n_rows, capacity)`` float64
array while ``n_rows * capacity <= dense_max_cells`` (2**24 cells = 128 MiB by default: every toy,
digits and FMNIST configuration with 10 classes), and switch once to an exact sparse store when the
classes grow past it. The sparse store keeps only the nonzero ``(row, class)`` cells, sorted by
``row << 32 | class``, so its memory follows what the stream put where (at most ``n_samples * S``
cells), never ``n_rows * n_classes``. Both layouts hold the same numbers; scores agree to float
rounding.

Value table (``ValueTable``): the columns live in a list of class blocks, each a contiguous
``(n_rows, width)`` buffer; a new block is ``max(16, capacity // 4)`` columns wide, so adding a class
allocates at most a quarter of the table and at most ``max_block_bytes`` (64 MiB), never a copy of
the existing columns (peak during growth <= 1.25 x the table); the blocks grow geometrically until they
reach that cap (16 columns at 2**20 rows in float32), then linearly. Memory:
``n_rows * capacity * itemsize`` with ``capacity <= n_classes + max(16, min(n_classes / 4, cap columns))``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

__all__ = ["CountTable", "ValueTable"]

_SHIFT = 32  # cell code = row << 32 | column
_BLOCK_CELLS = 1 << 22  # bound on gathered cells per scoring block (32 MiB of float64)


def _as_long(x: torch.Tensor, device) -> torch.Tensor:
    return torch.as_tensor(x, device=device).to(torch.int64)


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
        self.n_classes = 0
        self.dense_max_cells = int(dense_max_cells)
        self._auto = layout == "auto"
        self.layout = "sparse" if layout == "sparse" else "dense"
        self.device = torch.device(device)
        self._usage = torch.zeros(self.n_rows, dtype=torch.float64, device=self.device)
        self._dense = torch.zeros((self.n_rows, 0), dtype=torch.float64, device=self.device)
        self._codes = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._vals = torch.zeros(0, dtype=torch.float64, device=self.device)
        self._cache = None
        if n_classes:
            self.add_classes(n_classes)

    # ------------------------------------------------------------------ growth
    def add_classes(self, n_new: int) -> None:
        """Append ``n_new`` empty classes (amortised O(1): capacity grows geometrically).

        Parameters
        ----------
        n_new : int
            Number of classes to add (>= 0).
        """
        if n_new < 0:
            raise ValueError(f"n_new must be >= 0, got {n_new}.")
        k = self.n_classes + int(n_new)
        if self.layout == "dense" and k > self._dense.shape[1]:
            cap = max(k, math.ceil(1.5 * self._dense.shape[1]), 8)
            if self._auto and self.n_rows * cap > self.dense_max_cells:
                codes, vals = self._dense_to_sparse()
                self._codes, self._vals, self._dense = codes, vals, self._dense[:, :0]
                self.layout = "sparse"
            else:
                new = torch.zeros((self.n_rows, cap), dtype=torch.float64, device=self.device)
                new[:, : self.n_classes] = self._dense[:, : self.n_classes]
                self._dense = new
        self.n_classes = k  # the scoring cache is keyed on n_classes where it depends on it (vote)

    def _dense_to_sparse(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self._dense[:, : self.n_classes]
        r, c = torch.nonzero(d, as_tuple=True)  # row-major order, so codes come out sorted
        return (r << _SHIFT) | c, d[r, c].clone()

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
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.n_rows):
            raise ValueError(f"rows must lie in [0, {self.n_rows}).")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
            raise ValueError(f"y must lie in [0, {self.n_classes}); call add_classes first.")
        if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
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
        flat_rows = rows.reshape(-1)
        cols = y.view(-1, 1).expand(rows.shape).reshape(-1)
        w = weight.view(-1, 1).expand(rows.shape).reshape(-1)
        self._add_cells(flat_rows, cols, w)

    def _add_cells(self, flat_rows: torch.Tensor, cols: torch.Tensor, w: torch.Tensor) -> None:
        usage = self._usage.index_add(0, flat_rows, w)  # new object; published last
        if self.layout == "dense":
            cells = flat_rows * self._dense.shape[1] + cols
            self._dense.view(-1).index_add_(0, cells, w)  # the single in-place step
        else:
            codes, vals = self._merge(self._codes, self._vals, (flat_rows << _SHIFT) | cols, w)
            self._codes, self._vals = codes, vals  # one tuple assignment publishes the store
        self._usage = usage
        self._cache = None

    @staticmethod
    def _merge(codes, vals, new_codes, w):
        """Sorted store plus unsorted updates -> sorted store (new arrays, or one in-place add if no new cell)."""
        uniq, inv = torch.unique(new_codes, sorted=True, return_inverse=True)
        add = torch.zeros(uniq.shape[0], dtype=torch.float64, device=codes.device).index_add_(0, inv, w)
        keep = add != 0  # zero-weight updates create no cell
        uniq, add = uniq[keep], add[keep]
        pos = torch.searchsorted(codes, uniq)
        hit = pos < codes.shape[0]
        hit[hit.clone()] = codes[pos[hit]] == uniq[hit]
        if bool(hit.all()):
            # only existing cells: one in-place index_add_ (atomic like the dense path), no O(nnz) copy
            return codes, vals.index_add_(0, pos, add)
        vals = vals.index_add(0, pos[hit], add[hit])
        miss_codes, miss_vals, miss_pos = uniq[~hit], add[~hit], pos[~hit]
        n_new = codes.shape[0] + miss_codes.shape[0]
        dest = miss_pos + torch.arange(miss_codes.shape[0], device=codes.device)
        old_slot = torch.ones(n_new, dtype=torch.bool, device=codes.device)
        old_slot[dest] = False
        out_codes = torch.empty(n_new, dtype=torch.int64, device=codes.device)
        out_vals = torch.empty(n_new, dtype=torch.float64, device=codes.device)
        out_codes[old_slot], out_vals[old_slot] = codes, vals
        out_codes[dest], out_vals[dest] = miss_codes, miss_vals
        return out_codes, out_vals

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

    def _cells(self):
        """Nonzero cells as (rows, cols, values)."""
        if self.layout == "dense":
            d = self._dense[:, : self.n_classes]
            r, c = torch.nonzero(d, as_tuple=True)
            return r, c, d[r, c]
        return self._codes >> _SHIFT, self._codes & ((1 << _SHIFT) - 1), self._vals

    # ---------------------------------------------------------------- reading
    def usage(self) -> torch.Tensor:
        """Row totals.

        Returns
        -------
        usage : Tensor of shape (n_rows,)
            float64 sum of each row's counts, maintained incrementally.
        """
        return self._usage

    def to_dense(self) -> torch.Tensor:
        """The counts as a dense array (for tests and small models).

        Returns
        -------
        counts : Tensor of shape (n_rows, n_classes)
            float64 counts.
        """
        if self.layout == "dense":
            return self._dense[:, : self.n_classes].clone()
        out = torch.zeros((self.n_rows, self.n_classes), dtype=torch.float64, device=self.device)
        r, c, v = self._cells()
        out[r, c] = v
        return out

    @property
    def nnz(self) -> int:
        """Number of nonzero cells."""
        if self.layout == "dense":
            return int(torch.count_nonzero(self._dense))
        return int(self._vals.shape[0])

    def nbytes(self) -> int:
        """Bytes held by the store, the usage vector and the scoring cache.

        Returns
        -------
        nbytes : int
            Total bytes.
        """
        ts = [self._usage, self._dense, self._codes, self._vals]
        if self._cache is not None:
            ts += [t for t in self._cache[1] if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in ts)

    def _correction(self, decoder: str, smoothing: float):
        """Cached CSR (row pointer, columns, corrections) with the same nnz as the counts."""
        key = (decoder, float(smoothing), self.n_classes if decoder == "vote" else None)  # logp: log1p(n/a), no K
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        r, c, v = self._cells()
        if decoder == "logp":
            corr = torch.log1p(v / smoothing)
        else:
            corr = v / (self._usage[r] + self.n_classes * smoothing)
        crow = torch.zeros(self.n_rows + 1, dtype=torch.int64, device=self.device)
        crow[1:] = torch.cumsum(torch.bincount(r, minlength=self.n_rows), 0)
        value = (crow, c.clone(), corr)
        self._cache = (key, value)
        return value

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
        b, n_sel = rows.shape
        k, a = self.n_classes, float(smoothing)
        out = torch.empty((b, k), dtype=torch.float32, device=self.device)
        if b == 0 or k == 0:
            return out
        if self.layout == "dense":
            step = max(1, _BLOCK_CELLS // max(1, n_sel * k))
            for start in range(0, b, step):
                r = rows[start : start + step]
                g = self._dense[r, :k]  # (bb, S, K) float64
                f = (g + a) / (self._usage[r].unsqueeze(-1) + k * a)
                out[start : start + step] = f.log().sum(1) if decoder == "logp" else f.mean(1)
            return out
        crow, cols, corr = self._correction(decoder, a)
        lens = crow[rows + 1] - crow[rows]  # (b, S)
        per_sample = lens.sum(1)
        denom = self._usage[rows] + k * a
        if decoder == "logp":
            base = torch.log(a / denom).sum(1)
        else:
            base = (a / denom).sum(1)
        # split samples so that each block gathers at most ~_BLOCK_CELLS nonzeros (and rows)
        ends = torch.cumsum(per_sample, 0)
        start = 0
        while start < b:
            offset = int(ends[start - 1]) if start else 0
            stop = int(torch.searchsorted(ends, offset + _BLOCK_CELLS, right=True))
            stop = min(b, max(stop, start + 1), start + max(1, _BLOCK_CELLS // max(1, k)))
            blk = self._correction_sum(rows[start:stop], crow, cols, corr, lens[start:stop])
            blk += base[start:stop].unsqueeze(1)
            out[start:stop] = blk / n_sel if decoder == "vote" else blk
            start = stop
        return out

    def _correction_sum(self, rows, crow, cols, corr, lens) -> torch.Tensor:
        """(bb, K) float64 sums over s of the correction rows ``rows[i, s]``: a CSR selection matrix
        (bb x n_rows) times the CSR correction table; index arithmetic where CSR products are missing."""
        bb, n_sel = rows.shape
        k = self.n_classes
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                table = torch.sparse_csr_tensor(crow, cols, corr, size=(self.n_rows, k), check_invariants=False)
                sel = torch.sparse_csr_tensor(
                    torch.arange(0, bb * n_sel + 1, n_sel, dtype=torch.int64, device=self.device),
                    rows.reshape(-1),
                    torch.ones(bb * n_sel, dtype=torch.float64, device=self.device),
                    size=(bb, self.n_rows),
                    check_invariants=False,
                )
                prod = sel @ table
                p_crow, p_col, p_val = prod.crow_indices(), prod.col_indices(), prod.values()
            # scatter the CSR product into a dense block (Tensor.to_dense of CSR is slow on the CPU)
            blk = torch.zeros((bb, k), dtype=torch.float64, device=self.device)
            p_row = torch.repeat_interleave(torch.arange(bb, device=self.device), p_crow[1:] - p_crow[:-1])
            blk.view(-1).index_put_((p_row * k + p_col,), p_val, accumulate=True)
            return blk
        except (RuntimeError, NotImplementedError):
            pass
        blk = torch.zeros((bb, k), dtype=torch.float64, device=self.device)
        ln = lens.reshape(-1)
        total = int(ln.sum())
        if total:
            first = crow[rows.reshape(-1)]
            seg = torch.repeat_interleave(torch.arange(ln.shape[0], device=self.device), ln)
            within = torch.arange(total, device=self.device) - torch.repeat_interleave(torch.cumsum(ln, 0) - ln, ln)
            idx = first[seg] + within
            blk.view(-1).index_add_(0, (seg // n_sel) * k + cols[idx], corr[idx])
        return blk

    # ------------------------------------------------------------- integrity
    def check(self) -> None:
        """Raise ``ValueError`` if an invariant is broken (shapes, finite, >= 0, usage == row sums)."""
        if self._usage.shape != (self.n_rows,):
            raise ValueError("usage has the wrong shape.")
        r, c, v = self._cells()
        if self.layout == "dense":
            if self._dense.shape[0] != self.n_rows or self._dense.shape[1] < self.n_classes:
                raise ValueError("dense table has the wrong shape.")
            if bool(self._dense[:, self.n_classes :].ne(0).any()):
                raise ValueError("padding columns of the dense table must be 0.")
        else:
            if self._codes.shape != self._vals.shape:
                raise ValueError("sparse codes and values differ in length.")
            if self._codes.numel() > 1 and not bool((self._codes[1:] > self._codes[:-1]).all()):
                raise ValueError("sparse codes must be strictly increasing.")
            if r.numel() and (int(r.max()) >= self.n_rows or int(c.max()) >= self.n_classes):
                raise ValueError("sparse cell outside the table.")
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()) or not bool(torch.isfinite(self._usage).all()):
            raise ValueError("counts must be finite and >= 0.")
        sums = torch.zeros(self.n_rows, dtype=torch.float64, device=self.device).index_add_(0, r, v)
        if not torch.allclose(sums, self._usage, rtol=1e-9, atol=1e-9):
            raise ValueError("usage differs from the row sums of the counts.")

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Numpy state (views of the tensors where the device is the CPU: no second copy).

        Returns
        -------
        state : dict of str to numpy.ndarray
            ``layout``, ``shape``, ``usage`` and either ``dense`` or ``codes`` and ``values``.
        """

        def np_(t):
            return t.detach().cpu().numpy()

        d = {
            "layout": np.array(self.layout),
            "auto": np.array(self._auto),
            "dense_max_cells": np.array(self.dense_max_cells, dtype=np.int64),
            "shape": np.array([self.n_rows, self.n_classes], dtype=np.int64),
            "usage": np_(self._usage),
        }
        if self.layout == "dense":
            d["dense"] = np_(self._dense[:, : self.n_classes])
        else:
            d["codes"], d["values"] = np_(self._codes), np_(self._vals)
        return d

    @classmethod
    def from_state_dict(cls, d: dict, device="cpu") -> CountTable:
        """Rebuild a table from :meth:`state_dict`.

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
        n_rows, n_classes = (int(x) for x in d["shape"])
        layout = str(d["layout"])
        t = cls(n_rows, 0, layout=layout, device=device, dense_max_cells=int(d["dense_max_cells"]))
        t._auto = bool(d["auto"])
        t.n_classes = n_classes
        t._usage = torch.as_tensor(np.asarray(d["usage"]), dtype=torch.float64).to(device).clone()
        if layout == "dense":
            dense = torch.as_tensor(np.ascontiguousarray(d["dense"]), dtype=torch.float64)
            if dense.shape != (n_rows, n_classes):
                raise ValueError(f"dense state has shape {tuple(dense.shape)}, expected {(n_rows, n_classes)}.")
            t._dense = dense.to(device).clone()
        else:
            t._codes = torch.as_tensor(np.asarray(d["codes"]), dtype=torch.int64).to(device).clone()
            t._vals = torch.as_tensor(np.asarray(d["values"]), dtype=torch.float64).to(device).clone()
        t.check()
        return t

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
        for name in ("_usage", "_dense", "_codes", "_vals"):
            t = getattr(self, name).to(new.device)
            setattr(new, name, t.clone() if copy else t)
        new._cache = None
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
            self.blocks = self.blocks + [block]
        self.n_classes = k

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
        """Numpy state: one array per block (views on the CPU, no copy; bfloat16 saved as float32).

        Returns
        -------
        state : dict of str to numpy.ndarray
            ``shape``, ``dtype`` and ``block_<i>``.
        """
        d = {"shape": np.array([self.n_rows, self.n_classes], dtype=np.int64), "dtype": np.array(str(self.dtype))}
        for i, b in enumerate(self.blocks):
            b = b.detach().cpu()
            d[f"block_{i}"] = (b.float() if b.dtype == torch.bfloat16 else b).numpy()
        return d

    @classmethod
    def from_state_dict(cls, d: dict, device="cpu") -> ValueTable:
        """Rebuild from :meth:`state_dict`.

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
        dtype = getattr(torch, str(d["dtype"]).replace("torch.", ""))
        n_rows, n_classes = (int(x) for x in d["shape"])
        t = cls(n_rows, 0, dtype=dtype, device=device)
        i, blocks = 0, []
        while f"block_{i}" in d:
            blocks.append(torch.as_tensor(np.asarray(d[f"block_{i}"])).to(device=device, dtype=dtype).clone())
            i += 1
        t.blocks = blocks
        if n_classes > t.capacity:
            raise ValueError(f"state has {n_classes} classes but only {t.capacity} columns.")
        t.n_classes = n_classes
        return t

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
