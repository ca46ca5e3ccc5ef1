"""Data-parallel training and block-wise prediction of DKVB models on Dask.

:func:`fit_parallel` trains copies of one key-initialised
:class:`~skdkvb.DKVBClassifier` on groups of partitions ("shards"), one task
per shard, and adds the shards' results pairwise in a tree of tasks on the
workers. :func:`predict_parallel` maps a fitted model over the blocks of a
Dask array or DataFrame, lazily.

Semantics
---------
* Count decoders (``decoder="logp"`` or ``"vote"``): a shard returns what it
  added, a :class:`ShardCounts` (the count cells its samples incremented, in
  the smaller exact form, and per partition the labels in arrival order, the
  weight total and the history rows), never a model. Sums of counts do not
  depend on the order, so a shard may hold any partitions: with a client and
  persisted data, the partitions each worker already holds. The client adds
  the total to a copy of the estimator and rebuilds ``classes_`` (labels in
  order of first arrival over the partitions in partition order, after the
  estimator's own classes), ``t_``, ``n_iter_`` and ``history_`` in
  partition order: exactly what sequential
  :meth:`~skdkvb.DKVBClassifier.partial_fit` over the concatenated data
  gives, bit for bit with integer (or unit) weights, whatever the
  partitioning and the order in which tasks complete.
* ``decoder="sgd"``: shards are contiguous ranges of partitions; each of
  ``epochs`` rounds starts every shard from the model merged at the end of
  the previous round, each shard passes once over its partitions (one
  ``partial_fit`` per partition, with ``classes=`` all labels sorted), and
  the round ends with one tree of :func:`skdkvb.merge.merge` (neighbours,
  left before right). It equals sequential training only when no key is
  selected by two shards; otherwise it is close (see the "Scaling out"
  documentation page).
"""

from __future__ import annotations

import copy
import itertools
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._classifier import DKVBClassifier
from ._state import HISTORY_MAX_ROWS, check_state, structure_of
from .merge import merge

__all__ = ["PartitionError", "ShardCounts", "add_shard_counts", "fit_parallel", "predict_parallel"]


class PartitionError(RuntimeError):
    """Training on one partition failed; the message names the partition and the cause."""


def _is_dask(obj) -> bool:
    return hasattr(obj, "__dask_graph__") and obj.__dask_graph__() is not None


def _partitions(X, y, sample_weight) -> tuple[list[tuple], list[int | None]]:
    """One ``(X_part, y_part, w_part_or_None)`` per partition (delayed objects or numpy), and row counts."""
    import dask

    if not _is_dask(X):
        if y is not None:
            raise TypeError(
                "y must be None when X is an iterable of (X, y[, sample_weight]) batches, got "
                f"{type(y).__name__}. Pass the labels inside the batches, or pass Dask collections."
            )
        parts = []
        for i, batch in enumerate(X):
            if not isinstance(batch, tuple | list) or len(batch) not in (2, 3):
                raise TypeError(
                    f"batch {i} must be a tuple (X, y) or (X, y, sample_weight), got {type(batch).__name__}."
                )
            parts.append((batch[0], batch[1], batch[2] if len(batch) == 3 else None))
        return parts, [len(p[1]) for p in parts]
    if y is None or not _is_dask(y):
        raise TypeError(f"y must be a Dask collection when X is one, got {type(y).__name__}.")
    if hasattr(X, "ndim") and hasattr(X, "chunks") and not hasattr(X, "columns"):  # dask array
        X = X.rechunk({1: -1}) if X.ndim == 2 else X
        rows = X.chunks[0]
        y = y.rechunk((rows,)) if hasattr(y, "chunks") else y.to_dask_array(lengths=True).rechunk((rows,))
        xs = X.to_delayed(optimize_graph=False).ravel().tolist()
        ys = y.to_delayed(optimize_graph=False).ravel().tolist()
        sizes = list(rows)
        ws = [None] * len(xs)
        if sample_weight is not None:
            w = sample_weight if hasattr(sample_weight, "chunks") else dask.array.asarray(sample_weight)
            ws = w.rechunk((rows,)).to_delayed(optimize_graph=False).ravel().tolist()
    else:  # dask DataFrame / Series: partitions must line up
        xs = X.to_delayed(optimize_graph=False)
        sizes = [None] * len(xs)
        ys = y.to_delayed(optimize_graph=False)
        if len(ys) != len(xs):
            raise ValueError(f"X has {len(xs)} partitions but y has {len(ys)}; repartition y like X.")
        ws = [None] * len(xs)
        if sample_weight is not None:
            ws = sample_weight.to_delayed(optimize_graph=False)
            if len(ws) != len(xs):
                raise ValueError(f"X has {len(xs)} partitions but sample_weight has {len(ws)}.")
    return list(zip(xs, ys, ws)), sizes


