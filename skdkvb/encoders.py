"""Frozen feature extractors: timm backbones, torch modules and callables.

DKVB sits on top of a *frozen, pre-trained* encoder. This module turns an
encoder specification (a timm model name, an ``nn.Module`` or a plain callable)
into a :class:`FrozenEncoder` that validates raw inputs, preprocesses images
with batched tensor operations and embeds them in bounded-memory batches
under :func:`torch.inference_mode`. The same machinery is exposed as
scikit-learn transformers, :class:`TimmEmbedder` and :class:`TorchEmbedder`,
so the embeddings can feed any estimator.

Weights never come from the network unless asked for: a timm model is built
with ``pretrained=False`` and filled from a local ``checkpoint_path``
(safetensors or a torch state dict). ``pretrained=True`` uses timm's hub
loader, which works when the weights are already cached; without a network
it fails within seconds with a message pointing at ``checkpoint_path``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import math
import os
import socket
import threading
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from numbers import Integral
from urllib.parse import urlparse

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_array, check_is_fitted
from tqdm.auto import tqdm

from ._device import resolve_device

__all__ = ["FrozenEncoder", "TimmEmbedder", "TorchEmbedder", "build_encoder"]

# Keys of ``encoder_kwargs`` that configure the wrapper rather than the model.
_WRAPPER_KEYS = ("checkpoint_path", "pretrained", "data_config", "preprocess", "cache", "cache_size", "copy")
_DEFAULT_CACHE_SIZE = 4096
_HUB_PROBE_TIMEOUT = 3.0
_RANDOM_INIT_SEED = 0
# timm's eval transform default when a config has no crop_pct.
_DEFAULT_CROP_PCT = 0.875
# F.interpolate has no lanczos/hamming/box; these are the closest it offers.
_INTERPOLATION = {
    "nearest": "nearest",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "lanczos": "bicubic",
    "hamming": "bilinear",
    "box": "area",
    "area": "area",
}


# --------------------------------------------------------------------------
# timm model construction
# --------------------------------------------------------------------------
def _offline_requested() -> bool:
    """True when the user asked the Hugging Face hub to stay offline."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT) -> bool:
    """Cheap TCP probe of the hub endpoint, bounded by ``timeout`` seconds.

    Runs in a daemon thread because name resolution ignores socket timeouts
    and can otherwise block for much longer than the caller is willing to wait.
    """
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except ImportError:  # pragma: no cover
        endpoint = "https://huggingface.co"
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    result = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


@contextmanager
def _forced_hub_offline():
    """Make huggingface_hub serve cached files only, for the duration of a call.

    The hub reads ``HF_HUB_OFFLINE`` once at import; its module constant is what
    is consulted per request, so that is what is switched.
    """
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _offline_message(name: str, reason: str) -> str:
    return (
        f"Could not load pretrained weights for timm model {name!r}: {reason}. "
        "Download the weights on a machine with network access (for example the "
        f"'model.safetensors' file of the Hugging Face repository 'timm/{name}...') and "
        f"pass the local file instead: encoder_kwargs={{'checkpoint_path': 'path/to/model.safetensors'}} "
        f"for DKVBClassifier, or TimmEmbedder({name!r}, checkpoint_path='path/to/model.safetensors')."
    )


def _check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown timm model name {name!r}.{hint} See timm.list_models().")


