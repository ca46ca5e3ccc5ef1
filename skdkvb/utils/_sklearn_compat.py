"""The one module that touches other libraries' private names.

Everything skdkvb needs from scikit-learn (or the standard library) that is
not public API is imported here and nowhere else, with a fallback where a
supported version lacks it, so that a change upstream is fixed in one place
(the pattern of scikit-learn's ``utils/fixes.py`` and imbalanced-learn's
``utils/_sklearn_compat.py``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from numbers import Integral, Real
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from sklearn import config_context, get_config

# Declarative parameter constraints: public in spirit, private in name, stable
# since scikit-learn 1.2 (the minimum we support is 1.6).
from sklearn.utils._param_validation import (  # re-exported: see __all__
    HasMethods,
    Interval,
    Options,
    StrOptions,
    validate_parameter_constraints,
)

__all__ = [
    "HasMethods",
    "Integral",
    "Interval",
    "Options",
    "Real",
    "StrOptions",
    "check_sample_weight",
    "final_estimator",
    "fit_context",
    "timm_url_is_cached",
    "validate_estimator_params",
    "validate_pipeline_steps",
]


def validate_estimator_params(estimator) -> None:
    """Check ``estimator.get_params()`` against its ``_parameter_constraints``.

    Raises scikit-learn's ``InvalidParameterError`` (a ``ValueError`` and
    ``TypeError`` subclass) naming the parameter, its value and what is allowed.
    Unlike scikit-learn's own ``_fit_context``, callers run this on *every*
    call that uses the parameters, ``partial_fit`` on a fitted model included:
    ``set_params`` after a fit must not slip through unchecked.

    Parameters
    ----------
    estimator : BaseEstimator
        An estimator with a ``_parameter_constraints`` dict.

    Returns
    -------
    None
        Returns nothing; raises on the first invalid parameter.
    """
    if get_config()["skip_parameter_validation"]:
        return
    validate_parameter_constraints(
        estimator._parameter_constraints,
        estimator.get_params(deep=False),
        caller_name=type(estimator).__name__,
    )


def fit_context(*, prefer_skip_nested_validation: bool = True):
    """Decorator for ``fit``-like methods: validate the parameters, then run.

    Parameters
    ----------
    prefer_skip_nested_validation : bool, default=True
        Skip the parameter validation of scikit-learn functions called inside
        the method (their arguments are ours and already valid).

    Returns
    -------
    decorator : callable
        Wraps the method. Unlike ``sklearn.base._fit_context`` the parameters
        are validated on every call, ``partial_fit`` included.
    """

    def decorator(method):
        @functools.wraps(method)
        def wrapper(estimator, *args, **kwargs):
            validate_estimator_params(estimator)
            skip = prefer_skip_nested_validation or get_config()["skip_parameter_validation"]
            with config_context(skip_parameter_validation=skip):
                return method(estimator, *args, **kwargs)

        return wrapper

    return decorator


def check_sample_weight(sample_weight, n_samples: int, *, dtype=np.float64) -> np.ndarray:
    """Validated sample weights as a 1-D numpy array of ``n_samples`` entries.

    Policy (skdkvb's own, the same on every scikit-learn version):

    * ``None`` means unit weights; a scalar is broadcast.
    * Weights must be finite and non-negative, and finite in float32 (the
      dtype the model accumulates in on a GPU), else ``ValueError`` naming the
      first offending sample.
    * All-zero weights are legal: in a stream, a batch whose samples all have
      zero weight is a no-op for the learned statistics (scikit-learn >= 1.9
      rejects it in ``_check_sample_weight``; we do not).
    * Torch tensors and other array-likes are converted to numpy on the host.

    Parameters
    ----------
    sample_weight : None, float, array-like or torch.Tensor of shape (n_samples,)
        The weights given by the caller.
    n_samples : int
        Number of samples of the batch they weigh.
    dtype : numpy dtype, default=np.float64
        Dtype of the returned array.

    Returns
    -------
    ndarray of shape (n_samples,)
        The validated weights.
    """
    if sample_weight is None:
        return np.ones(n_samples, dtype=dtype)
    if hasattr(sample_weight, "detach"):  # a torch tensor
        sample_weight = sample_weight.detach().cpu().numpy()
    try:
        # asarray first: array-likes that refuse numpy's functions (np.ndim) still convert.
        w = np.asarray(sample_weight, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"sample_weight must be numeric, got {sample_weight!r:.80}.") from exc
    if w.ndim == 0:
        w = np.full(n_samples, w, dtype=dtype)
    if w.ndim != 1:
        raise ValueError(f"sample_weight must be 1-D, got an array of shape {w.shape}.")
    if w.shape[0] != n_samples:
        raise ValueError(f"sample_weight has {w.shape[0]} entries but X has {n_samples} samples.")
    bad = ~np.isfinite(w) | (np.abs(w) > np.finfo(np.float32).max)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"sample_weight must be finite in float32; sample {i} has weight {w[i]!r} ({int(bad.sum())} such samples)."
        )
    if (w < 0).any():
        i = int(np.flatnonzero(w < 0)[0])
        raise ValueError(f"sample_weight must be non-negative; sample {i} has weight {w[i]!r}.")
    return w


def _is_passthrough(step) -> bool:
    return step is None or (isinstance(step, str) and step == "passthrough")


def final_estimator(pipeline):
    """The last step of a scikit-learn ``Pipeline``, from its public ``steps``.

    Stands in for the private ``Pipeline._final_estimator``.

    Parameters
    ----------
    pipeline : sklearn.pipeline.Pipeline
        Any pipeline; its ``steps`` are read, not changed.

    Returns
    -------
    estimator or "passthrough"
        The final step's estimator, or ``"passthrough"`` when that step is
        ``None`` or ``"passthrough"``.

    Examples
    --------
    >>> from sklearn.pipeline import Pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skdkvb.utils._sklearn_compat import final_estimator
    >>> final_estimator(Pipeline([("s", StandardScaler()), ("last", None)]))
    'passthrough'
    """
    step = pipeline.steps[-1][1]
    return "passthrough" if _is_passthrough(step) else step


def validate_pipeline_steps(pipeline) -> None:
    """Check a pipeline's steps the way ``Pipeline`` does before fitting.

    Stands in for the private ``Pipeline._validate_steps``, using only the
    public ``steps``: names must be unique strings without ``__``, every
    intermediate step must be ``"passthrough"``/``None`` or have
    ``fit``/``fit_transform`` and ``transform``, and the final step must be
    ``"passthrough"``/``None`` or have ``fit``.

    Parameters
    ----------
    pipeline : sklearn.pipeline.Pipeline
        The pipeline to check; not changed.

    Returns
    -------
    None
        Returns nothing; raises ``ValueError`` (bad names) or ``TypeError``
        (a step without the needed methods) naming the step and the fix.

    Examples
    --------
    >>> from sklearn.pipeline import Pipeline
    >>> from sklearn.linear_model import SGDClassifier
    >>> from skdkvb.utils._sklearn_compat import validate_pipeline_steps
    >>> validate_pipeline_steps(Pipeline([("a", "passthrough"), ("clf", SGDClassifier())]))
    >>> try:
    ...     validate_pipeline_steps(Pipeline([("clf", SGDClassifier()), ("last", SGDClassifier())]))
    ... except TypeError as exc:
    ...     print(str(exc).split(": ")[1])
    step 'clf' (SGDClassifier()) has no transform method. Put it last or remove it.
    """
    steps = list(pipeline.steps)
    if not steps:
        raise ValueError("The pipeline has no steps; pass at least one (name, estimator) pair.")
    names = [name for name, _ in steps]
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"Step names must be strings, got {name!r}.")
        if "__" in name:
            raise ValueError(f"Step name {name!r} contains '__', which separates step and parameter names.")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Step names must be unique, got {duplicates} more than once.")
    for name, step in steps[:-1]:
        if _is_passthrough(step):
            continue
        if not (hasattr(step, "fit") or hasattr(step, "fit_transform")) or not hasattr(step, "transform"):
            raise TypeError(
                f"All intermediate steps should be transformers: step {name!r} ({step!r}) has no "
                f"{'transform' if not hasattr(step, 'transform') else 'fit or fit_transform'} method. "
                "Put it last or remove it."
            )
    name, last = steps[-1]
    if not _is_passthrough(last) and not hasattr(last, "fit"):
        raise TypeError(f"The last step {name!r} ({last!r}) has no fit method; pass an estimator or 'passthrough'.")


# timm stores URL downloads under <torch hub dir>/checkpoints/<file name>, and
# a file name such as "resnet18-f37072fd.pth" carries a SHA-256 prefix.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")


def timm_url_is_cached(url: str, *, check_hash: bool = True) -> bool:
    """Whether timm's download of ``url`` is already in the local torch hub cache.

    Stands in for the private ``timm.models._hub.check_cached_file``, using
    only ``torch.hub.get_dir()``: timm keeps URL downloads in its
    ``checkpoints`` sub-folder under the file's own name.

    Parameters
    ----------
    url : str
        The ``url`` of a timm ``pretrained_cfg``.
    check_hash : bool, default=True
        When the file name carries a hash prefix (``name-<hex>.ext``), also
        require the file's SHA-256 to start with it.

    Returns
    -------
    bool
        True when the file is cached (and, if checked, its hash matches).

    Examples
    --------
    >>> from skdkvb.utils._sklearn_compat import timm_url_is_cached
    >>> timm_url_is_cached("https://example.invalid/no-such-weights-0123abcd.pth")
    False
    """
    import torch.hub

    filename = os.path.basename(urlparse(url).path)
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not filename or not path.is_file():
        return False
    match = _HASH_IN_NAME.search(filename)
    if not check_hash or match is None:
        return True
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest().startswith(match.group(1))
