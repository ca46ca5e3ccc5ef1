"""NearestClassMean and StreamingLDA: exactness, order invariance, all-or-nothing updates, sklearn API."""

import pickle
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from sklearn.base import clone
from sklearn.covariance import oas
from sklearn.datasets import load_iris, make_blobs, make_classification
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import SGDClassifier
from sklearn.neighbors import NearestCentroid
from sklearn.neural_network import MLPClassifier
from sklearn.utils.estimator_checks import parametrize_with_checks

import skdkvb.continual.baselines as baselines
from skdkvb.continual.baselines import NearestClassMean, StreamingLDA, make_linear_probe, make_mlp

ESTIMATORS = [NearestClassMean, StreamingLDA]


@parametrize_with_checks([NearestClassMean(), StreamingLDA(), StreamingLDA(shrinkage="auto")])
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.fixture
def data():
    X, y = make_blobs(n_samples=300, centers=5, n_features=4, cluster_std=2.0, random_state=0)
    return X, y


def _state(est):
    """Every attribute of ``est``, arrays copied, for an exact comparison."""
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in vars(est).items()}


def assert_same_state(before, est):
    """``est`` holds exactly the attributes of ``before``: same names, types, dtypes, shapes and bits."""
    after = vars(est)
    assert list(after) == list(before), (list(before), list(after))
    for name, value in before.items():
        other = after[name]
        assert type(other) is type(value), name
        if isinstance(value, np.ndarray):
            assert other.dtype == value.dtype and other.shape == value.shape, name
            np.testing.assert_array_equal(other, value, err_msg=name, strict=True)
        else:
            assert other == value, name


def _is_same_state(before, est):
    try:
        assert_same_state(before, est)
    except AssertionError:
        return False
    return True


def _class_by_class(est, X, y, order):
    for c in order:
        est.partial_fit(X[y == c], y[y == c])
    return est


# -- exactness ------------------------------------------------------------------------------------------------------


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


def test_slda_auto_shrinkage_is_oas_of_the_pooled_within_class_data(data):
    X, y = data
    X = X[:, [0, 1, 2, 3, 0, 1]] + np.random.RandomState(1).normal(scale=0.5, size=(300, 6))  # correlated columns
    slda = _class_by_class(StreamingLDA(shrinkage="auto"), X, y, [4, 2, 0, 1, 3])
    means = np.stack([X[y == c].mean(0) for c in range(5)])
    shrunk, expected = oas(X - means[y], assume_centered=True)
    assert slda.shrinkage_ == pytest.approx(expected, rel=1e-9)
    assert 0.0 < slda.shrinkage_ < 1.0
    coef = np.linalg.solve(shrunk, means.T).T
    np.testing.assert_allclose(slda.coef_, coef, rtol=1e-6)
    np.testing.assert_allclose(slda.intercept_, -0.5 * np.einsum("kd,kd->k", means, coef), rtol=1e-6)


def test_slda_auto_shrinks_more_with_fewer_samples_per_feature():
    X, y = make_blobs(n_samples=400, centers=4, n_features=40, random_state=0)
    X = X @ np.random.RandomState(0).normal(size=(40, 40))  # not isotropic: OAS does not shrink all the way
    few = StreamingLDA(shrinkage="auto").fit(X[:60], y[:60]).shrinkage_
    many = StreamingLDA(shrinkage="auto").fit(X, y).shrinkage_
    assert few > 2 * many > 0


def test_slda_auto_shrinkage_beats_the_fixed_one_with_few_samples_per_feature():
    """80 samples in 60 correlated dimensions: the regime of frozen-encoder embeddings of a few images."""
    X, y = make_classification(
        n_samples=1080,
        n_features=60,
        n_informative=20,
        n_redundant=20,
        n_classes=4,
        n_clusters_per_class=1,
        random_state=0,
    )
    fixed = StreamingLDA(shrinkage=1e-4).fit(X[:80], y[:80]).score(X[80:], y[80:])
    auto = StreamingLDA(shrinkage="auto").fit(X[:80], y[:80]).score(X[80:], y[80:])
    assert auto > fixed + 0.05, (auto, fixed)


def test_slda_class_incremental_iris():
    X, y = load_iris(return_X_y=True)
    est = _class_by_class(StreamingLDA(), X, y, [2, 0, 1])
    assert est.score(X, y) > 0.95
    proba = est.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    np.testing.assert_allclose(np.exp(est.predict_log_proba(X)), proba, atol=1e-12)