def _has_pretrained_source(cfg: dict) -> bool:
    return bool(cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file") or cfg.get("state_dict"))


def _create_pretrained(name: str, model_kwargs: dict):
    """``timm.create_model(pretrained=True)`` that never waits on a dead network."""
    import timm
    from timm.models._hub import check_cached_file

    probe = timm.create_model(name, pretrained=False, num_classes=0, **model_kwargs)
    cfg = dict(getattr(probe, "pretrained_cfg", None) or {})
    del probe
    if not _has_pretrained_source(cfg):
        raise ValueError(
            f"timm has no pretrained weights for {name!r}; pass checkpoint_path=... "
            "or pick a model from timm.list_models(pretrained=True)."
        )
    offline = _offline_requested() or not _hub_reachable()
    try:
        if offline:
            url_only = not cfg.get("hf_hub_id") and cfg.get("url")
            if url_only and not check_cached_file(cfg["url"]):
                # timm downloads URLs without a timeout; do not even start.
                raise OSError("the weights are not in the local torch hub cache")
            with _forced_hub_offline():
                return timm.create_model(name, pretrained=True, num_classes=0, **model_kwargs)
        return timm.create_model(name, pretrained=True, num_classes=0, **model_kwargs)
    except Exception as exc:  # hub, HTTP and cache errors come in many types
        reason = (
            "the Hugging Face hub is offline or unreachable and the weights are not cached"
            if offline
            else f"{type(exc).__name__}: {exc}"
        )
        raise OSError(_offline_message(name, reason)) from exc


def _classifier_prefixes(model) -> tuple[str, ...]:
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    if isinstance(cls, str):
        cls = (cls,)
    return tuple(f"{c}." for c in cls)


def _load_checkpoint(model, checkpoint_path, name: str) -> None:
    """Fill ``model`` from a local safetensors / torch state-dict file.

    Classifier-head weights in the file are ignored (the model is headless);
    any other mismatch is an error rather than a silent partial load.
    """
    from timm.models import load_state_dict

    path = os.fspath(checkpoint_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint_path={path!r} does not exist or is not a file. Pass the path of a "
            f"'.safetensors' file or a torch state dict saved for timm model {name!r}."
        )
    try:
        state = load_state_dict(path, device="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"Could not read checkpoint_path={path!r} as safetensors or a torch state dict: {exc}"
        ) from exc
    head = _classifier_prefixes(model)
    state = {k: v for k, v in state.items() if not (head and k.startswith(head))}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"checkpoint_path={path!r} does not fit timm model {name!r}: {exc}") from exc
    if missing or unexpected:
        raise ValueError(
            f"checkpoint_path={path!r} does not fit timm model {name!r}: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:3]}. Was it saved from another architecture?"
        )


def _build_timm(name, *, checkpoint_path=None, pretrained=False, model_kwargs=None):
    import timm

    _check_timm_name(name)
    model_kwargs = dict(model_kwargs or {})
    if pretrained and checkpoint_path is not None:
        raise ValueError("Pass either pretrained=True or checkpoint_path, not both.")
    if pretrained:
        return _create_pretrained(name, model_kwargs)
    # A fixed seed, so that random-weight encoders are the same in every fit,
    # clone and process; fork_rng leaves the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_INIT_SEED)
        model = timm.create_model(name, pretrained=False, num_classes=0, **model_kwargs)
    if checkpoint_path is not None:
        _load_checkpoint(model, checkpoint_path, name)
    return model


