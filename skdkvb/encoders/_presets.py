"""DKVB settings measured to suit the embeddings of frozen pretrained backbones.

Two public helpers share one table of values, :data:`EMBEDDING_PARAMS`:

* :func:`dkvb_params_for_embeddings` returns them as keyword arguments, for
  users who embed their data themselves (``encoder=None``);
* :func:`resolve_auto_params` is the rule behind the estimator's ``"auto"``
  values of ``n_heads``, ``n_keys``, ``input_transform``,
  ``input_transform_components`` and ``top_k``: the embedding settings when an ``encoder`` is set, the pixel
  (raw-input) defaults otherwise, so that inputs without an encoder keep
  exactly the results they had before ``"auto"`` existed.
"""

from __future__ import annotations

__all__ = ["EMBEDDING_PARAMS", "RAW_INPUT_PARAMS", "dkvb_params_for_embeddings", "resolve_auto_params"]

#: The settings measured on real backbone embeddings (docs/results.md, "Real backbones").
#: 1024 heads of 1024 keys hold as many key rows as 256 heads of 4096 (same memory,
#: same search cost) but average four times as many partitions of 256 whitened
#: components: +0.8 to 1 point on Fashion-MNIST through both backbones.
EMBEDDING_PARAMS = {
    "n_heads": 1024,
    "n_keys": 1024,
    "input_transform": "pca-whiten",
    "input_transform_components": 256,
    "top_k": 4,
}

#: What ``"auto"`` means without an encoder: the estimator's settings before ``"auto"`` existed.
RAW_INPUT_PARAMS = {
    "n_heads": 256,
    "n_keys": 4096,
    "input_transform": None,
    "input_transform_components": 64,
    "top_k": 1,
}

_AUTO = "auto"


def dkvb_params_for_embeddings(n_features: int | None = None) -> dict:
    """DKVB parameters for real backbone embeddings: many heads, PCA whitening, top-k counting.

    On Fashion-MNIST embedded by ImageNet MobileNetV2 and EfficientNet-Lite0
    (1280 features, 3,000 training images), whitening the first 256
    principal components, splitting the usual key budget into 1024 heads of
    1024 keys, and letting every head vote with its 4 nearest keys beat the
    raw-input defaults by about 4 points and Streaming LDA by a few tenths
    of a point on all 10,000 test images. Every choice keeps the count
    decoders order-invariant: the model after a class-incremental stream is
    the model fitted on all the data. The measurements are in the "Real
    backbones" section of the results page. An estimator with an
    ``encoder`` gets these settings by itself (its ``"auto"`` values, see
    :func:`resolve_auto_params`); call this function when you pass
    embeddings you computed yourself.

    Parameters
    ----------
    n_features : int, default=None
        Embedding size; the PCA keeps ``min(256, n_features)`` components.

    Returns
    -------
    dict
        Keyword arguments for :class:`~skdkvb.DKVBClassifier`.

    Examples
    --------
    >>> from skdkvb.encoders import dkvb_params_for_embeddings
    >>> dkvb_params_for_embeddings(1280)
    {'n_heads': 1024, 'n_keys': 1024, 'input_transform': 'pca-whiten', 'input_transform_components': 256, 'top_k': 4}
    >>> dkvb_params_for_embeddings(64)["input_transform_components"]
    64
    """
    params = dict(EMBEDDING_PARAMS)
    if n_features is not None:
        params["input_transform_components"] = max(1, min(params["input_transform_components"], int(n_features)))
    return params


def resolve_auto_params(
    encoder: object = None,
    *,
    n_heads: object = _AUTO,
    n_keys: object = _AUTO,
    input_transform: object = _AUTO,
    input_transform_components: object = _AUTO,
    top_k: object = _AUTO,
    n_samples: int | None = None,
) -> dict:
    """The values that the estimator's ``"auto"`` parameters stand for.

    Every parameter left at ``"auto"`` becomes the embedding setting
    (:data:`EMBEDDING_PARAMS`: 1024 heads of 1024 keys, PCA whitening of
    256 components, top-4 counting) when ``encoder`` is set, and the
    raw-input setting (:data:`RAW_INPUT_PARAMS`: 256 heads of 4096 keys, no
    transform, 64 components, top-1) when it is None. Any other value is
    returned unchanged: an explicit choice always wins, and is validated by
    the estimator, not here.

    The rule looks at the ``encoder`` parameter only, never at the data, so
    the resolved values are known before ``fit`` and equal for every clone.

    Parameters
    ----------
    encoder : object, default=None
        The estimator's ``encoder`` parameter (None: inputs are embeddings
        or raw features).
    n_heads : "auto" or int, default="auto"
        The estimator's ``n_heads``.
    n_keys : "auto", int or None, default="auto"
        The estimator's ``n_keys``: an automatic ``top_k`` never exceeds it
        (an explicit one is left for the estimator to reject). None means
        ``"auto"``, as it did before ``n_keys`` could be ``"auto"``.
    input_transform : {"auto", None, "pca-whiten"}, default="auto"
        The estimator's ``input_transform``.
    input_transform_components : "auto" or int, default="auto"
        The estimator's ``input_transform_components``.
    top_k : "auto" or int, default="auto"
        The estimator's ``top_k``.
    n_samples : int, default=None
        Samples the transform is fitted on: with an encoder, automatic
        components never exceed ``n_samples - 1``, the rank of their centred
        covariance (without one, ``"auto"`` keeps the raw-input behaviour
        exactly).
        Whitening a direction without variance would multiply noise (such
        as the rounding differences between two layouts of the same images)
        by about a thousand.

    Returns
    -------
    dict
        ``n_heads``, ``n_keys``, ``input_transform``,
        ``input_transform_components`` and ``top_k`` with every ``"auto"``
        replaced.

    Examples
    --------
    >>> from skdkvb.encoders import resolve_auto_params
    >>> resolve_auto_params("torchvision:mobilenet_v2")
    {'n_heads': 1024, 'n_keys': 1024, 'input_transform': 'pca-whiten', 'input_transform_components': 256, 'top_k': 4}
    >>> resolve_auto_params(None)
    {'n_heads': 256, 'n_keys': 4096, 'input_transform': None, 'input_transform_components': 64, 'top_k': 1}
    >>> resolve_auto_params("torchvision:mobilenet_v2", top_k=1)["top_k"]
    1
    >>> resolve_auto_params("torchvision:mobilenet_v2", n_keys=2)["top_k"]
    2
    >>> resolve_auto_params("torchvision:mobilenet_v2", n_samples=36)["input_transform_components"]
    35
    """
    table = RAW_INPUT_PARAMS if encoder is None else EMBEDDING_PARAMS
    n_keys = _AUTO if n_keys is None else n_keys
    given = {
        "n_heads": n_heads,
        "n_keys": n_keys,
        "input_transform": input_transform,
        "input_transform_components": input_transform_components,
        "top_k": top_k,
    }
    out = {name: table[name] if _is_auto(value) else value for name, value in given.items()}
    if _is_auto(top_k) and not _is_auto(n_keys):
        out["top_k"] = max(1, min(out["top_k"], int(n_keys)))
    if _is_auto(input_transform_components) and encoder is not None and n_samples is not None:
        out["input_transform_components"] = max(1, min(out["input_transform_components"], int(n_samples) - 1))
    return out


def _is_auto(value) -> bool:
    # ``value == "auto"`` would compare arrays element-wise; only a str can mean "auto".
    return isinstance(value, str) and value == _AUTO