def _unique_in_order(y) -> np.ndarray:
    y = np.asarray(y).ravel()
    labels, first = np.unique(y, return_index=True)
    return labels[np.argsort(first, kind="stable")]


def _train_shard(start, shard_id, part_ids, classes, *parts):
    """SGD rounds: train a private copy of ``start`` on the shard's partitions (``parts`` = X0, y0, w0, X1, ...)."""
    model = copy.deepcopy(start)
    trained = False
    for j, pid in enumerate(part_ids):
        Xp, yp, wp = _part(parts, j)
        if len(yp) == 0:
            continue
        _partial_fit(model, pid, shard_id, Xp, yp, wp, classes)
        trained = True
    return model if trained else None


def _part(parts, j):
    Xp, yp, wp = parts[3 * j], parts[3 * j + 1], parts[3 * j + 2]
    return np.asarray(Xp), np.asarray(yp).ravel(), None if wp is None else np.asarray(wp).ravel()


def _partial_fit(model, pid, shard_id, Xp, yp, wp, classes=None):
    try:
        model.partial_fit(Xp, yp, classes=classes, sample_weight=wp)
    except Exception as exc:
        raise PartitionError(
            f"partial_fit failed on partition {pid} ({len(yp)} rows, shard {shard_id}): {type(exc).__name__}: {exc}"
        ) from exc


# ----------------------------------------------------------------------------------------------------------------
# Count decoders: a shard ships what it added (compact), never a model.


@dataclass
class ShardCounts:
    """What one shard, or a subtree of merged shards, added to the class counts.

    Count decoders (``"logp"``, ``"vote"``) learn nothing but counts, so a
    shard's whole contribution is the cells of the ``(n_heads * n_keys,
    n_labels)`` count table its samples incremented, plus a few numbers per
    partition. It travels in the smaller of two exact forms: sparse (the
    nonzero cells and their sums) or dense; integer counts below ``2**31``
    travel as int32. Adding two of them (:func:`add_shard_counts`) is exact
    for integer weights and independent of the order, so shards may hold any
    partitions and merge in any order.

    Parameters
    ----------
    labels : ndarray of shape (n_labels,)
        The label of each column (in no particular order).
    n_rows : int
        Rows of the table: ``n_heads * n_keys``.
    dense : ndarray of shape (n_rows, n_labels) or None
        The table, int32 or float64; ``None`` in the sparse form.
    cells : ndarray of shape (n_cells,) or None
        Sparse form: the sorted flat indices ``row * n_labels + column`` of
        the nonzero cells (int64).
    sums : ndarray of shape (n_cells,) or None
        Sparse form: the counts of those cells, int32 or float64.
    partitions : dict
        ``{partition index: (labels in order of first arrival, sum of
        weights, history rows)}`` for every non-empty partition trained.
    """

    labels: np.ndarray
    n_rows: int
    dense: np.ndarray | None
    cells: np.ndarray | None
    sums: np.ndarray | None
    partitions: dict = field(default_factory=dict)

    def __sizeof__(self) -> int:
        # What Dask's scheduler and memory accounting see (``dask.sizeof`` falls back to this).
        return self.nbytes + 1000 * (1 + len(self.partitions))

    @property
    def nbytes(self) -> int:
        """Bytes of the count data (what crosses the network, without pickling overhead)."""
        if self.dense is not None:
            return int(self.dense.nbytes)
        return int(self.cells.nbytes + self.sums.nbytes)

    @property
    def n_cells(self) -> int:
        """Number of cells stored (all cells in the dense form)."""
        return int(self.dense.size if self.dense is not None else self.cells.size)

    def to_dense(self) -> np.ndarray:
        """The table as a float64 array of shape (n_rows, n_labels).

        Returns
        -------
        ndarray of shape (n_rows, n_labels)
            A new array.
        """
        out = np.zeros((self.n_rows, len(self.labels)), dtype=np.float64)
        _add_into(self, out, np.arange(len(self.labels)))
        return out