def _timm_data_config(model) -> dict:
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    return {k: cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode") if k in cfg}


def _complete_data_config(cfg) -> dict:
    """Fill defaults for a user-given (possibly partial) data config."""
    if not isinstance(cfg, dict):
        raise TypeError(f"data_config must be a dict, got {type(cfg).__name__}.")
    if "input_size" not in cfg:
        raise ValueError("data_config needs an 'input_size' of the form (channels, height, width).")
    size = tuple(int(s) for s in cfg["input_size"])
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"data_config['input_size'] must be (channels, height, width), got {cfg['input_size']!r}.")
    out = {
        "input_size": size,
        "interpolation": cfg.get("interpolation", "bilinear"),
        "mean": tuple(cfg.get("mean", (0.0,) * size[0])),
        "std": tuple(cfg.get("std", (1.0,) * size[0])),
        "crop_pct": cfg.get("crop_pct", 1.0),
        "crop_mode": cfg.get("crop_mode", "center"),
    }
    if out["interpolation"] not in _INTERPOLATION:
        raise ValueError(f"Unsupported interpolation {out['interpolation']!r}; use one of {sorted(_INTERPOLATION)}.")
    if len(out["mean"]) != size[0] or len(out["std"]) != size[0]:
        raise ValueError("data_config 'mean' and 'std' need one value per input channel.")
    return out


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# --------------------------------------------------------------------------
# The frozen encoder
# --------------------------------------------------------------------------
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
        self.data_config = None if data_config is None else _complete_data_config(data_config)
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
        """Cache statistics: ``hits``, ``misses`` (in samples) and ``size``."""
        return {"hits": self._cache_hits, "misses": self._cache_misses, "size": len(self._cache)}

    def clear_cache(self) -> None:
        """Drop every cached embedding and reset the counters."""
        self._reset_cache()

    def to(self, device):
        """Move the model to ``device`` (in place) and return ``self``."""
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
            import timm

            model = timm.create_model(
                self.spec["model_name"], pretrained=False, num_classes=0, **self.spec.get("model_kwargs", {})
            )
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
        if isinstance(chunk, torch.Tensor):
            t = chunk.to(self.device, non_blocking=True)
        else:
            if kind != "uint8" and chunk.dtype != np.float32:
                chunk = chunk.astype(np.float32)  # halve host->device traffic
            chunk = np.ascontiguousarray(chunk)
            if not chunk.flags.writeable:
                chunk = chunk.copy()  # torch wants writeable memory
            t = torch.from_numpy(chunk).to(self.device, non_blocking=True)
        if kind == "uint8":
            if t.ndim == 3:
                t = t.unsqueeze(0)
            t = t.permute(0, 3, 1, 2).float().div_(255.0)
        elif kind == "float":
            if t.ndim == 3:
                t = t.unsqueeze(0)
            t = t.float()
        else:
            t = t.to(self._model_dtype())
        return t

    def _preprocess(self, t, kind):
        """Batched version of timm's eval transform (resize, crop, normalise)."""
        cfg = self.data_config
        c, th, tw = cfg["input_size"]
        if t.shape[1] == 1 and c != 1:
            t = t.expand(-1, c, -1, -1)
        if self.preprocess:
            t = _resize_crop(t, (th, tw), cfg, clamp=kind == "uint8")
            mean = torch.tensor(cfg["mean"], device=t.device, dtype=t.dtype).view(1, c, 1, 1)
            std = torch.tensor(cfg["std"], device=t.device, dtype=t.dtype).view(1, c, 1, 1)
            t = (t - mean) / std
        return t.to(self._model_dtype())

    def _forward(self, t):
        if isinstance(self.model, torch.nn.Module) and self.model.training:
            self.model.eval()  # someone called .train() on the wrapped module
        out = self.model(t)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"The encoder must return a tensor (or a tuple starting with one), got {type(out).__name__}.")
        return out.reshape(out.shape[0], -1).float()

    def _embed_chunk(self, chunk, kind):
        t = self._to_device(chunk, kind)
        if kind != "generic":
            t = self._preprocess(t, kind)
        with torch.inference_mode():
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


def _resize_crop(t, target, cfg, clamp):
    """Resize then centre-crop ``t`` (N, C, H, W) like timm's eval transform."""
    _, _, h, w = t.shape
    th, tw = target
    crop_pct = cfg.get("crop_pct") or _DEFAULT_CROP_PCT
    mode = cfg.get("crop_mode") or "center"
    sh, sw = math.floor(th / crop_pct), math.floor(tw / crop_pct)
    if mode == "squash":
        size = (sh, sw)
    elif mode == "border":
        ratio = max(h / sh, w / sw)
        size = (round(h / ratio), round(w / ratio))
    elif sh == sw:
        # shorter edge to the scale size, as torchvision's Resize(int) does
        size = (sh, int(sh * w / h)) if h <= w else (int(sh * h / w), sh)
    else:
        ratio = min(h / sh, w / sw)
        size = (round(h / ratio), round(w / ratio))
    if size != (h, w):
        interp = _INTERPOLATION[cfg.get("interpolation", "bilinear")]
        kwargs = {"antialias": True, "align_corners": False} if interp in ("bilinear", "bicubic") else {}
        t = F.interpolate(t, size=size, mode=interp, **kwargs)
        if clamp:
            t = t.clamp_(0.0, 1.0)
    nh, nw = size
    if nh < th or nw < tw:
        # pad with the mean colour, which normalises to zero
        mean = torch.tensor(cfg["mean"], device=t.device, dtype=t.dtype).view(1, -1, 1, 1)
        canvas = mean.expand(t.shape[0], t.shape[1], max(nh, th), max(nw, tw)).clone()
        top, left = (canvas.shape[2] - nh) // 2, (canvas.shape[3] - nw) // 2
        canvas[:, :, top : top + nh, left : left + nw] = t
        t, nh, nw = canvas, canvas.shape[2], canvas.shape[3]
    top = int(round((nh - th) / 2.0))
    left = int(round((nw - tw) / 2.0))
    return t[:, :, top : top + th, left : left + tw]


