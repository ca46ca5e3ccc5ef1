"""Figures of the continual-learning benchmark, drawn with the optional matplotlib.

* :func:`plot_accuracy_matrices`: accuracy-matrix heatmaps side by side;
* :func:`plot_average_accuracy`: mean accuracy over the tasks seen so far,
  after each task, one line per method (mean ± std over seeds);
* :func:`plot_decision_regions`: the paper's 2-D toy figure, the predicted
  class over the plane after every task;
* :func:`plot_benchmark`: the two first ones in one figure (the CLI's PNG);
* :func:`seen_mask`: which accuracy-matrix cells score a task already seen.

Tasks and steps are numbered from 1 everywhere; cells of tasks not yet seen
are blank, since their zero accuracy is a consequence of the protocol, not a
measurement.

matplotlib is imported lazily, so the rest of skdkvb works without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "plot_accuracy_matrices",
    "plot_average_accuracy",
    "plot_benchmark",
    "plot_decision_regions",
    "seen_mask",
]


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError('Plotting needs matplotlib: pip install "skdkvb[plot]".') from exc
    return plt


def _mean_matrix(reports: Sequence[Any]) -> np.ndarray:
    return np.nanmean(np.stack([r.accuracy_matrix for r in reports]), axis=0)


def _group(reports: Iterable[Any]) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = {}
    for r in reports:
        groups.setdefault(r.name, []).append(r)
    return groups


def seen_mask(accuracy_matrix: np.ndarray) -> np.ndarray:
    """Which cells of an accuracy matrix score a task already trained on.

    In a class-incremental run (one step per task, a square matrix) task ``j``
    is unseen after step ``t`` when ``j > t``: its accuracy is zero by
    construction, not a measurement, so figures leave those cells blank. An
    i.i.d. run (fewer steps than tasks) has seen every task at every step.

    Parameters
    ----------
    accuracy_matrix : ndarray of shape (n_steps, n_tasks)
        ``R[t, j]``, the accuracy on task ``j`` after step ``t``.

    Returns
    -------
    mask : ndarray of bool, shape (n_steps, n_tasks)
        True where the task had been trained on.

    Examples
    --------
    >>> import numpy as np
    >>> from skdkvb.continual.plotting import seen_mask
    >>> seen_mask(np.ones((3, 3))).astype(int)
    array([[1, 0, 0],
           [1, 1, 0],
           [1, 1, 1]])
    """
    R = np.asarray(accuracy_matrix)
    if R.ndim != 2:
        raise ValueError(f"accuracy_matrix must be 2-D, got shape {R.shape}.")
    n_steps, n_tasks = R.shape
    if n_steps != n_tasks:
        return np.ones(R.shape, dtype=bool)
    return np.tril(np.ones(R.shape, dtype=bool))


def plot_accuracy_matrices(
    reports: Sequence[Any],
    *,
    axes: Sequence[Any] | None = None,
    annotate: bool = True,
    cmap: str = "viridis",
) -> Any:
    """Heatmaps of the accuracy matrix, one panel per method.

    Reports sharing a name (several seeds) are averaged into one panel. Tasks
    and steps are numbered from 1, as in :func:`plot_average_accuracy`; cells
    of tasks not yet trained on are left blank (see :func:`seen_mask`).

    Parameters
    ----------
    reports : sequence of ContinualReport
        The runs to draw; one panel per distinct ``name``.
    axes : sequence of matplotlib Axes, default=None
        One per method; a new figure if None.
    annotate : bool, default=True
        Write the accuracy in every seen cell.
    cmap : str, default="viridis"
        Colour map of the accuracies (0 to 1).

    Returns
    -------
    fig : matplotlib.figure.Figure
        The figure holding the panels.
    """
    plt = _pyplot()
    groups = _group(reports)
    if axes is None:
        n = len(groups)
        fig, axes = plt.subplots(1, n, figsize=(2.6 * n + 0.6, 2.9), squeeze=False)
        axes = axes[0]
    fig = axes[0].figure
    image = None
    for ax, (name, group) in zip(axes, groups.items()):
        R = _mean_matrix(group)
        seen = seen_mask(R)
        image = ax.imshow(np.ma.masked_array(R, mask=~seen), vmin=0.0, vmax=1.0, cmap=cmap)
        if annotate and R.size <= 100:
            for (t, j), v in np.ndenumerate(R):
                if seen[t, j]:
                    ax.text(j, t, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.5 else "black")  # fmt: skip
        ax.set_title(f"{name}\navg {R[-1].mean():.3f}", fontsize=9)
        ax.set_xlabel("evaluated task")
        ax.set_ylabel("after task" if R.shape[0] == R.shape[1] else "after step")
        ax.set_xticks(range(R.shape[1]), [str(j + 1) for j in range(R.shape[1])])
        ax.set_yticks(range(R.shape[0]), [str(t + 1) for t in range(R.shape[0])])
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="accuracy")
    return fig


def plot_average_accuracy(reports: Sequence[Any], *, ax: Any | None = None) -> Any:
    """Mean accuracy over the tasks seen so far after each task, per method.

    Tasks are numbered from 1, as in :func:`plot_accuracy_matrices`. A method
    trained in one i.i.d. step (an upper bound) is drawn as a dashed level line.

    Parameters
    ----------
    reports : sequence of ContinualReport
        Several seeds of one method are shown as mean ± std.
    ax : matplotlib Axes, default=None
        Where to draw; a new figure if None.

    Returns
    -------
    fig : matplotlib.figure.Figure
        The figure holding ``ax``.
    """
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 3.2))
    n_tasks = 1
    for name, group in _group(reports).items():
        curves = np.stack([r.average_accuracy_curve for r in group])
        steps = np.arange(1, curves.shape[1] + 1)
        mean, std = curves.mean(axis=0), curves.std(axis=0)
        if curves.shape[1] == 1:  # i.i.d. bound trained in one step: a level line
            ax.axhline(mean[0], linestyle="--", linewidth=1, label=name, color="grey")
            continue
        n_tasks = max(n_tasks, curves.shape[1])
        (line,) = ax.plot(steps, mean, marker="o", label=name)
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2, color=line.get_color())
    ax.set_xticks(range(1, n_tasks + 1))
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy on tasks seen")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ax.figure


def plot_benchmark(reports: Sequence[Any], *, title: str | None = None) -> Any:
    """Accuracy matrices of all methods plus the average-accuracy curves.

    Parameters
    ----------
    reports : sequence of ContinualReport
        All runs of the benchmark; i.i.d. bounds get no matrix, only a level
        line in the curves.
    title : str, default=None
        Figure title.

    Returns
    -------
    fig : matplotlib.figure.Figure
        The figure (matrices on the left, curves on the right).
    """
    plt = _pyplot()
    groups = [g for g in _group(reports).values() if g[0].kind != "iid"]
    n = len(groups)
    fig = plt.figure(figsize=(2.5 * n + 4.8, 3.2), layout="constrained")
    grid = fig.add_gridspec(1, n + 2)
    axes = [fig.add_subplot(grid[0, i]) for i in range(n)]
    flat = [r for g in groups for r in g]
    if flat:
        plot_accuracy_matrices(flat, axes=axes)
    plot_average_accuracy(reports, ax=fig.add_subplot(grid[0, n:]))
    if title:
        fig.suptitle(title)
    return fig


def plot_decision_regions(
    snapshots: Mapping[str, Sequence[Callable[[np.ndarray], np.ndarray]]],
    X: Any,
    y: Any,
    *,
    resolution: int = 150,
    padding: float = 0.25,
    titles: Sequence[str] | None = None,
) -> Any:
    """Predicted class over the plane after each task (2-D inputs only).

    Parameters
    ----------
    snapshots : dict of str -> list of callable
        For each method, one ``predict`` function per step (e.g. collected
        with the ``callback`` of :func:`~skdkvb.continual.evaluate_stream`).
        Rows of the figure are methods, columns are steps.
    X : array-like of shape (n_samples, 2)
        Points drawn on top (and used to set the plotting range).
    y : array-like of shape (n_samples,)
        Labels of ``X`` (colours of the points).
    resolution : int, default=150
        Grid points per axis.
    padding : float, default=0.25
        Margin around the data range.
    titles : list of str, default=None
        Column titles (``"after task t"``, counted from 1, if None).

    Returns
    -------
    fig : matplotlib.figure.Figure
        One row per method, one column per step.
    """
    plt = _pyplot()
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2 or X.shape[1] != 2:
        raise ValueError(f"X must have 2 features to draw regions, got shape {X.shape}.")
    lo, hi = X.min(axis=0) - padding, X.max(axis=0) + padding
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], resolution),
                         np.linspace(lo[1], hi[1], resolution))  # fmt: skip
    grid = np.c_[gx.ravel(), gy.ravel()].astype(X.dtype)
    n_rows = len(snapshots)
    n_cols = max(len(v) for v in snapshots.values())
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.2 * n_cols, 2.2 * n_rows),
                             squeeze=False, layout="constrained")  # fmt: skip
    classes = np.unique(y)
    cmap = plt.get_cmap("tab10", max(classes.size, 2))
    for i, (name, predictors) in enumerate(snapshots.items()):
        for t, predict in enumerate(predictors):
            ax = axes[i, t]
            zz = np.searchsorted(classes, predict(grid)).reshape(gx.shape)
            ax.contourf(gx, gy, zz, levels=np.arange(classes.size + 1) - 0.5,
                        cmap=cmap, alpha=0.35)  # fmt: skip
            ax.scatter(X[:, 0], X[:, 1], c=np.searchsorted(classes, y), cmap=cmap,
                       vmin=-0.5, vmax=classes.size - 0.5, s=3)  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[t] if titles else f"after task {t + 1}", fontsize=9)
            if t == 0:
                ax.set_ylabel(name, fontsize=9)
    return fig