def _compact(table: np.ndarray, labels, partitions) -> ShardCounts:
    """The smaller exact form of a table of shape (n_rows, n_labels): float64, or int64 holding exact sums."""
    flat = table.reshape(-1)
    labels = np.asarray(labels)
    if table.dtype.kind == "i":  # integer sums: exact by construction, int32 unless one is too large
        nnz = int(np.count_nonzero(flat))
        exact = nnz == 0 or int(flat.max()) < 2**31
        cells = sums = None
    else:
        cells = np.flatnonzero(flat)
        sums = flat[cells]
        nnz = cells.size
        exact = bool(nnz == 0 or (np.array_equal(sums, np.rint(sums)) and np.abs(sums).max() < 2**31))
    dtype = np.int32 if exact else np.float64
    itemsize = np.dtype(dtype).itemsize
    if nnz * (8 + itemsize) < flat.size * itemsize:
        if cells is None:
            cells = np.flatnonzero(flat)
            sums = flat[cells]
        return ShardCounts(labels, table.shape[0], None, cells.astype(np.int64), sums.astype(dtype), partitions)
    return ShardCounts(labels, table.shape[0], table.astype(dtype, copy=False), None, None, partitions)


def _add_into(sc: ShardCounts, out: np.ndarray, colmap: np.ndarray) -> None:
    """``out[:, colmap[j]] += column j of sc``; ``out`` is (n_rows, L) and ``colmap`` has no duplicates."""
    if sc.dense is not None:
        if sc.dense.shape[1] == out.shape[1] and np.array_equal(colmap, np.arange(out.shape[1])):
            out += sc.dense  # same columns: no gather/scatter copy
        else:
            out[:, colmap] += sc.dense
        return
    n_labels = len(sc.labels)
    rows, cols = np.divmod(sc.cells, n_labels)
    out.reshape(-1)[rows * out.shape[1] + colmap[cols]] += sc.sums  # cells are unique: no lost updates


