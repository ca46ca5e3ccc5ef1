"""Round trips through pickle, joblib, skdkvb.persistence and skops."""

import hashlib
import json
import pickle

import joblib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_iris

from skdkvb import DKVBClassifier
from skdkvb.persistence import FORMAT_VERSION, SKOPS_TRUSTED_TYPES, load, save

IRIS_X, IRIS_Y = load_iris(return_X_y=True)


def small(**kw):
    params = dict(n_heads=8, n_keys=16, key_dim=2, key_init_epochs=2, random_state=0, device="cpu")
    params.update(kw)
    return DKVBClassifier(**params)


def _split(y):
    # Class-incremental halves: classes 0, 1 first, then 2.
    return y < 2, y >= 2


LABELS = {
    "int": IRIS_Y,
    "str": np.array(["setosa", "versicolor", "virginica"])[IRIS_Y],
    "object": np.array(["a", "b", "c"], dtype=object)[IRIS_Y],
    "float": IRIS_Y * 2.0 - 1.0,
}


def _same_state(a, b):
    assert np.array_equal(a.classes_, b.classes_)
    assert a.classes_.dtype == b.classes_.dtype
    assert a.n_features_in_ == b.n_features_in_
    assert a.t_ == b.t_ and a.n_iter_ == b.n_iter_
    assert a.history_ == b.history_
    assert a.key_init_info_ == b.key_init_info_
    assert a.get_params() == b.get_params()
    assert a.bottleneck_.config() == b.bottleneck_.config()
    arrays_b = b.bottleneck_.arrays()
    assert a.bottleneck_.arrays().keys() == arrays_b.keys()
    for key, value in a.bottleneck_.arrays().items():
        assert np.array_equal(value, arrays_b[key]), key


@pytest.mark.parametrize("labels", list(LABELS), ids=list(LABELS))
def test_safetensors_round_trip_and_continue(tmp_path, labels):
    y = LABELS[labels]
    first, second = _split(IRIS_Y)
    clf = small().partial_fit(IRIS_X[first], y[first])
    path = tmp_path / "m.safetensors"
    save(clf, path)
    loaded = load(path, device="cpu")
    _same_state(clf, loaded)
    assert np.array_equal(loaded.predict_proba(IRIS_X), clf.predict_proba(IRIS_X))
    # The random state travels too, so continuing gives the same model.
    clf.partial_fit(IRIS_X[second], y[second])
    loaded.partial_fit(IRIS_X[second], y[second])
    _same_state(clf, loaded)
    assert np.array_equal(loaded.predict(IRIS_X), clf.predict(IRIS_X))


def test_safetensors_keeps_feature_names_transform_and_decoder(tmp_path):
    pd = pytest.importorskip("pandas")
    X = pd.DataFrame(IRIS_X, columns=["sl", "sw", "pl", "pw"])
    clf = small(decoder="logp", input_transform="pca-whiten", input_transform_components=3).fit(X, IRIS_Y)
    save(clf, tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors", device="cpu")
    assert list(loaded.feature_names_in_) == ["sl", "sw", "pl", "pw"]
    assert loaded.input_transform_.n_features_out_ == 3
    assert np.array_equal(loaded.decision_function(X), clf.decision_function(X))
    with pytest.raises(ValueError, match="feature names"):
        loaded.predict(X.rename(columns={"sl": "other"}))


def test_safetensors_random_state_instance_and_unfitted(tmp_path):
    clf = small(random_state=np.random.RandomState(3))
    save(clf, tmp_path / "u.safetensors")
    loaded = load(tmp_path / "u.safetensors")
    assert not hasattr(loaded, "classes_")
    rs = loaded.random_state
    assert isinstance(rs, np.random.RandomState)
    assert rs.randint(1000) == np.random.RandomState(3).randint(1000)


def test_safetensors_keys_only_model(tmp_path):
    clf = small().fit_keys(IRIS_X)
    save(clf, tmp_path / "k.safetensors")
    loaded = load(tmp_path / "k.safetensors")
    assert np.array_equal(loaded.bottleneck_.keys.numpy(), clf.bottleneck_.keys.numpy())
    assert np.array_equal(
        loaded.partial_fit(IRIS_X, IRIS_Y).predict(IRIS_X), clf.partial_fit(IRIS_X, IRIS_Y).predict(IRIS_X)
    )


def _rewrite_meta(src, dst, change):
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["skdkvb"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    change(meta)
    text = json.dumps(meta)
    # Re-signed, so that the checks behind the hash are what the tests reach.
    save_file(tensors, str(dst), metadata={"skdkvb": text, "skdkvb_sha256": hashlib.sha256(text.encode()).hexdigest()})


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, None])
def test_other_format_version_is_a_clear_error(tmp_path, version):
    save(small().fit(IRIS_X, IRIS_Y), tmp_path / "m.safetensors")
    _rewrite_meta(tmp_path / "m.safetensors", tmp_path / "v.safetensors", lambda m: m.update(format_version=version))
    with pytest.raises(ValueError, match=f"format version {version}.*reads format versions \\[2, 3\\]"):
        load(tmp_path / "v.safetensors")


