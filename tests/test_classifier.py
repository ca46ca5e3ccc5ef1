"""Behaviour of DKVBClassifier: the paper's toy, locality, growth, bad input,
reproducibility, persistence by pickle, and scikit-learn composition."""

import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import SGDClassifier
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from skdkvb import DKVBClassifier
from skdkvb.continual.datasets import make_toy_2d

TOY_TASKS = [(0, 4), (1, 5), (2, 6), (3, 7)]


def snapshot(clf):
    """Everything a failed call must leave untouched."""
    state = {k: v for k, v in clf.__dict__.items() if k.endswith("_") and k != "bottleneck_"}
    module = {k: torch.as_tensor(np.array(v)) for k, v in clf.bottleneck_.arrays().items()}
    return state, module, clf._rng.get_state()[1].copy(), len(clf.history_)


def assert_same_snapshot(a, b):
    state_a, module_a, rng_a, hist_a = a
    state_b, module_b, rng_b, hist_b = b
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        va, vb = state_a[k], state_b[k]
        if isinstance(va, np.ndarray):
            np.testing.assert_array_equal(va, vb)
        elif k not in ("history_",):
            assert va == vb, k
    assert module_a.keys() == module_b.keys()
    for k in module_a:
        assert torch.equal(module_a[k], module_b[k]), k
    np.testing.assert_array_equal(rng_a, rng_b)
    assert hist_a == hist_b


# --------------------------------------------------------------------- the toy
@pytest.mark.parametrize(
    "config",
    [
        dict(n_heads=20, n_keys=20, key_dim=2, decoder="sgd"),
        dict(n_heads=1, n_keys=400, projection="chunk", decoder="sgd"),
        dict(n_heads=20, n_keys=20, key_dim=2, decoder="logp"),
    ],
    ids=["20x20-random-sgd", "1x400-sgd", "20x20-logp"],
)
def test_toy_2d_dkvb_keeps_all_classes_linear_probe_forgets(config):
    X, y = make_toy_2d(random_state=0)
    X_test, y_test = make_toy_2d(random_state=1)
    # 1000 full-batch steps per task, as in the paper.
    clf = DKVBClassifier(**config, batch_size=200, partial_fit_epochs=1000, random_state=0, device="cpu")
    clf.fit_keys(X)  # unlabeled data of the domain
    probe = SGDClassifier(loss="log_loss", random_state=0)
    for task in TOY_TASKS:
        mask = np.isin(y, task)
        clf.partial_fit(X[mask], y[mask])
        for _ in range(50):
            probe.partial_fit(X[mask], y[mask], classes=np.arange(8))
    assert clf.score(X_test, y_test) >= 0.95
    per_class = [np.mean(clf.predict(X_test[y_test == c]) == c) for c in range(8)]
    assert min(per_class) >= 0.9
    assert probe.score(X_test, y_test) < 0.40
    np.testing.assert_array_equal(clf.classes_, [0, 4, 1, 5, 2, 6, 3, 7])


# ------------------------------------------------------------------- locality
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), n_batch=st.integers(1, 40), decoder=st.sampled_from(["sgd", "vote", "logp"]))
def test_partial_fit_only_touches_selected_rows(seed, n_batch, decoder):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(300, 5))
    y = rng.randint(0, 3, size=300)
    clf = DKVBClassifier(
        n_heads=6,
        n_keys=64,
        key_dim=2,
        decoder=decoder,
        dropout=0.0 if decoder != "sgd" else 0.3,
        device="cpu",
        random_state=seed,
    )
    clf.partial_fit(X[:200], y[:200], classes=[0, 1, 2])
    table = "values" if decoder == "sgd" else "counts"  # the only table the decoder keeps
    before = getattr(clf.bottleneck_, table).detach().clone()
    before_usage = clf.bottleneck_.usage.clone()
    X_new, y_new = X[200 : 200 + n_batch], y[200 : 200 + n_batch]
    touched = np.zeros((6, 64), dtype=bool)
    idx = clf.key_indices(X_new, prune=False)[:, :, 0]
    touched[np.arange(6)[None, :].repeat(len(idx), 0), idx] = True

    # Which probe inputs only use keys that stay untouched (and trained)?
    probes = rng.normal(size=(500, 5))
    raw = clf.key_indices(probes, prune=False)[:, :, 0]
    pruned = clf.key_indices(probes)[:, :, 0]
    safe = (raw == pruned).all(1) & ~touched[np.arange(6)[None, :], raw].any(1)
    proba_before = clf.predict_proba(probes[safe])

    clf.partial_fit(X_new, y_new)
    after = getattr(clf.bottleneck_, table).detach()
    untouched = torch.as_tensor(~touched)
    assert torch.equal(after[untouched], before[untouched])
    assert torch.equal(clf.bottleneck_.usage[untouched], before_usage[untouched])
    if safe.any():
        np.testing.assert_array_equal(clf.predict_proba(probes[safe]), proba_before)


