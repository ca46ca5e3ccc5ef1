"""Accuracy-matrix metrics against hand-computed cases and their laws."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from skdkvb.continual.metrics import (
    accuracy_matrix_row,
    average_accuracy,
    backward_transfer,
    expected_calibration_error,
    forgetting,
    per_class_accuracy,
)

# A 3-task stream computed by hand:
#   average accuracy = (0.5 + 0.6 + 0.9) / 3 = 2.0 / 3
#   forgetting: task 0 best earlier 0.9, final 0.5 -> 0.4;
#               task 1 best earlier 0.8, final 0.6 -> 0.2; mean 0.3
#   BWT: ((0.5 - 0.9) + (0.6 - 0.8)) / 2 = -0.3
R_HAND = np.array([[0.9, 0.0, 0.0], [0.7, 0.8, 0.0], [0.5, 0.6, 0.9]])


def test_hand_computed_case():
    assert average_accuracy(R_HAND) == pytest.approx(2.0 / 3)
    assert forgetting(R_HAND) == pytest.approx(0.3)
    np.testing.assert_allclose(forgetting(R_HAND, per_task=True), [0.4, 0.2])
    assert backward_transfer(R_HAND) == pytest.approx(-0.3)


def test_forgetting_uses_best_earlier_not_diagonal():
    # Task 0 improves after task 1 and then drops: forgetting counts from the
    # peak (0.95), BWT from the diagonal (0.8). Hand values: F_0 = 0.35, F_1 = 0,
    # BWT = ((0.6 - 0.8) + (0.9 - 0.9)) / 2 = -0.1.
    R3 = np.array([[0.8, 0.0, 0.0], [0.95, 0.9, 0.0], [0.6, 0.9, 0.7]])
    assert forgetting(R3, per_task=True) == pytest.approx([0.35, 0.0])
    assert backward_transfer(R3) == pytest.approx(-0.1)


def test_positive_backward_transfer_and_negative_forgetting():
    R = np.array([[0.5, 0.0], [0.7, 0.9]])
    assert backward_transfer(R) == pytest.approx(0.2)
    assert forgetting(R) == pytest.approx(-0.2)


def test_single_task_is_nan():
    assert np.isnan(forgetting([[0.7]]))
    assert np.isnan(backward_transfer([[0.7]]))
    assert average_accuracy([[0.7]]) == pytest.approx(0.7)


@pytest.mark.parametrize("bad", [[[1.5, 0.0], [0.2, 0.3]], [[-0.1, 0.0], [0.2, 0.3]]])
def test_out_of_range_rejected(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        average_accuracy(bad)


def test_non_square_rejected_for_forgetting():
    with pytest.raises(ValueError, match="square"):
        forgetting(np.full((1, 3), 0.5))
    with pytest.raises(ValueError, match="square"):
        backward_transfer(np.full((2, 3), 0.5))


square = st.integers(1, 6).flatmap(lambda n: arrays(np.float64, (n, n), elements=st.floats(0, 1, allow_nan=False)))


@settings(max_examples=60, deadline=None)
@given(square)
def test_metric_ranges(R):
    assert 0.0 <= average_accuracy(R) <= 1.0
    if R.shape[0] > 1:
        f = forgetting(R, per_task=True)
        assert np.all(f >= -1.0) and np.all(f <= 1.0)
        # Forgetting measured from the best earlier accuracy is at least the
        # drop from the diagonal: F_j >= -(R[T, j] - R[j, j]), so F >= -BWT.
        assert forgetting(R) >= -backward_transfer(R) - 1e-12
        assert -1.0 <= backward_transfer(R) <= 1.0


@settings(max_examples=40, deadline=None)
@given(square)
def test_no_forgetting_when_accuracies_never_drop(R):
    # Make every column non-decreasing down the rows: no task is ever forgotten.
    R = np.maximum.accumulate(R, axis=0)
    if R.shape[0] > 1:
        assert forgetting(R) <= 1e-12
        assert backward_transfer(R) >= -1e-12


def test_accuracy_matrix_row_and_per_class():
    y_true = np.array([0, 0, 1, 1, 2, 2, 3])
    y_pred = np.array([0, 1, 1, 1, 0, 2, 0])
    np.testing.assert_allclose(accuracy_matrix_row(y_true, y_pred, [[0, 1], [2, 3]]), [3 / 4, 1 / 3])
    np.testing.assert_allclose(per_class_accuracy(y_true, y_pred, [3, 2, 1, 0]), [0.0, 0.5, 1.0, 0.5])
    row = accuracy_matrix_row(y_true, y_pred, [[0], [9]])
    assert row[0] == 0.5 and np.isnan(row[1])


def test_ece_hand_case_and_perfect_calibration():
    # Two bins: confidence 0.9 with accuracy 0.5, confidence 0.8 with accuracy 1.
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.2, 0.8]])
    assert expected_calibration_error([0, 1, 1, 1], proba, n_bins=10) == pytest.approx(0.3)
    # Confident and right everywhere: ECE 0. Labels mapped through classes=.
    onehot = np.eye(3)[[0, 2, 1]]
    assert expected_calibration_error(["a", "c", "b"], onehot, classes=["a", "b", "c"]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="columns"):
        expected_calibration_error([0], np.ones((1, 2)) / 2, classes=[0, 1, 2])
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0], np.ones((1, 2)) / 2, n_bins=0)


@st.composite
def labelled_tasks(draw):
    """Labels 0..n_classes-1 cut into consecutive tasks, and a labelled test set."""
    n_classes = draw(st.integers(1, 6))
    cuts = draw(st.lists(st.integers(1, n_classes - 1), unique=True, max_size=n_classes - 1)) if n_classes > 1 else []
    bounds = [0, *sorted(cuts), n_classes]
    tasks = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
    n = draw(st.integers(1, 30))
    y_true = draw(arrays(np.int64, n, elements=st.integers(0, n_classes - 1)))
    y_pred = draw(arrays(np.int64, n, elements=st.integers(0, n_classes - 1)))
    return y_true, y_pred, tasks


@settings(max_examples=60, deadline=None)
@given(labelled_tasks())
def test_accuracy_matrix_row_matches_per_sample_count(case):
    y_true, y_pred, tasks = case
    row = accuracy_matrix_row(y_true, y_pred, tasks)
    assert row.shape == (len(tasks),)
    for j, classes in enumerate(tasks):
        hits = [t == p for t, p in zip(y_true, y_pred) if t in classes]
        if hits:
            assert row[j] == pytest.approx(sum(hits) / len(hits))
        else:
            assert np.isnan(row[j])
    # Per-class accuracy is the row for one-class tasks, in the requested order.
    classes = sorted({c for task in tasks for c in task}, reverse=True)
    np.testing.assert_array_equal(
        per_class_accuracy(y_true, y_pred, classes), accuracy_matrix_row(y_true, y_pred, [[c] for c in classes])
    )


@st.composite
def probabilities(draw):
    n, k = draw(st.integers(1, 25)), draw(st.integers(2, 4))
    raw = draw(arrays(np.float64, (n, k), elements=st.floats(0.01, 1.0)))
    proba = raw / raw.sum(axis=1, keepdims=True)
    y = draw(arrays(np.int64, n, elements=st.integers(0, k - 1)))
    return y, proba, draw(st.integers(1, 12))


@settings(max_examples=60, deadline=None)
@given(probabilities())
def test_ece_matches_per_bin_reference(case):
    y, proba, n_bins = case
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    # Bin b holds confidences in (b / n_bins, (b + 1) / n_bins]; the first bin also holds 0.
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    expected = sum(
        abs(correct[bins == b].sum() - conf[bins == b].sum()) for b in range(n_bins) if (bins == b).any()
    ) / len(y)
    # Confidences exactly on a bin edge may fall either side of it in floating point.
    on_edge = np.isclose(conf * n_bins, np.round(conf * n_bins))
    if not on_edge.any():
        assert expected_calibration_error(y, proba, n_bins=n_bins) == pytest.approx(expected, abs=1e-12)
    # One bin: the gap between accuracy and mean confidence, whatever the edges.
    assert expected_calibration_error(y, proba, n_bins=1) == pytest.approx(abs(correct.mean() - conf.mean()))
