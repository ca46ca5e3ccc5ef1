"""The one module that touches other libraries' private names.

Everything skdkvb needs from scikit-learn (or the standard library) that is
not public API is imported here and nowhere else, with a fallback where a
supported version lacks it, so that a change upstream is fixed in one place
(the pattern of scikit-learn's ``utils/fixes.py`` and imbalanced-learn's
``utils/_sklearn_compat.py``).
"""

from __future__ import annotations

import functools
from numbers import Integral, Real

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
    "fit_context",
    "validate_estimator_params",
]


def validate_estimator_params(estimator) -> None:
    """Check ``estimator.get_params()`` against its ``_parameter_constraints``.

    Raises scikit-learn's ``InvalidParameterError`` (a ``ValueError`` and
    ``TypeError`` subclass) naming the parameter, its value and what is allowed.
    Unlike scikit-learn's own ``_fit_context``, callers run this on *every*
    call that uses the parameters, ``partial_fit`` on a fitted model included:
    ``set_params`` after a fit must not slip through unchecked.
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
    """
    if sample_weight is None:
        return np.ones(n_samples, dtype=dtype)
    if hasattr(sample_weight, "detach"):  # a torch tensor
        sample_weight = sample_weight.detach().cpu().numpy()
    if np.isscalar(sample_weight) or np.ndim(sample_weight) == 0:
        sample_weight = np.full(n_samples, sample_weight)
    try:
        w = np.asarray(sample_weight, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"sample_weight must be numeric, got {sample_weight!r:.80}.") from exc
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