# -- structure: any cut of the stream, any weights -------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    est_index=st.sampled_from([0, 1, 2]),
    cuts=st.lists(st.integers(1, 89), max_size=8, unique=True),
    order=st.permutations(range(90)),
)
def test_partial_fit_over_any_cut_equals_fit(est_index, cuts, order):
    """Law: partial_fit over any cut of any ordering of the data equals fit on all of it."""
    X, y = make_blobs(n_samples=90, centers=4, n_features=3, random_state=1)
    make = [NearestClassMean, StreamingLDA, lambda: StreamingLDA(shrinkage="auto")][est_index]
    ref = make().fit(X, y)
    est = make()
    idx = np.asarray(order)
    for part in np.split(idx, sorted(cuts)):
        est.partial_fit(X[part], y[part])
    np.testing.assert_array_equal(est.classes_, ref.classes_)
    np.testing.assert_array_equal(est.class_count_, ref.class_count_)
    np.testing.assert_allclose(est.means_, ref.means_, rtol=1e-10, atol=1e-10)
    if isinstance(est, StreamingLDA):
        np.testing.assert_allclose(est.scatter_, ref.scatter_, rtol=1e-9, atol=1e-9)
        assert est.shrinkage_ == pytest.approx(ref.shrinkage_, rel=1e-9)
    np.testing.assert_allclose(est.decision_function(X), ref.decision_function(X), rtol=1e-6, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(weights=st.lists(st.integers(0, 3), min_size=40, max_size=40).filter(lambda w: sum(w) > 0))
def test_integer_weights_equal_repeated_samples(weights):
    """Law: a sample of weight k counts as k copies of it (0: absent from the statistics)."""
    X, y = make_blobs(n_samples=40, centers=3, n_features=3, random_state=2)
    w = np.asarray(weights)
    for Est in ESTIMATORS:
        weighted = Est().partial_fit(X, y, classes=np.unique(y), sample_weight=w)
        repeated = Est().partial_fit(np.repeat(X, w, axis=0), np.repeat(y, w), classes=np.unique(y))
        np.testing.assert_allclose(weighted.class_count_, repeated.class_count_)
        np.testing.assert_allclose(weighted.means_, repeated.means_, rtol=1e-10, atol=1e-10)
        if Est is StreamingLDA:
            np.testing.assert_allclose(weighted.scatter_, repeated.scatter_, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("Est", ESTIMATORS)
def test_zero_weight_batch_is_a_no_op_for_the_statistics(Est, data):
    X, y = data
    est = Est().partial_fit(X[y < 3], y[y < 3])
    before = _state(est)
    est.partial_fit(X[y < 3][:20], y[y < 3][:20], sample_weight=np.zeros(20))
    assert_same_state(before, est)
    with pytest.raises(ValueError, match="all zero"):
        Est().fit(X, y, sample_weight=np.zeros(len(y)))


# -- validation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("Est", ESTIMATORS)
def test_declared_but_unseen_classes_are_never_predicted(Est, data):
    X, y = data
    est = Est().partial_fit(X[y < 2], y[y < 2], classes=np.arange(5))
    assert est.classes_.tolist() == [0, 1, 2, 3, 4]
    assert set(est.predict(X)) <= {0, 1}
    assert np.all(est.predict_proba(X)[:, 2:] == 0)
    with pytest.raises(ValueError, match="not in the classes"):
        Est().partial_fit(X, y, classes=[0, 1])


@pytest.mark.parametrize("Est", ESTIMATORS)
@pytest.mark.parametrize(
    "bad, match",
    [
        ({"X": "1e300"}, r"finite in float32; sample 7, column 2"),
        ({"X": "nan"}, "NaN"),
        ({"X": "inf"}, "infinity"),
        ({"X": "3 features"}, "features"),
        ({"w": 1e39}, "finite in float32; sample 3"),
        ({"w": np.nan}, "finite in float32; sample 3"),
        ({"w": -1.0}, "non-negative; sample 3"),
        ({"classes": [[0, 1], [2, 3]]}, "1-D"),
        ({"classes": [0, 1]}, "not in the classes"),
    ],
)
def test_rejected_batch_leaves_state_unchanged_and_stream_usable(Est, data, bad, match):
    X, y = data
    est = Est().partial_fit(X[:150], y[:150])
    before = _state(est)
    Xb, yb = X[150:200].copy(), y[150:200]
    w, classes = np.ones(50), None
    if "X" in bad:
        if bad["X"] == "3 features":
            Xb = Xb[:, :3]
        else:
            Xb[7, 2] = float(bad["X"])
    if "w" in bad:
        w[3] = bad["w"]
    classes = bad.get("classes")
    with pytest.raises(ValueError, match=match):
        est.partial_fit(Xb, yb, classes=classes, sample_weight=w)
    assert_same_state(before, est)
    # The next clean batch is learnt as if the bad one never came.
    est.partial_fit(X[150:], y[150:])
    ref = Est().partial_fit(X[:150], y[:150]).partial_fit(X[150:], y[150:])
    np.testing.assert_array_equal(est.means_, ref.means_)


@pytest.mark.parametrize("Est", ESTIMATORS)
def test_predict_rejects_values_beyond_float32(Est, data):
    X, y = data
    est = Est().fit(X, y)
    Xb = X[:5].copy()
    Xb[1, 0] = -1e300
    with pytest.raises(ValueError, match="sample 1, column 0"):
        est.predict(Xb)


@pytest.mark.parametrize("Est", ESTIMATORS)
def test_label_types_never_mix(Est, data):
    X, y = data
    est = Est().partial_fit(X[:100], y[:100])
    before = _state(est)
    with pytest.raises(TypeError, match="string labels"):
        est.partial_fit(X[100:110], np.array(["a"] * 10))
    with pytest.raises(TypeError, match="declare classes of the same type"):
        est.partial_fit(X[100:110], y[100:110], classes=["0", "1", "2", "3", "4"])
    assert_same_state(before, est)
    assert est.classes_.dtype.kind == "i"
    with pytest.raises(TypeError, match="declare classes of the same type"):
        Est().partial_fit(X[:10], y[:10], classes=np.array(["a", "b"]))
    with pytest.raises(TypeError, match="mixes label types"):
        Est().partial_fit(X[:3], np.array([0, "a", 1], dtype=object))
    with pytest.raises(TypeError, match="mixes label types"):
        Est().partial_fit(X[:3], [0, "a", 1])
    # String streams stay strings; integral floats keep integer classes_.
    words = Est().partial_fit(X[:100], np.array(["ab", "cd"])[y[:100] % 2])
    assert words.partial_fit(X[100:110], np.array(["zz"] * 10)).classes_.tolist() == ["ab", "cd", "zz"]
    assert est.partial_fit(X[:10], np.full(10, 9.0)).classes_.dtype == before["classes_"].dtype


def test_slda_rejects_bad_shrinkage_on_every_call(data):
    X, y = data
    with pytest.raises(ValueError, match="shrinkage"):
        StreamingLDA(shrinkage=1.5).fit(X, y)
    est = StreamingLDA().fit(X, y)
    before = _state(est)
    est.set_params(shrinkage="sometimes")
    with pytest.raises(ValueError, match="shrinkage"):
        est.partial_fit(X, y)
    est.set_params(shrinkage=before["shrinkage"])
    assert_same_state(before, est)


# -- all-or-nothing under interruption ---------------------------------------------------------------------------


def _interrupt_at_line(k, exc):
    """A trace function raising ``exc`` at the k-th line executed in baselines.py."""
    count = [0]

    def local(frame, event, arg):
        if event == "line":
            count[0] += 1
            if count[0] == k:
                raise exc
        return local

    def global_(frame, event, arg):
        return local if frame.f_code.co_filename == baselines.__file__ else None

    return global_


@pytest.mark.parametrize("Est", [NearestClassMean, StreamingLDA, lambda: StreamingLDA(shrinkage="auto")])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, MemoryError])
@pytest.mark.parametrize("call", ["partial_fit", "fit"])
def test_interruption_at_every_line_leaves_state_unchanged(Est, exc, call, data):
    """An interrupt at any line of the update leaves the model as it was; the retry equals an uninterrupted call."""
    X, y = data
    first, second = np.flatnonzero(y < 3), np.flatnonzero(y >= 2)  # the second batch adds classes 3 and 4
    args = (X[second][:, :3], y[second]) if call == "fit" else (X[second], y[second])  # fit also resets n_features_in_

    ref = getattr(Est().partial_fit(X[first], y[first]), call)(*args)
    k, outcomes = 0, {"unchanged": 0, "complete": 0}
    while True:
        k += 1
        est = Est().partial_fit(X[first], y[first])
        before = _state(est)
        tracer = _interrupt_at_line(k, exc)
        old = sys.gettrace()
        sys.settrace(tracer)
        try:
            getattr(est, call)(*args)
        except exc:
            interrupted = True
        else:
            interrupted = False
        finally:
            sys.settrace(old)
        if not interrupted:
            break
        if _is_same_state(before, est):
            outcomes["unchanged"] += 1
            getattr(est, call)(*args)  # the retry
        else:  # interrupted after the new state was published (on the way out)
            outcomes["complete"] += 1
        assert_same_state(_state(ref), est)
    assert outcomes["unchanged"] > 30 and outcomes["complete"] <= 3, outcomes
    assert_same_state(_state(ref), est)


