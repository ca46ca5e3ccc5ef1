"""Scale-out on Dask: Incremental, GridSearchCV on the joblib Dask backend,
and dask-ml's early-stopping searches over DKVB's partial_fit.

Needs ``pip install "skdkvb[dask]"`` (dask/distributed 2025.2.0: dask-ml's
search classes break on later releases). X and y are never ``.persist()``ed
before ``fit``: that trips the same dask-ml bug.
"""

import itertools

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
dask_ml_wrappers = pytest.importorskip("dask_ml.wrappers")
dask_ml_search = pytest.importorskip("dask_ml.model_selection")

from skdkvb import DKVBClassifier  # noqa: E402

X_ALL, Y_ALL = load_digits(return_X_y=True)


def _small(**kw):
    params = dict(n_heads=16, n_keys=32, key_dim=4, key_init_epochs=2, random_state=0, device="cpu")
    params.update(kw)
    return DKVBClassifier(**params)


def _class_by_class(n_per_class=40):
    """Digits sorted by class; one Dask block per class (blocks arrive in label order)."""
    rows = np.concatenate([np.flatnonzero(np.equal(Y_ALL, c))[:n_per_class] for c in range(10)])
    X, y = X_ALL[rows].astype(np.float32), Y_ALL[rows]
    sizes = tuple(np.bincount(y))
    return X, y, da.from_array(X, chunks=(sizes, X.shape[1])), da.from_array(y, chunks=(sizes,))


def _sequential(est, X, y):
    sizes = np.bincount(y)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for lo, hi in itertools.pairwise(bounds):
        est.partial_fit(X[lo:hi], y[lo:hi])
    return est


@pytest.mark.parametrize("decoder", ["sgd", "logp"])
def test_incremental_class_by_class_equals_sequential(client, decoder):
    X, y, Xd, yd = _class_by_class()
    est = _small(decoder=decoder)
    inc = dask_ml_wrappers.Incremental(est, shuffle_blocks=False).fit(Xd, yd)
    seq = _sequential(clone(est), X, y)
    assert list(inc.estimator_.classes_) == list(range(10))  # grown block by block
    assert np.array_equal(inc.estimator_.predict_proba(X), seq.predict_proba(X))
    assert inc.estimator_.t_ == seq.t_ == len(y)
    assert np.array_equal(np.asarray(inc.predict(Xd)), seq.predict(X))


def test_incremental_from_keys_fitted_on_unlabeled_data(client):
    X, y, Xd, yd = _class_by_class()
    est = _small()
    inc = dask_ml_wrappers.Incremental(est, shuffle_blocks=False)
    # Keys first, from unlabeled data of the domain; partial_fit continues estimator_.
    inc.estimator_ = clone(est).fit_keys(X_ALL)
    inc.partial_fit(Xd, yd)
    seq = _sequential(clone(est).fit_keys(X_ALL), X, y)
    assert np.array_equal(inc.estimator_.bottleneck_.keys.numpy(), seq.bottleneck_.keys.numpy())
    assert np.array_equal(inc.estimator_.predict_proba(X), seq.predict_proba(X))
    assert inc.estimator_.score(X, y) > 0.8


def test_grid_search_on_joblib_dask_backend(client):
    import joblib
    from sklearn.model_selection import GridSearchCV

    X, y = X_ALL[:600], Y_ALL[:600]
    grid = {"n_keys": [8, 64], "decoder": ["vote", "logp"]}
    serial = GridSearchCV(_small(), grid, cv=2).fit(X, y)
    with joblib.parallel_config(backend="dask"):
        on_dask = GridSearchCV(_small(), grid, cv=2, n_jobs=-1).fit(X, y)
    assert np.array_equal(on_dask.cv_results_["mean_test_score"], serial.cv_results_["mean_test_score"])
    assert on_dask.best_params_ == serial.best_params_
    assert on_dask.best_score_ > 0.6  # chance is 0.1


def _shuffled_dask(n=800, chunk=100):
    X, y = X_ALL[:n].astype(np.float32), Y_ALL[:n]
    return da.from_array(X, chunks=(chunk, X.shape[1])), da.from_array(y, chunks=(chunk,))


def test_hyperband_stops_bad_candidates_early(client):
    Xd, yd = _shuffled_dask()
    from scipy.stats import loguniform

    # n_keys=1 puts every sample on the same key: a constant, chance-level model.
    params = {"n_keys": [1, 64], "learning_rate": loguniform(0.05, 1.0)}
    search = dask_ml_search.HyperbandSearchCV(_small(batch_size=64), params, max_iter=9, random_state=0)
    search.fit(Xd, yd, classes=np.arange(10))
    calls = np.asarray(search.cv_results_["partial_fit_calls"])
    assert calls.min() < calls.max()  # some candidates were stopped early
    assert search.best_params_["n_keys"] == 64
    assert search.best_score_ > 0.5


def test_incremental_search_cv(client):
    Xd, yd = _shuffled_dask()
    params = {"n_keys": [4, 16, 64], "decoder": ["sgd", "logp"]}
    search = dask_ml_search.IncrementalSearchCV(
        _small(), params, n_initial_parameters=4, max_iter=3, decay_rate=None, random_state=0
    )
    search.fit(Xd, yd, classes=np.arange(10))
    results = search.cv_results_
    assert len(results["params"]) == 4
    assert list(results["partial_fit_calls"]) == [3] * 4  # decay_rate=None: nobody stopped early
    scores = dict(zip([(p["n_keys"], p["decoder"]) for p in results["params"]], results["test_score"]))
    # Digits need more than 4 keys per head: the smallest table is never the best candidate.
    assert search.best_params_["n_keys"] > 4
    assert max(scores.values()) == search.best_score_ > min(s for (k, _), s in scores.items() if k == 4)
    best = search.best_estimator_
    assert {k: best.get_params()[k] for k in search.best_params_} == search.best_params_
    assert best.score(X_ALL[800:], Y_ALL[800:]) > 0.6  # held-out rows; chance is 0.1
