"""fit_parallel / predict_parallel: exact equality with sequential partial_fit, failures, schedulers."""

import copy
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits

da = pytest.importorskip("dask.array")
dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("distributed")

from skdkvb import DKVBClassifier  # noqa: E402
from skdkvb.parallel import (  # noqa: E402
    PartitionError,
    ShardCounts,
    _compact,
    _count_shard,
    _partitions,
    _shard_groups,
    add_shard_counts,
    fit_parallel,
    predict_parallel,
)

X_ALL, Y_ALL = load_digits(return_X_y=True)
X_ALL = X_ALL.astype(np.float32)
# Classes split across partitions: sorted by label, so partitions hold one to three classes
# and labels arrive in a non-sorted order after the permutation below.
_ORDER = np.argsort(np.array([3, 1, 4, 0, 5, 9, 2, 6, 8, 7])[Y_ALL], kind="stable")
X, Y = X_ALL[_ORDER][:600], Y_ALL[_ORDER][:600]


def _start(decoder="logp", **kw):
    params = dict(n_heads=16, n_keys=32, key_dim=4, key_init_epochs=2, random_state=0, device="cpu", decoder=decoder)
    params.update(kw)
    return DKVBClassifier(**params).fit_keys(X_ALL)


def _sequential(start, X, y, w=None):
    return copy.deepcopy(start).partial_fit(X, y, sample_weight=w)


def _assert_same(a, b):
    assert list(a.classes_) == list(b.classes_)
    assert np.array_equal(a.bottleneck_.counts.numpy(), b.bottleneck_.counts.numpy())
    assert np.array_equal(a.predict_proba(X_ALL), b.predict_proba(X_ALL))
    assert a.t_ == b.t_


@pytest.mark.slow
@pytest.mark.parametrize(
    "chunks",
    [(100,) * 6, (1, 250, 7, 300, 42), (600,), (5, 0, 595)],
    ids=["even", "uneven", "one", "with-empty"],
)
def test_logp_on_local_cluster_equals_sequential(client, chunks):
    start = _start()
    model = fit_parallel(
        start, da.from_array(X, chunks=(chunks, 64)), da.from_array(Y, chunks=(chunks,)), client=client
    )
    seq = _sequential(start, X, Y)
    # classes_ in order of first arrival, as sequential partial_fit grows them (not sorted).
    assert list(seq.classes_) == list(dict.fromkeys(Y.tolist()))
    _assert_same(model, seq)
    assert not hasattr(start, "classes_")  # the estimator is not modified


@pytest.mark.slow
def test_continues_a_fitted_estimator_on_cluster_with_weights(client):
    start = _start(decoder="vote").partial_fit(X_ALL[-200:], Y_ALL[-200:])
    w = np.random.default_rng(0).integers(0, 4, len(Y)).astype(np.float64)
    chunks = (50, 350, 200)
    model = fit_parallel(
        start,
        client.persist(da.from_array(X, chunks=(chunks, 64))),  # persisted: partitions already on workers
        client.persist(da.from_array(Y, chunks=(chunks,))),
        sample_weight=da.from_array(w, chunks=(chunks,)),
        client=client,
    )
    _assert_same(model, _sequential(start, X, Y, w))


def test_threads_no_cluster_any_partitioning_and_n_shards():
    start = _start()
    seq = _sequential(start, X, Y)
    for chunks, n_shards in [((300, 300), None), ((17, 83, 100, 400), 3), ((200,) * 3, 5)]:
        model = fit_parallel(
            start,
            da.from_array(X, chunks=(chunks, 64)),
            da.from_array(Y, chunks=(chunks,)),
            n_shards=n_shards,
            scheduler="threads",
        )
        _assert_same(model, seq)


def test_non_integer_weights_exact_with_float64_counts():
    start = _start()
    w = np.random.default_rng(1).uniform(0.1, 2.0, len(Y)).round(3)
    chunks = (100, 200, 300)
    model = fit_parallel(
        start,
        da.from_array(X, chunks=(chunks, 64)),
        da.from_array(Y, chunks=(chunks,)),
        sample_weight=da.from_array(w, chunks=(chunks,)),
        scheduler="threads",
    )
    seq = _sequential(start, X, Y, w)
    assert list(model.classes_) == list(seq.classes_)
    # Sums of the same float64 terms in another order: equal to a few ulps, predictions identical.
    np.testing.assert_allclose(model.bottleneck_.counts.numpy(), seq.bottleneck_.counts.numpy(), rtol=1e-12)
    assert np.array_equal(model.predict(X_ALL), seq.predict(X_ALL))