@pytest.mark.parametrize("Est", ESTIMATORS)
def test_failure_in_solver_leaves_state_unchanged(Est, data, monkeypatch):
    X, y = data
    est = Est().partial_fit(X[y < 3], y[y < 3])
    before = _state(est)

    def boom(*args, **kwargs):
        raise MemoryError("injected")

    monkeypatch.setattr(baselines.sparse, "csr_matrix", boom)
    with pytest.raises(MemoryError, match="injected"):
        est.partial_fit(X[y >= 3], y[y >= 3])
    assert_same_state(before, est)


@pytest.mark.parametrize("Est", ESTIMATORS)
def test_pickle_clone_round_trip(Est, data):
    X, y = data
    est = Est().fit(X, y)
    again = pickle.loads(pickle.dumps(est))
    assert_same_state(_state(est), again)
    np.testing.assert_array_equal(again.predict(X), est.predict(X))
    assert clone(est).get_params() == est.get_params()
    assert not hasattr(clone(est), "classes_")


def test_factories():
    probe = make_linear_probe(random_state=3, alpha=1e-3)
    assert isinstance(probe, SGDClassifier)
    assert probe.loss == "log_loss" and probe.random_state == 3 and probe.alpha == 1e-3
    mlp = make_mlp(random_state=1)
    assert isinstance(mlp, MLPClassifier) and mlp.hidden_layer_sizes == (128,)
    assert make_mlp(hidden=16).hidden_layer_sizes == (16,)