# -------------------------------------------------------------------- classes
def test_classes_grow_in_order_of_arrival(blobs, small_params):
    X, y = blobs
    clf = DKVBClassifier(**small_params)
    clf.fit_keys(X)
    for label in [2, 0, 3, 1]:
        clf.partial_fit(X[y == label], y[y == label])
        assert clf.classes_[-1] == label
    np.testing.assert_array_equal(clf.classes_, [2, 0, 3, 1])
    assert clf.predict_proba(X).shape == (len(X), 4)
    assert clf.score(X, y) > 0.9


def test_classes_argument_predeclares(blobs, small_params):
    X, y = blobs
    clf = DKVBClassifier(**small_params).partial_fit(X[y == 1], y[y == 1], classes=[3, 1, 0, 2])
    np.testing.assert_array_equal(clf.classes_, [0, 1, 2, 3])
    assert clf.predict_proba(X[:3]).shape == (3, 4)


def test_new_classes_error_names_unseen_labels(blobs, small_params):
    X, y = blobs
    clf = DKVBClassifier(new_classes="error", **small_params)
    clf.partial_fit(X[y < 2], y[y < 2])
    before = snapshot(clf)
    with pytest.raises(ValueError, match=r"not seen before: \[3, 2\]"):
        clf.partial_fit(X[y >= 2], y[y >= 2])
    assert_same_snapshot(before, snapshot(clf))


def test_string_labels(blobs, small_params):
    X, y = blobs
    names = np.array(["ant", "bee", "cat", "dog"])[y]
    clf = DKVBClassifier(**dict(small_params, decoder="vote")).fit_keys(X)
    clf.partial_fit(X[y == 3], names[y == 3])
    clf.partial_fit(X[y != 3], names[y != 3])
    rest = names[y != 3]
    _, first = np.unique(rest, return_index=True)
    assert list(clf.classes_) == ["dog"] + list(rest[np.sort(first)])
    assert set(clf.predict(X)) <= set(names)
    assert clf.score(X, names) > 0.9


def test_not_fitted_errors(blobs, small_params):
    X, _ = blobs
    clf = DKVBClassifier(**small_params)
    with pytest.raises(NotFittedError):
        clf.predict(X)
    clf.fit_keys(X)  # keys only: still no classes to predict
    with pytest.raises(NotFittedError):
        clf.predict_proba(X)


# ------------------------------------------------------------------ bad input
BAD_INPUTS = [
    ("nan", lambda X, y: (np.where(np.arange(X.size).reshape(X.shape) == 3, np.nan, X), y), ValueError, "NaN"),
    ("inf", lambda X, y: (np.where(np.arange(X.size).reshape(X.shape) == 3, np.inf, X), y), ValueError, "infinity"),
    ("1d", lambda X, y: (X[0], y[:1]), ValueError, "Expected 2D array"),
    ("3d", lambda X, y: (X[:, :, None], y), ValueError, "dim"),
    ("n_features", lambda X, y: (X[:, :4], y), ValueError, "features"),
    ("empty", lambda X, y: (X[:0], y[:0]), ValueError, "0 sample"),
    ("lengths", lambda X, y: (X, y[:-1]), ValueError, "inconsistent numbers of samples"),
    ("strings", lambda X, y: (np.full(X.shape, "a"), y), ValueError, "could not convert|numeric"),
    ("continuous_y", lambda X, y: (X, y + 0.5), ValueError, "Unknown label type"),
    ("negative_weight", None, ValueError, "non-negative"),
]