def test_iterable_of_batches_and_dataframe():
    start = _start()
    batches = [(X[:123], Y[:123]), (X[123:400], Y[123:400]), (X[400:], Y[400:])]
    _assert_same(fit_parallel(start, iter(batches), scheduler="sync"), _sequential(start, X, Y))
    df = dd.from_array(X, chunksize=150)
    ys = dd.from_array(Y, chunksize=150)
    _assert_same(fit_parallel(start, df, ys, scheduler="threads"), _sequential(start, X, Y))


def test_failed_partition_is_reported_by_index():
    start = _start(new_classes="error").partial_fit(X[:10], Y[:10], classes=np.unique(Y[:300]))
    # Partition 2 holds labels never declared: partial_fit raises there.
    batches = [(X[:100], Y[:100]), (X[100:200], Y[100:200]), (X[300:400], Y[300:400])]
    with pytest.raises(PartitionError, match=r"partition 2 \(100 rows"):
        fit_parallel(start, batches, scheduler="sync")
    assert list(start.classes_) == list(np.unique(Y[:300]))


@pytest.mark.slow
def test_failed_partition_on_cluster_after_retries(client):
    start = _start(new_classes="error").partial_fit(X[:10], Y[:10], classes=np.unique(Y[:300]))
    chunks = (150, 150, 100)
    with pytest.raises(PartitionError, match=r"partition 2 \(100 rows"):
        fit_parallel(
            start,
            da.from_array(X[:400], chunks=(chunks, 64)),
            da.from_array(Y[:400], chunks=(chunks,)),
            client=client,
            retries=1,
        )


def test_needs_keys_or_init_keys_sample():
    fresh = DKVBClassifier(n_heads=16, n_keys=32, key_dim=4, key_init_epochs=2, random_state=0, device="cpu")
    with pytest.raises(ValueError, match="init_keys_sample"):
        fit_parallel(fresh, [(X, Y)], scheduler="sync")
    model = fit_parallel(fresh, [(X[:300], Y[:300]), (X[300:], Y[300:])], init_keys_sample=400, scheduler="sync")
    seq = copy.deepcopy(fresh).fit_keys(X[:400]).partial_fit(X, Y)
    _assert_same(model, seq)
    assert not hasattr(fresh, "bottleneck_")


def test_sgd_rounds_close_to_sequential():
    start = _start(decoder="sgd")
    chunks = (300, 300)
    model = fit_parallel(
        start, da.from_array(X, chunks=(chunks, 64)), da.from_array(Y, chunks=(chunks,)), epochs=3, scheduler="threads"
    )
    seq = copy.deepcopy(start)
    for _ in range(3):
        for lo in (0, 300):
            seq.partial_fit(X[lo : lo + 300], Y[lo : lo + 300], classes=np.unique(Y))
    assert list(model.classes_) == list(np.unique(Y))
    assert model.t_ == seq.t_
    acc_par, acc_seq = model.score(X, Y), seq.score(X, Y)
    assert acc_par > 0.5 and abs(acc_par - acc_seq) < 0.1


def test_predict_parallel_lazy_blockwise():
    clf = _sequential(_start(), X, Y)
    Xd = da.from_array(X_ALL, chunks=(400, 64))
    pred = predict_parallel(clf, Xd)
    proba = predict_parallel(clf, Xd, method="predict_proba")
    assert pred.shape == (len(X_ALL),) and proba.shape == (len(X_ALL), len(clf.classes_))
    assert np.array_equal(pred.compute(scheduler="threads"), clf.predict(X_ALL))
    assert np.array_equal(proba.compute(scheduler="threads"), clf.predict_proba(X_ALL))
    df = dd.from_array(X_ALL, chunksize=500)
    assert np.array_equal(predict_parallel(clf, df).compute(scheduler="sync"), clf.predict(X_ALL))
    with pytest.raises(ValueError, match="method="):
        predict_parallel(clf, Xd, method="score")


# ---------------------------------------------------------------------------------------------------------------
# Compact shard results (count decoders): what a shard added, not a model.


def _table(rng, n_rows, n_labels, n_nonzero, integer=True):
    t = np.zeros((n_rows, n_labels))
    cells = rng.choice(n_rows * n_labels, n_nonzero, replace=False)
    t.flat[cells] = rng.integers(1, 9, n_nonzero) if integer else rng.uniform(0.1, 2.0, n_nonzero)
    return t


