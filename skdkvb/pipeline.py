"""A scikit-learn ``Pipeline`` that can learn from a stream with ``partial_fit``.

scikit-learn's :class:`~sklearn.pipeline.Pipeline` has no ``partial_fit``, so
a frozen encoder followed by an incremental classifier cannot be trained
batch by batch as one estimator. :class:`StreamingPipeline` adds it: steps
with ``partial_fit`` are updated, every other step is only used to
``transform`` (after being fitted once, on the first batch, if it was not
fitted yet). Everything else, ``fit``, ``predict``, ``clone``,
``set_params(step__param=...)``, ``GridSearchCV``, is the ordinary Pipeline.
"""

from __future__ import annotations

from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

__all__ = ["StreamingPipeline", "make_streaming_pipeline"]


def _final_estimator_has(attr):
    def check(self):
        # AttributeError here hides the method, as sklearn's available_if expects.
        getattr(self._final_estimator, attr)
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

    @available_if(_final_estimator_has("partial_fit"))
    def partial_fit(self, X, y=None, **params):
        """Update the pipeline with one batch.

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
        """
        self._validate_steps()
        routed = self._split_partial_fit_params(params)
        Xt = X
        for name, step in self.steps[:-1]:
            if _is_passthrough(step):
                continue
            if hasattr(step, "partial_fit"):
                step.partial_fit(Xt, y, **routed[name])
            elif not _is_fitted(step):
                step.fit(Xt, y, **routed[name])
            elif routed[name]:
                raise ValueError(
                    f"Step {name!r} is fitted and has no partial_fit, so it takes no parameters; "
                    f"got {sorted(routed[name])}."
                )
            Xt = step.transform(Xt)
        name, last = self.steps[-1]
        last.partial_fit(Xt, y, **routed[name])
        return self


def make_streaming_pipeline(*steps, memory=None, transform_input=None, verbose=False):
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