@pytest.mark.parametrize("name,make,error,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("method", ["partial_fit", "fit"])
def test_bad_input_raises_and_keeps_model(blobs, small_params, name, make, error, match, method):
    X, y = blobs
    if method == "fit" and name == "n_features":
        pytest.skip("fit starts afresh, so a new feature count is legitimate there")
    clf = DKVBClassifier(**small_params).fit(X, y)
    before = snapshot(clf)
    proba = clf.predict_proba(X)
    with pytest.raises(error, match=match):
        if make is None:
            getattr(clf, method)(X, y, sample_weight=-np.ones(len(y)))
        else:
            getattr(clf, method)(*make(X, y))
    assert_same_snapshot(before, snapshot(clf))
    np.testing.assert_array_equal(clf.predict_proba(X), proba)


def test_predict_with_wrong_feature_count(blobs, small_params):
    X, y = blobs
    clf = DKVBClassifier(**small_params).fit(X, y)
    with pytest.raises(ValueError, match="X has 5 features, but DKVBClassifier is expecting 6"):
        clf.predict(X[:, :5])


def test_single_sample_partial_fit_is_a_valid_stream_step(blobs, small_params):
    X, y = blobs
    clf = DKVBClassifier(**small_params).fit(X, y)
    clf.partial_fit(X[:1], y[:1])
    assert clf.t_ == len(X) + 1


def test_bad_parameters_are_reported(blobs):
    X, y = blobs
    with pytest.raises(ValueError, match="n_heads"):
        DKVBClassifier(n_heads=0).fit(X, y)
    with pytest.raises(ValueError, match="decoder"):
        DKVBClassifier(decoder="median").fit(X, y)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        DKVBClassifier(n_heads=4, projection="chunk", device="cpu").fit(X[:, :5], y)
    with pytest.raises(ValueError, match="valid device"):
        DKVBClassifier(device="tpu-9").fit(X, y)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_reported(blobs):
    X, y = blobs
    with pytest.raises(ValueError, match="CUDA is not available"):
        DKVBClassifier(device="cuda").fit(X, y)


# ----------------------------------------------------------- reproducibility
@pytest.mark.parametrize("decoder", ["sgd", "logp"])
def test_random_state_reproduces(blobs, small_params, decoder):
    X, y = blobs
    params = dict(small_params, decoder=decoder, dropout=0.1)
    a = DKVBClassifier(**params).fit(X, y).predict_proba(X)
    b = DKVBClassifier(**params).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)
    clf = DKVBClassifier(**params).fit(X, y)
    np.testing.assert_array_equal(clone(clf).fit(X, y).predict_proba(X), a)
    # Refitting the same object starts from scratch and reproduces too.
    np.testing.assert_array_equal(clf.fit(X, y).predict_proba(X), a)


def test_different_random_state_differs(blobs, small_params):
    X, y = blobs
    a = DKVBClassifier(**dict(small_params, random_state=0)).fit(X, y)
    b = DKVBClassifier(**dict(small_params, random_state=1)).fit(X, y)
    assert not torch.equal(a.bottleneck_.keys, b.bottleneck_.keys)


def test_pickle_round_trip_predicts_and_continues_identically(blobs, small_params):
    X, y = blobs
    clf = DKVBClassifier(**dict(small_params, dropout=0.2))
    clf.partial_fit(X[y < 2], y[y < 2])
    restored = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(restored.predict_proba(X), clf.predict_proba(X))
    clf.partial_fit(X[y >= 2], y[y >= 2])
    restored.partial_fit(X[y >= 2], y[y >= 2])
    np.testing.assert_array_equal(restored.predict_proba(X), clf.predict_proba(X))
    np.testing.assert_array_equal(restored.classes_, clf.classes_)


def test_pickle_holds_cpu_tensors_only(blobs, small_params):
    X, y = blobs
    clf = DKVBClassifier(**small_params).fit(X, y)
    state = clf.__getstate__()
    arrays = state["bottleneck_"]["state"].values()
    assert all(isinstance(a, np.ndarray) for a in arrays)  # host memory, skops-safe
    assert isinstance(state["device_"], str)
    # The live model is untouched by pickling.
    assert isinstance(clf.bottleneck_, torch.nn.Module)


