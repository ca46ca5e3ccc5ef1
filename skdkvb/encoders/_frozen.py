"""The frozen encoder: model construction from a specification, batched embedding and its in-memory cache."""

from __future__ import annotations

import copy
import difflib
import hashlib
import warnings
from collections import OrderedDict
from numbers import Integral
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.utils.validation import check_array
from tqdm.auto import tqdm

from .._device import resolve_device
from ._preprocess import complete_data_config, preprocess_batch, timm_data_config, torchvision_data_config
from ._weights import cached_hub_file, load_foreign_state_dict, read_state_dict

__all__ = ["FrozenEncoder", "RandomWeightsWarning", "build_encoder"]

# Keys of ``encoder_kwargs`` that configure the wrapper rather than the model.
_WRAPPER_KEYS = ("checkpoint_path", "pretrained", "data_config", "preprocess", "cache", "cache_size", "copy")
_DEFAULT_CACHE_SIZE = 4096
_RANDOM_INIT_SEED = 0
_TORCHVISION_PREFIX = "torchvision:"


class RandomWeightsWarning(UserWarning):
    """An encoder was built with random weights: its features carry no pretrained knowledge."""


def _check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown timm model name {name!r}.{hint} See timm.list_models().")


def _check_torchvision_name(name: str) -> None:
    from torchvision.models import list_models

    names = list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(repr(_TORCHVISION_PREFIX + c) for c in close)}?" if close else ""
        raise ValueError(f"Unknown torchvision model {name!r}.{hint} See torchvision.models.list_models().")


def _last_linear(model: torch.nn.Module) -> str | None:
    name = None
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            name = n
    return name


def _head_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """Key prefixes of a model's classifier head (timm's config, else its last linear layer)."""
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if cls is None:
        cls = _last_linear(model)
    if not cls:
        return ()
    return tuple(f"{c}." for c in ((cls,) if isinstance(cls, str) else cls))


def _create_model(encoder: str, model_kwargs: dict, *, with_head: bool) -> torch.nn.Module:
    """A timm or ``torchvision:`` model with random (seeded) weights, with or without its head."""
    # A fixed seed, so that random-weight encoders are the same in every fit,
    # clone and process; fork_rng leaves the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_INIT_SEED)
        if encoder.startswith(_TORCHVISION_PREFIX):
            from torchvision.models import get_model

            name = encoder[len(_TORCHVISION_PREFIX) :]
            _check_torchvision_name(name)
            model = get_model(name, weights=None, **model_kwargs)
        else:
            import timm

            _check_timm_name(encoder)
            kwargs = dict(model_kwargs) if with_head else {"num_classes": 0, **model_kwargs}
            model = timm.create_model(encoder, pretrained=False, **kwargs)
    return model


def _drop_head(model: torch.nn.Module) -> torch.nn.Module:
    """Make a model return its pooled features instead of class logits."""
    if hasattr(model, "reset_classifier"):  # timm
        model.reset_classifier(0)
        return model
    name = _last_linear(model)
    if name is None:
        raise ValueError(f"Cannot find the classifier head of {type(model).__name__} (no nn.Linear layer).")
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, torch.nn.Identity())
    return model


def _pretrained_file(encoder: str, model: torch.nn.Module) -> str:
    """Local path of the library's own pretrained weights, or OSError; never downloads."""
    if encoder.startswith(_TORCHVISION_PREFIX):
        from torchvision.models import get_model_weights

        url = get_model_weights(encoder[len(_TORCHVISION_PREFIX) :]).DEFAULT.url
        cfg = {"url": url}
    else:
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    path = cached_hub_file(cfg)
    if path is None:
        where = cfg.get("hf_hub_id") or cfg.get("url") or "the model's hub repository"
        raise OSError(
            f"Could not load pretrained weights for {encoder!r}: they are not in the local Hugging Face or "
            f"torch hub cache, and skdkvb never downloads. Fetch them on a machine with network access "
            f"(from {where}) and pass the local file instead: encoder_kwargs={{'checkpoint_path': "
            "'path/to/model.safetensors'}} for DKVBClassifier, or TimmEmbedder(..., checkpoint_path=...)."
        )
    return path


