"""StreamingPipeline: the scikit-learn ``Pipeline`` that learns from a stream with ``partial_fit``.

scikit-learn's :class:`~sklearn.pipeline.Pipeline` has no ``partial_fit``, so
a frozen encoder followed by an incremental classifier cannot be trained
batch by batch as one estimator. :class:`StreamingPipeline` adds it: steps
with ``partial_fit`` are updated, every other step is only used to
``transform`` (after being fitted once, on the first batch, if it was not
fitted yet). Everything else, ``fit``, ``predict``, ``clone``,
``set_params(step__param=...)``, ``GridSearchCV``, is the ordinary Pipeline.
"""

from __future__ import annotations

import copy
from typing import Any

from numpy.typing import ArrayLike
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

__all__ = ["StreamingPipeline", "make_streaming_pipeline"]


def _final_estimator_has(attr):
    def check(self):
        # AttributeError here hides the method, as sklearn's available_if expects.
        getattr(self.steps[-1][1], attr)
        return True

    return check


def _is_passthrough(step) -> bool:
    return step is None or (isinstance(step, str) and step == "passthrough")


def _is_fitted(step) -> bool:
    """Fitted, or stateless (``requires_fit`` tag False)."""
    try:
        check_is_fitted(step)
    except NotFittedError:
        return False
    except TypeError:
        # Not an estimator in sklearn's sense (e.g. a bare object with transform).
        return True
    return True


def _snapshot(step):
    """A copy of ``step``'s attributes that a failed update can be rolled back to.

    Constructor parameters are kept by reference (fitting must not change
    them, by scikit-learn's convention, and they may be large: a frozen
    network); everything else, the fitted state, is deep-copied, since a
    ``partial_fit`` may update its arrays in place.
    """
    state = getattr(step, "__dict__", None)
    if state is None:
        return None
    try:
        params = set(step.get_params(deep=False))
    except (AttributeError, TypeError):
        params = set()
    return {key: value if key in params else copy.deepcopy(value) for key, value in state.items()}


def _restore(step, saved) -> None:
    if saved is not None:
        step.__dict__ = saved  # one assignment: the step is whole again


