"""The runner: drives a learner through a stream and measures forgetting.

A *stream* is a sequence of training batches ("tasks" or "experiences") plus
the partition of the classes used to score the learner after every step. In a
class-incremental stream each task brings classes never seen before and the
learner is never told where one task ends: it only sees ``partial_fit(X, y)``
calls. :func:`evaluate_stream` drives any scikit-learn classifier through a
stream, scores it on every task after every step, and returns a
:class:`ContinualReport` with the accuracy matrix and the usual metrics.

Examples
--------
>>> from sklearn.datasets import load_digits
>>> from skdkvb.continual.baselines import NearestClassMean
>>> from skdkvb.continual import class_incremental_split, evaluate_stream
>>> X, y = load_digits(return_X_y=True)
>>> stream = class_incremental_split(X[:1200], y[:1200], n_tasks=5, random_state=0)
>>> [t.tolist() for t in stream.task_classes]
[[2, 8], [4, 9], [1, 6], [7, 3], [0, 5]]
>>> report = evaluate_stream(NearestClassMean(), stream, X[1200:], y[1200:])
>>> report.accuracy_matrix.shape
(5, 5)
>>> print(f"{report.average_accuracy:.3f} {report.forgetting:.3f}")
0.881 0.050
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.base import clone as sk_clone
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array

from . import metrics
from .streams import Stream, class_incremental_split

__all__ = ["ContinualReport", "evaluate_seeds", "evaluate_stream", "summarize"]


@dataclass
class ContinualReport:
    """What :func:`evaluate_stream` measured on one stream.

    Parameters
    ----------
    name : str
        Label of the learner (for tables and plots).
    accuracy_matrix : ndarray of shape (n_steps, n_tasks)
        ``R[t, j]``: accuracy on task ``j`` after training step ``t``.
    task_classes : list of list
        Classes of every task (columns of ``accuracy_matrix``).
    classes : ndarray of shape (n_classes,)
        Classes in task order (columns of ``per_class_accuracy``).
    per_class_accuracy : ndarray of shape (n_steps, n_classes)
        Recall of each class after every step.
    fit_times : list of float
        Seconds spent in ``partial_fit`` / ``fit`` at every step.
    key_init_time : float
        Seconds spent in unsupervised preparation (``fit_keys``), if any.
    final_accuracy : float
        Accuracy on the whole test set after the last step.
    log_loss, ece : float
        Log-loss and expected calibration error of ``predict_proba`` after the
        last step (``nan`` when the learner has no ``predict_proba``).
    kind : str
        ``"class-incremental"`` or ``"iid"``.
    seed : int or None
        Seed of the stream.
    mode : str
        ``"partial_fit"`` or ``"refit"``.
    extra : dict
        Free-form additions (e.g. a method's own diagnostics).
    """

    name: str
    accuracy_matrix: np.ndarray
    task_classes: list
    classes: np.ndarray
    per_class_accuracy: np.ndarray
    fit_times: list
    key_init_time: float = 0.0
    final_accuracy: float = float("nan")
    log_loss: float = float("nan")
    ece: float = float("nan")
    kind: str = "class-incremental"
    seed: int | None = None
    mode: str = "partial_fit"
    extra: dict = field(default_factory=dict)

    @property
    def _square(self):
        return self.accuracy_matrix.shape[0] == self.accuracy_matrix.shape[1]

    @property
    def average_accuracy(self):
        """Mean over tasks of the accuracy after the last step."""
        return metrics.average_accuracy(self.accuracy_matrix)

    @property
    def forgetting(self):
        """Mean forgetting (``nan`` unless one step per task)."""
        return metrics.forgetting(self.accuracy_matrix) if self._square else float("nan")

    @property
    def backward_transfer(self):
        """Backward transfer (``nan`` unless one step per task)."""
        if not self._square:
            return float("nan")
        return metrics.backward_transfer(self.accuracy_matrix)

    @property
    def average_accuracy_curve(self):
        """Mean accuracy over the tasks seen so far, after every step.

        For an i.i.d. stream every task counts as seen from the first step.
        """
        R = self.accuracy_matrix
        if not self._square:
            return R.mean(axis=1)
        return np.array([R[t, : t + 1].mean() for t in range(R.shape[0])])

    @property
    def total_time(self):
        """Seconds of training, key initialisation included."""
        return float(sum(self.fit_times) + self.key_init_time)

    def to_dict(self):
        """The raw results and the metrics as a JSON-serialisable dict.

        Returns
        -------
        dict
            Plain lists and numbers (``None`` for NaN).
        """
        out = asdict(self)
        out["accuracy_matrix"] = self.accuracy_matrix.tolist()
        out["per_class_accuracy"] = self.per_class_accuracy.tolist()
        out["classes"] = self.classes.tolist()
        out["task_classes"] = [np.asarray(c).tolist() for c in self.task_classes]
        out.update(
            average_accuracy=self.average_accuracy,
            forgetting=self.forgetting,
            backward_transfer=self.backward_transfer,
            average_accuracy_curve=self.average_accuracy_curve.tolist(),
            total_time=self.total_time,
        )
        return _jsonable(out)

    def to_json(self, path=None, **kwargs):
        """Serialise :meth:`to_dict` as JSON; write it to ``path`` if given.

        Parameters
        ----------
        path : str or path-like, default=None
            File to write; nothing is written if None.
        **kwargs
            Passed to :func:`json.dumps` (e.g. ``indent=2``).

        Returns
        -------
        str
            The JSON text.
        """
        text = json.dumps(self.to_dict(), **kwargs)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text

    def to_records(self):
        """Tidy rows, one per (step, task) with the accuracy.

        Returns
        -------
        list of dict
            Keys ``method``, ``seed``, ``kind``, ``step``, ``task``, ``accuracy``.
        """
        R = self.accuracy_matrix
        return [
            {"method": self.name, "seed": self.seed, "kind": self.kind, "step": t,
             "task": j, "accuracy": float(R[t, j])}
            for t in range(R.shape[0]) for j in range(R.shape[1])
        ]  # fmt: skip

    def to_frame(self):
        """:meth:`to_records` as a pandas DataFrame (needs pandas).

        Returns
        -------
        pandas.DataFrame
            One row per (step, task).
        """
        return _frame(self.to_records())

    def plot(self, ax=None, **kwargs):
        """Heatmap of the accuracy matrix (needs matplotlib).

        Parameters
        ----------
        ax : matplotlib.axes.Axes, default=None
            Where to draw; a new figure if None.
        **kwargs
            Passed to :func:`skdkvb.continual.plotting.plot_accuracy_matrices`.

        Returns
        -------
        matplotlib.figure.Figure
            The figure drawn on.
        """
        from .plotting import plot_accuracy_matrices

        return plot_accuracy_matrices([self], axes=None if ax is None else [ax], **kwargs)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None  # JSON has no NaN
    return obj


def _frame(records):
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - pandas is a test dependency
        raise ImportError(
            'to_frame() needs pandas: pip install "skdkvb[pandas]", or use to_records() for plain dicts.'
        ) from exc
    return pd.DataFrame.from_records(records)


def _aligned_proba(estimator, X, classes):
    """predict_proba with columns re-ordered (and padded) to ``classes``."""
    proba = estimator.predict_proba(X)
    out = np.zeros((proba.shape[0], classes.size))
    pos = {c: i for i, c in enumerate(classes.tolist())}
    for k, c in enumerate(np.asarray(estimator.classes_).tolist()):
        if c in pos:
            out[:, pos[c]] = proba[:, k]
    # float32 probabilities drift from summing to one; renormalise in float64.
    total = out.sum(axis=1, keepdims=True)
    return np.divide(out, total, out=np.full_like(out, 1.0 / classes.size), where=total > 0)


def evaluate_stream(
    estimator,
    stream,
    X_test,
    y_test,
    *,
    X_unlabeled=None,
    epochs=1,
    mode="auto",
    pass_classes=True,
    clone=True,
    callback=None,
    name=None,
    random_state=0,
    verbose=0,
):
    """Train a classifier through a stream, scoring every task after every step.

    Parameters
    ----------
    estimator : classifier
        Any scikit-learn classifier. With ``partial_fit`` it is updated on each
        step's data only; without it, it is re-fitted on everything seen so far
        (an upper bound, not a continual learner).
    stream : Stream
        From :func:`class_incremental_split` or :func:`iid_stream`.
    X_test : array-like of shape (n_test, n_features) or (n_test, H, W, C)
        Test inputs; image batches are passed to the estimator as they are.
    y_test : array-like of shape (n_test,)
        Test labels.
    X_unlabeled : array-like, default=None
        Inputs without labels for unsupervised preparation before the stream
        starts: passed to ``estimator.fit_keys`` when the estimator has one
        (DKVB's key initialisation), ignored otherwise.
    epochs : int, default=1
        ``partial_fit`` calls per step, each on a freshly shuffled copy of the
        step's data (for learners whose ``partial_fit`` does one SGD epoch).
    mode : {"auto", "partial_fit", "refit"}, default="auto"
        ``"auto"`` uses ``partial_fit`` when the estimator has it.
    pass_classes : bool, default=True
        Pass every class of the stream as ``classes=`` on the first
        ``partial_fit`` call, as scikit-learn's incremental learners require.
        It announces the label set only; no data of later tasks is seen.
    clone : bool, default=True
        Work on ``sklearn.base.clone(estimator)``; if False the given
        estimator is trained in place.
    callback : callable, default=None
        ``callback(step, estimator)`` after each step (e.g. to snapshot
        decision regions).
    name : str, default=None
        Label in the report; the estimator's class name if None.
    random_state : int, default=0
        Seed of the per-epoch shuffles.
    verbose : int, default=0
        Show a tqdm progress bar over steps when > 0.

    Returns
    -------
    ContinualReport
        The accuracy matrix, per-class recalls, timings and final metrics.
    """
    if mode not in ("auto", "partial_fit", "refit"):
        raise ValueError(f"mode must be 'auto', 'partial_fit' or 'refit', got {mode!r}.")
    if not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}.")
    if not isinstance(stream, Stream):
        raise TypeError(
            f"stream must be a Stream from class_incremental_split or iid_stream, got {type(stream).__name__}."
        )
    # Image arrays (4-D) are fine: the estimator (e.g. DKVB with an encoder) validates them.
    X_test = check_array(X_test, dtype=None, allow_nd=True)
    y_test = np.asarray(y_test)
    if mode == "auto":
        mode = "partial_fit" if hasattr(estimator, "partial_fit") else "refit"
    elif mode == "partial_fit" and not hasattr(estimator, "partial_fit"):
        raise ValueError(f"{type(estimator).__name__} has no partial_fit; use mode='refit'.")
    est = sk_clone(estimator) if clone else estimator
    classes = stream.classes
    all_classes = np.unique(classes)
    rng = check_random_state(random_state)

    key_init_time = 0.0
    if X_unlabeled is not None and hasattr(est, "fit_keys"):
        t0 = time.perf_counter()
        est.fit_keys(X_unlabeled)
        key_init_time = time.perf_counter() - t0

    steps = range(len(stream))
    if verbose:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=name or type(estimator).__name__, unit="task")
    rows, class_rows, fit_times = [], [], []
    seen_X, seen_y = [], []
    for t in steps:
        X_t, y_t = stream.steps[t]
        t0 = time.perf_counter()
        if mode == "partial_fit":
            for e in range(epochs):
                order = rng.permutation(y_t.size) if e > 0 else np.arange(y_t.size)
                kwargs = {"classes": all_classes} if (pass_classes and t == 0 and e == 0) else {}
                est.partial_fit(X_t[order], y_t[order], **kwargs)
        else:
            seen_X.append(X_t)
            seen_y.append(y_t)
            est.fit(np.concatenate(seen_X), np.concatenate(seen_y))
        fit_times.append(time.perf_counter() - t0)
        y_pred = est.predict(X_test)
        rows.append(metrics.accuracy_matrix_row(y_test, y_pred, stream.task_classes))
        class_rows.append(metrics.per_class_accuracy(y_test, y_pred, classes))
        if callback is not None:
            callback(t, est)

    final_accuracy = float(np.mean(y_pred == y_test))
    ll = ece = float("nan")
    if hasattr(est, "predict_proba"):
        proba = _aligned_proba(est, X_test, all_classes)
        ll = float(sk_log_loss(y_test, np.clip(proba, 1e-15, 1.0), labels=all_classes))
        ece = metrics.expected_calibration_error(y_test, proba, classes=all_classes)
    return ContinualReport(
        name=name or type(estimator).__name__,
        accuracy_matrix=np.vstack(rows),
        task_classes=[np.asarray(c).tolist() for c in stream.task_classes],
        classes=classes,
        per_class_accuracy=np.vstack(class_rows),
        fit_times=fit_times,
        key_init_time=key_init_time,
        final_accuracy=final_accuracy,
        log_loss=ll,
        ece=ece,
        kind=stream.kind,
        seed=stream.random_state,
        mode=mode,
    )


def evaluate_seeds(
    make_estimator,
    X_train,
    y_train,
    X_test,
    y_test,
    *,
    seeds=(0, 1, 2, 3, 4),
    n_tasks=5,
    class_order="random",
    iid=False,
    X_unlabeled=None,
    name=None,
    verbose=0,
    **kwargs,
):
    """Run :func:`evaluate_stream` over several seeds (class orders).

    Parameters
    ----------
    make_estimator : callable
        ``make_estimator(seed)`` returns a fresh, unfitted estimator.
    X_train : array-like of shape (n_samples, n_features) or images
        Training inputs, split into tasks per seed.
    y_train : array-like of shape (n_samples,)
        Training labels.
    X_test : array-like of shape (n_test, n_features) or images
        Test inputs.
    y_test : array-like of shape (n_test,)
        Test labels.
    seeds : iterable of int, default=(0, 1, 2, 3, 4)
        One stream per seed: the class order and shuffles are drawn from it.
    n_tasks : int, default=5
        Tasks per stream.
    class_order : {"random", "fixed"} or array-like, default="random"
        Order of the classes over the tasks (see ``class_incremental_split``).
    iid : bool, default=False
        Train on the i.i.d. shuffle of the same data in one step instead (the
        upper bound); the task partition of the seed's stream is kept.
    X_unlabeled : array-like, default=None
        See :func:`evaluate_stream`.
    name : str, default=None
        Label in the reports.
    verbose : int, default=0
        Progress bars when > 0.
    **kwargs
        Passed to :func:`evaluate_stream` (``epochs``, ``mode``, ...).

    Returns
    -------
    list of ContinualReport
        One report per seed.
    """
    reports = []
    for seed in seeds:
        stream = class_incremental_split(X_train, y_train, n_tasks=n_tasks, class_order=class_order, random_state=seed)
        if iid:
            stream = stream.iid(n_steps=1)
        reports.append(
            evaluate_stream(
                make_estimator(seed),
                stream,
                X_test,
                y_test,
                X_unlabeled=X_unlabeled,
                name=name,
                random_state=seed,
                verbose=verbose,
                **kwargs,
            )
        )
    return reports


_SUMMARY_FIELDS = (
    "average_accuracy", "forgetting", "backward_transfer", "final_accuracy",
    "log_loss", "ece", "total_time",
)  # fmt: skip


def summarize(reports, *, as_frame=False):
    """Mean and standard deviation of the metrics per method over seeds.

    Parameters
    ----------
    reports : iterable of ContinualReport
        Reports of one or several methods and seeds.
    as_frame : bool, default=False
        Return a pandas DataFrame (needs pandas) instead of a list of dicts.

    Returns
    -------
    list of dict or pandas.DataFrame
        One row per method name, in first-seen order, with ``n_seeds`` and
        ``<metric>_mean`` / ``<metric>_std`` for each metric.

    Examples
    --------
    >>> import numpy as np
    >>> from skdkvb.continual import ContinualReport, summarize
    >>> r = [ContinualReport("m", np.array([[1.0, 0], [0.5, 1]]), [[0], [1]],
    ...                      np.array([0, 1]), np.eye(2), [0.1, 0.1], seed=s)
    ...      for s in (0, 1)]
    >>> row = summarize(r)[0]
    >>> row["method"], row["average_accuracy_mean"], row["forgetting_mean"]
    ('m', 0.75, 0.5)
    """
    groups = {}
    for r in reports:
        groups.setdefault(r.name, []).append(r)
    rows = []
    for name, group in groups.items():
        row = {"method": name, "kind": group[0].kind, "n_seeds": len(group)}
        for f in _SUMMARY_FIELDS:
            vals = np.array([getattr(r, f) for r in group], dtype=float)
            finite = vals[np.isfinite(vals)]
            row[f + "_mean"] = float(finite.mean()) if finite.size else float("nan")
            row[f + "_std"] = float(finite.std()) if finite.size else float("nan")
        rows.append(row)
    return _frame(rows) if as_frame else rows
