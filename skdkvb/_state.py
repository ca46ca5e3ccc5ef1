"""The one declared schema of a fitted DKVBClassifier's state, and the check of its invariants.

Every component that reads or writes a model's fitted state (the rollback of a
failed call, pickle, skops, :mod:`skdkvb.persistence`, :func:`skdkvb.merge.merge`)
goes through the names declared here, and verifies the result with
:func:`check_state`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "BOTTLENECK_TABLES",
    "BOTTLENECK_TENSORS",
    "FITTED_ATTRS",
    "HISTORY_MAX_ROWS",
    "STRUCTURAL_PARAMS",
    "StateError",
    "check_state",
    "structure_of",
]

#: Fitted attributes (and the private RNG) that make up a model's state, with
#: their kind. A failed call restores exactly these.
FITTED_ATTRS = {
    "n_features_in_": "int",
    "feature_names_in_": "1-D str array",
    "classes_": "1-D label array",
    "bottleneck_": "DiscreteKeyValueBottleneck",
    "input_transform_": "InputTransform or None",
    "encoder_": "encoder or None",
    "device_": "torch.device",
    "n_iter_": "int",
    "t_": "float",
    "history_": "list of dict",
    "key_init_info_": "dict",
    "structure_": "dict",
    "_rng": "numpy RandomState",
}

#: Dense tensors of the bottleneck: name -> (dtype, shape as a function of its config).
BOTTLENECK_TENSORS = {
    "projection": (torch.float32, lambda c: (c["n_features"], c["n_heads"] * c["key_dim"])),
    "keys": (torch.float32, lambda c: (c["n_heads"], c["n_keys"], c["key_dim"])),
}

#: Tables of the bottleneck by decoder: attribute -> what it holds. The count
#: decoders keep only a CountTable; ``sgd`` keeps a ValueTable and a float64
#: per-key usage vector (C * M,) for pruning.
BOTTLENECK_TABLES = {
    "logp": {"count_table": "CountTable (C * M rows, n_classes)"},
    "vote": {"count_table": "CountTable (C * M rows, n_classes)"},
    "sgd": {"value_table": "ValueTable (C * M rows, n_classes, values_dtype)", "_usage": "float64 (C * M,)"},
}

_VALUES_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: Parameters that define the fitted structure: changing one on a fitted model
#: needs a refit (``structure_`` records their values at fit time).
STRUCTURAL_PARAMS = (
    "decoder",
    "n_heads",
    "n_keys",
    "key_dim",
    "projection",
    "top_k",
    "values_dtype",
    "input_transform",
    "input_transform_components",
    "encoder",
)

#: ``history_`` keeps at most this many rows (the oldest are dropped).
HISTORY_MAX_ROWS = 1000


class StateError(ValueError):
    """A model's fitted state breaks an invariant of the schema."""


def _encoder_key(encoder):
    """A comparable description of the ``encoder`` parameter."""
    if encoder is None or isinstance(encoder, str):
        return encoder
    return f"<{type(encoder).__module__}.{type(encoder).__qualname__}>"


def structure_of(est) -> dict:
    """The structural parameters of ``est`` as plain, comparable values.

    Parameters
    ----------
    est : DKVBClassifier
        Any estimator (fitted or not).

    Returns
    -------
    dict
        ``{name: value}`` for :data:`STRUCTURAL_PARAMS` (encoder modules by type).
    """
    out = {name: getattr(est, name) for name in STRUCTURAL_PARAMS}
    out["encoder"] = _encoder_key(out["encoder"])
    return out


def _fail(msg):
    raise StateError(f"Invalid model state: {msg}")