# --------------------------------------------------------------------------
# Factory used by DKVBClassifier
# --------------------------------------------------------------------------
def build_encoder(encoder, encoder_kwargs=None, *, device, batch_size=64, verbose=0):
    """Build the frozen encoder described by an estimator's ``encoder`` parameter.

    Parameters
    ----------
    encoder : None, str, torch.nn.Module or callable
        ``None``: inputs are already embeddings (returns ``None``). A string:
        a timm model name, created headless (``num_classes=0``). A module or
        callable: wrapped as it is.
    encoder_kwargs : dict or None, default=None
        ``checkpoint_path`` (local safetensors / state-dict file for timm
        models), ``pretrained`` (timm hub weights; needs them cached or a
        network), ``data_config`` (overrides or, for modules, declares image
        preprocessing), ``preprocess`` (bool), ``cache`` (bool), ``cache_size``
        (int), ``copy`` (modules only, default True: wrap a deep copy so the
        caller's module is not put in eval mode or moved). Other keys are passed
        to ``timm.create_model`` (for example ``img_size``).
    device : torch.device or str
        Where the encoder runs.
    batch_size : int, default=64
        Samples per forward pass.
    verbose : int, default=0
        Progress bar over batches when > 0.

    Returns
    -------
    FrozenEncoder or None

    Examples
    --------
    >>> import numpy as np
    >>> from skdkvb.encoders import build_encoder
    >>> enc = build_encoder(
    ...     "test_convnext", {"data_config": {"input_size": (3, 32, 32)}}, device="cpu"
    ... )
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
            raise TypeError("encoder_kwargs 'copy' applies to module encoders, not timm model names.")
        model = _build_timm(
            encoder,
            checkpoint_path=wrapper.get("checkpoint_path"),
            pretrained=wrapper.get("pretrained", False),
            model_kwargs=kwargs,
        )
        data_config = {**_timm_data_config(model), **(wrapper.get("data_config") or {})}
        spec = {"model_name": encoder, "model_kwargs": kwargs}
        return FrozenEncoder(model, data_config=data_config, spec=spec, **common)
    if callable(encoder):
        bad = sorted(set(kwargs) | ({"checkpoint_path", "pretrained"} & set(wrapper)))
        if bad:
            raise TypeError(
                f"encoder_kwargs {bad} only apply to timm model names; a module encoder accepts "
                "'data_config', 'preprocess', 'cache', 'cache_size' and 'copy'."
            )
        model = encoder
        if isinstance(encoder, torch.nn.Module) and wrapper.get("copy", True):
            model = copy.deepcopy(encoder)
        return FrozenEncoder(model, data_config=wrapper.get("data_config"), **common)
    raise TypeError(
        "encoder must be None, a timm model name, a torch.nn.Module or a callable; "
        f"got {type(encoder).__name__}."
    )


# --------------------------------------------------------------------------
# scikit-learn transformers
# --------------------------------------------------------------------------
class _EmbedderMixin(ClassNamePrefixFeaturesOutMixin, TransformerMixin):
    """fit/transform shared by the embedders; subclasses define ``_build``."""

    def _build(self, device):  # pragma: no cover - abstract
        raise NotImplementedError

    @_fit_context(prefer_skip_nested_validation=True)
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
        self
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
        Any name from ``timm.list_models()``.
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
