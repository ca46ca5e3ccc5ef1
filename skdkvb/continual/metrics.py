"""Owns the continual-learning metrics: scores computed from an accuracy matrix and from predictions.

The accuracy matrix ``R`` has one row per training step and one column per
evaluation task: ``R[t, j]`` is the accuracy on the test samples of task ``j``
after the learner has been trained on the stream up to and including task
``t``. The definitions follow GEM (Lopez-Paz & Ranzato, 2017) and Avalanche;
with ``T`` the index of the last row:

* average accuracy ``= mean_j R[T, j]``;
* forgetting of task ``j`` ``= max_{t < T} R[t, j] - R[T, j]`` for ``j < T``;
* backward transfer ``= mean_{j < T} (R[T, j] - R[j, j])``.

Besides these, the module has the per-class accuracy (recall) and the
expected calibration error used by the benchmark to judge probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn.utils.validation import check_array, check_consistent_length

__all__ = [
    "accuracy_matrix_row",
    "average_accuracy",
    "backward_transfer",
    "expected_calibration_error",
    "forgetting",
    "per_class_accuracy",
]


def _check_matrix(R: ArrayLike, *, square: bool = False) -> np.ndarray:
    R = check_array(R, ensure_2d=True, dtype=np.float64, input_name="R")
    if np.any(R < 0) or np.any(R > 1):
        raise ValueError(
            "accuracy matrix entries must lie in [0, 1]; got values in "
            f"[{R.min():.3g}, {R.max():.3g}]. Pass accuracies, not percentages."
        )
    if square and R.shape[0] != R.shape[1]:
        raise ValueError(
            "this metric needs a square accuracy matrix (one row per task, "
            f"trained in task order); got shape {R.shape}."
        )
    return R


def average_accuracy(R: ArrayLike) -> float:
    """Mean accuracy over all tasks after the last training step.

    Parameters
    ----------
    R : array-like of shape (n_steps, n_tasks)
        Accuracy matrix; ``R[t, j]`` is the accuracy on task ``j`` after
        training step ``t``.

    Returns
    -------
    float
        ``mean_j R[-1, j]``.

    Examples
    --------
    >>> from skdkvb.continual.metrics import average_accuracy
    >>> average_accuracy([[0.9, 0.0], [0.7, 0.8]])
    0.75
    """
    R = _check_matrix(R)
    return float(R[-1].mean())


def forgetting(R: ArrayLike, *, per_task: bool = False) -> float | np.ndarray:
    """How much accuracy each earlier task lost by the end of the stream.

    ``forgetting_j = max_{t < T} R[t, j] - R[T, j]`` for every task ``j < T``
    (the last task cannot have been forgotten yet), where ``T`` is the last
    step. It is never below the drop from the best earlier accuracy, and can
    be negative only when the final accuracy beats every earlier one.

    Parameters
    ----------
    R : array-like of shape (n_tasks, n_tasks)
        Square accuracy matrix.
    per_task : bool, default=False
        Return the vector ``forgetting_j`` instead of its mean.

    Returns
    -------
    float or ndarray of shape (n_tasks - 1,)
        Mean forgetting over the first ``n_tasks - 1`` tasks (``nan`` for a
        single-task stream), or the per-task values.

    Examples
    --------
    >>> from skdkvb.continual.metrics import forgetting
    >>> R = [[0.9, 0.0, 0.0], [0.6, 0.8, 0.0], [0.5, 0.7, 0.9]]
    >>> round(forgetting(R), 6)  # ((0.9 - 0.5) + (0.8 - 0.7)) / 2
    0.25
    >>> forgetting(R, per_task=True).round(6)
    array([0.4, 0.1])
    """
    R = _check_matrix(R, square=True)
    T = R.shape[0] - 1
    per = R[:T, :T].max(axis=0) - R[T, :T] if T > 0 else np.empty(0)
    if per_task:
        return per
    return float(per.mean()) if per.size else float("nan")


def backward_transfer(R: ArrayLike) -> float:
    """Backward transfer (BWT) of GEM: effect of later tasks on earlier ones.

    ``BWT = mean_{j < T} (R[T, j] - R[j, j])``; negative values mean
    forgetting, positive values mean later training improved earlier tasks.

    Parameters
    ----------
    R : array-like of shape (n_tasks, n_tasks)
        Square accuracy matrix.

    Returns
    -------
    float
        The mean change of each earlier task's accuracy between the step that
        learned it and the last step; ``nan`` for a single-task stream.

    Examples
    --------
    >>> from skdkvb.continual.metrics import backward_transfer
    >>> R = [[0.9, 0.0, 0.0], [0.6, 0.8, 0.0], [0.5, 0.7, 0.9]]
    >>> round(backward_transfer(R), 6)  # ((0.5 - 0.9) + (0.7 - 0.8)) / 2
    -0.25
    """
    R = _check_matrix(R, square=True)
    T = R.shape[0] - 1
    if T == 0:
        return float("nan")
    return float(np.mean(R[T, :T] - np.diag(R)[:T]))


def accuracy_matrix_row(y_true: ArrayLike, y_pred: ArrayLike, task_classes: Sequence[ArrayLike]) -> np.ndarray:
    """Accuracy on each task's test samples: one row of the accuracy matrix.

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_samples,)
        True and predicted labels of the whole test set.
    task_classes : sequence of array-like
        The classes of each task; sample ``i`` belongs to the task whose
        classes contain ``y_true[i]``.

    Returns
    -------
    ndarray of shape (n_tasks,)
        Fraction of each task's test samples predicted right; ``nan`` for a
        task without test samples.

    Examples
    --------
    >>> from skdkvb.continual.metrics import accuracy_matrix_row
    >>> accuracy_matrix_row([0, 0, 1, 2], [0, 1, 1, 0], [[0, 1], [2]])
    array([0.66666667, 0.        ])
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    check_consistent_length(y_true, y_pred)
    row = np.full(len(task_classes), np.nan)
    correct = y_true == y_pred
    for j, classes in enumerate(task_classes):
        mask = np.isin(y_true, np.asarray(classes))
        if mask.any():
            row[j] = correct[mask].mean()
    return row


