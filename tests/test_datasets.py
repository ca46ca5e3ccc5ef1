"""Dataset loaders: Fashion-MNIST IDX files, digits and the 2-D toy."""

import gzip
import struct

import numpy as np
import pytest

from skdkvb.continual.datasets import (
    FASHION_MNIST_DIR,
    TOY_2D_CLASS_ORDER,
    load_dataset,
    load_digits_split,
    load_fashion_mnist,
    make_toy_2d,
)

HAVE_FMNIST = (FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz").exists()


def _write_idx(path, array, compress):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("compress", [True, False])
def test_reads_idx_files(tmp_path, compress):
    rng = np.random.RandomState(0)
    images = {"train": rng.randint(0, 256, (20, 28, 28)), "t10k": rng.randint(0, 256, (10, 28, 28))}
    labels = {"train": np.arange(20) % 10, "t10k": np.arange(10)}
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images[prefix], compress)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels[prefix], compress)
    data = load_fashion_mnist(tmp_path)
    assert data.X_train.shape == (20, 784) and data.X_train.dtype == np.float32
    np.testing.assert_array_equal(data.X_train[3], images["train"][3].ravel())
    np.testing.assert_array_equal(data.y_test, labels["t10k"])
    sub = load_fashion_mnist(tmp_path, n_train=10)
    assert sub.X_train.shape == (10, 784) and np.unique(sub.y_train).size == 10


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_corrupt_file_rejected(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="IDX"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not HAVE_FMNIST, reason="needs the Debian package dataset-fashion-mnist")
def test_real_fashion_mnist():
    data = load_fashion_mnist(n_test=1000)
    assert data.X_train.shape == (60000, 784)
    assert data.X_test.shape == (1000, 784)
    assert data.X_train.min() == 0 and data.X_train.max() == 255
    np.testing.assert_array_equal(np.bincount(data.y_train), np.full(10, 6000))
    assert data.y_train[:3].tolist() == [9, 0, 0]  # first training labels of the IDX file
    assert len(data.target_names) == 10


def test_digits_split():
    data = load_digits_split()
    assert data.X_train.shape == (1347, 64) and data.X_test.shape == (450, 64)
    assert np.unique(data.y_test).size == 10
    again = load_digits_split()
    np.testing.assert_array_equal(data.X_test, again.X_test)


def test_toy_2d_layout():
    X, y = make_toy_2d(random_state=0)
    assert X.shape == (800, 2) and np.bincount(y).tolist() == [100] * 8
    centres = np.stack([X[y == c].mean(0) for c in range(8)])
    # Eight cells of the 3x3 grid {0, 0.5, 1}^2, centre (0.5, 0.5) left out.
    grid = {(a, b) for a in (0.0, 0.5, 1.0) for b in (0.0, 0.5, 1.0)} - {(0.5, 0.5)}
    assert {tuple(np.round(c * 2) / 2) for c in centres} == grid
    # Classes c and c + 4 are opposite through the centre.
    np.testing.assert_allclose(centres[:4] + centres[4:], 1.0, atol=0.03)
    assert np.allclose(X[y == 0].std(0), 0.035, rtol=0.2)
    assert list(TOY_2D_CLASS_ORDER) == [0, 4, 1, 5, 2, 6, 3, 7]
    with pytest.raises(ValueError, match="std"):
        make_toy_2d(std=0)


def test_load_dataset_dispatch():
    assert load_dataset("toy").X_test.shape == (800, 2)
    assert load_dataset("digits").name == "digits"
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_dataset("mnist")


# ------------------------------------------------------------ embedding cache
def _flatten_encoder():
    import torch

    from skdkvb.encoders import FrozenEncoder

    return FrozenEncoder(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)), device="cpu")


def test_embedding_cache_hits_resumes_and_is_bounded(tmp_path, monkeypatch):
    import torch

    from skdkvb.encoders._disk_cache import EmbeddingCache

    torch.manual_seed(0)
    enc = _flatten_encoder()
    X = np.random.default_rng(0).random((10, 3, 4)).astype(np.float32)
    expected = enc.embed_numpy(X)
    cache = EmbeddingCache(tmp_path, dtype="float32")
    # interrupted after the first chunk: the finished rows are kept
    calls = {"n": 0}
    real = enc.embed_numpy

    def flaky(chunk):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(chunk)

    monkeypatch.setattr(enc, "embed_numpy", flaky)
    with pytest.raises(KeyboardInterrupt):
        cache.embed(enc, X, chunk_size=4, verbose=False)

    def counting(chunk):
        calls["rows"] = calls.get("rows", 0) + len(chunk)
        return real(chunk)

    monkeypatch.setattr(enc, "embed_numpy", counting)
    Z = cache.embed(enc, X, chunk_size=4, verbose=False)
    assert calls["rows"] == 6  # resumed after the 4 rows already written
    np.testing.assert_allclose(Z, expected, rtol=1e-6)
    assert not cache.last_hit
    np.testing.assert_allclose(cache.embed(enc, X, verbose=False), expected, rtol=1e-6)
    assert cache.last_hit and calls["rows"] == 6
    # other weights or other inputs: another entry
    with torch.no_grad():
        enc.model[1].bias.add_(1.0)
    cache.embed(enc, X, verbose=False)
    assert not cache.last_hit
    assert len([d for d in tmp_path.iterdir() if d.is_dir()]) == 2
    # bounded: a tiny budget keeps only the entry just written
    small = EmbeddingCache(tmp_path, dtype="float16", max_bytes=1)
    Z16 = small.embed(enc, X[:5], verbose=False)
    assert Z16.dtype == np.float32
    assert len([d for d in tmp_path.iterdir() if d.is_dir()]) == 1


def test_embed_dataset_images_and_cache(tmp_path):
    import warnings

    from skdkvb.continual.datasets import embed_dataset, load_dataset

    data = load_dataset("digits")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = embed_dataset(
            data, encoder="test_convnext", image_size=32, subsample=50, cache_dir=tmp_path, verbose=False
        )
        again = embed_dataset(
            data, encoder="test_convnext", image_size=32, subsample=50, cache_dir=tmp_path, verbose=False
        )
        bigger = embed_dataset(
            data, encoder="test_convnext", image_size=40, subsample=50, cache_dir=tmp_path, verbose=False
        )
    assert first.X_train.shape == (50, 64) and first.X_test.shape == (16, 64)
    assert not first.cache_hit and again.cache_hit and not bigger.cache_hit
    np.testing.assert_allclose(again.X_train, first.X_train, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(again.y_test, first.y_test)
    assert first.data_config["input_size"] == (3, 32, 32)