def _build_model(encoder: str, *, checkpoint_path=None, pretrained=False, model_kwargs=None):
    """The headless model for a name, filled from a local file (or random, with a warning)."""
    model_kwargs = dict(model_kwargs or {})
    if pretrained and checkpoint_path is not None:
        raise ValueError("Pass either pretrained=True or checkpoint_path, not both.")
    if not pretrained and checkpoint_path is None:
        warnings.warn(
            f"The encoder {encoder!r} is built with RANDOM weights (no checkpoint_path, pretrained=False): "
            "its features carry no pretrained knowledge. Pass encoder_kwargs={'checkpoint_path': ...} "
            "(see docs/encoders.md for offline weights), or silence skdkvb.encoders.RandomWeightsWarning "
            "if this is intended.",
            RandomWeightsWarning,
            stacklevel=4,
        )
        # timm models are created headless, as before: same random weights as earlier versions
        model = _create_model(encoder, model_kwargs, with_head=encoder.startswith(_TORCHVISION_PREFIX))
        return _drop_head(model)
    model = _create_model(encoder, model_kwargs, with_head=True)
    path = _pretrained_file(encoder, model) if pretrained else checkpoint_path
    state = read_state_dict(path)
    try:
        load_foreign_state_dict(model, state, head_prefixes=_head_prefixes(model))
    except ValueError as exc:
        raise ValueError(f"checkpoint_path={str(path)!r} does not fit model {encoder!r}: {exc}") from exc
    return _drop_head(model)