class StreamingPipeline(Pipeline):
    """A :class:`~sklearn.pipeline.Pipeline` with ``partial_fit``.

    Parameters and behaviour are those of :class:`sklearn.pipeline.Pipeline`;
    only :meth:`partial_fit` is added.

    Parameters
    ----------
    steps : list of (str, estimator) tuples
        Intermediate steps must have ``transform`` (or be ``"passthrough"``);
        the last step must have ``partial_fit`` for :meth:`partial_fit` to exist.
    transform_input : list of str, default=None
        As in :class:`~sklearn.pipeline.Pipeline` (metadata routing only).
    memory : str or object with the joblib.Memory interface, default=None
        Caches fitted transformers in :meth:`fit`; :meth:`partial_fit` updates
        the steps in place and does not use it.
    verbose : bool, default=False
        As in :class:`~sklearn.pipeline.Pipeline` (affects :meth:`fit`).

    See Also
    --------
    make_streaming_pipeline : build one without naming the steps.

    Notes
    -----
    In :meth:`partial_fit`, each intermediate step is handled by what it
    offers:

    - it has ``partial_fit`` (e.g. ``StandardScaler``, ``IncrementalPCA``):
      ``partial_fit`` on the batch, then ``transform``;
    - it is fitted already, or stateless: ``transform`` only. Fit a step
      beforehand (e.g. a PCA on unlabelled data) to freeze it;
    - otherwise (a frozen encoder such as
      :class:`~skdkvb.encoders.TimmEmbedder`, whose ``fit`` only builds the
      model): ``fit`` once on the first batch, then ``transform`` only. A
      stateful step without ``partial_fit`` thus learns from the first batch
      alone.

    Keyword arguments ``step__param=value`` go to that step's ``partial_fit``
    (or first ``fit``); bare keyword arguments such as ``classes=`` go to the
    final step.

    :meth:`partial_fit` is all or nothing for the steps before the last: it
    copies their fitted state (small for scalers and projections; the
    constructor parameters, such as a frozen network, are not copied) before
    updating them, and puts it back if a later step fails. The last step is
    not copied (it may be large): its own ``partial_fit`` must leave it
    unchanged on failure, as skdkvb's estimators do. Its update is the
    commit point: skdkvb's baselines publish their new state in one swap, so
    an interrupt that arrives after that swap, on the way out, keeps the
    batch in every step instead of rolling the earlier ones back.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import SGDClassifier
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skdkvb.pipeline import make_streaming_pipeline
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.normal(size=(40, 3)), np.repeat([0, 1], 20)
    >>> X[y == 1] += 3
    >>> pipe = make_streaming_pipeline(StandardScaler(), SGDClassifier(random_state=0))
    >>> for Xb, yb in ((X[:20], y[:20]), (X[20:], y[20:])):
    ...     pipe = pipe.partial_fit(Xb, yb, classes=[0, 1])
    >>> pipe.predict(X[[0, -1]])
    array([0, 1])
    """

    def _split_partial_fit_params(self, params):
        names = [name for name, _ in self.steps]
        routed = {name: {} for name in names}
        for key, value in params.items():
            if "__" in key:
                name, _, param = key.partition("__")
                if name not in routed:
                    raise ValueError(
                        f"partial_fit got {key}={value!r}, but the pipeline has no step {name!r}; "
                        f"its steps are {names}."
                    )
                routed[name][param] = value
            else:
                routed[names[-1]][key] = value
        return routed

    def _check_streaming_steps(self) -> None:
        """The checks of Pipeline's own step validation that partial_fit relies on, with public API only."""
        names = [name for name, _ in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"Step names must be unique; got {names}.")
        for name, step in self.steps[:-1]:
            if _is_passthrough(step):
                continue
            if not hasattr(step, "transform"):
                raise TypeError(
                    f"Step {name!r} ({step!r}) has no transform method; every step but the last must "
                    "transform its input, or be 'passthrough'."
                )

    @available_if(_final_estimator_has("partial_fit"))
    def partial_fit(self, X: ArrayLike, y: ArrayLike | None = None, **params: Any) -> StreamingPipeline:
        """Update the pipeline with one batch, all or nothing.

        Each step before the last is updated (``partial_fit``, or ``fit`` once
        if it is not fitted yet) and transforms the batch for the next; the
        last step is updated with ``partial_fit``. If any step fails, the
        earlier steps are rolled back: a batch the final step rejects (or an
        exception, ``KeyboardInterrupt`` or ``MemoryError`` at any point)
        teaches nothing to the scaler before it.

        Parameters
        ----------
        X : iterable
            A batch of inputs for the first step.
        y : iterable, default=None
            Targets of the batch.
        **params : dict
            ``step__param=value`` for a given step; bare names (``classes``,
            ``sample_weight``) for the final step.

        Returns
        -------
        self : StreamingPipeline
            The updated pipeline. On any error every step before the last is
            as it was; the last step is left as its own ``partial_fit``
            leaves it on that error (skdkvb's estimators leave it unchanged).
        """
        self._check_streaming_steps()
        routed = self._split_partial_fit_params(params)
        saved = []  # (step, attributes before this call), for the rollback
        name, last = self.steps[-1]
        last_state = getattr(last, "__dict__", None)
        try:
            Xt = X
            for step_name, step in self.steps[:-1]:
                if _is_passthrough(step):
                    continue
                if hasattr(step, "partial_fit"):
                    saved.append((step, _snapshot(step)))
                    step.partial_fit(Xt, y, **routed[step_name])
                elif not _is_fitted(step):
                    saved.append((step, _snapshot(step)))
                    step.fit(Xt, y, **routed[step_name])
                elif routed[step_name]:
                    raise ValueError(
                        f"Step {step_name!r} is fitted and has no partial_fit, so it takes no parameters; "
                        f"got {sorted(routed[step_name])}."
                    )
                Xt = step.transform(Xt)
            last.partial_fit(Xt, y, **routed[name])
        except BaseException:
            # The final step is the commit point. A final step that publishes
            # its new state by swapping its attribute dict (skdkvb's baselines)
            # shows that it committed before an interrupt on the way out: then
            # the earlier steps keep this batch too. Otherwise roll them back.
            if last_state is None or getattr(last, "__dict__", None) is last_state:
                for step, state in reversed(saved):
                    _restore(step, state)
            raise
        return self


def make_streaming_pipeline(
    *steps: Any, memory: Any = None, transform_input: list[str] | None = None, verbose: bool = False
) -> StreamingPipeline:
    """Build a :class:`StreamingPipeline`, naming steps after their classes.

    Parameters
    ----------
    *steps : list of estimators
        As for :func:`sklearn.pipeline.make_pipeline`.
    memory : str or object with the joblib.Memory interface, default=None
        Passed to the pipeline.
    transform_input : list of str, default=None
        Passed to the pipeline.
    verbose : bool, default=False
        Passed to the pipeline.

    Returns
    -------
    StreamingPipeline
        The pipeline of ``steps``, each named after its class in lower case.

    Examples
    --------
    >>> from sklearn.linear_model import SGDClassifier
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skdkvb.pipeline import make_streaming_pipeline
    >>> make_streaming_pipeline(StandardScaler(), SGDClassifier())
    StreamingPipeline(steps=[('standardscaler', StandardScaler()),
                             ('sgdclassifier', SGDClassifier())])
    """
    named = make_pipeline(*steps, memory=memory, transform_input=transform_input, verbose=verbose)
    return StreamingPipeline(named.steps, memory=memory, transform_input=transform_input, verbose=verbose)
