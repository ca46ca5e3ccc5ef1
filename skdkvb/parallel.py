"""Data-parallel training and block-wise prediction of DKVB models on Dask.

:func:`fit_parallel` trains copies of one key-initialised
:class:`~skdkvb.DKVBClassifier` on contiguous groups of partitions ("shards"),
one task per shard, and merges the shards pairwise in a tree with
:func:`skdkvb.merge.merge` on the workers. :func:`predict_parallel` maps a
fitted model over the blocks of a Dask array or DataFrame, lazily.

Semantics
---------
* Shard ``i`` holds partitions ``[b_i, b_{i+1})`` in partition order and the
  tree merges neighbours (left before right), so ``classes_`` of the result
  is the order in which labels first arrive over the partitions in partition
  order, appended to the estimator's own ``classes_`` -- exactly what
  sequential :meth:`~skdkvb.DKVBClassifier.partial_fit` over the concatenated
  data gives. With ``decoder="logp"`` or ``"vote"`` and integer (or unit)
  weights, the merged model equals the sequential one bit for bit, whatever
  the partitioning and the order in which tasks complete: counts are sums.
* ``decoder="sgd"``: each of ``epochs`` rounds starts every shard from the
  model merged at the end of the previous round, each shard passes once over
  its partitions (one ``partial_fit`` per partition, with
  ``classes=`` all labels sorted), and the round ends with one tree merge. It
  equals sequential training only when no key is selected by two shards;
  otherwise it is close (see the "Scaling out" documentation page).
"""

from __future__ import annotations

import copy
import itertools
import os
from typing import Any

import numpy as np

from ._classifier import DKVBClassifier
from .merge import merge

__all__ = ["PartitionError", "fit_parallel", "predict_parallel"]


class PartitionError(RuntimeError):
    """Training on one partition failed; the message names the partition and the cause."""


def _is_dask(obj) -> bool:
    return hasattr(obj, "__dask_graph__") and obj.__dask_graph__() is not None


def _partitions(X, y, sample_weight) -> list[tuple]:
    """One ``(X_part, y_part, w_part_or_None)`` per partition: delayed objects or numpy."""
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
        return parts
    if y is None or not _is_dask(y):
        raise TypeError(f"y must be a Dask collection when X is one, got {type(y).__name__}.")
    if hasattr(X, "ndim") and hasattr(X, "chunks") and not hasattr(X, "columns"):  # dask array
        X = X.rechunk({1: -1}) if X.ndim == 2 else X
        rows = X.chunks[0]
        y = y.rechunk((rows,)) if hasattr(y, "chunks") else y.to_dask_array(lengths=True).rechunk((rows,))
        xs = X.to_delayed(optimize_graph=False).ravel().tolist()
        ys = y.to_delayed(optimize_graph=False).ravel().tolist()
        ws = [None] * len(xs)
        if sample_weight is not None:
            w = sample_weight if hasattr(sample_weight, "chunks") else dask.array.asarray(sample_weight)
            ws = w.rechunk((rows,)).to_delayed(optimize_graph=False).ravel().tolist()
    else:  # dask DataFrame / Series: partitions must line up
        xs = X.to_delayed(optimize_graph=False)
        ys = y.to_delayed(optimize_graph=False)
        if len(ys) != len(xs):
            raise ValueError(f"X has {len(xs)} partitions but y has {len(ys)}; repartition y like X.")
        ws = [None] * len(xs)
        if sample_weight is not None:
            ws = sample_weight.to_delayed(optimize_graph=False)
            if len(ws) != len(xs):
                raise ValueError(f"X has {len(xs)} partitions but sample_weight has {len(ws)}.")
    return list(zip(xs, ys, ws))


def _unique_in_order(y) -> np.ndarray:
    y = np.asarray(y).ravel()
    labels, first = np.unique(y, return_index=True)
    return labels[np.argsort(first, kind="stable")]


def _train_shard(start, shard_id, part_ids, classes, *parts):
    """Train a private copy of ``start`` on the shard's partitions (``parts`` = X0, y0, w0, X1, ...)."""
    model = copy.deepcopy(start)
    trained = False
    for j, pid in enumerate(part_ids):
        Xp, yp, wp = parts[3 * j], parts[3 * j + 1], parts[3 * j + 2]
        Xp = np.asarray(Xp)
        yp = np.asarray(yp).ravel()
        if len(yp) == 0:
            continue
        wp = None if wp is None else np.asarray(wp).ravel()
        try:
            model.partial_fit(Xp, yp, classes=classes, sample_weight=wp)
        except Exception as exc:
            raise PartitionError(
                f"partial_fit failed on partition {pid} ({len(yp)} rows, shard {shard_id}): {type(exc).__name__}: {exc}"
            ) from exc
        trained = True
    return model if trained else None


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
        partitions. Default: the number of worker threads of ``client``,
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
    parts = _partitions(X, y, sample_weight)
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
