"""DKVB settings measured to suit the embeddings of frozen pretrained backbones.

Two public helpers share one table of values, :data:`EMBEDDING_PARAMS`:

* :func:`dkvb_params_for_embeddings` returns them as keyword arguments, for
  users who embed their data themselves (``encoder=None``);
* :func:`resolve_auto_params` is the rule behind the estimator's ``"auto"``
  values of ``input_transform``, ``input_transform_components`` and
  ``top_k``: the embedding settings when an ``encoder`` is set, the pixel
  (raw-input) defaults otherwise, so that inputs without an encoder keep
  exactly the results they had before ``"auto"`` existed.
"""

from __future__ import annotations

__all__ = ["EMBEDDING_PARAMS", "RAW_INPUT_PARAMS", "dkvb_params_for_embeddings", "resolve_auto_params"]

#: The settings measured on real backbone embeddings (docs/results.md, "Real backbones").
EMBEDDING_PARAMS = {"input_transform": "pca-whiten", "input_transform_components": 128, "top_k": 4}

#: What ``"auto"`` means without an encoder: the estimator's settings before ``"auto"`` existed.
RAW_INPUT_PARAMS = {"input_transform": None, "input_transform_components": 64, "top_k": 1}

_AUTO = "auto"


def dkvb_params_for_embeddings(n_features: int | None = None) -> dict:
    """DKVB parameters for real backbone embeddings: PCA whitening, then top-k counting.

    On Fashion-MNIST embedded by ImageNet MobileNetV2 and EfficientNet-Lite0
    (1280 features, 3,000 training images), whitening the first 128
    principal components and letting every head vote with its 4 nearest keys
    beat the defaults by about 3 points. Both choices keep the count decoders
    order-invariant: the model after a class-incremental stream is the model
    fitted on all the data. The measurements are in the "Real backbones"
    section of the results page. An estimator with an ``encoder`` gets these
    settings by itself (its ``"auto"`` values, see
    :func:`resolve_auto_params`); call this function when you pass
    embeddings you computed yourself.

    Parameters
    ----------
    n_features : int, default=None
        Embedding size; the PCA keeps ``min(128, n_features)`` components.

    Returns
    -------
    dict
        Keyword arguments for :class:`~skdkvb.DKVBClassifier`.

    Examples
    --------
    >>> from skdkvb.encoders import dkvb_params_for_embeddings
    >>> dkvb_params_for_embeddings(1280)
    {'input_transform': 'pca-whiten', 'input_transform_components': 128, 'top_k': 4}
    """
    params = dict(EMBEDDING_PARAMS)
    if n_features is not None:
        params["input_transform_components"] = max(1, min(params["input_transform_components"], int(n_features)))
    return params


def resolve_auto_params(
    encoder: object = None,
    *,
    input_transform: object = _AUTO,
    input_transform_components: object = _AUTO,
    top_k: object = _AUTO,
    n_keys: int | None = None,
    n_samples: int | None = None,
) -> dict:
    """The values that the estimator's ``"auto"`` parameters stand for.

    Every parameter left at ``"auto"`` becomes the embedding setting
    (:data:`EMBEDDING_PARAMS`: PCA whitening of 128 components, top-4
    counting) when ``encoder`` is set, and the raw-input setting
    (:data:`RAW_INPUT_PARAMS`: no transform, 64 components, top-1)
    when it is None. Any other value is returned unchanged: an explicit
    choice always wins, and is validated by the estimator, not here.

    The rule looks at the ``encoder`` parameter only, never at the data, so
    the resolved values are known before ``fit`` and equal for every clone.

    Parameters
    ----------
    encoder : object, default=None
        The estimator's ``encoder`` parameter (None: inputs are embeddings
        or raw features).
    input_transform : {"auto", None, "pca-whiten"}, default="auto"
        The estimator's ``input_transform``.
    input_transform_components : "auto" or int, default="auto"
        The estimator's ``input_transform_components``.
    top_k : "auto" or int, default="auto"
        The estimator's ``top_k``.
    n_keys : int, default=None
        The estimator's ``n_keys``: an automatic ``top_k`` never exceeds it
        (an explicit one is left for the estimator to reject).
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
        ``input_transform``, ``input_transform_components`` and ``top_k``
        with every ``"auto"`` replaced.

    Examples
    --------
    >>> from skdkvb.encoders import resolve_auto_params
    >>> resolve_auto_params("torchvision:mobilenet_v2")
    {'input_transform': 'pca-whiten', 'input_transform_components': 128, 'top_k': 4}
    >>> resolve_auto_params(None)
    {'input_transform': None, 'input_transform_components': 64, 'top_k': 1}
    >>> resolve_auto_params("torchvision:mobilenet_v2", top_k=1)["top_k"]
    1
    >>> resolve_auto_params("torchvision:mobilenet_v2", n_keys=2)["top_k"]
    2
    >>> resolve_auto_params("torchvision:mobilenet_v2", n_samples=36)["input_transform_components"]
    35
    """
    table = RAW_INPUT_PARAMS if encoder is None else EMBEDDING_PARAMS
    given = {
        "input_transform": input_transform,
        "input_transform_components": input_transform_components,
        "top_k": top_k,
    }
    # ``value == "auto"`` would compare arrays element-wise; only a str can mean "auto".
    out = {name: table[name] if isinstance(value, str) and value == _AUTO else value for name, value in given.items()}
    if isinstance(top_k, str) and top_k == _AUTO and n_keys is not None:
        out["top_k"] = max(1, min(out["top_k"], int(n_keys)))
    auto_components = isinstance(input_transform_components, str) and input_transform_components == _AUTO
    if auto_components and encoder is not None and n_samples is not None:
        out["input_transform_components"] = max(1, min(out["input_transform_components"], int(n_samples) - 1))
    return out
