"""Merge DKVB models trained on disjoint shards into one.

A DKVB model only ever changes the values (and class counts) at the keys its
training samples selected, and its keys and projection are frozen. Two models
that start from the same keys, one trained on shard A and one on shard B,
therefore differ from their common start only where A's, respectively B's,
samples landed. :func:`merge` adds those differences up:

``values = base + sum_i (values_i - base)``, ``counts = sum_i counts_i``,

with value columns aligned by label and ``classes_`` the union of the models'
classes (in order of first appearance). ``base`` is the shared starting point,
all zeros for models trained from :meth:`~skdkvb.DKVBClassifier.fit_keys` (or a
fitted model all shards continued from).

When does this equal training on A then B?

* Count decoders (``decoder="vote"`` or ``"logp"``): always; counts are sums.
* SGD decoder (``decoder="sgd"``): exactly when no key selected by A is also
  selected by B and every shard declared all labels up front
  (``partial_fit(..., classes=all_labels)``, so that the softmax and the label
  smoothing see the same classes), with ``shuffle=False`` or single-batch
  calls; approximately otherwise (A's and B's updates of a shared key were
  computed from the same start rather than one after the other).

Shards can train in parallel on separate machines (e.g. Dask workers); see
the "Scaling out" page of the documentation.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ._bottleneck import _add_dense_counts, _write_values
from ._classifier import DKVBClassifier
from ._state import HISTORY_MAX_ROWS, check_state
from ._tables import CountTable, ValueTable

__all__ = ["merge"]

# Parameters that define the representation: they must agree for values to be addable.
_SHARED_PARAMS = (
    "decoder",
    "values_dtype",
    "n_heads",
    "n_keys",
    "key_dim",
    "projection",
    "top_k",
    "input_transform",
    "input_transform_components",
    "encoder",
    "encoder_kwargs",
)


def _check_same_representation(ref, other, pos):
    for name in _SHARED_PARAMS:
        a, b = getattr(ref, name), getattr(other, name)
        if name == "encoder" and not _same_encoder(a, b):
            raise ValueError(
                f"models[{pos}] has an encoder of type {type(b).__name__} with other weights than models[0]'s "
                f"{type(a).__name__}; only models with the same encoder can be merged."
            )
        if name != "encoder" and a != b:
            raise ValueError(
                f"models[{pos}] has {name}={b!r} but models[0] has {name}={a!r}; only models "
                "with the same keys and projection can be merged."
            )
    if getattr(ref, "n_features_in_", None) != getattr(other, "n_features_in_", None):
        raise ValueError(
            f"models[{pos}] was fitted on {getattr(other, 'n_features_in_', None)} features, "
            f"models[0] on {getattr(ref, 'n_features_in_', None)}."
        )
    names_a = getattr(ref, "feature_names_in_", None)
    names_b = getattr(other, "feature_names_in_", None)
    if (names_a is None) != (names_b is None) or (names_a is not None and not np.array_equal(names_a, names_b)):
        raise ValueError(f"models[{pos}] was fitted on other feature names than models[0].")
    ma, mb = ref.bottleneck_, other.bottleneck_
    checks = [("keys", ma.keys, mb.keys)]
    if ma.projection is not None:
        checks.append(("projection", ma.projection, mb.projection))
    ta, tb = ref.input_transform_, other.input_transform_
    if ta is not None:
        checks += [("input transform", ta.mean_, tb.mean_), ("input transform", ta.components_, tb.components_)]
    for what, x, y in checks:
        if not torch.equal(x, y.to(x.device)):
            raise ValueError(
                f"models[{pos}] has other {what} than models[0]. Merging needs shared keys: fit "
                "every shard's model with the same random_state and the same fit_keys data "
                "(or copy one model that ran fit_keys), then train each copy on its shard."
            )


def _same_encoder(a, b) -> bool:
    """Encoders compare by value: names by equality, modules by type and ``state_dict``."""
    if a is b:
        return True
    if a is None or b is None or isinstance(a, str) or isinstance(b, str):
        return a == b
    if type(a) is not type(b):
        return False
    if hasattr(a, "state_dict") and hasattr(b, "state_dict"):
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)
    return False


def _union_classes(models):
    classes = list(models[0].classes_)
    kinds = {m.classes_.dtype.kind for m in models}
    if len(kinds - {"i", "u"}) > 1 or (kinds & {"i", "u"} and kinds - {"i", "u"}):
        raise TypeError(f"Cannot merge models whose classes_ have different label types: {sorted(kinds)}.")
    seen = set(classes)
    for m in models[1:]:
        for label in m.classes_:
            if label not in seen:
                seen.add(label)
                classes.append(label)
    dtype = np.result_type(*[m.classes_.dtype for m in models])
    return np.asarray(classes, dtype=dtype)


_NOT_ANCESTOR = (
    "base is not an ancestor of models[{pos}]: some of base's class counts exceed that model's. "
    "Pass as base the fitted model every shard continued from (or None)."
)


def _merged_counts(models, base, classes, columns, device) -> CountTable:
    """``sum_i counts_i`` (minus ``(n - 1) * base``) as a new count table, classes aligned by label.

    Without ``base`` the tables are added cell by cell (``add_table``: sparse
    stores stay sparse). With ``base`` the difference is formed densely, one
    (C * M, K) float64 array: fine for the small models this is meant for.
    """
    n_rows = models[0].bottleneck_.count_table.n_rows
    ref = models[0].bottleneck_.count_table
    merged = CountTable(n_rows, len(classes), device=device, dense_max_cells=ref.dense_max_cells)
    if base is None:
        for m in models:
            merged.add_table(m.bottleneck_.count_table.to(device), columns(m))
        return merged

    def dense(m):
        out = torch.zeros((n_rows, len(classes)), dtype=torch.float64, device=device)
        out[:, torch.as_tensor(columns(m), device=device)] = m.bottleneck_.count_table.to_dense().to(device)
        return out

    base_counts = dense(base)
    total = torch.zeros_like(base_counts)
    for p, m in enumerate(models):
        c = dense(m)
        if bool((c < base_counts).any()):
            raise ValueError(_NOT_ANCESTOR.format(pos=p))
        total += c
    total -= (len(models) - 1) * base_counts
    _add_dense_counts(merged, total)
    return merged


def _merge_values(module, models, base, classes, columns, device) -> None:
    """``values = base + sum_i (values_i - base)`` and the usage likewise, into ``module``'s new tables."""
    n_rows = module.n_heads * module.n_keys
    values = torch.zeros((n_rows, len(classes)), dtype=torch.float32, device=device)
    usage = torch.zeros(n_rows, dtype=torch.float64, device=device)

    def add(m, scale):
        b = m.bottleneck_
        cols = torch.as_tensor(columns(m), device=device)
        for lo, hi, block in b.value_table.segments():
            values[:, cols[lo:hi]] += scale * block[:, : hi - lo].to(device=device, dtype=torch.float32)
        usage.add_(b.usage.reshape(-1).to(device), alpha=scale)

    for m in models:
        add(m, 1.0)
    if base is not None:
        add(base, -(len(models) - 1.0))
        if bool((usage < 0).any()):
            raise ValueError(_NOT_ANCESTOR.format(pos=0))
    table = ValueTable(n_rows, len(classes), dtype=module.value_table.dtype, device=device)
    _write_values(table, values)
    module.value_table = table
    module._usage = usage


