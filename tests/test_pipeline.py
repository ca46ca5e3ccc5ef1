"""StreamingPipeline: partial_fit semantics, rollback of a failed batch, sklearn composition."""

import itertools
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.decomposition import PCA
from sklearn.linear_model import SGDClassifier
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from skdkvb.continual.baselines import NearestClassMean
from skdkvb.pipeline import StreamingPipeline, make_streaming_pipeline


def _class_stream(n_classes=4, n_per_class=15, n_features=6, seed=0):
    """A class-incremental stream: one batch per class."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4.0, size=(n_classes, n_features))
    X = np.concatenate([c + rng.normal(size=(n_per_class, n_features)) for c in centers])
    y = np.repeat(np.arange(n_classes), n_per_class)
    return X, y, [(X[y == k], y[y == k]) for k in range(n_classes)]


class _FitCounter(TransformerMixin, BaseEstimator):
    """A stateful transformer without partial_fit: centres on the data it was fitted on."""

    def fit(self, X, y=None):
        self.mean_ = np.asarray(X).mean(axis=0)
        self.n_fits_ = getattr(self, "n_fits_", 0) + 1
        return self

    def transform(self, X):
        return np.asarray(X) - self.mean_


def test_partial_fit_over_class_batches_equals_steps_by_hand():
    X, y, batches = _class_stream()
    classes = np.unique(y)
    pipe = make_streaming_pipeline(
        StandardScaler(),
        _FitCounter(),
        FunctionTransformer(np.tanh),
        SGDClassifier(random_state=0),
    )
    scaler, centre, clf = StandardScaler(), _FitCounter(), SGDClassifier(random_state=0)
    for Xb, yb in batches:
        pipe.partial_fit(Xb, yb, classes=classes)
        scaler.partial_fit(Xb)
        Z = scaler.transform(Xb)
        if not hasattr(centre, "mean_"):
            centre.fit(Z)  # fitted once, on the first batch
        Z = np.tanh(centre.transform(Z))
        clf.partial_fit(Z, yb, classes=classes)
    fitted = pipe.named_steps
    np.testing.assert_array_equal(fitted["standardscaler"].mean_, scaler.mean_)
    np.testing.assert_array_equal(fitted["_fitcounter"].mean_, centre.mean_)
    assert fitted["_fitcounter"].n_fits_ == 1
    np.testing.assert_array_equal(fitted["sgdclassifier"].coef_, clf.coef_)
    np.testing.assert_array_equal(pipe.predict(X), clf.predict(np.tanh(centre.transform(scaler.transform(X)))))


def test_partial_fit_with_dkvb_and_frozen_embedder_equals_by_hand():
    import torch

    from skdkvb import DKVBClassifier
    from skdkvb.encoders import TorchEmbedder

    X, _, batches = _class_stream(n_classes=3)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh())
    params = dict(n_heads=4, n_keys=8, key_dim=2, key_init="random", device="cpu", random_state=0)
    pipe = make_streaming_pipeline(TorchEmbedder(net, device="cpu"), DKVBClassifier(**params))
    embedder, clf = TorchEmbedder(net, device="cpu"), DKVBClassifier(**params)
    for i, (Xb, yb) in enumerate(batches):
        pipe.partial_fit(Xb, yb)
        if i == 0:
            embedder.fit(Xb)
        clf.partial_fit(embedder.transform(Xb), yb)
    assert pipe.named_steps["torchembedder"].encoder_ is not embedder.encoder_
    np.testing.assert_array_equal(pipe.classes_, clf.classes_)
    np.testing.assert_allclose(pipe.predict_proba(X), clf.predict_proba(embedder.transform(X)), rtol=1e-6)


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(1, 59), min_size=0, max_size=6, unique=True))
def test_partial_fit_equals_manual_for_any_split(cuts):
    """Law: for any split of a stream into batches, the pipeline is the composition of its steps."""
    X, y, _ = _class_stream()
    bounds = [0, *sorted(cuts), len(X)]
    classes = np.unique(y)
    pipe = make_streaming_pipeline(StandardScaler(), SGDClassifier(random_state=0))
    scaler, clf = StandardScaler(), SGDClassifier(random_state=0)
    for a, b in itertools.pairwise(bounds):
        pipe.partial_fit(X[a:b], y[a:b], classes=classes)
        scaler.partial_fit(X[a:b])
        clf.partial_fit(scaler.transform(X[a:b]), y[a:b], classes=classes)
    np.testing.assert_array_equal(pipe[-1].coef_, clf.coef_)
    np.testing.assert_allclose(pipe[0].var_, scaler.var_)


def test_prefitted_step_is_frozen():
    X, y, batches = _class_stream()
    pca = PCA(n_components=2).fit(X)
    components = pca.components_.copy()
    pipe = StreamingPipeline([("pca", pca), ("clf", SGDClassifier(random_state=0))])
    for Xb, yb in batches:
        pipe.partial_fit(Xb, yb, classes=np.unique(y))
    np.testing.assert_array_equal(pipe.named_steps["pca"].components_, components)
    with pytest.raises(ValueError, match="takes no parameters"):
        pipe.partial_fit(X, y, pca__whatever=1)


def test_parameter_routing_and_passthrough():
    X, y, _ = _class_stream()
    seen = {}

    class Recorder(SGDClassifier):
        def partial_fit(self, X, y=None, classes=None, sample_weight=None):
            seen["classes"], seen["sample_weight"] = classes, sample_weight
            return super().partial_fit(X, y, classes=classes, sample_weight=sample_weight)

    class ScalerRecorder(StandardScaler):
        def partial_fit(self, X, y=None, sample_weight=None):
            seen["scaler_weight"] = sample_weight
            return super().partial_fit(X, y, sample_weight=sample_weight)

    w = np.ones(len(X))
    pipe = StreamingPipeline([("s", ScalerRecorder()), ("skip", "passthrough"), ("none", None), ("c", Recorder())])
    pipe.partial_fit(X, y, classes=[0, 1, 2, 3], s__sample_weight=w, sample_weight=w)
    assert seen["classes"] == [0, 1, 2, 3]
    assert seen["scaler_weight"] is w and seen["sample_weight"] is w
    with pytest.raises(ValueError, match="no step 'nope'"):
        pipe.partial_fit(X, y, nope__x=1)


def test_partial_fit_only_when_final_step_has_it():
    pipe = make_streaming_pipeline(StandardScaler(), PCA())
    assert not hasattr(pipe, "partial_fit")
    assert hasattr(make_streaming_pipeline(SGDClassifier()), "partial_fit")


def test_clone_set_params_pickle():
    X, y, batches = _class_stream()
    pipe = make_streaming_pipeline(StandardScaler(), SGDClassifier(random_state=0))
    pipe.set_params(sgdclassifier__alpha=0.01)
    assert pipe.get_params()["sgdclassifier__alpha"] == 0.01
    for Xb, yb in batches[:2]:
        pipe.partial_fit(Xb, yb, classes=np.unique(y))
    fresh = clone(pipe)
    assert type(fresh) is StreamingPipeline
    assert fresh.get_params()["sgdclassifier__alpha"] == 0.01
    assert not hasattr(fresh[-1], "coef_")
    restored = pickle.loads(pickle.dumps(pipe))
    np.testing.assert_array_equal(restored.predict(X), pipe.predict(X))
    # a plain fit still works and is the ordinary Pipeline.fit
    plain = Pipeline(clone(pipe).steps).fit(X, y)
    np.testing.assert_array_equal(clone(pipe).fit(X, y).predict(X), plain.predict(X))


def test_grid_search_over_inner_step_parameter_picks_the_separating_projection():
    # Four classes, each apart from the others along its own axis: one principal
    # component cannot separate them, four can.
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    X = rng.normal(size=(120, 6))
    X[np.arange(120), y] += 6.0
    pipe = make_streaming_pipeline(StandardScaler(), PCA(random_state=0), NearestClassMean())
    search = GridSearchCV(pipe, {"pca__n_components": [1, 4]}, cv=3).fit(X, y)
    one, four = search.cv_results_["mean_test_score"]
    assert four > 0.95 and one < 0.8, (one, four)
    assert search.best_params_ == {"pca__n_components": 4}
    best = search.best_estimator_
    assert isinstance(best, StreamingPipeline)
    assert best.named_steps["pca"].n_components_ == 4
    # The winner keeps learning from the stream: a new class arrives.
    X_new = rng.normal(size=(30, 6))
    X_new[:, 4] += 6.0
    best.partial_fit(X_new, np.full(30, 4))
    assert best.classes_.tolist() == [0, 1, 2, 3, 4]
    assert best.score(np.vstack([X, X_new]), np.r_[y, np.full(30, 4)]) > 0.9


def _exact(value):
    """A comparable image of ``value``: arrays by dtype, shape and bytes, objects by their attributes."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, np.generic):
        return (type(value).__name__, value.tobytes())
    if isinstance(value, dict):
        return ("dict", [(k, _exact(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_exact(v) for v in value])
    if (hasattr(value, "__dict__") and not callable(value)) or hasattr(value, "get_params"):
        return (type(value).__name__, _exact(vars(value)))
    return value


def _pipeline_state(pipe):
    """The whole state of every step (parameters and fitted attributes), for an exact comparison."""
    return [(name, _exact(step)) for name, step in pipe.steps]


class _Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [KeyboardInterrupt, MemoryError, _Boom])
@pytest.mark.parametrize("where", ["final", "scaler.transform", "fitcounter.transform"])
def test_failed_batch_rolls_back_every_step(exc, where, monkeypatch):
    *_, batches = _class_stream()
    pipe = make_streaming_pipeline(StandardScaler(), _FitCounter(), NearestClassMean())
    if where != "fitcounter.transform":  # else the first batch fails: every step goes back to unfitted
        pipe.partial_fit(*batches[0])
    before = _pipeline_state(pipe)

    def boom(*args, **kwargs):
        raise exc("injected")

    step, method = {"final": ("nearestclassmean", "partial_fit")}.get(where, where.split("."))
    target = pipe.named_steps[{"scaler": "standardscaler", "fitcounter": "_fitcounter"}.get(step, step)]
    monkeypatch.setattr(type(target), method, boom)  # on the class: undo leaves no trace in the instance
    with pytest.raises(exc, match="injected"):
        pipe.partial_fit(*batches[1])
    monkeypatch.undo()
    assert _pipeline_state(pipe) == before
    assert hasattr(pipe.named_steps["_fitcounter"], "mean_") == (where != "fitcounter.transform")
    # The retry equals a stream that never saw the failure.
    ref = pickle.loads(pickle.dumps(pipe))
    pipe.partial_fit(*batches[1])
    ref.partial_fit(*batches[1])
    assert _pipeline_state(pipe) == _pipeline_state(ref)


def test_batch_rejected_by_final_step_teaches_the_scaler_nothing():
    *_, batches = _class_stream()
    pipe = make_streaming_pipeline(StandardScaler(), NearestClassMean())
    pipe.partial_fit(*batches[0])
    before = _pipeline_state(pipe)
    Xb, yb = batches[1]
    with pytest.raises(TypeError, match="string labels"):
        pipe.partial_fit(Xb, np.array(["x"] * len(yb)))
    with pytest.raises(ValueError, match="sample_weight must be finite"):
        pipe.partial_fit(Xb, yb, sample_weight=np.full(len(yb), 1e39))
    with pytest.raises(ValueError, match="not in the classes"):
        pipe.partial_fit(Xb, yb, classes=[0])
    assert _pipeline_state(pipe) == before
    assert pipe.named_steps["standardscaler"].n_samples_seen_ == len(batches[0][1])


def test_partial_fit_checks_the_steps():
    X, y, _ = _class_stream()
    with pytest.raises(TypeError, match="has no transform"):
        StreamingPipeline([("clf", SGDClassifier()), ("ncm", NearestClassMean())]).partial_fit(X, y)
    with pytest.raises(ValueError, match="unique"):
        StreamingPipeline([("a", StandardScaler()), ("a", NearestClassMean())]).partial_fit(X, y)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, MemoryError])
