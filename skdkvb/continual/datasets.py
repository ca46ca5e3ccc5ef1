"""Datasets for the continual-learning benchmark, all available offline.

* :func:`load_fashion_mnist` reads the IDX files installed by the Debian
  package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``).
* :func:`load_digits_split` is scikit-learn's 8x8 digits with a fixed
  stratified train/test split; it needs nothing beyond scikit-learn.
* :func:`make_toy_2d` is the 2-D toy of the DKVB paper: eight Gaussian classes
  on a 3x3 grid without its centre, learnt in the four tasks
  ``{0, 4}, {1, 5}, {2, 6}, {3, 7}`` (:data:`TOY_2D_CLASS_ORDER`).
* :func:`embed_dataset` turns an image dataset into the embeddings of a frozen
  pretrained backbone, once: they are kept in an on-disk cache.
"""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.utils import Bunch, check_random_state

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_LABELS",
    "TOY_2D_CLASS_ORDER",
    "embed_dataset",
    "load_dataset",
    "load_digits_split",
    "load_fashion_mnist",
    "make_toy_2d",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs the IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

#: Class order of the paper's 2-D toy: split in 4 tasks it gives {0,4}, {1,5}, ...
TOY_2D_CLASS_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)

# The eight cells of a 3x3 grid without its centre, numbered around the ring,
# so that class c and class c + 4 sit on opposite sides of the centre.
_TOY_CENTRES = np.array(
    [[0.0, 0.0], [0.5, 0.0], [1.0, 0.0], [1.0, 0.5],
     [1.0, 1.0], [0.5, 1.0], [0.0, 1.0], [0.0, 0.5]]
)  # fmt: skip

# IDX element types (the third byte of the magic number).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class FashionMNISTNotFoundError(FileNotFoundError):
    """Raised when the Fashion-MNIST IDX files are not installed."""