@pytest.mark.gpu
def test_cuda_model_unpickles_on_cpu(blobs, small_params, monkeypatch):
    X, y = blobs
    clf = DKVBClassifier(**dict(small_params, device="cuda")).fit(X, y)
    payload = pickle.dumps(clf)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="loading it on the CPU"):
        restored = pickle.loads(payload)
    assert restored.device_.type == "cpu"
    np.testing.assert_allclose(restored.predict_proba(X), clf.predict_proba(X), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_matches_cpu(blobs, small_params):
    X, y = blobs
    params = dict(small_params, decoder="logp")
    cpu = DKVBClassifier(**params).fit(X, y)
    gpu = DKVBClassifier(**dict(params, device="cuda")).fit(X, y)
    assert gpu.bottleneck_.keys.device.type == "cuda"
    assert gpu.bottleneck_.count_table.device.type == "cuda"
    assert np.mean(cpu.predict(X) == gpu.predict(X)) > 0.95


# ----------------------------------------------------------- sklearn pieces
def test_pipeline_and_grid_search(blobs):
    X, y = blobs
    pipe = Pipeline(
        [
            ("scale", StandardScaler()),
            ("dkvb", DKVBClassifier(n_keys=32, key_dim=3, key_init_epochs=1, device="cpu", random_state=0)),
        ]
    )
    grid = GridSearchCV(pipe, {"dkvb__n_heads": [4, 8], "dkvb__decoder": ["sgd", "logp"]}, cv=3, n_jobs=2)
    grid.fit(X, y)
    assert grid.best_score_ > 0.9
    assert set(grid.best_params_) == {"dkvb__n_heads", "dkvb__decoder"}
    assert grid.predict(X).shape == (len(X),)


def test_sparse_input_matches_dense(blobs, small_params):
    X, y = blobs
    X = np.where(np.abs(X) < 1.0, 0.0, X)
    dense = DKVBClassifier(**small_params).fit(X, y)
    sparse = DKVBClassifier(**small_params).fit(sp.csr_matrix(X), y)
    np.testing.assert_allclose(sparse.predict_proba(sp.csr_matrix(X)), dense.predict_proba(X), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dense.predict_proba(sp.csr_matrix(X)), dense.predict_proba(X), rtol=1e-5, atol=1e-7)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 1000),
    decoder=st.sampled_from(["sgd", "vote", "logp"]),
    top_k=st.integers(1, 3),
    temperature=st.floats(0.1, 10),
)
def test_probabilities_are_distributions(seed, decoder, top_k, temperature):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(60, 4))
    y = rng.randint(0, 3, 60)
    clf = DKVBClassifier(
        n_heads=4,
        n_keys=8,
        key_dim=2,
        top_k=top_k,
        decoder=decoder,
        temperature=temperature,
        key_init_epochs=1,
        max_epochs=2,
        device="cpu",
        random_state=seed,
    ).fit(X, y)
    probes = rng.normal(scale=3, size=(40, 4))
    proba = clf.predict_proba(probes)
    assert np.all(proba >= 0)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-10)
    np.testing.assert_allclose(np.exp(clf.predict_log_proba(probes)), proba, rtol=1e-8, atol=1e-12)
    np.testing.assert_array_equal(clf.predict(probes), clf.classes_[proba.argmax(1)])


def test_count_decoder_weight_equals_repetition(blobs, small_params):
    X, y = blobs
    weights = np.random.RandomState(0).randint(0, 3, len(y))
    base = DKVBClassifier(**dict(small_params, decoder="logp")).fit_keys(X)
    weighted = pickle.loads(pickle.dumps(base)).partial_fit(X, y, classes=[0, 1, 2, 3], sample_weight=weights)
    repeated = pickle.loads(pickle.dumps(base)).partial_fit(
        np.repeat(X, weights, 0), np.repeat(y, weights), classes=[0, 1, 2, 3]
    )
    assert torch.equal(weighted.bottleneck_.counts, repeated.bottleneck_.counts)
    np.testing.assert_allclose(weighted.predict_proba(X), repeated.predict_proba(X))


def test_count_decoders_are_order_invariant(blobs, small_params):
    X, y = blobs
    base = DKVBClassifier(**dict(small_params, decoder="vote")).fit_keys(X)
    a, b = pickle.loads(pickle.dumps(base)), pickle.loads(pickle.dumps(base))
    for label in [0, 1, 2, 3]:
        a.partial_fit(X[y == label], y[y == label], classes=[0, 1, 2, 3])
    b.partial_fit(X, y, classes=[0, 1, 2, 3])
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X))