def test_shard_counts_smaller_exact_form():
    rng = np.random.default_rng(0)
    sparse = _compact(_table(rng, 40, 3, 10), np.array([3, 1, 4]), {0: None})
    assert sparse.dense is None and sparse.sums.dtype == np.int32 and sparse.cells.dtype == np.int64
    assert sparse.n_cells == 10 and sparse.nbytes == 10 * (8 + 4) < 40 * 3 * 4
    full = _table(rng, 40, 3, 100)
    dense = _compact(full, np.array([3, 1, 4]), {})
    assert dense.cells is None and dense.dense.dtype == np.int32 and dense.nbytes == 40 * 3 * 4
    assert np.array_equal(dense.to_dense(), full)
    frac = _table(rng, 40, 3, 10, integer=False)
    real = _compact(frac, np.array([0, 1, 2]), {})
    assert real.sums.dtype == np.float64 and np.array_equal(real.to_dense(), frac)
    big = np.zeros((4, 1))
    big[0, 0] = 2.0**31
    assert _compact(big, np.array([0]), {}).sums.dtype == np.float64  # int32 only when it is exact
    assert sys.getsizeof(sparse) >= sparse.nbytes  # what Dask's sizeof sees


@pytest.mark.parametrize("fill", [(5, 7), (100, 120), (5, 120)], ids=["sparse+sparse", "dense+dense", "mixed"])
def test_add_shard_counts_aligns_labels_exact_and_order_free(fill):
    rng = np.random.default_rng(1)
    ta, tb = _table(rng, 50, 3, fill[0]), _table(rng, 50, 3, fill[1])
    a = _compact(ta, np.array([3, 1, 4]), {0: "a"})
    b = _compact(tb, np.array([4, 9, 3]), {2: "b", 1: "b"})
    ab, ba = add_shard_counts(a, b), add_shard_counts(b, a)
    assert list(ab.labels) == [3, 1, 4, 9] and list(ba.labels) == [4, 9, 3, 1]
    assert ab.partitions == ba.partitions == {0: "a", 1: "b", 2: "b"}
    want = np.zeros((50, 4))  # columns 3, 1, 4, 9
    want[:, [0, 1, 2]] += ta
    want[:, [2, 3, 0]] += tb
    assert np.array_equal(ab.to_dense(), want)
    assert np.array_equal(ba.to_dense()[:, [2, 3, 0, 1]], want)
    assert ab.nbytes <= min(np.count_nonzero(want) * 12, want.size * 4)
    assert add_shard_counts(a, None) is a and add_shard_counts(None, b) is b and add_shard_counts(None, None) is None


def test_add_shard_counts_refuses_overlap_and_other_tables():
    rng = np.random.default_rng(2)
    a = _compact(_table(rng, 50, 2, 5), np.array([0, 1]), {0: None, 1: None})
    with pytest.raises(ValueError, match=r"partitions \[1\] were counted by two shards"):
        add_shard_counts(a, _compact(_table(rng, 50, 2, 5), np.array([0, 1]), {1: None}))
    with pytest.raises(ValueError, match="50 and 60 table rows"):
        add_shard_counts(a, _compact(_table(rng, 60, 2, 5), np.array([0, 1]), {2: None}))


def test_a_shard_returns_what_it_added_compactly():
    start = _start().partial_fit(X_ALL[-100:], Y_ALL[-100:])
    parts = [X[:40], Y[:40], None, X[40:40], Y[40:40], None, X[300:330], Y[300:330], None]
    result = _count_shard(start, 0, [0, 1, 2], *parts)
    b = start.bottleneck_
    assert isinstance(result, ShardCounts) and result.dense is None  # 70 rows touch few of the 16 x 32 x 10 cells
    assert result.nbytes < b.counts.numel() * b.counts.element_size()
    assert sorted(result.partitions) == [0, 2]  # the empty partition is not trained
    labels, t_add, rows = result.partitions[2]
    assert list(labels) == list(dict.fromkeys(Y[300:330].tolist())) and t_add == 30.0 and len(rows) == 1
    seq = copy.deepcopy(start).partial_fit(X[:40], Y[:40]).partial_fit(X[300:330], Y[300:330])
    added = seq.bottleneck_.counts.numpy() - np.pad(b.counts.numpy(), ((0, 0), (0, 0), (0, 0)))
    pos = {label: j for j, label in enumerate(seq.classes_.tolist())}
    got = np.zeros_like(added).reshape(-1, added.shape[-1])
    got[:, [pos[label] for label in result.labels.tolist()]] = result.to_dense()
    assert np.array_equal(got.reshape(added.shape), added)
    assert _count_shard(start, 1, [5], X[:0], Y[:0], None) is None