def _read_idx(path):
    """Read one IDX file (gzip-compressed or plain) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number).")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(
            f"{path} is truncated: header announces shape {shape} "
            f"({expected} bytes) but {len(data) - offset} bytes follow."
        )
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def _find_idx(directory, stem):
    for name in (stem + ".gz", stem):
        path = directory / name
        if path.is_file():
            return path
    raise FashionMNISTNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}. Install the "
        "Debian package that provides it: `sudo apt-get install "
        "dataset-fashion-mnist`, or pass data_dir= pointing to a folder with "
        "the four IDX files."
    )


def load_fashion_mnist(data_dir=None, *, n_train=None, n_test=None, random_state=0):
    """Load Fashion-MNIST from the IDX files of ``dataset-fashion-mnist``.

    Parameters
    ----------
    data_dir : str or path-like, default=None
        Folder with ``train-images-idx3-ubyte[.gz]``,
        ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]`` and
        ``t10k-labels-idx1-ubyte[.gz]``. Defaults to the environment variable
        ``SKDKVB_FASHION_MNIST_DIR`` if set, else :data:`FASHION_MNIST_DIR`.
    n_train, n_test : int, default=None
        Keep a stratified random subset of this many training / test samples
        (all of them if None); handy for quick runs and tests.
    random_state : int, RandomState instance or None, default=0
        Seed of the subsets.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        ``X_train`` (n, 784) float32 pixels in [0, 255], ``y_train`` int64,
        ``X_test``, ``y_test``, ``target_names`` and ``name``.

    Raises
    ------
    FashionMNISTNotFoundError
        A :class:`FileNotFoundError` whose message names the Debian package
        ``dataset-fashion-mnist`` when the files are missing.

    Examples
    --------
    >>> from skdkvb.continual.datasets import load_fashion_mnist
    >>> data = load_fashion_mnist(n_train=100, n_test=50)  # doctest: +SKIP
    >>> data.X_train.shape, data.X_test.shape  # doctest: +SKIP
    ((100, 784), (50, 784))
    """
    if data_dir is None:
        data_dir = os.environ.get("SKDKVB_FASHION_MNIST_DIR", FASHION_MNIST_DIR)
    directory = Path(data_dir)
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find_idx(directory, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find_idx(directory, f"{prefix}-labels-idx1-ubyte"))
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{split} images and labels disagree in length: {images.shape[0]} vs {labels.shape[0]}.")
        parts[split] = (
            images.reshape(images.shape[0], -1).astype(np.float32),
            labels.astype(np.int64),
        )
    (X_train, y_train), (X_test, y_test) = parts["train"], parts["test"]
    X_train, y_train = _subset(X_train, y_train, n_train, random_state)
    X_test, y_test = _subset(X_test, y_test, n_test, random_state)
    return Bunch(
        X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test,
        target_names=list(FASHION_MNIST_LABELS), name="fashion-mnist",
    )  # fmt: skip


def _subset(X, y, n, random_state):
    if n is None or n >= X.shape[0]:
        return X, y
    if n < 1:
        raise ValueError(f"subset size must be >= 1, got {n}.")
    idx, _ = train_test_split(np.arange(X.shape[0]), train_size=n, stratify=y, random_state=random_state)
    idx = np.sort(idx)
    return X[idx], y[idx]


def load_digits_split(*, test_size=0.25, random_state=0):
    """scikit-learn's 8x8 digits with a stratified train/test split.

    Parameters
    ----------
    test_size : float, default=0.25
        Fraction of the 1797 images kept for testing.
    random_state : int, default=0
        Seed of the split.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        ``X_train``, ``y_train``, ``X_test``, ``y_test`` (64 float32 pixel
        features in [0, 16]), ``target_names`` and ``name``.

    Examples
    --------
    >>> from skdkvb.continual.datasets import load_digits_split
    >>> data = load_digits_split()
    >>> data.X_train.shape, data.X_test.shape
    ((1347, 64), (450, 64))
    """
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X.astype(np.float32), y.astype(np.int64), test_size=test_size,
        stratify=y, random_state=random_state,
    )  # fmt: skip
    return Bunch(
        X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test,
        target_names=[str(d) for d in range(10)], name="digits",
    )  # fmt: skip


def make_toy_2d(n_samples_per_class=100, *, std=0.035, random_state=None):
    """The 2-D toy stream of the DKVB paper (8 Gaussian blobs on a grid).

    Class centres are the eight cells of the grid ``{0, 0.5, 1}^2`` without
    its centre, numbered around the ring so that classes ``c`` and ``c + 4``
    are opposite. The paper learns them in four tasks ``{0, 4}, {1, 5},
    {2, 6}, {3, 7}``: pass ``class_order=TOY_2D_CLASS_ORDER, n_tasks=4`` to
    :func:`skdkvb.continual.class_incremental_split`.

    Parameters
    ----------
    n_samples_per_class : int, default=100
        Samples drawn around each of the eight centres.
    std : float, default=0.035
        Standard deviation of every blob along both axes.
    random_state : int, RandomState instance or None, default=None
        Seed of the Gaussian draws.

    Returns
    -------
    X : ndarray of shape (8 * n_samples_per_class, 2), float32
        The points.
    y : ndarray of shape (8 * n_samples_per_class,), int64
        Their classes, 0 to 7.

    Examples
    --------
    >>> from skdkvb.continual.datasets import make_toy_2d
    >>> X, y = make_toy_2d(random_state=0)
    >>> X.shape, sorted(set(y.tolist())) == list(range(8))
    ((800, 2), True)
    """
    if n_samples_per_class < 1:
        raise ValueError(f"n_samples_per_class must be >= 1, got {n_samples_per_class}.")
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}.")
    rng = check_random_state(random_state)
    y = np.repeat(np.arange(8), n_samples_per_class)
    X = _TOY_CENTRES[y] + rng.normal(scale=std, size=(y.size, 2))
    return X.astype(np.float32), y.astype(np.int64)


def load_dataset(name, *, quick=False, random_state=0, data_dir=None):
    """Train/test data of one benchmark dataset by name (used by the CLI).

    Parameters
    ----------
    name : {"digits", "fashion-mnist", "toy"}
    quick : bool, default=False
        Use a small stratified subset of Fashion-MNIST (6000 train / 2000
        test); no effect on the smaller datasets.
    random_state : int, default=0
        Seed of the subsets, of the digits split and of the toy sampling.
    data_dir : path-like, default=None
        Passed to :func:`load_fashion_mnist`.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Same fields as :func:`load_digits_split`.

    Examples
    --------
    >>> from skdkvb.continual.datasets import load_dataset
    >>> load_dataset("toy").X_train.shape
    (800, 2)
    """
    if name == "digits":
        return load_digits_split(random_state=random_state)
    if name == "fashion-mnist":
        sizes = {"n_train": 6000, "n_test": 2000} if quick else {}
        return load_fashion_mnist(data_dir, random_state=random_state, **sizes)
    if name == "toy":
        X_train, y_train = make_toy_2d(random_state=random_state)
        X_test, y_test = make_toy_2d(random_state=random_state + 1)
        return Bunch(
            X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test,
            target_names=[str(c) for c in range(8)], name="toy",
        )  # fmt: skip
    raise ValueError(f"Unknown dataset {name!r}; choose one of 'digits', 'fashion-mnist', 'toy'.")


def _as_images(X, name):
    """Flat grey pixels (n, s*s) to uint8 images (n, s, s, 1); images are returned as they are."""
    X = np.asarray(X)
    if X.ndim == 4 or (X.ndim == 3 and X.dtype == np.uint8):
        return X if X.ndim == 4 else X[..., None]
    if X.ndim != 2:
        raise ValueError(f"embed_dataset needs images or flat square grey images, got X of shape {X.shape}.")
    side = int(np.sqrt(X.shape[1]) + 0.5)
    if side * side != X.shape[1]:
        raise ValueError(
            f"embed_dataset cannot see images in {X.shape[1]} features of dataset {name!r}: "
            "pass 4-D images (n, H, W, C) or flat square grey images."
        )
    top = 16.0 if name == "digits" else 255.0  # digits pixels are 0..16
    return np.clip(np.rint(X * (255.0 / top)), 0, 255).astype(np.uint8).reshape(-1, side, side, 1)


def embed_dataset(
    data,
    *,
    encoder,
    checkpoint_path=None,
    image_size=None,
    subsample=None,
    cache_dir=None,
    device="auto",
    batch_size=64,
    verbose=True,
    random_state=0,
):
    """Embed an image dataset with a frozen pretrained backbone, reusing cached embeddings.

    Parameters
    ----------
    data : :class:`~sklearn.utils.Bunch`
        As returned by :func:`load_dataset`: ``X_train``, ``y_train``,
        ``X_test``, ``y_test`` (flat square grey images, such as
        Fashion-MNIST's 784 pixels in 0..255, or 4-D ``uint8`` images),
        ``target_names`` and ``name``.
    encoder : str
        A timm model name or ``"torchvision:<name>"`` (see
        :func:`skdkvb.encoders.build_encoder`).
    checkpoint_path : str or path-like, default=None
        Local weights of ``encoder``; random weights (with a warning) if None.
    image_size : int, default=None
        Side of the square network input. The whole image is resized to it
        (no centre crop: small datasets such as Fashion-MNIST fill their
        frame). None keeps the model's data config. Smaller is faster: the
        forward cost grows with the square of the side.
    subsample : int, default=None
        Keep a stratified random subset of this many training images and
        ``max(subsample // 3, n_classes)`` test images; all if None.
    cache_dir : str or path-like, default=None
        Embedding cache folder; ``$SKDKVB_EMBEDDING_CACHE`` or
        ``~/.cache/skdkvb/embeddings`` if None. A second call with the same
        images, weights and preprocessing reads the embeddings from it.
    device : str, default="auto"
        Where the backbone runs.
    batch_size : int, default=64
        Images per forward pass.
    verbose : bool, default=True
        Progress bar while embedding.
    random_state : int, default=0
        Seed of the subsets.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        The fields of ``data`` with ``X_train`` and ``X_test`` replaced by
        float32 embeddings, plus ``encoder``, ``data_config``,
        ``embed_time`` (seconds, cache reads included) and ``cache_hit``
        (True when nothing had to be embedded).

    Examples
    --------
    >>> import warnings
    >>> from skdkvb.continual.datasets import embed_dataset, load_dataset
    >>> data = load_dataset("digits")
    >>> with warnings.catch_warnings():  # random weights, for the example only
    ...     warnings.simplefilter("ignore")
    ...     emb = embed_dataset(data, encoder="test_convnext", image_size=32, subsample=60, verbose=False)
    >>> emb.X_train.shape, emb.X_test.shape
    ((60, 64), (20, 64))
    """
    from ..encoders import build_encoder
    from ..encoders._disk_cache import EmbeddingCache

    name = data.get("name", "data")
    X_train, y_train, X_test, y_test = data.X_train, data.y_train, data.X_test, data.y_test
    if subsample is not None:
        n_classes = np.unique(y_train).size
        X_train, y_train = _subset(X_train, y_train, int(subsample), random_state)
        X_test, y_test = _subset(X_test, y_test, max(int(subsample) // 3, n_classes), random_state)
    kwargs = {}
    if checkpoint_path is not None:
        kwargs["checkpoint_path"] = checkpoint_path
    if image_size is not None:
        kwargs["data_config"] = {"input_size": (3, int(image_size), int(image_size)), "crop_pct": 1.0}
    frozen = build_encoder(encoder, kwargs, device=device, batch_size=batch_size, verbose=0)
    cache = EmbeddingCache(cache_dir)
    t0 = time.perf_counter()
    Z_train = cache.embed(frozen, _as_images(X_train, name), verbose=verbose)
    hit = cache.last_hit
    Z_test = cache.embed(frozen, _as_images(X_test, name), verbose=verbose)
    out = Bunch(**data)
    out.update(
        X_train=Z_train, y_train=np.asarray(y_train), X_test=Z_test, y_test=np.asarray(y_test),
        name=f"{name}/{encoder}", encoder=encoder, data_config=dict(frozen.data_config),
        embed_time=time.perf_counter() - t0, cache_hit=bool(hit and cache.last_hit),
    )  # fmt: skip
    return out