def _data_config_for(encoder: str, model) -> dict:
    if encoder.startswith(_TORCHVISION_PREFIX):
        return torchvision_data_config(encoder[len(_TORCHVISION_PREFIX) :])
    return timm_data_config(model)


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class FrozenEncoder:
    """A frozen model that turns raw inputs into float32 embeddings.

    Usually made by :func:`build_encoder`. The model runs in ``eval()`` mode
    with gradients off, under :func:`torch.inference_mode`, in batches of
    ``batch_size`` so that device memory stays bounded whatever the input size.

    Parameters
    ----------
    model : torch.nn.Module or callable
        Maps a float batch on ``device`` to features of shape ``(n, ...)``;
        outputs with more than two axes are flattened.
    device : torch.device or str
        Where the model runs.
    batch_size : int, default=64
        Samples per forward pass.
    data_config : dict or None, default=None
        Image preprocessing: ``input_size`` ``(C, H, W)``, ``mean``, ``std``,
        ``interpolation``, ``crop_pct``, ``crop_mode`` (timm's data config).
        When given, inputs are images: ``uint8`` arrays are channels-last
        ``(N, H, W, C)`` in 0..255, floating arrays are channels-first
        ``(N, C, H, W)`` in 0..1, a 3-D input is a single image, and one-channel
        images are repeated to ``C`` channels. When ``None``, inputs are fed
        to the model as float batches with the sample axis first.
    preprocess : bool, default=True
        Resize, crop and normalise images as the data config says. With
        ``False`` images must already have the model's input size and are only
        converted to float (uint8 divided by 255).
    verbose : int, default=0
        Show a tqdm progress bar over batches when > 0.
    cache : bool, default=False
        Keep embeddings of recently seen samples, keyed by a hash of their
        content, so that repeated passes over the same inputs skip the model.
    cache_size : int, default=4096
        Most samples kept in the cache (least recently used are dropped). The
        cache lives in host memory: ``cache_size * n_features_out * 4`` bytes.
    spec : dict or None, default=None
        How to re-create the model, ``{"model_name": ..., "model_kwargs": ...}``
        for timm models. With a spec, pickling stores the spec and the weights
        (a state dict) instead of the module object.

    Attributes
    ----------
    n_features_out : int
        Embedding size ``D``; found with one dummy forward pass when needed.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skdkvb.encoders import FrozenEncoder
    >>> enc = FrozenEncoder(torch.nn.Flatten(), device="cpu")
    >>> enc.embed(np.ones((5, 2, 3))).shape
    torch.Size([5, 6])
    """

    def __init__(
        self,
        model,
        *,
        device,
        batch_size=64,
        data_config=None,
        preprocess=True,
        verbose=0,
        cache=False,
        cache_size=_DEFAULT_CACHE_SIZE,
        spec=None,
    ):
        if not callable(model):
            raise TypeError(f"model must be a torch module or a callable, got {type(model).__name__}.")
        if not isinstance(batch_size, Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
        if not isinstance(cache_size, Integral) or cache_size < 1:
            raise ValueError(f"cache_size must be an integer >= 1, got {cache_size!r}.")
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.data_config = None if data_config is None else complete_data_config(data_config)
        self.preprocess = bool(preprocess)
        self.verbose = verbose
        self.cache = bool(cache)
        self.cache_size = int(cache_size)
        self.spec = spec
        if isinstance(model, torch.nn.Module):
            model = _freeze(model).to(self.device)
        self.model = model
        self._n_features_out = None
        self._reset_cache()

    # ---------------------------------------------------------------- state
    def _reset_cache(self):
        self._cache = OrderedDict()
        self._cache_hits = 0
        self._cache_misses = 0

    def cache_info(self) -> dict:
        """Statistics of the in-memory cache.

        Returns
        -------
        dict
            ``hits``, ``misses`` (in samples) and ``size`` (samples held).
        """
        return {"hits": self._cache_hits, "misses": self._cache_misses, "size": len(self._cache)}

    def clear_cache(self) -> None:
        """Drop every cached embedding and reset the counters."""
        self._reset_cache()

    def to(self, device):
        """Move the model to ``device``, in place.

        Parameters
        ----------
        device : str or torch.device
            The new device.

        Returns
        -------
        FrozenEncoder
            ``self``.
        """
        self.device = resolve_device(device)
        if isinstance(self.model, torch.nn.Module):
            self.model.to(self.device)
        return self

    @property
    def is_image_encoder(self) -> bool:
        """Whether inputs are images (a data config is known)."""
        return self.data_config is not None

    @property
    def n_features_out(self) -> int:
        """Embedding size ``D`` (one dummy forward pass the first time)."""
        if self._n_features_out is None:
            if self.data_config is None:
                raise AttributeError(
                    "n_features_out of an encoder without a data_config is known only after "
                    "it has embedded data; call embed() first or pass data_config={'input_size': ...}."
                )
            c, h, w = self.data_config["input_size"]
            with torch.inference_mode():
                out = self._forward(torch.zeros((1, c, h, w), device=self.device))
            self._n_features_out = int(out.shape[1])
        return self._n_features_out

    def __repr__(self) -> str:
        what = self.spec["model_name"] if self.spec else type(self.model).__name__
        return f"FrozenEncoder({what!r}, device={str(self.device)!r}, batch_size={self.batch_size})"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["device"] = str(self.device)
        # Caches are a speed-up for one process; they are not part of the model.
        state["_cache"], state["_cache_hits"], state["_cache_misses"] = OrderedDict(), 0, 0
        if self.spec is not None:
            # A timm model travels as its name plus weights: small, and
            # independent of timm's class layout at pickling time.
            state["model"] = None
            state["_state_dict"] = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        elif isinstance(self.model, torch.nn.Module) and self.device.type != "cpu":
            # CPU copy, so that the pickle loads on machines without the device.
            state["model"] = copy.deepcopy(self.model).cpu()
        return state

    def __setstate__(self, state):
        device = torch.device(state["device"])
        if device.type == "cuda" and not torch.cuda.is_available():
            warnings.warn(
                f"This encoder was saved on {device} but CUDA is not available; loading it on the CPU.",
                RuntimeWarning,
                stacklevel=2,
            )
            device = torch.device("cpu")
        state["device"] = device
        weights = state.pop("_state_dict", None)
        self.__dict__.update(state)
        if weights is not None:
            model = _create_model(self.spec["model_name"], self.spec.get("model_kwargs", {}), with_head=True)
            model = _drop_head(model)
            model.load_state_dict(weights)
            self.model = model
        if isinstance(self.model, torch.nn.Module):
            self.model = _freeze(self.model).to(device)

    # ------------------------------------------------------------ validation
    def _check(self, X):
        """Validated batch (array or tensor, never copied) plus its layout.

        Returns ``(X, kind)`` where ``kind`` is ``"uint8"`` (channels-last
        images), ``"float"`` (channels-first images) or ``"generic"``.
        """
        if sp.issparse(X):
            raise TypeError(
                "Sparse input is not supported by encoders: an encoder needs dense inputs "
                "(images or feature arrays). Use X.toarray()."
            )
        if isinstance(X, torch.Tensor):
            if X.is_complex():
                raise TypeError(f"Unsupported tensor dtype {X.dtype} for the encoder input.")
            if X.is_floating_point() and not bool(torch.isfinite(X).all()):
                raise ValueError("Input X contains NaN or infinity.")
            dtype_is_uint8 = X.dtype == torch.uint8
            dtype_is_float = X.is_floating_point()
        else:
            X = check_array(
                X,
                dtype="numeric",
                ensure_2d=False,
                allow_nd=True,
                ensure_all_finite=True,
                input_name="X",
            )
            dtype_is_uint8 = X.dtype == np.uint8
            dtype_is_float = np.issubdtype(X.dtype, np.floating)
        if X.ndim == 0 or X.shape[0] == 0:
            raise ValueError(f"X must hold at least one sample, got shape {tuple(X.shape)}.")
        if not self.is_image_encoder:
            if X.ndim < 2:
                raise ValueError(
                    f"Expected 2D array, got {X.ndim}D array instead. Reshape your data either using "
                    "array.reshape(-1, 1) if your data has a single feature or array.reshape(1, -1) "
                    "if it contains a single sample."
                )
            return X, "generic"
        return X, self._check_image(X, dtype_is_uint8, dtype_is_float)

    def _check_image(self, X, is_uint8, is_float):
        shape = tuple(X.shape)
        if not (is_uint8 or is_float):
            raise TypeError(
                f"Images must be uint8 (0..255, channels-last) or floating point (0..1, channels-first); "
                f"got dtype {X.dtype}. Cast with X.astype(np.uint8) or X.astype(np.float32) / 255 "
                "(and move the channel axis first for floats)."
            )
        if X.ndim not in (3, 4):
            layout = "(N, H, W, C)" if is_uint8 else "(N, C, H, W)"
            raise ValueError(
                f"Expected {'uint8' if is_uint8 else 'float'} images as a 4-D batch {layout} or a single "
                f"3-D image, got an array of shape {shape}. Flattened images must be reshaped, e.g. "
                "X.reshape(-1, 28, 28, 1) for 28x28 grey uint8 images."
            )
        want = self.data_config["input_size"][0]
        axis = -1 if is_uint8 else (0 if X.ndim == 3 else 1)
        got = shape[axis]
        if got != want and not (got == 1 and want == 3):
            other = shape[1 if X.ndim == 4 else 0] if is_uint8 else shape[-1]
            hint = ""
            if other in (want, 1):
                hint = (
                    " The channels seem to be on the other axis: uint8 images are read channels-last "
                    "(N, H, W, C), float images channels-first (N, C, H, W); transpose, or convert the dtype."
                )
            elif is_uint8 and X.ndim == 3:
                hint = " A batch of grey images (N, H, W) needs a channel axis: X[..., None]."
            raise ValueError(
                f"The encoder expects {want} channel(s) (or 1, repeated), but the "
                f"{'uint8 channels-last' if is_uint8 else 'float channels-first'} input of shape {shape} has "
                f"{got} on axis {axis}.{hint}"
            )
        h, w = (shape[-3], shape[-2]) if is_uint8 else (shape[-2], shape[-1])
        if h < 1 or w < 1:
            raise ValueError(f"Images must be at least 1x1 pixels, got {h}x{w} (shape {shape}).")
        if not self.preprocess and (h, w) != tuple(self.data_config["input_size"][1:]):
            raise ValueError(
                f"With preprocess=False images must be {self.data_config['input_size'][1:]} pixels, "
                f"got {h}x{w}. Resize them, or leave preprocess=True."
            )
        return "uint8" if is_uint8 else "float"

    def validate(self, X) -> None:
        """Check that ``X`` is a valid input; raise ValueError/TypeError if not.

        Never modifies ``X``.

        Parameters
        ----------
        X : array-like or torch.Tensor
            Images (when the encoder has a data config) or feature arrays.
        """
        self._check(X)

    # ---------------------------------------------------------- computation
    def _model_dtype(self):
        if isinstance(self.model, torch.nn.Module):
            for p in self.model.parameters():
                if p.is_floating_point():
                    return p.dtype
        return torch.float32

    def _to_device(self, chunk, kind):
        """Move a chunk to the device as it is (uint8 stays uint8: a quarter of the traffic)."""
        if isinstance(chunk, torch.Tensor):
            t = chunk.to(self.device, non_blocking=True)
        else:
            if kind == "float" and chunk.dtype != np.float32:
                chunk = chunk.astype(np.float32)  # halve host->device traffic
            chunk = np.ascontiguousarray(chunk)
            if not chunk.flags.writeable:
                chunk = chunk.copy()  # torch wants writeable memory
            t = torch.from_numpy(chunk).to(self.device, non_blocking=True)
        if kind == "generic":
            return t.to(self._model_dtype())
        if t.ndim == 3:
            t = t.unsqueeze(0)
        return t.permute(0, 3, 1, 2) if kind == "uint8" else t

    def _preprocess(self, t, kind):
        """Batched version of timm's eval transform (resize, crop, normalise)."""
        dtype = self._model_dtype()
        if self.preprocess:
            return preprocess_batch(t, self.data_config, is_uint8=kind == "uint8", resize=True, dtype=dtype)
        c = self.data_config["input_size"][0]
        t = t.to(torch.float32)
        if kind == "uint8":
            t = t / 255.0
        if t.shape[1] == 1 and c != 1:
            t = t.expand(-1, c, -1, -1)
        return t.to(dtype)

    def _forward(self, t):
        if isinstance(self.model, torch.nn.Module) and self.model.training:
            self.model.eval()  # someone called .train() on the wrapped module
        out = self.model(t)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"The encoder must return a tensor (or a tuple starting with one), got {type(out).__name__}."
            )
        return out.reshape(out.shape[0], -1).float()

    def _embed_chunk(self, chunk, kind):
        with torch.inference_mode():
            t = self._to_device(chunk, kind)
            if kind != "generic":
                t = self._preprocess(t, kind)
            return self._forward(t)

    def _iter_embeddings(self, X):
        """Yield ``(n, start, stop, Z_chunk)`` over batches of a validated ``X``."""
        X, kind = self._check(X)
        single = kind in ("uint8", "float") and X.ndim == 3
        if single:
            X = X[None]
        n = X.shape[0]
        starts = range(0, n, self.batch_size)
        bar = tqdm(starts, desc="embedding", unit="batch", disable=not self.verbose, leave=False)
        for start in bar:
            stop = min(start + self.batch_size, n)
            chunk = X[start:stop]
            z = self._cached_chunk(chunk, kind) if self.cache else self._embed_chunk(chunk, kind)
            if self._n_features_out is None:
                self._n_features_out = int(z.shape[1])
            yield n, start, stop, z

    def _cached_chunk(self, chunk, kind):
        keys = _content_keys(chunk)
        rows = [self._cache.get(k) for k in keys]
        miss = [i for i, r in enumerate(rows) if r is None]
        self._cache_hits += len(keys) - len(miss)
        self._cache_misses += len(miss)
        if miss:
            sub = chunk[miss] if len(miss) < len(keys) else chunk
            z_new = self._embed_chunk(sub, kind).cpu()
            for j, i in enumerate(miss):
                rows[i] = z_new[j].clone()  # own storage, so the batch can be freed
                self._cache[keys[i]] = rows[i]
        for k in keys:
            self._cache.move_to_end(k)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack(rows).to(self.device)

    def embed(self, X) -> torch.Tensor:
        """Embed ``X`` into a float32 tensor of shape ``(n, n_features_out)``.

        Parameters
        ----------
        X : array-like or torch.Tensor
            A batch of inputs, or a single 3-D image for image encoders.

        Returns
        -------
        torch.Tensor
            float32 embeddings on ``device`` (an ordinary tensor, usable in
            autograd as a constant input).
        """
        out = None
        for n, start, stop, z in self._iter_embeddings(X):
            if out is None:
                out = torch.empty((n, z.shape[1]), dtype=torch.float32, device=self.device)
            out[start:stop] = z
        return out

    def embed_numpy(self, X) -> np.ndarray:
        """Like :meth:`embed` but into a host ``numpy.float32`` array.

        Batches are copied to the host as they are made, so device memory holds
        one batch at a time.

        Parameters
        ----------
        X : array-like or torch.Tensor
            A batch of inputs, or a single 3-D image for image encoders.

        Returns
        -------
        ndarray of shape (n_samples, n_features_out), float32
            The embeddings.
        """
        out = None
        for n, start, stop, z in self._iter_embeddings(X):
            if out is None:
                out = np.empty((n, z.shape[1]), dtype=np.float32)
            out[start:stop] = z.cpu().numpy()
        return out


