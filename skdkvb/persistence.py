"""Safe persistence of :class:`~skdkvb.DKVBClassifier`: no code runs on load.

:func:`save` writes one `safetensors <https://huggingface.co/docs/safetensors>`_
file: the tensors of the bottleneck (projection, keys, and the decoder's tables:
the count table's arrays, or the value blocks and key usage of ``sgd``) and of
the optional input transform as named tensors, and everything else
(parameters, ``classes_`` of any label type, ``n_features_in_``,
``feature_names_in_``, the random state, ``history_``, ``key_init_info_``) as
JSON in the file's metadata, next to a ``format_version``. :func:`load`
reads only tensors and JSON and rebuilds the estimator from a fixed list of
known classes, so a file from an untrusted source cannot execute code, unlike
:mod:`pickle`/:mod:`joblib`.

The file format is versioned: a file written by another format version
raises a :class:`ValueError` that says which versions are involved, rather
than loading silently wrong. Files of format 2 (dense ``values`` and ``counts``
tables of shape (C, M, K)) still load: their counts become a count table, or
their values a value table, as the model's decoder needs.

``skops.io`` works too, with the types in :data:`SKOPS_TRUSTED_TYPES`::

    import skops.io as sio
    sio.dump(clf, "model.skops")
    clf = sio.load("model.skops", trusted=SKOPS_TRUSTED_TYPES)
"""

from __future__ import annotations

import hashlib
import json
import os
from numbers import Integral, Real

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._bottleneck import DiscreteKeyValueBottleneck
from ._classifier import DKVBClassifier
from ._device import resolve_device
from ._state import FITTED_ATTRS, StateError, check_state
from ._transform import InputTransform

__all__ = ["FORMAT_VERSION", "SKOPS_TRUSTED_TYPES", "ModelFileError", "load", "save"]

#: Version of the layout written by :func:`save`; :func:`load` reads this one and version 2.
#: Version 2 added the SHA-256 of the metadata and of every tensor; version 3 stores only the
#: decoder's tables (the arrays of the count table, or the value blocks and key usage).
FORMAT_VERSION = 3

#: Format versions :func:`load` reads.
READABLE_VERSIONS = (2, 3)


class ModelFileError(ValueError):
    """A model file that :func:`load` refuses: not written by :func:`save`, another
    format version, corrupted (a hash does not match), or content outside the
    fitted-state schema. The message says what is wrong."""


_HASH_KEY = "skdkvb_sha256"

# Plain-JSON fitted attributes and the Python types load() accepts for them.
_JSON_ATTRS = {
    "n_features_in_": (int,),
    "n_iter_": (int,),
    "t_": (int, float),
    "history_": (list,),
    "key_init_info_": (dict,),
    "structure_": (dict,),
}


def _sha256_tensor(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.view(-1).view(torch.uint8).numpy())  # the buffer itself, no bytes copy
    return h.hexdigest()


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


#: Types to pass as ``trusted=`` to :func:`skops.io.load` for a DKVBClassifier
#: (with ``input_transform="pca-whiten"`` the transform is an object of its own).
SKOPS_TRUSTED_TYPES = [
    "skdkvb._classifier.DKVBClassifier",
    "skdkvb._transform.InputTransform",
]

_FORMAT_NAME = "skdkvb"
# The only classes load() will ever build: the file names one, never a module path.
_CLASSES = {"DKVBClassifier": DKVBClassifier}