def test_count_epochs_equal_sequential_passes():
    start = _start()
    chunks = (100, 250, 250)
    model = fit_parallel(
        start, da.from_array(X, chunks=(chunks, 64)), da.from_array(Y, chunks=(chunks,)), epochs=2, scheduler="threads"
    )
    seq = _sequential(start, X, Y).partial_fit(X, Y)
    _assert_same(model, seq)
    assert model.n_iter_ == 2 * 3 * start.partial_fit_epochs and len(model.history_) == 6


def test_new_classes_error_and_label_types_across_shards():
    fresh = _start(new_classes="error")
    batches = [(X[:100], Y[:100]), (X[200:300], Y[200:300])]  # the second batch brings new labels
    assert set(Y[200:300]) - set(Y[:100])
    with pytest.raises(ValueError, match="not seen before"):
        _sequential(fresh, X[:100], Y[:100]).partial_fit(X[200:300], Y[200:300])
    with pytest.raises(PartitionError, match="partition 1 holds labels not seen before"):
        fit_parallel(fresh, batches, n_shards=2, scheduler="sync")
    mixed = [(X[:100], Y[:100]), (X[200:300], Y[200:300].astype(str))]
    with pytest.raises(PartitionError, match="partition 1"):
        fit_parallel(_start(), mixed, n_shards=2, scheduler="sync")


@pytest.mark.slow
def test_data_generated_on_workers_trains_where_it_lives(client):
    # Partitions made by Dask's random generators on the workers, kept there (never on the client).
    sizes = (90, 150, 60, 120, 30, 150)
    labels = da.random.RandomState(0).randint(0, 6, size=sum(sizes), chunks=(sizes,))
    noise = da.random.RandomState(1).normal(size=(sum(sizes), 64), chunks=(sizes, 64))
    Xd = (noise + labels[:, None] * 2.0).astype(np.float32)
    Xd, yd = client.persist([Xd, labels])
    distributed.wait([Xd, yd])
    parts, rows = _partitions(Xd, yd, None)
    groups = _shard_groups(parts, rows, client, None)
    workers = set(client.scheduler_info()["workers"])
    assert len(groups) == 2 and {w for _, w in groups} <= workers
    assert sorted(p for pids, _ in groups for p in pids) == list(range(len(sizes)))
    who = client.who_has()
    held = {pid: next(iter(who[parts[pid][0].key])) for pid in range(len(sizes))}
    loads = [sum(sizes[p] for p in pids) for pids, _ in groups]
    moved = [p for pids, w in groups for p in pids if held[p] != w]
    assert max(loads) <= sum(sizes) / 2 * 1.05 + max(sizes)  # balanced by rows
    assert len(moved) <= len(sizes) // 2  # most partitions are trained where they are

    start = _start()
    model = fit_parallel(start, Xd, yd, client=client)
    Xn, yn = client.compute([Xd, yd], sync=True)
    seq = _sequential(start, Xn, yn)
    assert list(model.classes_) == list(dict.fromkeys(yn.tolist()))  # arrival order, whatever the shards
    _assert_same(model, seq)


def test_add_shard_counts_leaves_int32_when_a_sum_outgrows_it():
    big = np.full((4, 2), 2.0**30 + 1)
    a = _compact(big, np.array([0, 1]), {0: None})
    b = _compact(big, np.array([1, 0]), {1: None})
    assert a.dense.dtype == np.int32
    total = add_shard_counts(a, b)
    assert total.dense.dtype == np.float64 and np.array_equal(total.to_dense(), 2 * big)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_shard_result_read_from_a_count_table(layout):
    import torch

    from skdkvb._tables import CountTable
    from skdkvb.parallel import _added

    table = CountTable(64, 3, layout=layout)
    rng = np.random.default_rng(3)
    for _ in range(3):  # several runs in the sparse store; cells repeat across them
        rows, labels = rng.integers(0, 64, (5, 2)), rng.integers(0, 3, 5)  # few cells: the sparse form is smaller
        table.add(torch.as_tensor(rows), torch.as_tensor(labels), torch.ones(5, dtype=torch.float64))
    module = type("Module", (), {"count_table": table})()
    result = _added(module, np.array([7, 5, 6]), {0: None})
    assert result.dense is None and result.sums.dtype == np.int32
    assert np.array_equal(result.to_dense(), table.to_dense().numpy())