def _content_keys(chunk) -> list[bytes]:
    """One 128-bit digest per sample (dtype and shape included).

    A cryptographic hash, because a collision would silently return another
    image's embedding; its cost is in hashing the bytes, which is small next to
    running the encoder on the same sample.
    """
    if isinstance(chunk, torch.Tensor):
        chunk = chunk.detach().cpu().numpy()
    chunk = np.ascontiguousarray(chunk)
    prefix = f"{chunk.dtype.str}{chunk.shape[1:]}".encode()
    flat = chunk.reshape(chunk.shape[0], -1).view(np.uint8)
    return [hashlib.blake2b(row, digest_size=16, key=prefix[:64]).digest() for row in flat]


def build_encoder(
    encoder: Any,
    encoder_kwargs: dict | None = None,
    *,
    device: str | torch.device,
    batch_size: int = 64,
    verbose: int = 0,
) -> FrozenEncoder | None:
    """Build the frozen encoder described by an estimator's ``encoder`` parameter.

    Parameters
    ----------
    encoder : None, str, torch.nn.Module or callable
        ``None``: inputs are already embeddings (returns ``None``). A string:
        a timm model name, or ``"torchvision:<name>"`` for a torchvision
        classification model, created headless. A module or callable: wrapped
        as it is.
    encoder_kwargs : dict or None, default=None
        ``checkpoint_path`` (local safetensors / state-dict file; key names
        may differ from the model's, then tensors are matched by order with
        every shape checked), ``pretrained`` (the library's own weights, only
        from the local hub cache), ``data_config`` (overrides or, for modules, declares image
        preprocessing), ``preprocess`` (bool), ``cache`` (bool), ``cache_size``
        (int), ``copy`` (modules only, default True: wrap a deep copy so the
        caller's module is not put in eval mode or moved). Other keys are passed
        to ``timm.create_model`` (for example ``img_size``) or torchvision's
        ``get_model``. Without ``checkpoint_path`` or ``pretrained`` the
        weights are random and a :class:`RandomWeightsWarning` is emitted.
    device : torch.device or str
        Where the encoder runs.
    batch_size : int, default=64
        Samples per forward pass.
    verbose : int, default=0
        Progress bar over batches when > 0.

    Returns
    -------
    FrozenEncoder or None
        The frozen encoder, or ``None`` when ``encoder`` is ``None``.

    Examples
    --------
    >>> import numpy as np
    >>> from skdkvb.encoders import build_encoder
    >>> import warnings
    >>> with warnings.catch_warnings():  # random weights: fine for a shape check
    ...     warnings.simplefilter("ignore")
    ...     enc = build_encoder("test_convnext", {"data_config": {"input_size": (3, 32, 32)}}, device="cpu")
    >>> enc.n_features_out
    64
    >>> enc.embed(np.zeros((2, 28, 28, 1), dtype=np.uint8)).shape
    torch.Size([2, 64])
    """
    if encoder is None:
        return None
    if isinstance(encoder, FrozenEncoder):
        return encoder
    kwargs = dict(encoder_kwargs or {})
    if not isinstance(kwargs, dict):
        raise TypeError(f"encoder_kwargs must be a dict or None, got {type(encoder_kwargs).__name__}.")
    wrapper = {k: kwargs.pop(k) for k in _WRAPPER_KEYS if k in kwargs}
    common = {
        "device": device,
        "batch_size": batch_size,
        "verbose": verbose,
        "preprocess": wrapper.get("preprocess", True),
        "cache": wrapper.get("cache", False),
        "cache_size": wrapper.get("cache_size", _DEFAULT_CACHE_SIZE),
    }
    if isinstance(encoder, str):
        if "copy" in wrapper:
            raise TypeError("encoder_kwargs 'copy' applies to module encoders, not model names.")
        model = _build_model(
            encoder,
            checkpoint_path=wrapper.get("checkpoint_path"),
            pretrained=wrapper.get("pretrained", False),
            model_kwargs=kwargs,
        )
        data_config = {**_data_config_for(encoder, model), **(wrapper.get("data_config") or {})}
        spec = {"model_name": encoder, "model_kwargs": kwargs}
        return FrozenEncoder(model, data_config=data_config, spec=spec, **common)
    if callable(encoder):
        bad = sorted(set(kwargs) | ({"checkpoint_path", "pretrained"} & set(wrapper)))
        if bad:
            raise TypeError(
                f"encoder_kwargs {bad} only apply to model names; a module encoder accepts "
                "'data_config', 'preprocess', 'cache', 'cache_size' and 'copy'."
            )
        model = encoder
        if isinstance(encoder, torch.nn.Module) and wrapper.get("copy", True):
            model = copy.deepcopy(encoder)
        return FrozenEncoder(model, data_config=wrapper.get("data_config"), **common)
    raise TypeError(
        "encoder must be None, a timm model name, 'torchvision:<name>', a torch.nn.Module or a callable; "
        f"got {type(encoder).__name__}."
    )