# --------------------------------------------------------------------- JSON
def _json_default(obj):
    """JSON for numpy scalars and small arrays; anything else is refused."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.device):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _to_json(obj, what):
    try:
        return json.loads(json.dumps(obj, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{what} cannot be stored by skdkvb.persistence.save ({exc}). Use plain "
            "values (numbers, strings, lists, dicts), or pickle/joblib for arbitrary objects."
        ) from exc


def _encode_array(a, what):
    """A 1-D label/name array as JSON that keeps its dtype (strings included)."""
    a = np.asarray(a)
    if a.ndim != 1:
        raise TypeError(f"{what} must be 1-D, got shape {a.shape}.")
    kind = a.dtype.kind
    if kind in "biufU":
        return {"dtype": a.dtype.str, "values": a.tolist()}
    if kind == "S":
        return {"dtype": a.dtype.str, "values": [v.decode("latin-1") for v in a.tolist()]}
    if kind == "O":
        values = a.tolist()
        for v in values:
            if not isinstance(v, (str, bool, Integral, Real)) or isinstance(v, np.ndarray):
                raise TypeError(
                    f"{what} holds a {type(v).__name__} ({v!r}); only strings, numbers and "
                    "booleans can be stored. Use pickle/joblib for other label types."
                )
        return {"dtype": "|O", "values": _to_json(values, what)}
    raise TypeError(f"{what} has dtype {a.dtype}, which skdkvb.persistence cannot store.")


def _decode_array(d):
    dtype = np.dtype(d["dtype"])
    if dtype.kind == "O":
        out = np.empty(len(d["values"]), dtype=object)
        out[:] = d["values"]
        return out
    if dtype.kind == "S":
        return np.asarray([v.encode("latin-1") for v in d["values"]], dtype=dtype)
    return np.asarray(d["values"], dtype=dtype)


def _encode_params(model):
    params = model.get_params(deep=False)
    out = {}
    for name, value in params.items():
        if name == "random_state" and isinstance(value, np.random.RandomState):
            out[name] = {"__RandomState__": _encode_rng(value)}
            continue
        if name == "encoder" and value is not None and not isinstance(value, str):
            raise TypeError(
                f"encoder={type(value).__name__} object cannot be stored safely; "
                "skdkvb.persistence.save supports encoder=None or a timm model name "
                "(with encoder_kwargs such as checkpoint_path). Use pickle/joblib "
                "for models with a custom encoder module."
            )
        out[name] = _to_json(value, f"Parameter {name}={value!r}")
    return out


def _decode_params(params):
    params = dict(params)
    rs = params.get("random_state")
    if isinstance(rs, dict) and "__RandomState__" in rs:
        params["random_state"] = _decode_rng(rs["__RandomState__"])
    return params


def _encode_rng(rng):
    name, keys, pos, has_gauss, cached = rng.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _decode_rng(state):
    name, keys, pos, has_gauss, cached = state
    rng = np.random.RandomState()
    rng.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return rng


# --------------------------------------------------------------------- save
def save(model, path):
    """Write ``model`` to ``path`` as a safetensors file with JSON metadata.

    Parameters
    ----------
    model : DKVBClassifier
        Fitted or not. Models with ``encoder=None`` or a timm model name are
        supported; a custom encoder module is refused (use pickle).
    path : str or os.PathLike
        Destination file, conventionally ``*.safetensors``.

    Raises
    ------
    TypeError
        If ``model`` is not a DKVBClassifier, or holds something that has no
        safe representation (an encoder module, labels that are neither
        strings nor numbers).

    See Also
    --------
    load : Read the file back.

    Examples
    --------
    >>> import os, tempfile
    >>> from sklearn.datasets import load_iris
    >>> from skdkvb import DKVBClassifier
    >>> from skdkvb.persistence import save, load
    >>> X, y = load_iris(return_X_y=True)
    >>> names = ["setosa", "versicolor", "virginica"]
    >>> clf = DKVBClassifier(n_heads=8, n_keys=16, key_dim=2, key_init_epochs=2,
    ...                      random_state=0, device="cpu").fit(X, [names[i] for i in y])
    >>> path = os.path.join(tempfile.mkdtemp(), "iris.safetensors")
    >>> save(clf, path)
    >>> clf2 = load(path, device="cpu")
    >>> clf2.classes_
    array(['setosa', 'versicolor', 'virginica'], dtype='<U10')
    >>> bool((clf2.predict(X) == clf.predict(X)).all())
    True
    """
    name = type(model).__name__
    if _CLASSES.get(name) is not type(model):
        raise TypeError(f"save() writes DKVBClassifier models, got {name}.")
    state = model.__dict__
    tensors: dict[str, torch.Tensor] = {}
    fitted: dict = {}
    module = state.get("bottleneck_")
    if module is not None:
        fitted["bottleneck_"] = module.config()
        for key, value in module.arrays().items():
            t = torch.from_numpy(np.ascontiguousarray(value))
            if key.startswith("values.") and module.values_dtype == "bfloat16":
                t = t.view(torch.bfloat16)  # arrays() gives bfloat16 as its int16 bits
            tensors[f"bottleneck.{key}"] = t
    transform = state.get("input_transform_")
    if transform is not None:
        fitted["input_transform_"] = {
            "method": transform.method,
            "n_components": int(transform.n_components),
            "eps": float(transform.eps),
            "n_features_out_": int(transform.n_features_out_),
        }
        for key in ("mean_", "components_"):
            tensors[f"input_transform.{key}"] = getattr(transform, key).detach().cpu().contiguous()
    elif "input_transform_" in state:
        fitted["input_transform_"] = None
    if "encoder_" in state:
        # Rebuilt from the parameters on load (a timm name), never stored.
        fitted["encoder_"] = None if state["encoder_"] is None else "rebuild"
    if "device_" in state:
        fitted["device_"] = str(state["device_"])
    for key in ("classes_", "feature_names_in_"):
        if key in state:
            fitted[key] = _encode_array(state[key], key)
    if "_rng" in state:
        fitted["_rng"] = _encode_rng(state["_rng"])
    for key in _JSON_ATTRS:
        if key in state:
            fitted[key] = _to_json(state[key], f"Fitted attribute {key}")
    meta = {
        "format": _FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "skdkvb_version": _version(),
        "class": name,
        "params": _encode_params(model),
        "fitted": fitted,
        "tensor_sha256": {key: _sha256_tensor(t) for key, t in tensors.items()},
    }
    # safetensors metadata is str -> str; one JSON document keeps it simple,
    # and its hash (which covers the tensors' hashes) sits next to it.
    text = json.dumps(meta)
    save_file(tensors, os.fspath(path), metadata={_FORMAT_NAME: text, _HASH_KEY: _sha256_text(text)})


def _version():
    from . import __version__

    return __version__


# --------------------------------------------------------------------- load
def _read(path):
    path = os.fspath(path)
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFileError(f"{path!r} is not a safetensors file written by skdkvb.persistence.save: {exc}") from exc
    with handle as f:
        metadata = f.metadata() or {}
        if _FORMAT_NAME not in metadata:
            raise ModelFileError(f"{path!r} is a safetensors file but was not written by skdkvb.persistence.save.")
        text = metadata[_FORMAT_NAME]
        try:
            meta = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ModelFileError(
                f"{path!r}: the skdkvb metadata is not valid JSON ({exc}); the file is corrupted."
            ) from exc
        if not isinstance(meta, dict):
            raise ModelFileError(f"{path!r}: the skdkvb metadata is not a JSON object; the file is corrupted.")
        version = meta.get("format_version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise ModelFileError(
                f"{path!r} uses skdkvb file format version {version} (written by skdkvb "
                f"{meta.get('skdkvb_version', 'unknown')}), but this skdkvb {_version()} reads "
                f"format versions {list(READABLE_VERSIONS)} only. Load it with the skdkvb version that "
                "wrote it and re-save, or retrain."
            )
        if metadata.get(_HASH_KEY) != _sha256_text(text):
            raise ModelFileError(f"{path!r}: the SHA-256 of the metadata does not match; the file is corrupted.")
        hashes = meta.get("tensor_sha256")
        names = sorted(f.keys())
        if not isinstance(hashes, dict) or sorted(hashes) != names:
            raise ModelFileError(f"{path!r}: the tensors {names} do not match the recorded ones; the file is corrupted")
        tensors = {}
        for key in names:
            t = f.get_tensor(key)
            if _sha256_tensor(t) != hashes[key]:
                raise ModelFileError(f"{path!r}: the SHA-256 of tensor {key!r} does not match; the file is corrupted.")
            tensors[key] = t
    return meta, tensors


def load(path, device="auto", *, encoder=None):
    """Read a model written by :func:`save`; no code from the file is executed.

    The file is verified before anything is built: the SHA-256 of the metadata
    and of every tensor, the format version, the fitted-state schema (names,
    types, dtypes, shapes) and its invariants (finite keys, counts >= 0,
    ``classes_`` matching the table columns...). ``load`` reads only ``path``:
    it never builds an encoder from what the file names, so it never reads
    another file nor reaches the network.

    Parameters
    ----------
    path : str or os.PathLike
        The file written by :func:`save`.
    device : {"auto", "cpu", "cuda"} or str, default="auto"
        Where the tensors go (``"auto"``: CUDA when available). The model's
        ``device`` parameter is restored as saved; only ``device_`` changes.
    encoder : object, default=None
        For a model saved with an ``encoder`` (a timm model name): the frozen
        encoder to use, built by the caller (e.g. with
        :func:`skdkvb.encoders.build_encoder` from local weights). Required
        for such models, ignored otherwise.

    Returns
    -------
    model : DKVBClassifier
        Predicts exactly as the saved model and continues ``partial_fit``
        from the saved random state.

    Raises
    ------
    ModelFileError
        A ``ValueError`` subclass, for every file that was not written by
        :func:`save`, uses another ``format_version``, is corrupted or holds
        content outside the schema.
    FileNotFoundError
        If ``path`` does not exist.

    See Also
    --------
    save : Write the file.
    """
    meta, tensors = _read(path)
    try:
        return _build(meta, tensors, path, device, encoder)
    except (ModelFileError, FileNotFoundError):
        raise
    except StateError as exc:
        raise ModelFileError(f"{os.fspath(path)!r}: {exc}") from exc
    except Exception as exc:  # malformed content of a correctly hashed file
        raise ModelFileError(
            f"{os.fspath(path)!r} holds content outside the skdkvb model schema ({type(exc).__name__}: {exc})."
        ) from exc


def _build(meta, tensors, path, device, encoder):
    cls = _CLASSES.get(meta.get("class"))
    if cls is None:
        raise ModelFileError(f"{os.fspath(path)!r} holds a {meta.get('class')!r}, which skdkvb cannot load.")
    if not isinstance(meta.get("params"), dict) or not isinstance(meta.get("fitted"), dict):
        raise ModelFileError(f"{os.fspath(path)!r}: params and fitted must be JSON objects.")
    params = _decode_params(meta["params"])
    known = set(cls().get_params(deep=False))
    unknown = sorted(set(params) - known)
    if unknown:
        raise ModelFileError(
            f"{os.fspath(path)!r} sets parameters {unknown} that this skdkvb {_version()} "
            f"does not know; it was written by skdkvb {meta.get('skdkvb_version')}."
        )
    model = cls(**params)
    fitted = dict(meta["fitted"])
    extra = sorted(set(fitted) - set(FITTED_ATTRS))
    if extra:
        raise ModelFileError(f"{os.fspath(path)!r} sets {extra}, which are not fitted attributes of the schema.")
    for key, types in _JSON_ATTRS.items():
        if key in fitted and (not isinstance(fitted[key], types) or isinstance(fitted[key], bool)):
            raise ModelFileError(f"{os.fspath(path)!r}: {key} has type {type(fitted[key]).__name__}.")
    if "t_" in fitted:
        fitted["t_"] = float(fitted["t_"])
    dev = resolve_device(device)
    state = {}
    config = fitted.pop("bottleneck_", None)
    expected_tensors = set()
    if config is not None:
        prefix = "bottleneck."
        module_state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        expected_tensors |= {prefix + k for k in module_state}
        if not isinstance(config, dict):
            raise ModelFileError(f"{os.fspath(path)!r}: the bottleneck's config must be a JSON object.")
        config = dict(config)
        if meta.get("format_version") == 2:  # dense tables; the decoder was not part of the config
            config.pop("decoder", None)
            config.pop("table", None)
            config["decoder"] = params.get("decoder", "logp")
        elif "table" not in config:
            raise ModelFileError(f"{os.fspath(path)!r}: the bottleneck's config lacks its table layout.")
        state["bottleneck_"] = DiscreteKeyValueBottleneck.from_state(config, module_state, dev, copy=False)
    if "input_transform_" in fitted:
        info = fitted.pop("input_transform_")
        transform = None
        if info is not None:
            transform = InputTransform(info["method"], int(info["n_components"]), float(info["eps"]))
            transform.mean_ = tensors["input_transform.mean_"].to(torch.float32)
            transform.components_ = tensors["input_transform.components_"].to(torch.float32)
            transform.n_features_out_ = int(info["n_features_out_"])
            if tuple(transform.components_.shape) != (transform.mean_.shape[-1], transform.n_features_out_):
                raise ModelFileError(f"{os.fspath(path)!r}: the input transform's tensors have inconsistent shapes.")
            expected_tensors |= {"input_transform.mean_", "input_transform.components_"}
            transform = transform.to(dev)
        state["input_transform_"] = transform
    if set(tensors) != expected_tensors:
        raise ModelFileError(
            f"{os.fspath(path)!r} holds tensors {sorted(set(tensors) - expected_tensors)} outside the schema."
        )
    if "device_" in fitted:
        fitted.pop("device_")
        state["device_"] = dev
    stored_encoder = fitted.pop("encoder_", "absent")
    if stored_encoder is None:
        state["encoder_"] = None
    elif stored_encoder == "rebuild":
        if encoder is None:
            raise ModelFileError(
                f"{os.fspath(path)!r} was saved with encoder={model.encoder!r}; load never builds encoders "
                "(that could read other files or reach the network). Build it yourself and pass "
                "load(path, encoder=...)."
            )
        from .encoders import build_encoder

        state["encoder_"] = build_encoder(
            encoder, None, device=dev, batch_size=model.encoder_batch_size, verbose=model.verbose
        )
    elif stored_encoder != "absent":
        raise ModelFileError(f"{os.fspath(path)!r}: encoder_ must be null or 'rebuild'.")
    for key in ("classes_", "feature_names_in_"):
        if key in fitted:
            state[key] = _decode_array(fitted.pop(key))
            if state[key].ndim != 1:
                raise ModelFileError(f"{os.fspath(path)!r}: {key} must be 1-D.")
    if "_rng" in fitted:
        state["_rng"] = _decode_rng(fitted.pop("_rng"))
    state.update(fitted)
    model.__dict__.update(state)
    check_state(model)
    return model
