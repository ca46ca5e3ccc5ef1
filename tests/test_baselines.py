"""NearestClassMean and StreamingLDA: exactness, order invariance, sklearn API."""

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.datasets import load_iris, make_blobs
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import SGDClassifier
from sklearn.neighbors import NearestCentroid
from sklearn.neural_network import MLPClassifier
from sklearn.utils.estimator_checks import parametrize_with_checks

from skdkvb.continual.baselines import NearestClassMean, StreamingLDA, make_linear_probe, make_mlp


@parametrize_with_checks([NearestClassMean(), StreamingLDA()])
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.fixture
def data():
    X, y = make_blobs(n_samples=300, centers=5, n_features=4, cluster_std=2.0, random_state=0)
    return X, y


def _class_by_class(est, X, y, order):
    for c in order:
        est.partial_fit(X[y == c], y[y == c])
    return est


def test_ncm_matches_batch_nearest_centroid(data):
    X, y = data
    ncm = _class_by_class(NearestClassMean(), X, y, [3, 0, 4, 1, 2])
    ref = NearestCentroid().fit(X, y)
    np.testing.assert_allclose(ncm.means_, ref.centroids_, atol=1e-12)
    np.testing.assert_array_equal(ncm.predict(X), ref.predict(X))
    np.testing.assert_array_equal(ncm.classes_, np.arange(5))  # sorted as they grow
    np.testing.assert_allclose(ncm.predict_proba(X).sum(1), 1.0)


def test_slda_equals_batch_within_class_covariance(data):
    X, y = data
    slda = StreamingLDA(shrinkage=0.0)
    for chunk in np.array_split(np.random.RandomState(0).permutation(len(y)), 7):
        slda.partial_fit(X[chunk], y[chunk])
    means = np.stack([X[y == c].mean(0) for c in range(5)])
    centred = X - means[y]
    np.testing.assert_allclose(slda.means_, means, atol=1e-10)
    np.testing.assert_allclose(slda.scatter_, centred.T @ centred, rtol=1e-9, atol=1e-9)
    assert slda.n_samples_seen_ == 300
    # Same decisions as sklearn's LDA with equal priors (the LDA rule).
    lda = LinearDiscriminantAnalysis(priors=np.full(5, 0.2)).fit(X, y)
    assert np.mean(slda.predict(X) == lda.predict(X)) > 0.99


@settings(max_examples=15, deadline=None)
@given(st.permutations(range(5)), st.integers(1, 4))
def test_slda_order_and_batching_invariant(order, n_chunks):
    X, y = make_blobs(n_samples=120, centers=5, n_features=3, random_state=1)
    ref = StreamingLDA().fit(X, y)
    est = StreamingLDA()
    for c in order:
        for part in np.array_split(np.flatnonzero(y == c), n_chunks):
            est.partial_fit(X[part], y[part])
    np.testing.assert_allclose(est.scatter_, ref.scatter_, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(est.decision_function(X), ref.decision_function(X),
                               rtol=1e-6, atol=1e-6)


def test_slda_class_incremental_iris():
    X, y = load_iris(return_X_y=True)
    est = _class_by_class(StreamingLDA(), X, y, [2, 0, 1])
    assert est.score(X, y) > 0.95
    proba = est.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    np.testing.assert_allclose(np.exp(est.predict_log_proba(X)), proba, atol=1e-12)


@pytest.mark.parametrize("Est", [NearestClassMean, StreamingLDA])
def test_declared_but_unseen_classes_are_never_predicted(Est, data):
    X, y = data
    est = Est().partial_fit(X[y < 2], y[y < 2], classes=np.arange(5))
    assert est.classes_.tolist() == [0, 1, 2, 3, 4]
    assert set(est.predict(X)) <= {0, 1}
    assert np.all(est.predict_proba(X)[:, 2:] == 0)
    with pytest.raises(ValueError, match="not in the classes"):
        Est().partial_fit(X, y, classes=[0, 1])


@pytest.mark.parametrize("Est", [NearestClassMean, StreamingLDA])
def test_bad_input_leaves_fitted_state_unchanged(Est, data):
    X, y = data
    est = Est().fit(X, y)
    before = pickle.dumps(est)
    with pytest.raises(ValueError, match="features"):
        est.partial_fit(X[:, :2], y)
    with pytest.raises(ValueError):
        est.fit(X[:, :2], y[:5])
    assert pickle.dumps(est) == before
    again = pickle.loads(before)
    np.testing.assert_array_equal(again.predict(X), est.predict(X))
    assert clone(est).get_params() == est.get_params()


def test_slda_rejects_bad_shrinkage(data):
    X, y = data
    with pytest.raises(ValueError, match="shrinkage"):
        StreamingLDA(shrinkage=1.5).fit(X, y)


def test_factories():
    probe = make_linear_probe(random_state=3, alpha=1e-3)
    assert isinstance(probe, SGDClassifier)
    assert probe.loss == "log_loss" and probe.random_state == 3 and probe.alpha == 1e-3
    mlp = make_mlp(random_state=1)
    assert isinstance(mlp, MLPClassifier) and mlp.hidden_layer_sizes == (128,)
    assert make_mlp(hidden=16).hidden_layer_sizes == (16,)