# ------------------------------------------------------- keys and warm start
def test_fit_keys_then_warm_start_keeps_keys(blobs, small_params):
    X, y = blobs
    clf = DKVBClassifier(**dict(small_params, warm_start=True)).fit_keys(X[:100])
    keys = clf.bottleneck_.keys.clone()
    clf.fit(X, y)
    assert torch.equal(clf.bottleneck_.keys, keys)
    cold = DKVBClassifier(**small_params).fit_keys(X[:100]).fit(X, y)
    assert not torch.equal(cold.bottleneck_.keys, keys)


def test_partial_fit_initialises_keys_only_once(blobs, small_params):
    X, y = blobs
    clf = DKVBClassifier(**small_params).partial_fit(X[:50], y[:50])
    keys = clf.bottleneck_.keys.clone()
    clf.partial_fit(X[50:], y[50:])
    assert torch.equal(clf.bottleneck_.keys, keys)
    assert clf.key_init_info_["method"] == "kmeans"


def test_pruning_falls_back_to_trained_keys(small_params):
    rng = np.random.RandomState(0)
    X_keys = rng.uniform(-1, 1, size=(400, 2))
    clf = DKVBClassifier(n_heads=1, n_keys=64, projection="chunk", decoder="vote", device="cpu", random_state=0)
    clf.fit_keys(X_keys)
    X = np.array([[0.5, 0.5], [0.55, 0.45], [-0.5, -0.5], [-0.45, -0.55]])
    clf.partial_fit(X, [1, 1, 0, 0])
    far = np.array([[0.95, 0.95], [-0.95, -0.95]])
    np.testing.assert_array_equal(clf.predict(far), [1, 0])
    assert clf.key_indices(far, prune=False).tolist() != clf.key_indices(far).tolist()
    assert (clf.bottleneck_.usage > 0).sum() <= 4
    # Without pruning the far points land on never-trained keys: no evidence.
    clf.set_params(prune_unused_keys=False)
    np.testing.assert_allclose(clf.predict_proba(far), 0.5)


def test_input_transform_pca_whiten(blobs, small_params):
    X, y = blobs
    clf = DKVBClassifier(**dict(small_params, input_transform="pca-whiten", input_transform_components=4)).fit(X, y)
    assert clf.bottleneck_.n_features == 4
    assert clf.score(X, y) > 0.9


def test_history_and_counters(blobs, small_params):
    X, y = blobs
    clf = DKVBClassifier(**dict(small_params, decoder="sgd")).fit(X, y)
    assert len(clf.history_) == small_params["max_epochs"]
    losses = [row["loss"] for row in clf.history_]
    assert losses[-1] < losses[0]
    assert clf.n_iter_ == small_params["max_epochs"]
    clf.partial_fit(X[:10], y[:10])
    assert clf.n_iter_ == small_params["max_epochs"] + 1
    assert clf.t_ == len(X) + 10


def test_verbose_shows_progress(blobs, small_params, capsys):
    X, y = blobs
    DKVBClassifier(**dict(small_params, verbose=1, decoder="sgd")).fit(X, y)
    err = capsys.readouterr().err
    assert "key init" in err and "key search" in err and "fit" in err
    DKVBClassifier(**dict(small_params, verbose=0)).fit(X, y)
    assert capsys.readouterr().err == ""


def test_wide_sparse_input_is_never_densified(small_params):
    # 200 000 features: densifying even one block of rows would need gigabytes.
    X = sp.random(300, 200_000, density=2e-4, format="csr", random_state=0, dtype=np.float64)
    y = np.arange(300) % 3
    clf = DKVBClassifier(**dict(small_params, decoder="vote")).fit(X, y)
    assert clf.predict_proba(X).shape == (300, 3)
    assert clf.bottleneck_.projection.shape == (200_000, 8 * 3)


def test_auto_temperature_calibrates_logp_without_changing_predictions(blobs, small_params):
    X, y = blobs
    auto = DKVBClassifier(**small_params).fit(X, y)
    assert auto.decoder == "logp" and auto._temperature() == small_params["n_heads"] / 4
    raw = clone(auto).set_params(temperature=1.0).fit(X, y)
    np.testing.assert_array_equal(auto.predict(X), raw.predict(X))
    # Summing correlated heads makes T=1 over-confident; "auto" softens it.
    assert auto.predict_proba(X).max(1).mean() < raw.predict_proba(X).max(1).mean()
    # One head's top-k keys are neighbours: they do not multiply the temperature.
    top4 = clone(auto).set_params(top_k=4).fit(X, y)
    assert top4._temperature() == small_params["n_heads"] / 4


