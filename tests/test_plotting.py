"""Figures of the benchmark: 1-based task numbering everywhere and blank unseen cells."""

import numpy as np
import pytest

from skdkvb.continual import ContinualReport
from skdkvb.continual.plotting import seen_mask

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


def _report(name, R, kind="class-incremental", seed=0):
    n_tasks = R.shape[1]
    return ContinualReport(name, R, [[2 * j, 2 * j + 1] for j in range(n_tasks)],
                           np.arange(2 * n_tasks), np.zeros((R.shape[0], 2 * n_tasks)),
                           [0.0] * R.shape[0], kind=kind, seed=seed)  # fmt: skip


def _lower(n, value=0.7):
    return np.tril(np.full((n, n), value))


def test_seen_mask_square_and_iid():
    np.testing.assert_array_equal(seen_mask(np.zeros((3, 3))), np.tril(np.ones((3, 3), bool)))
    # One i.i.d. step has seen every task.
    assert seen_mask(np.zeros((1, 4))).all()
    with pytest.raises(ValueError, match="2-D"):
        seen_mask(np.zeros(3))


def test_matrix_cells_of_unseen_tasks_are_blank():
    from skdkvb.continual.plotting import plot_accuracy_matrices

    R = _lower(4)
    fig = plot_accuracy_matrices([_report("m", R)])
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    assert np.ma.is_masked(shown)
    np.testing.assert_array_equal(np.ma.getmaskarray(shown), np.triu(np.ones((4, 4), bool), k=1))
    np.testing.assert_allclose(shown.compressed(), R[np.tril_indices(4)])
    # Only seen cells carry a number: 4 + 3 + 2 + 1.
    assert len(ax.texts) == 10
    assert all(t.get_text() == "0.70" for t in ax.texts)


def test_tasks_are_numbered_from_one_in_matrices_and_curves():
    from skdkvb.continual.plotting import plot_benchmark

    reports = [_report("m", _lower(5), seed=s) for s in (0, 1)]
    reports.append(_report("bound", np.full((1, 5), 0.9), kind="iid"))
    fig = plot_benchmark(reports, title="t")
    matrix_ax, curve_ax = fig.axes[0], fig.axes[-1]
    labels = [t.get_text() for t in matrix_ax.get_xticklabels()]
    assert labels == ["1", "2", "3", "4", "5"]
    assert [t.get_text() for t in matrix_ax.get_yticklabels()] == labels
    assert list(curve_ax.get_xticks()) == [1, 2, 3, 4, 5]
    (curve,) = [line for line in curve_ax.get_lines() if line.get_label() == "m"]
    np.testing.assert_array_equal(curve.get_xdata(), [1, 2, 3, 4, 5])
    # The i.i.d. bound gets no matrix panel, only a level line in the curves.
    assert [a.get_title().split("\n")[0] for a in fig.axes if a.images] == ["m"]
    assert any(line.get_label() == "bound" for line in curve_ax.get_lines())