def merge(models, *, base=None):
    """Merge DKVB models that share keys and were trained on disjoint shards.

    Parameters
    ----------
    models : list of DKVBClassifier
        Fitted models with identical keys, projection and input transform
        (same ``random_state`` and ``fit_keys`` data). They are not modified.
    base : DKVBClassifier, default=None
        The fitted model all ``models`` continued from, if any; its values,
        counts and ``t_`` are counted once. ``None`` means the models started
        from freshly initialised keys (all-zero values and counts).

    Returns
    -------
    merged : DKVBClassifier
        A new model: parameters, random state and device of ``models[0]``;
        ``classes_`` the union of all classes in order of first appearance;
        values ``base + sum(values_i - base)``; counts, ``t_`` and ``n_iter_``
        added; ``history_`` concatenated.

    Raises
    ------
    ValueError
        If the models do not share keys, projection, input transform, decoder,
        ``values_dtype`` or encoder (modules compare by type and
        ``state_dict``), or if ``base`` is not their common ancestor (its
        class counts must not exceed any model's, element by element).
    TypeError
        If the label types differ or an element is not a DKVBClassifier.

    Examples
    --------
    >>> import copy
    >>> from sklearn.datasets import load_digits
    >>> from skdkvb import DKVBClassifier
    >>> from skdkvb.merge import merge
    >>> X, y = load_digits(return_X_y=True)
    >>> start = DKVBClassifier(n_heads=32, n_keys=64, key_dim=4, decoder="vote",
    ...                        key_init_epochs=2, random_state=0, device="cpu").fit_keys(X)
    >>> a = copy.deepcopy(start).partial_fit(X[y < 5], y[y < 5])
    >>> b = copy.deepcopy(start).partial_fit(X[y >= 5], y[y >= 5])
    >>> both = copy.deepcopy(start).partial_fit(X[y < 5], y[y < 5]).partial_fit(X[y >= 5], y[y >= 5])
    >>> merged = merge([a, b])
    >>> merged.classes_
    array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    >>> bool((merged.predict_proba(X) == both.predict_proba(X)).all())
    True
    """
    models = list(models)
    if not models:
        raise ValueError("merge() needs at least one model.")
    for m in models + ([base] if base is not None else []):
        if not isinstance(m, DKVBClassifier):
            raise TypeError(f"merge() combines DKVBClassifier models, got {type(m).__name__}.")
        check_is_fitted(m)
        check_state(m)
    ref = models[0]
    for pos, m in enumerate(models[1:] + ([base] if base is not None else []), start=1):
        _check_same_representation(ref, m, pos if pos < len(models) else "base")
    classes = _union_classes(models + ([base] if base is not None else []))
    device = ref.bottleneck_.keys.device
    pos = {label: j for j, label in enumerate(classes.tolist())}

    def columns(m):
        return np.asarray([pos[label] for label in m.classes_.tolist()], dtype=np.int64)

    t = float(sum(m.t_ for m in models))
    n_iter = sum(getattr(m, "n_iter_", 0) for m in models)
    if base is not None:
        t -= (len(models) - 1) * base.t_
        n_iter -= (len(models) - 1) * getattr(base, "n_iter_", 0)
        for p, m in enumerate(models):
            if m.t_ < base.t_:
                raise ValueError(_NOT_ANCESTOR.format(pos=p))
    merged = copy.deepcopy(ref)
    module = merged.bottleneck_
    if module.count_table is not None:
        module.count_table = _merged_counts(models, base, classes, columns, device)
    else:
        _merge_values(module, models, base, classes, columns, device)
    merged.classes_ = classes
    merged.t_ = t
    merged.n_iter_ = n_iter
    merged.history_ = [dict(row) for m in models for row in m.history_][-HISTORY_MAX_ROWS:]
    check_state(merged)
    return merged