def _union_labels(a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels of ``a`` then ``b``'s new ones, and the column maps of each into the union."""
    pos = {label: j for j, label in enumerate(a.tolist())}
    extra = [label for label in b.tolist() if label not in pos]
    union = np.concatenate([a, np.asarray(extra, dtype=b.dtype)]) if extra else a
    for label in extra:
        pos[label] = len(pos)
    return union, np.arange(len(a)), np.asarray([pos[label] for label in b.tolist()], dtype=np.int64)


def add_shard_counts(left: ShardCounts | None, right: ShardCounts | None) -> ShardCounts | None:
    """Add two shard results: counts cell by cell (columns aligned by label), partitions united.

    Parameters
    ----------
    left, right : ShardCounts or None
        Results of disjoint sets of partitions (``None``: a shard without
        rows).

    Returns
    -------
    ShardCounts or None
        Their sum, in the smaller exact form.

    Raises
    ------
    ValueError
        If the tables have different numbers of rows (other models) or the
        two results share a partition.
    """
    if left is None or right is None:
        return right if left is None else left
    if left.n_rows != right.n_rows:
        raise ValueError(f"shard results with {left.n_rows} and {right.n_rows} table rows cannot be added.")
    twice = set(left.partitions) & set(right.partitions)
    if twice:
        raise ValueError(f"partitions {sorted(twice)} were counted by two shards.")
    labels, map_l, map_r = _union_labels(left.labels, right.labels)
    parts = {**left.partitions, **right.partitions}
    n = len(labels)
    if left.cells is not None and right.cells is not None and (left.n_cells + right.n_cells) * 12 < left.n_rows * n * 4:
        keys = []
        for sc, colmap in ((left, map_l), (right, map_r)):
            rows, cols = np.divmod(sc.cells, len(sc.labels))
            keys.append(rows * n + colmap[cols])
        cells, inverse = np.unique(np.concatenate(keys), return_inverse=True)
        sums = np.bincount(inverse, weights=np.concatenate([left.sums, right.sums]).astype(np.float64))
        out = _compact_sparse(cells, sums, labels, left.n_rows, parts)
        if out is not None:
            return out
    # Integer counts add in int64 (exact, half the work of float64 plus a check); others in float64.
    ints = all((sc.dense if sc.dense is not None else sc.sums).dtype == np.int32 for sc in (left, right))
    table = np.zeros((left.n_rows, n), dtype=np.int64 if ints else np.float64)
    _add_into(left, table, map_l)
    _add_into(right, table, map_r)
    return _compact(table, labels, parts)


def _compact_sparse(cells, sums, labels, n_rows, parts) -> ShardCounts | None:
    """Sparse result, or ``None`` when the dense form would be smaller."""
    exact = bool(sums.size == 0 or (np.array_equal(sums, np.rint(sums)) and np.abs(sums).max() < 2**31))
    dtype = np.int32 if exact else np.float64
    itemsize = np.dtype(dtype).itemsize
    if cells.size * (8 + itemsize) >= n_rows * len(labels) * itemsize:
        return None
    return ShardCounts(labels, n_rows, None, cells.astype(np.int64), sums.astype(dtype), parts)


def _empty_counts(module) -> None:
    """Give a private copy of the bottleneck empty counts (same classes)."""
    module.count_table = module.count_table.empty_like()


def _added(module, labels, done) -> ShardCounts:
    """The bottleneck's counts (what the shard added) in the smaller exact form."""
    table = module.count_table
    if table.layout == "dense":
        return _compact(table.to_dense().cpu().numpy(), labels, done)
    rows, cols, vals = (x.cpu().numpy() for x in table.cells())
    cells = rows.astype(np.int64) * table.n_classes + cols
    out = _compact_sparse(cells, vals.astype(np.float64), np.asarray(labels), table.n_rows, done)
    if out is None:
        return _compact(table.to_dense().cpu().numpy(), labels, done)
    return out


def _add_total(module, total: ShardCounts, colmap: np.ndarray) -> None:
    """Add the summed shard counts into the bottleneck's counts, column ``colmap[j]`` for label ``j``."""
    table = module.count_table
    if total.dense is not None:
        rows, cols = np.nonzero(total.dense)
        vals = total.dense[rows, cols]
    else:
        rows, cols = np.divmod(total.cells, len(total.labels))
        vals = total.sums
    table.add(
        torch.as_tensor(rows, dtype=torch.int64).view(-1, 1),
        torch.as_tensor(colmap[cols], dtype=torch.int64),
        torch.as_tensor(vals, dtype=torch.float64),
    )


def _count_shard(start, shard_id, part_ids, *parts) -> ShardCounts | None:
    """Count decoders: train a copy of ``start`` from zero counts and return only what it added."""
    model = copy.deepcopy(start)
    module = model.bottleneck_
    # What this shard adds, not start's counts again (t_ follows the counts: the state stays consistent).
    _empty_counts(module)
    model.t_ = 0.0
    done = {}
    for j, pid in enumerate(part_ids):
        Xp, yp, wp = _part(parts, j)
        if len(yp) == 0:
            continue
        model.history_ = []  # this partition's rows only; the caller strings them together in partition order
        _partial_fit(model, pid, shard_id, Xp, yp, wp)
        # The weight total partial_fit adds to t_ (float64 sum of the batch's weights).
        t_add = float(len(yp)) if wp is None else float(np.asarray(wp, dtype=np.float64).sum())
        done[pid] = (_unique_in_order(yp), t_add, list(model.history_))
    if not done:
        return None
    return _added(module, model.classes_, done)


def _label_group(labels) -> str:
    return "int" if labels.dtype.kind in "iu" else labels.dtype.kind


def _finish_counts(start: DKVBClassifier, total: ShardCounts) -> DKVBClassifier:
    """Start's copy plus the summed counts, with classes_, t_, n_iter_ and history_ as sequential training gives."""
    fitted = hasattr(start, "classes_")
    known = list(start.classes_) if fitted else []
    pieces = [start.classes_] if fitted else []
    seen = set(known)
    t = float(start.t_) if fitted else 0.0
    history = list(start.history_) if fitted else []
    n_iter = getattr(start, "n_iter_", 0) if fitted else 0
    group = _label_group(start.classes_) if fitted else None
    for pid in sorted(total.partitions):
        labels, t_add, rows = total.partitions[pid]
        if group is None:
            group = _label_group(labels)
        elif _label_group(labels) != group:
            raise PartitionError(
                f"partition {pid} holds labels of another type ({labels.dtype}) than the partitions before it; "
                "convert the labels to one type."
            )
        new = np.asarray([label not in seen for label in labels.tolist()], dtype=bool)
        if new.any() and seen and start.new_classes == "error":
            raise PartitionError(
                f"partition {pid} holds labels not seen before: {labels[new].tolist()} while "
                f"new_classes='error' (known: {sorted(seen)}). Set new_classes='grow' or train on a model "
                "that declared all labels."
            )
        if new.any():
            pieces.append(labels[new])
            seen.update(labels[new].tolist())
        t = t + t_add
        history = (history + rows)[-HISTORY_MAX_ROWS:]
        n_iter += start.partial_fit_epochs
    classes = np.concatenate(pieces)
    model = copy.deepcopy(start)
    module = model.bottleneck_
    module.add_classes(len(classes) - module.n_classes)
    pos = {label: j for j, label in enumerate(classes.tolist())}
    _add_total(module, total, np.asarray([pos[x] for x in total.labels.tolist()], dtype=np.int64))
    model.classes_ = classes
    model.t_ = t
    model.history_ = history
    model.n_iter_ = n_iter
    model.structure_ = structure_of(model)
    check_state(model)
    return model


def _merge_pair(left, right, base):
    """Merge two shard results (``None`` = shard without data), left's classes first."""
    if left is None or right is None:
        return right if left is None else left
    return merge([left, right], base=base)


def _shard_bounds(n_parts: int, n_shards: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n_parts, n_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]


def fit_parallel(
    estimator: DKVBClassifier,
    X: Any,
    y: Any = None,
    *,
    client: Any = None,
    sample_weight: Any = None,
    n_shards: int | None = None,
    epochs: int = 1,
    init_keys_sample: int | None = None,
    retries: int = 1,
    scheduler: str | None = None,
) -> DKVBClassifier:
    """Train a DKVB model on every Dask worker at once and merge the results exactly.

    Parameters
    ----------
    estimator : DKVBClassifier
        The starting model. It must be key-initialised (after
        :meth:`~skdkvb.DKVBClassifier.fit_keys`, or fitted); if it is fitted,
        every shard continues from it and it is the merge ``base``. It is not
        modified. Pass ``init_keys_sample`` to let this function run
        ``fit_keys`` on a copy instead.
    X : dask array, dask DataFrame or iterable of tuples
        Training inputs of shape (n_samples, n_features), partitioned any
        way; or an iterable of numpy batches ``(X, y)`` or
        ``(X, y, sample_weight)`` (then ``y`` and ``sample_weight`` must be
        None).
    y : dask array or dask Series, default=None
        Labels, rechunked like ``X`` (arrays) or with as many partitions as
        ``X`` (DataFrames).
    client : distributed.Client, default=None
        Cluster to run on. The starting model is scattered to all workers
        once (``broadcast=True``). ``None`` runs on Dask's current scheduler
        (an active ``Client`` if there is one, else threads; see
        ``scheduler``).
    sample_weight : dask array or dask Series, default=None
        Per-sample weights, partitioned like ``y``.
    n_shards : int, default=None
        Number of training tasks per round; each takes a contiguous range of
        partitions. Default: the number of worker threads of ``client``
        (with persisted data and a count decoder: one shard per worker
        thread made of the partitions that worker holds, balanced by rows),
        else ``os.cpu_count()``; never more than the number of partitions.
    epochs : int, default=1
        Rounds: each round trains every shard once over its partitions from
        the model merged at the end of the previous round. For count decoders
        ``K`` rounds equal ``K`` sequential passes exactly.
    init_keys_sample : int, default=None
        If the estimator has no keys yet, run ``fit_keys`` on a copy of it
        with the first ``init_keys_sample`` rows of ``X`` (in partition
        order; this reads those partitions on the client). ``None`` requires
        a key-initialised estimator.
    retries : int, default=1
        How often the distributed scheduler retries a failed task (with a
        ``client`` only). A partition that still fails raises
        :class:`PartitionError` naming it; no partition is ever skipped,
        except empty ones.
    scheduler : str, default=None
        Dask scheduler when ``client`` is None (e.g. ``"threads"``,
        ``"sync"``); ``None`` uses Dask's default.

    Returns
    -------
    model : DKVBClassifier
        A new model: the merge of all shards (``classes_`` in order of first
        arrival over the partitions, after the estimator's own classes).

    Raises
    ------
    ValueError
        If the estimator has no keys and ``init_keys_sample`` is None, if
        ``epochs`` or ``n_shards`` is not a positive integer, or if the data
        has no rows.
    PartitionError
        If ``partial_fit`` raises on a partition (after ``retries``).

    Examples
    --------
    >>> import dask.array as da
    >>> from sklearn.datasets import load_digits
    >>> from skdkvb import DKVBClassifier
    >>> from skdkvb.parallel import fit_parallel
    >>> X, y = load_digits(return_X_y=True)
    >>> start = DKVBClassifier(n_heads=16, n_keys=32, key_dim=4, decoder="logp",
    ...                        key_init_epochs=2, random_state=0, device="cpu").fit_keys(X)
    >>> Xd, yd = da.from_array(X, chunks=(300, 64)), da.from_array(y, chunks=300)
    >>> model = fit_parallel(start, Xd, yd, scheduler="threads")
    >>> seq = DKVBClassifier(**start.get_params()).fit_keys(X).partial_fit(X, y)
    >>> bool((model.predict_proba(X) == seq.predict_proba(X)).all())
    True
    """
    import dask

    if not isinstance(estimator, DKVBClassifier):
        raise TypeError(f"estimator must be a DKVBClassifier, got {type(estimator).__name__}.")
    for name, value in (("epochs", epochs), ("n_shards", n_shards), ("retries", retries + 1)):
        if value is not None and (not isinstance(value, int | np.integer) or value < 1):
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    parts, sizes = _partitions(X, y, sample_weight)
    if not parts:
        raise ValueError("X has no partitions: nothing to train on.")
    if client is not None:
        compute = lambda objs: client.gather(client.compute(objs, retries=retries))  # noqa: E731
    else:
        compute = lambda objs: dask.compute(*objs, scheduler=scheduler)  # noqa: E731

    start = estimator
    if not hasattr(estimator, "bottleneck_"):
        if init_keys_sample is None:
            raise ValueError(
                "estimator has no keys: call estimator.fit_keys(X_sample) first, or pass "
                "init_keys_sample=<number of rows> to initialise them on the first rows of X."
            )
        rows, taken = [], 0
        for Xp, _, _ in parts:
            Xp = np.asarray(Xp.compute() if _is_dask(Xp) else Xp)
            rows.append(Xp)
            taken += len(Xp)
            if taken >= init_keys_sample:
                break
        start = copy.deepcopy(estimator).fit_keys(np.concatenate(rows)[:init_keys_sample])

    classes = None
    if start.decoder == "sgd":
        # Every shard declares all labels so that the softmax sees the same classes.
        uniq = compute([dask.delayed(_unique_in_order)(yp) for _, yp, _ in parts])
        known = list(getattr(start, "classes_", []))
        classes = np.unique(np.concatenate([np.asarray(known, dtype=uniq[0].dtype), *uniq]))

    if start.decoder == "sgd":
        return _fit_sgd_rounds(start, parts, compute, client, n_shards, epochs, classes)
    groups = _shard_groups(parts, sizes, client, n_shards)
    model = start
    for _ in range(epochs):
        if client is not None:
            shipped = client.scatter(model, broadcast=True, hash=False)  # once, not once per task
        else:
            shipped = dask.delayed(model, pure=False, traverse=False)
        level = []
        for s, (pids, worker) in enumerate(groups):
            flat = [obj for pid in pids for obj in parts[pid]]
            with dask.annotate(**({"workers": [worker], "allow_other_workers": True} if worker else {})):
                level.append(dask.delayed(_count_shard, pure=False)(shipped, s, pids, *flat))
        while len(level) > 1:  # pairwise tree; sums are exact and the classes' order is rebuilt at the end
            nxt = [
                dask.delayed(add_shard_counts, pure=False)(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)
            ]
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        (total,) = compute(level)
        if total is None:
            break
        model = _finish_counts(model, total)
    if not hasattr(model, "classes_"):
        raise ValueError("X has no rows: nothing to train on.")
    return copy.deepcopy(model) if model is start else model


def _shard_groups(parts, sizes, client, n_shards) -> list[tuple[list[int], str | None]]:
    """``(partition indices, worker or None)`` per shard.

    With a client, no explicit ``n_shards`` and every partition already in
    cluster memory (persisted), each worker thread gets one shard made of the
    partitions that worker holds, balanced by rows: the data does not move.
    Otherwise contiguous ranges of partitions, one shard per worker thread.
    """
    n_parts = len(parts)
    if client is not None and n_shards is None:
        info = client.scheduler_info()["workers"]
        slots = [addr for addr, w in sorted(info.items()) for _ in range(max(1, int(w.get("nthreads", 1))))]
        keys = [getattr(part[0], "key", None) for part in parts]
        # Ask only about these partitions: a bare who_has() lists every key in the cluster.
        who = client.who_has([part[0] for part in parts]) if all(k is not None for k in keys) else {}
        holders = [next(iter(who.get(k, ())), None) for k in keys]
        if slots and all(h in info for h in holders):
            w = np.asarray([1 if s is None else s for s in sizes], dtype=np.float64)
            target = w.sum() / len(slots)
            load = np.zeros(len(slots))
            members: list[list[int]] = [[] for _ in slots]
            for pid in np.argsort(-w, kind="stable"):  # big partitions first: a tighter balance
                own = [i for i, addr in enumerate(slots) if addr == holders[pid]]
                i = min(own, key=lambda i: load[i])
                if load[i] + w[pid] > target * 1.05 and load.min() + w[pid] <= target * 1.05:
                    i = int(np.argmin(load))  # its holder is full: another worker fetches it
                members[i].append(int(pid))
                load[i] += w[pid]
            return [(sorted(m), slots[i]) for i, m in enumerate(members) if m]
        n_shards = len(slots) or 1
    elif n_shards is None:
        n_shards = os.cpu_count() or 1
    return [(list(range(a, b)), None) for a, b in _shard_bounds(n_parts, min(n_shards, n_parts))]


def _fit_sgd_rounds(start, parts, compute, client, n_shards, epochs, classes):
    """``decoder="sgd"``: rounds of whole-model shards merged with :func:`skdkvb.merge.merge`."""
    import dask

    if n_shards is None:
        if client is not None:
            n_shards = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
        else:
            n_shards = os.cpu_count() or 1
    bounds = _shard_bounds(len(parts), min(n_shards, len(parts)))
    model = start
    for _ in range(epochs):
        fitted = hasattr(model, "classes_")
        if client is not None:
            shipped = client.scatter(model, broadcast=True, hash=False)  # once, not once per task
        else:
            shipped = dask.delayed(model, pure=False, traverse=False)
        base = shipped if fitted else None
        level = []
        for s, (a, b) in enumerate(bounds):
            flat = [obj for part in parts[a:b] for obj in part]
            level.append(dask.delayed(_train_shard, pure=False)(shipped, s, list(range(a, b)), classes, *flat))
        while len(level) > 1:  # pairwise tree, neighbours only: keeps the arrival order of classes
            nxt = [
                dask.delayed(_merge_pair, pure=False)(level[i], level[i + 1], base) for i in range(0, len(level) - 1, 2)
            ]
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        (result,) = compute(level)
        if result is not None:
            model = result
    if not hasattr(model, "classes_"):
        raise ValueError("X has no rows: nothing to train on.")
    return model


def _predict_block(block, model, method):
    return getattr(model, method)(np.asarray(block))


def predict_parallel(estimator: DKVBClassifier, X: Any, *, method: str = "predict") -> Any:
    """Predict lazily, block by block, over a Dask array or DataFrame.

    The model enters the task graph once (as one ``dask.delayed`` object), not
    once per block; on a distributed cluster it is sent to each worker that
    needs it. This is what :class:`dask_ml.wrappers.ParallelPostFit` does,
    without the wrapper (which also works with DKVB models).

    Parameters
    ----------
    estimator : DKVBClassifier
        A fitted model.
    X : dask array or dask DataFrame of shape (n_samples, n_features)
        Inputs, chunked along rows any way.
    method : {"predict", "predict_proba", "predict_log_proba", "decision_function"}, default="predict"
        The estimator method applied to each block.

    Returns
    -------
    result : dask array
        Of shape (n_samples,) for ``"predict"``, else (n_samples, n_classes);
        nothing is computed until ``.compute()``.

    Examples
    --------
    >>> import dask.array as da
    >>> from sklearn.datasets import load_digits
    >>> from skdkvb import DKVBClassifier
    >>> from skdkvb.parallel import predict_parallel
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = DKVBClassifier(n_heads=16, n_keys=32, key_dim=4, decoder="logp", random_state=0,
    ...                      key_init_epochs=2, device="cpu").fit(X, y)
    >>> proba = predict_parallel(clf, da.from_array(X, chunks=(500, 64)), method="predict_proba")
    >>> proba.shape
    (1797, 10)
    >>> bool((proba.compute(scheduler="sync") == clf.predict_proba(X)).all())
    True
    """
    import dask

    methods = ("predict", "predict_proba", "predict_log_proba", "decision_function")
    if method not in methods:
        raise ValueError(f"method={method!r} is not one of {methods}.")
    if not hasattr(estimator, "classes_"):
        raise ValueError("estimator is not fitted: call fit or partial_fit (or fit_parallel) first.")
    if not _is_dask(X):
        raise TypeError(f"X must be a Dask array or DataFrame, got {type(X).__name__}; call the method directly.")
    if hasattr(X, "columns"):
        X = X.to_dask_array()
    X = X.rechunk({1: -1})
    model = dask.delayed(estimator, pure=True, traverse=False)
    if method == "predict":
        return X.map_blocks(
            _predict_block,
            model,
            method,
            drop_axis=1,
            dtype=estimator.classes_.dtype,
            meta=np.empty(0, estimator.classes_.dtype),
        )
    n = len(estimator.classes_)
    dtype = getattr(estimator, method)(np.zeros((1, X.shape[1]), dtype=X.dtype)).dtype  # one-row probe
    return X.map_blocks(
        _predict_block, model, method, chunks=(X.chunks[0], (n,)), dtype=dtype, meta=np.empty((0, 0), dtype)
    )
