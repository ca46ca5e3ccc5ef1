"""StreamingPipeline: partial_fit semantics, sklearn composition."""

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.decomposition import PCA
from sklearn.linear_model import SGDClassifier
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from skdkvb.encoders import TorchEmbedder
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
    from skdkvb import DKVBClassifier

    X, y, batches = _class_stream(n_classes=3)
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
    for a, b in zip(bounds[:-1], bounds[1:]):
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


def test_grid_search_over_inner_step_parameter():
    X, y, _ = _class_stream(n_per_class=12)
    pipe = make_streaming_pipeline(StandardScaler(), PCA(random_state=0), SGDClassifier(random_state=0))
    search = GridSearchCV(pipe, {"pca__n_components": [1, 4]}, cv=3).fit(X, y)
    assert search.best_params_["pca__n_components"] in (1, 4)
    assert len(search.cv_results_["params"]) == 2
    best = search.best_estimator_
    assert isinstance(best, StreamingPipeline)
    assert best.named_steps["pca"].n_components == search.best_params_["pca__n_components"]
    # the winner can keep learning from the stream
    best.partial_fit(X[:10], y[:10])
    assert best.score(X, y) > 0.5


def test_grid_search_over_dkvb_in_streaming_pipeline():
    from skdkvb import DKVBClassifier

    X, y, _ = _class_stream(n_classes=3, n_per_class=12)
    pipe = make_streaming_pipeline(
        StandardScaler(),
        DKVBClassifier(n_heads=4, n_keys=8, key_dim=2, key_init_epochs=1, max_epochs=3, device="cpu", random_state=0),
    )
    search = GridSearchCV(pipe, {"dkvbclassifier__n_heads": [2, 8]}, cv=2).fit(X, y)
    assert search.best_params_["dkvbclassifier__n_heads"] in (2, 8)
    assert search.best_estimator_[-1].n_heads == search.best_params_["dkvbclassifier__n_heads"]