def test_paper_preset():
    clf = DKVBClassifier.from_preset("paper", random_state=3)
    assert (clf.decoder, clf.n_heads, clf.n_keys, clf.key_dim) == ("sgd", 256, 4096, 14)
    assert clf.random_state == 3
    with pytest.raises(ValueError, match="Unknown preset"):
        DKVBClassifier.from_preset("papr")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_values(blobs, small_params, dtype):
    X, y = blobs
    params = dict(small_params, decoder="sgd", max_epochs=20)
    full = DKVBClassifier(**params).fit(X, y)
    half = DKVBClassifier(**dict(params, values_dtype=dtype)).fit(X, y)
    assert half.bottleneck_.values.dtype == getattr(torch, dtype)
    assert half.bottleneck_.values.element_size() * 2 == full.bottleneck_.values.element_size()
    assert np.mean(half.predict(X) == full.predict(X)) > 0.95
    restored = pickle.loads(pickle.dumps(half))
    assert restored.bottleneck_.values.dtype == getattr(torch, dtype)
    np.testing.assert_array_equal(restored.predict_proba(X), half.predict_proba(X))


def test_labels_beyond_declared_classes_append_in_arrival_order(blobs, small_params):
    X, y = blobs
    clf = DKVBClassifier(**small_params).fit_keys(X)
    batch = np.r_[np.flatnonzero(y == 3)[:5], np.flatnonzero(y == 0)[:5], np.flatnonzero(y == 2)[:5]]
    clf.partial_fit(X[batch], y[batch], classes=[2])
    np.testing.assert_array_equal(clf.classes_, [2, 3, 0])


# ------------------------------------------------------------ tables follow the decoder
@pytest.mark.parametrize("decoder", ["logp", "vote", "sgd"])
def test_only_the_decoders_tables_exist(blobs, small_params, decoder):
    X, y = blobs
    clf = DKVBClassifier(**dict(small_params, decoder=decoder)).fit(X, y)
    b = clf.bottleneck_
    if decoder == "sgd":
        assert b.count_table is None and b.value_table.n_classes == 4
        with pytest.raises(AttributeError):
            b.counts  # noqa: B018
    else:
        assert b.value_table is None and b._usage is None and b.count_table.n_classes == 4
        with pytest.raises(AttributeError):
            b.values  # noqa: B018
        torch.testing.assert_close(b.usage, b.counts.sum(-1))
    assert b.usage.shape == (small_params["n_heads"], small_params["n_keys"])
    assert float(b.usage.sum()) == pytest.approx(len(y) * small_params["n_heads"])


def test_decoder_change_before_labels_rebuilds_the_tables(blobs, small_params):
    X, y = blobs
    clf = DKVBClassifier(**dict(small_params, decoder="logp")).fit_keys(X)
    keys = clf.bottleneck_.keys.clone()
    clf.set_params(decoder="sgd").partial_fit(X, y)
    assert clf.bottleneck_.value_table is not None and clf.bottleneck_.count_table is None
    assert torch.equal(clf.bottleneck_.keys, keys)
    with pytest.raises(ValueError, match="decoder='logp' was set after this model was fitted"):
        clf.set_params(decoder="logp").predict(X)
    clf.set_params(decoder="sgd")
    count = DKVBClassifier(**dict(small_params, decoder="logp")).fit(X, y)
    np.testing.assert_array_equal(count.set_params(decoder="vote").predict(X), count.predict(X))


def test_getstate_streams_views_of_the_tables(blobs, small_params):
    X, y = blobs
    for decoder in ("logp", "sgd"):
        clf = DKVBClassifier(**dict(small_params, decoder=decoder)).fit(X, y)
        state = clf.__getstate__()["bottleneck_"]["state"]
        b = clf.bottleneck_
        live = b.count_table.usage() if decoder != "sgd" else b.value_table.blocks[0]
        assert any(np.shares_memory(a, live.numpy()) for a in state.values())
        restored = pickle.loads(pickle.dumps(clf, protocol=5))
        np.testing.assert_array_equal(restored.predict_proba(X), clf.predict_proba(X))