# -- a stateful property: any sequence of good, bad and interrupted calls --------------------------------------------

_POOL_X, _POOL_Y = make_blobs(n_samples=200, centers=6, n_features=3, random_state=3)


class StreamMachine(RuleBasedStateMachine):
    """Good batches, rejected batches, interrupted batches, pickling and set_params, in any order.

    After every step the model equals a shadow that saw only the accepted
    batches (bit for bit), and agrees with ``fit`` on their union.
    """

    def __init__(self):
        super().__init__()
        self.make = None
        self.est = None
        self.shadow = None
        self.accepted = []

    @initialize(which=st.sampled_from(["ncm", "slda", "slda-auto"]))
    def start(self, which):
        self.make = {
            "ncm": NearestClassMean,
            "slda": StreamingLDA,
            "slda-auto": lambda: StreamingLDA(shrinkage="auto"),
        }[which]
        self.est, self.shadow = self.make(), self.make()

    @rule(start=st.integers(0, 190), size=st.integers(1, 40))
    def good_batch(self, start, size):
        idx = slice(start, start + size)
        self.est.partial_fit(_POOL_X[idx], _POOL_Y[idx])
        self.shadow.partial_fit(_POOL_X[idx], _POOL_Y[idx])
        self.accepted.append(idx)

    @rule(start=st.integers(0, 190), kind=st.sampled_from(["1e300", "nan", "label", "classes", "weight"]))
    def bad_batch(self, start, kind):
        X, y = _POOL_X[start : start + 10].copy(), _POOL_Y[start : start + 10]
        kwargs = {}
        if kind in ("1e300", "nan"):
            X[-1, 0] = float(kind)
        elif kind == "label" and hasattr(self.est, "classes_"):  # a string label in a stream of integers
            y = np.array(["new"] * len(y))
        elif kind == "label":
            X[0, 1] = np.inf
        elif kind == "classes":
            kwargs["classes"] = [[0, 1]]
        else:
            kwargs["sample_weight"] = np.full(len(y), -1.0)
        before = _state(self.est)
        with pytest.raises((ValueError, TypeError)):
            self.est.partial_fit(X, y, **kwargs)
        assert_same_state(before, self.est)

    @rule(start=st.integers(0, 190), line=st.integers(1, 80))
    def interrupted_batch(self, start, line):
        before = _state(self.est)
        old = sys.gettrace()
        sys.settrace(_interrupt_at_line(line, KeyboardInterrupt))
        try:
            self.est.partial_fit(_POOL_X[start : start + 10], _POOL_Y[start : start + 10])
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(old)
        if not _is_same_state(before, self.est):  # it completed (before or after the interrupt)
            self.shadow.partial_fit(_POOL_X[start : start + 10], _POOL_Y[start : start + 10])
            self.accepted.append(slice(start, start + 10))

    @rule()
    def pickle_round_trip(self):
        self.est = pickle.loads(pickle.dumps(self.est))

    @invariant()
    def equals_shadow_and_fit_on_the_union(self):
        if self.est is None or not self.accepted:
            return
        assert_same_state(_state(self.shadow), self.est)
        idx = np.concatenate([np.arange(200)[s] for s in self.accepted])
        ref = self.make().fit(_POOL_X[idx], _POOL_Y[idx])
        np.testing.assert_array_equal(self.est.classes_, ref.classes_)
        np.testing.assert_allclose(self.est.means_, ref.means_, rtol=1e-9, atol=1e-9)


TestStreamMachine = StreamMachine.TestCase
TestStreamMachine.settings = settings(max_examples=30, stateful_step_count=8, deadline=None)