def per_class_accuracy(y_true: ArrayLike, y_pred: ArrayLike, classes: ArrayLike) -> np.ndarray:
    """Recall of every class: fraction of its test samples predicted right.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels.
    y_pred : array-like of shape (n_samples,)
        Predicted labels.
    classes : array-like of shape (n_classes,)
        Classes to report, in this order.

    Returns
    -------
    ndarray of shape (n_classes,)
        Recall of each class; ``nan`` for a class without test samples.

    Examples
    --------
    >>> from skdkvb.continual.metrics import per_class_accuracy
    >>> per_class_accuracy([0, 0, 1, 1], [0, 1, 1, 1], classes=[0, 1, 2])
    array([0.5, 1. , nan])
    """
    return accuracy_matrix_row(y_true, y_pred, [[c] for c in classes])


def expected_calibration_error(
    y_true: ArrayLike, proba: ArrayLike, *, classes: ArrayLike | None = None, n_bins: int = 15
) -> float:
    """Expected calibration error of the top-class confidence.

    Samples are binned by their highest predicted probability into
    ``n_bins`` equal-width bins on [0, 1]; the ECE is the sample-weighted
    mean, over bins, of ``|accuracy - mean confidence|`` (Guo et al., 2017).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels, from ``classes``.
    proba : array-like of shape (n_samples, n_classes)
        Predicted class probabilities; column ``k`` belongs to ``classes[k]``.
    classes : array-like of shape (n_classes,), default=None
        Labels of the columns of ``proba``; ``0 .. n_classes - 1`` if None.
    n_bins : int, default=15
        Number of equal-width confidence bins.

    Returns
    -------
    float
        The expected calibration error, in [0, 1]; 0 for perfectly calibrated
        confidences.

    Examples
    --------
    >>> import numpy as np
    >>> from skdkvb.continual.metrics import expected_calibration_error
    >>> proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.2, 0.8]])
    >>> round(expected_calibration_error([0, 1, 1, 1], proba, n_bins=10), 6)
    0.3
    """
    proba = check_array(proba, dtype=np.float64, input_name="proba")
    y_true = np.asarray(y_true)
    check_consistent_length(y_true, proba)
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    classes = np.arange(proba.shape[1]) if classes is None else np.asarray(classes)
    if classes.shape[0] != proba.shape[1]:
        raise ValueError(f"classes has {classes.shape[0]} entries but proba has {proba.shape[1]} columns.")
    confidence = proba.max(axis=1)
    correct = classes[proba.argmax(axis=1)] == y_true
    # np.digitize on interior edges puts confidence 1.0 in the last bin.
    edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    bins = np.digitize(confidence, edges, right=True)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.abs(
        np.bincount(bins, weights=correct, minlength=n_bins) - np.bincount(bins, weights=confidence, minlength=n_bins)
    )
    return float(gap.sum() / max(count.sum(), 1))
