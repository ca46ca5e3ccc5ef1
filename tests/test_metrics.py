"""Accuracy-matrix metrics against hand-computed cases and their laws."""

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


square = st.integers(1, 6).flatmap(
    lambda n: arrays(np.float64, (n, n), elements=st.floats(0, 1, allow_nan=False))
)


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
    np.testing.assert_allclose(accuracy_matrix_row(y_true, y_pred, [[0, 1], [2, 3]]),
                               [3 / 4, 1 / 3])
    np.testing.assert_allclose(per_class_accuracy(y_true, y_pred, [3, 2, 1, 0]),
                               [0.0, 0.5, 1.0, 0.5])
    row = accuracy_matrix_row(y_true, y_pred, [[0], [9]])
    assert row[0] == 0.5 and np.isnan(row[1])


def test_ece_hand_case_and_perfect_calibration():
    # Two bins: confidence 0.9 with accuracy 0.5, confidence 0.8 with accuracy 1.
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.2, 0.8]])
    assert expected_calibration_error([0, 1, 1, 1], proba, n_bins=10) == pytest.approx(0.3)
    # Confident and right everywhere: ECE 0. Labels mapped through classes=.
    onehot = np.eye(3)[[0, 2, 1]]
    assert expected_calibration_error(["a", "c", "b"], onehot,
                                      classes=["a", "b", "c"]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="columns"):
        expected_calibration_error([0], np.ones((1, 2)) / 2, classes=[0, 1, 2])
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0], np.ones((1, 2)) / 2, n_bins=0)