def test_auto_params_follow_the_encoder():
    """'auto' heads, keys, input_transform and top_k: raw-input defaults without an encoder, the preset with one."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    kw = dict(n_heads=32, n_keys=64, key_dim=8, random_state=0, device="cpu", key_init_epochs=2)
    auto = DKVBClassifier(**kw).fit(X, y)
    explicit = DKVBClassifier(**kw, input_transform=None, input_transform_components=64, top_k=1).fit(X, y)
    assert auto.input_transform_ is None and auto.bottleneck_.top_k == 1
    np.testing.assert_array_equal(auto.predict_proba(X), explicit.predict_proba(X))

    enc = DKVBClassifier(**kw, encoder=torch.nn.Identity()).fit(X, y)
    # min(128, 64 features), less the 3 pixels that are 0 in every digits image (null directions)
    assert enc.input_transform_.n_features_out_ == 61 and enc.bottleneck_.top_k == 4
    preset = DKVBClassifier(
        **kw, encoder=torch.nn.Identity(), input_transform="pca-whiten", input_transform_components=256, top_k=4
    ).fit(X, y)
    np.testing.assert_array_equal(enc.predict_proba(X), preset.predict_proba(X))

    # Heads and keys: 1024 x 1024 with an encoder, 256 x 4096 without (the same key rows).
    one = dict(key_dim=2, key_init="random", device="cpu", random_state=0)
    heads = DKVBClassifier(**one, n_keys=8, encoder=torch.nn.Identity()).fit_keys(X)
    assert (heads.bottleneck_.n_heads, heads.bottleneck_.n_keys) == (1024, 8)
    assert DKVBClassifier(**one, n_keys=8).fit_keys(X).bottleneck_.n_heads == 256
    keys = DKVBClassifier(**one, n_heads=2, encoder=torch.nn.Identity()).fit_keys(X)
    assert (keys.bottleneck_.n_heads, keys.bottleneck_.n_keys) == (2, 1024)
    with pytest.warns(UserWarning, match="n_keys=4096"):  # 1,797 digits cannot place 4096 distinct keys
        assert DKVBClassifier(**one, n_heads=2).fit_keys(X).bottleneck_.n_keys == 4096
    assert DKVBClassifier().get_params()["n_heads"] == DKVBClassifier().get_params()["n_keys"] == "auto"

    few_keys = DKVBClassifier(
        n_heads=4, n_keys=2, key_dim=2, encoder=torch.nn.Identity(), device="cpu", random_state=0
    ).fit(X, y)
    assert few_keys.bottleneck_.top_k == 2  # 'auto' top_k never exceeds n_keys


def test_encoder_with_input_transform_predicts():
    """An encoder wider than the transform's output: predict takes the raw input, and checks its width."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 200)).astype(np.float32)
    y = (X @ rng.normal(size=200) > 0).astype(int)
    clf = DKVBClassifier(
        n_heads=16,
        n_keys=32,
        key_dim=4,
        key_init_epochs=2,
        device="cpu",
        random_state=0,
        encoder=torch.nn.Identity(),
    ).fit(X, y)
    assert clf.input_transform_.n_features_out_ == 200  # min(256 automatic components, 200 features)
    assert clf.score(X, y) > 0.5
    with pytest.raises(ValueError, match="200"):
        clf.predict(X[:, :150])


def test_whitening_never_amplifies_null_directions():
    """PCA-whitening keeps at most n_samples - 1 components and drops directions of zero variance."""
    from skdkvb._transform import InputTransform

    gen = torch.Generator().manual_seed(0)
    few = InputTransform("pca-whiten", 128).fit(torch.randn(50, 300, generator=gen))
    assert few.n_features_out_ == 49  # rank of 50 centred samples
    X = torch.randn(500, 10, generator=gen)
    X[:, 5] = X[:, 4]  # one exactly redundant column: rank 9
    t = InputTransform("pca-whiten", 64).fit(X)
    assert t.n_features_out_ == 9
    # Whitened training data has unit variance along every kept component, none blown up.
    Z = (X - t.mean_) @ t.components_
    np.testing.assert_allclose(Z.var(0).numpy(), 1.0, rtol=1e-3)


def test_top_k_above_n_keys_is_rejected_before_any_fitting():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 12)), np.arange(60) % 3
    clf = DKVBClassifier(
        n_heads=4, n_keys=3, key_dim=3, top_k=5, input_transform="pca-whiten", device="cpu", random_state=0
    )
    with pytest.raises(ValueError, match="top_k=5 must not exceed n_keys=3"):
        clf.fit(X, y)
    assert not hasattr(clf, "input_transform_") and not hasattr(clf, "bottleneck_")