def test_interruption_at_every_line_leaves_pipeline_unchanged_or_complete(exc):
    """An interrupt at any line of StreamingPipeline.partial_fit or of the baseline it feeds."""
    import sys

    import skdkvb.continual.baselines as baselines
    import skdkvb.pipeline as pipeline

    *_, batches = _class_stream()
    files = {pipeline.__file__, baselines.__file__}

    def fresh():
        return make_streaming_pipeline(StandardScaler(), _FitCounter(), NearestClassMean()).partial_fit(*batches[0])

    done = _pipeline_state(fresh().partial_fit(*batches[1]))
    k, outcomes = 0, {"unchanged": 0, "complete": 0}
    while True:
        k += 1
        pipe = fresh()
        before = _pipeline_state(pipe)
        count = [0]

        def local(frame, event, arg, count=count, k=k):
            if event == "line":
                count[0] += 1
                if count[0] == k:
                    raise exc
            return local

        old = sys.gettrace()
        sys.settrace(lambda frame, event, arg: local if frame.f_code.co_filename in files else None)
        try:
            pipe.partial_fit(*batches[1])
        except exc:
            interrupted = True
        except AttributeError as err:  # sklearn's available_if turns an Exception in its check into this
            assert isinstance(err.__cause__, exc)
            interrupted = True
        else:
            interrupted = False
        finally:
            sys.settrace(old)
        if not interrupted:
            break
        state = _pipeline_state(pipe)
        assert state in (before, done), k
        outcomes["unchanged" if state == before else "complete"] += 1
    assert outcomes["unchanged"] > 40 and outcomes["complete"] <= 4, outcomes
    assert _pipeline_state(pipe) == done