def _check_tables(module, cfg, decoder) -> None:
    """The decoder's tables exist (and only they), with the configured rows, classes and dtype."""
    n_rows = cfg["n_heads"] * cfg["n_keys"]
    kind = "sgd" if cfg["decoder"] == "sgd" else "counts"
    if decoder is not None and ("sgd" if decoder == "sgd" else "counts") != kind:
        _fail(f"the bottleneck holds the tables of decoder={cfg['decoder']!r}, but decoder={decoder!r}.")
    counts, values, usage = module.count_table, module.value_table, module._usage
    if kind == "counts":
        if counts is None or values is not None or usage is not None:
            _fail("a count-decoder bottleneck must hold a count table and nothing else.")
        if counts.n_rows != n_rows or counts.n_classes != cfg["n_classes"]:
            _fail(f"count table of {counts.n_rows} rows x {counts.n_classes} classes, expected {n_rows} rows.")
        try:
            counts.check()
        except ValueError as exc:
            _fail(f"count table: {exc}")
        return
    if values is None or usage is None or counts is not None:
        _fail("an sgd bottleneck must hold a value table and a usage vector, and no count table.")
    if values.n_rows != n_rows or values.dtype != _VALUES_DTYPES[cfg["values_dtype"]]:
        _fail(
            f"value table of {values.n_rows} rows in {values.dtype}, expected {n_rows} rows in {cfg['values_dtype']}."
        )
    if values.n_classes > values.capacity:
        _fail("value table has fewer columns than classes.")
    for start, stop, block in values.segments():
        if block.shape[0] != n_rows or not bool(torch.isfinite(block[:, : stop - start]).all()):
            _fail("value table holds non-finite entries or blocks of the wrong shape.")
    if usage.dtype != torch.float64 or tuple(usage.shape) != (n_rows,):
        _fail(f"usage must be float64 of shape ({n_rows},), got {usage.dtype} {tuple(usage.shape)}.")
    if not bool(torch.isfinite(usage).all()) or bool((usage < 0).any()):
        _fail("usage must be finite and >= 0.")


def check_state(est) -> None:
    """Verify the invariants of ``est``'s fitted state; raise :class:`StateError` if one fails.

    Parameters
    ----------
    est : DKVBClassifier
        The estimator to check (an unfitted one passes trivially).

    Returns
    -------
    None
        Returns nothing; raises on the first broken invariant.
    """
    d = est.__dict__
    module = d.get("bottleneck_")
    if module is None:
        if "classes_" in d:
            _fail("classes_ without a bottleneck_.")
        return
    cfg = module.config()
    for name, (dtype, shape_fn) in BOTTLENECK_TENSORS.items():
        t = getattr(module, name)
        if name == "projection" and cfg["projection"] == "chunk":
            if t is not None:
                _fail("a chunk-projection model holds a projection tensor.")
            continue
        if t is None:
            _fail(f"bottleneck tensor {name!r} is missing.")
        if t.dtype != dtype:
            _fail(f"bottleneck tensor {name!r} has dtype {t.dtype}, expected {dtype}.")
        if tuple(t.shape) != tuple(shape_fn(cfg)):
            _fail(f"bottleneck tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape_fn(cfg))}.")
        if not bool(torch.isfinite(t).all()):
            _fail(f"bottleneck tensor {name!r} holds non-finite entries.")
    # Before any label the decoder may still change (the tables follow it at the first label).
    _check_tables(module, cfg, d.get("decoder") if "classes_" in d else None)
    classes = d.get("classes_")
    if classes is not None:
        classes = np.asarray(classes)
        if classes.ndim != 1:
            _fail(f"classes_ must be 1-D, got shape {classes.shape}.")
        if len(classes) != cfg["n_classes"]:
            _fail(f"{len(classes)} classes_ but {cfg['n_classes']} value/count columns.")
        if len(np.unique(classes)) != len(classes):
            _fail("classes_ holds duplicates.")
    elif cfg["n_classes"] != 0:
        _fail(f"no classes_ but {cfg['n_classes']} value/count columns.")
    t = d.get("t_", 0.0)
    if not isinstance(t, (float, int)) or not math.isfinite(t) or t < 0:
        _fail(f"t_ must be a finite number >= 0, got {t!r}.")
    total = float(module.usage.sum())
    if classes is not None and abs(total / max(module.n_heads * module.top_k, 1) - t) > 1e-6 * max(1.0, t):
        _fail(f"t_={t!r} does not match the count total per head.")
    history = d.get("history_", [])
    if len(history) > HISTORY_MAX_ROWS or not all(isinstance(r, dict) for r in history):
        _fail(f"history_ must be a list of at most {HISTORY_MAX_ROWS} dicts.")
    structure = d.get("structure_")
    if structure is not None and set(structure) != set(STRUCTURAL_PARAMS):
        _fail(f"structure_ has keys {sorted(structure)}, expected {sorted(STRUCTURAL_PARAMS)}.")
    transform = d.get("input_transform_")
    if transform is not None:
        for name in ("mean_", "components_"):
            if not bool(torch.isfinite(getattr(transform, name)).all()):
                _fail(f"input_transform_.{name} holds non-finite entries.")
