"""fit_parallel / predict_parallel: exact equality with sequential partial_fit, failures, schedulers."""

import copy

import numpy as np
import pytest
from sklearn.datasets import load_digits

da = pytest.importorskip("dask.array")
dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("distributed")

from skdkvb import DKVBClassifier  # noqa: E402
from skdkvb.parallel import PartitionError, fit_parallel, predict_parallel  # noqa: E402

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
    if start.bottleneck_.counts.dtype != __import__("torch").float64:
        pytest.xfail("counts are not float64: non-integer weight sums depend on the summation order")
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
