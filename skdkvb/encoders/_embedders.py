"""The scikit-learn transformers over frozen encoders: :class:`TimmEmbedder` and :class:`TorchEmbedder`."""

from __future__ import annotations

import os
from numbers import Integral

import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .._device import resolve_device
from ..utils._sklearn_compat import Interval, fit_context
from ._frozen import _DEFAULT_CACHE_SIZE, _WRAPPER_KEYS, build_encoder

__all__ = ["TimmEmbedder", "TorchEmbedder"]


class _EmbedderMixin(ClassNamePrefixFeaturesOutMixin, TransformerMixin):
    """fit/transform shared by the embedders; subclasses define ``_build``."""

    def _build(self, device):  # pragma: no cover - abstract
        raise NotImplementedError

    @fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Build the frozen model and check ``X``; nothing is learned.

        Parameters
        ----------
        X : array-like or torch.Tensor
            Inputs; only validated.
        y : None
            Ignored.

        Returns
        -------
        self : object
            The fitted embedder.
        """
        device = resolve_device(self.device)
        encoder = self._build(device)
        encoder.validate(X)
        self.encoder_ = encoder
        self.device_ = device
        if encoder.is_image_encoder:
            self._n_features_out = encoder.n_features_out
        else:
            # Without a data config, the size is known only from a forward pass.
            first, _ = encoder._check(X)
            self._n_features_out = encoder.embed(first[:1]).shape[1]
        return self

    def transform(self, X):
        """Embed ``X``.

        Parameters
        ----------
        X : array-like or torch.Tensor
            Inputs of the kind given to ``fit``.

        Returns
        -------
        ndarray of shape (n_samples, n_features_out), dtype float32
            The embeddings.
        """
        check_is_fitted(self, "encoder_")
        self.encoder_.verbose = self.verbose
        Z = self.encoder_.embed_numpy(X)
        return Z

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        tags.input_tags.sparse = False
        tags.input_tags.allow_nan = False
        return tags


_COMMON_CONSTRAINTS = {
    "batch_size": [Interval(Integral, 1, None, closed="left")],
    "device": [str, torch.device],
    "cache": ["boolean"],
    "cache_size": [Interval(Integral, 1, None, closed="left")],
    "verbose": ["verbose"],
}


class TimmEmbedder(_EmbedderMixin, BaseEstimator):
    """Embed images with a frozen timm backbone (a scikit-learn transformer).

    The model is built in :meth:`fit` (never in ``__init__``), headless
    (``num_classes=0``), so ``transform`` returns its pooled features.
    Preprocessing follows the model's timm data config (resize, centre crop,
    normalise) with batched tensor operations on the device.

    Parameters
    ----------
    model_name : str, default="resnet18"
        Any name from ``timm.list_models()``, or ``"torchvision:<name>"``
        for a ``torchvision.models`` architecture (see
        :func:`~skdkvb.encoders.build_encoder`).
    checkpoint_path : str or path-like, default=None
        Local weights: a ``.safetensors`` file or a torch state dict for this
        architecture (classifier-head weights in the file are ignored). Without
        it and without ``pretrained`` the weights are random.
    pretrained : bool, default=False
        Load timm's hub weights. They must be in the local cache or reachable;
        without a network this fails within seconds, asking for
        ``checkpoint_path``.
    model_kwargs : dict, default=None
        Extra arguments of ``timm.create_model`` (e.g. ``{"img_size": 64}``).
    data_config : dict, default=None
        Overrides of timm's data config (``input_size``, ``mean``, ``std``,
        ``interpolation``, ``crop_pct``, ``crop_mode``).
    batch_size : int, default=64
        Images per forward pass.
    device : {"auto", "cpu", "cuda"} or str, default="auto"
        Where the model runs.
    cache : bool, default=False
        Reuse embeddings of images seen before (keyed by content hash).
    cache_size : int, default=4096
        Most images kept in the cache.
    verbose : int, default=0
        Progress bar when > 0.

    Attributes
    ----------
    encoder_ : FrozenEncoder
        The built model and preprocessing.
    device_ : torch.device
        The resolved device.

    See Also
    --------
    TorchEmbedder : the same for any torch module.

    Notes
    -----
    Inputs are ``uint8`` channels-last images ``(N, H, W, C)``, floating
    channels-first images ``(N, C, H, W)`` in 0..1 (arrays or tensors), or a
    single 3-D image. Grey images are repeated to three channels. There is no
    ``n_features_in_``: the input is images, not a feature table.

    Examples
    --------
    >>> import numpy as np
    >>> from skdkvb.encoders import TimmEmbedder
    >>> X = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    >>> emb = TimmEmbedder(
    ...     "test_convnext", data_config={"input_size": (3, 32, 32)}, device="cpu"
    ... ).fit(X)
    >>> emb.transform(X).shape
    (4, 64)
    """

    _parameter_constraints = {
        "model_name": [str],
        "checkpoint_path": [None, str, os.PathLike],
        "pretrained": ["boolean"],
        "model_kwargs": [None, dict],
        "data_config": [None, dict],
        **_COMMON_CONSTRAINTS,
    }

    def __init__(
        self,
        model_name="resnet18",
        *,
        checkpoint_path=None,
        pretrained=False,
        model_kwargs=None,
        data_config=None,
        batch_size=64,
        device="auto",
        cache=False,
        cache_size=_DEFAULT_CACHE_SIZE,
        verbose=0,
    ):
        self.model_name = model_name
        self.checkpoint_path = checkpoint_path
        self.pretrained = pretrained
        self.model_kwargs = model_kwargs
        self.data_config = data_config
        self.batch_size = batch_size
        self.device = device
        self.cache = cache
        self.cache_size = cache_size
        self.verbose = verbose

    def _build(self, device):
        kwargs = dict(self.model_kwargs or {})
        clash = sorted(set(kwargs) & set(_WRAPPER_KEYS))
        if clash:
            raise ValueError(f"model_kwargs {clash} are TimmEmbedder parameters; pass them directly.")
        kwargs.update(
            checkpoint_path=self.checkpoint_path,
            pretrained=self.pretrained,
            data_config=self.data_config,
            cache=self.cache,
            cache_size=self.cache_size,
        )
        return build_encoder(self.model_name, kwargs, device=device, batch_size=self.batch_size, verbose=self.verbose)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        return tags


class TorchEmbedder(_EmbedderMixin, BaseEstimator):
    """Embed inputs with a frozen torch module or callable (a transformer).

    The module is deep-copied in :meth:`fit` (so the caller's module is never
    put in eval mode or moved), frozen and run batched under
    :func:`torch.inference_mode`. Outputs with more than two axes are flattened.

    Parameters
    ----------
    module : torch.nn.Module or callable
        The feature extractor. Callables are used as they are (no copy).
    data_config : dict, default=None
        Declares image inputs and their preprocessing: ``input_size``
        ``(C, H, W)`` is required, ``mean`` (default 0), ``std`` (default 1),
        ``interpolation`` ("bilinear"), ``crop_pct`` (1.0) and ``crop_mode``
        ("center") are optional. Without it inputs are passed to the module
        as float batches of any shape with the sample axis first.
    batch_size : int, default=64
        Samples per forward pass.
    device : {"auto", "cpu", "cuda"} or str, default="auto"
        Where the module runs.
    cache : bool, default=False
        Reuse embeddings of inputs seen before (keyed by content hash).
    cache_size : int, default=4096
        Most samples kept in the cache.
    verbose : int, default=0
        Progress bar when > 0.

    Attributes
    ----------
    encoder_ : FrozenEncoder
        The frozen copy of the module.
    device_ : torch.device
        The resolved device.

    See Also
    --------
    TimmEmbedder : builds a timm backbone by name.

    Notes
    -----
    ``clone`` deep-copies the ``module`` parameter, as it does for any
    non-estimator parameter: large modules are duplicated per clone, and a
    module that cannot be deep-copied (or pickled) cannot be cloned or
    pickled. Lambdas and local functions are not picklable.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skdkvb.encoders import TorchEmbedder
    >>> emb = TorchEmbedder(torch.nn.Linear(3, 2), device="cpu")
    >>> emb.fit_transform(np.ones((4, 3))).shape
    (4, 2)
    """

    _parameter_constraints = {
        "module": [callable],
        "data_config": [None, dict],
        **_COMMON_CONSTRAINTS,
    }

    def __init__(
        self,
        module,
        *,
        data_config=None,
        batch_size=64,
        device="auto",
        cache=False,
        cache_size=_DEFAULT_CACHE_SIZE,
        verbose=0,
    ):
        self.module = module
        self.data_config = data_config
        self.batch_size = batch_size
        self.device = device
        self.cache = cache
        self.cache_size = cache_size
        self.verbose = verbose

    def _build(self, device):
        kwargs = {"data_config": self.data_config, "cache": self.cache, "cache_size": self.cache_size}
        return build_encoder(self.module, kwargs, device=device, batch_size=self.batch_size, verbose=self.verbose)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        if self.data_config is not None:
            tags.input_tags.two_d_array = False
            tags.input_tags.three_d_array = True
        return tags