def test_foreign_files_are_rejected(tmp_path):
    import torch

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not written by skdkvb"):
        load(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load(tmp_path / "junk.safetensors")
    save(small().fit(IRIS_X, IRIS_Y), tmp_path / "m.safetensors")
    _rewrite_meta(tmp_path / "m.safetensors", tmp_path / "c.safetensors", lambda m: m.update({"class": "os.system"}))
    with pytest.raises(ValueError, match="cannot load"):
        load(tmp_path / "c.safetensors")


def test_unsafe_content_is_refused(tmp_path):
    class Labels:
        pass

    y = np.array([Labels(), Labels(), Labels()], dtype=object)[IRIS_Y]
    # A fitted model whose labels are arbitrary objects (pickle-only territory).
    clf = small(decoder="vote").fit(IRIS_X, IRIS_Y)
    clf.classes_ = y[[0, 50, 100]]
    with pytest.raises(TypeError, match="Labels"):
        save(clf, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="encoder"):
        save(small(encoder=lambda x: x), tmp_path / "e.safetensors")
    with pytest.raises(TypeError, match="DKVBClassifier"):
        save(object(), tmp_path / "o.safetensors")


@pytest.mark.parametrize("dump", ["pickle", "joblib"])
def test_pickle_and_joblib(tmp_path, dump):
    clf = small().fit(IRIS_X, IRIS_Y)
    if dump == "pickle":
        loaded = pickle.loads(pickle.dumps(clf))
    else:
        joblib.dump(clf, tmp_path / "m.joblib")
        loaded = joblib.load(tmp_path / "m.joblib")
    _same_state(clf, loaded)
    assert np.array_equal(loaded.predict_proba(IRIS_X), clf.predict_proba(IRIS_X))


@pytest.mark.parametrize("transform", [None, "pca-whiten"])
def test_skops_round_trip_with_trusted_types(tmp_path, transform):
    sio = pytest.importorskip("skops.io")
    first, second = _split(IRIS_Y)
    y = LABELS["str"]
    clf = small(input_transform=transform, input_transform_components=3).partial_fit(IRIS_X[first], y[first])
    sio.dump(clf, tmp_path / "m.skops")
    untrusted = sio.get_untrusted_types(file=tmp_path / "m.skops")
    assert set(untrusted) <= set(SKOPS_TRUSTED_TYPES)
    loaded = sio.load(tmp_path / "m.skops", trusted=SKOPS_TRUSTED_TYPES)
    _same_state(clf, loaded)
    assert np.array_equal(loaded.predict_proba(IRIS_X), clf.predict_proba(IRIS_X))
    clf.partial_fit(IRIS_X[second], y[second])
    loaded.partial_fit(IRIS_X[second], y[second])
    assert np.array_equal(loaded.predict_proba(IRIS_X), clf.predict_proba(IRIS_X))


def test_half_precision_values_round_trip(tmp_path):
    clf = small(decoder="sgd", values_dtype="bfloat16").fit(IRIS_X, IRIS_Y)
    save(clf, tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors", device="cpu")
    assert loaded.bottleneck_.values.dtype == torch.bfloat16
    assert np.array_equal(loaded.predict_proba(IRIS_X), clf.predict_proba(IRIS_X))


def _sparse_counts(clf):
    """Put the model's counts into the sparse layout (what many classes give)."""
    from skdkvb._tables import CountTable

    b = clf.bottleneck_
    table = CountTable(b.count_table.n_rows, b.n_classes, layout="sparse")
    table.add_table(b.count_table, np.arange(b.n_classes))
    b.count_table = table
    return clf


@pytest.mark.parametrize("how", ["save", "pickle", "skops"])
def test_sparse_count_table_round_trips(tmp_path, how):
    clf = _sparse_counts(small(decoder="logp").fit(IRIS_X, IRIS_Y))
    assert clf.bottleneck_.count_table.layout == "sparse"
    if how == "save":
        save(clf, tmp_path / "m.safetensors")
        loaded = load(tmp_path / "m.safetensors", device="cpu")
    elif how == "pickle":
        loaded = pickle.loads(pickle.dumps(clf, protocol=5))
    else:
        sio = pytest.importorskip("skops.io")
        sio.dump(clf, tmp_path / "m.skops")
        loaded = sio.load(tmp_path / "m.skops", trusted=SKOPS_TRUSTED_TYPES)
    assert loaded.bottleneck_.count_table.layout == "sparse"
    _same_state(clf, loaded)
    assert np.array_equal(loaded.predict_proba(IRIS_X), clf.predict_proba(IRIS_X))


def _as_format_2(src, dst, clf):
    """Rewrite a format-3 file as format 2 wrote it: dense (C, M, K) values and counts, no decoder."""
    from safetensors import safe_open

    b = clf.bottleneck_
    shape = (b.n_heads, b.n_keys, b.n_classes)
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["skdkvb"])
        tensors = {k: f.get_tensor(k) for k in f.keys() if k in ("bottleneck.projection", "bottleneck.keys")}  # noqa: SIM118
    if b.count_table is not None:
        tensors["bottleneck.counts"] = b.counts.clone()
        tensors["bottleneck.values"] = torch.zeros(shape, dtype=getattr(torch, b.values_dtype))
    else:
        counts = torch.zeros(shape, dtype=torch.float64)
        counts[..., 0] = b.usage  # format 2 kept counts for every decoder; sgd only needs their row sums
        tensors["bottleneck.counts"] = counts
        tensors["bottleneck.values"] = b.values.clone()
    cfg = meta["fitted"]["bottleneck_"]
    del cfg["decoder"], cfg["table"]
    meta["format_version"] = 2
    meta["tensor_sha256"] = {}
    for k, t in tensors.items():
        h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        meta["tensor_sha256"][k] = h.hexdigest()
    text = json.dumps(meta)
    save_file(tensors, str(dst), metadata={"skdkvb": text, "skdkvb_sha256": hashlib.sha256(text.encode()).hexdigest()})


@pytest.mark.parametrize("decoder", ["logp", "vote", "sgd"])
def test_format_2_files_still_load(tmp_path, decoder):
    clf = small(decoder=decoder).fit(IRIS_X, IRIS_Y)
    save(clf, tmp_path / "m.safetensors")
    _as_format_2(tmp_path / "m.safetensors", tmp_path / "old.safetensors", clf)
    loaded = load(tmp_path / "old.safetensors", device="cpu")
    assert np.array_equal(loaded.predict_proba(IRIS_X), clf.predict_proba(IRIS_X))
    assert (loaded.bottleneck_.count_table is None) == (decoder == "sgd")
    torch.testing.assert_close(loaded.bottleneck_.usage, clf.bottleneck_.usage)
    loaded.partial_fit(IRIS_X[:10], IRIS_Y[:10])  # and it trains on


@pytest.mark.parametrize("values_dtype", ["float32", "bfloat16"])
def test_value_table_of_several_blocks_round_trips(tmp_path, values_dtype):
    rng = np.random.RandomState(0)
    X, y = rng.normal(size=(400, 4)), np.repeat(np.arange(40), 10)
    clf = small(decoder="sgd", values_dtype=values_dtype).fit_keys(X)
    for lo in range(0, 40, 8):  # classes arrive in groups: the table grows in blocks
        clf.partial_fit(X[(y >= lo) & (y < lo + 8)], y[(y >= lo) & (y < lo + 8)])
    assert len(clf.bottleneck_.value_table.blocks) > 1
    save(clf, tmp_path / "m.safetensors")
    sio = pytest.importorskip("skops.io")
    sio.dump(clf, tmp_path / "m.skops")
    for loaded in (
        load(tmp_path / "m.safetensors", device="cpu"),
        pickle.loads(pickle.dumps(clf, protocol=5)),
        sio.load(tmp_path / "m.skops", trusted=SKOPS_TRUSTED_TYPES),
    ):
        _same_state(clf, loaded)
        assert np.array_equal(loaded.predict_proba(X), clf.predict_proba(X))
        assert loaded.bottleneck_.value_table.capacity == clf.bottleneck_.value_table.capacity
