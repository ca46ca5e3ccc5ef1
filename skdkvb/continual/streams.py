"""Class-incremental streams: task splits, i.i.d. streams and unlabeled splits for key fitting."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_X_y

__all__ = ["Stream", "class_incremental_split", "iid_stream", "unlabeled_split"]


@dataclass
class Stream:
    """A sequence of training batches and the task partition used to score.

    Iterating yields the ``(X, y)`` of every step in order.

    Parameters
    ----------
    steps : list of tuple (X, y)
        The training data of every step, in the order it is presented.
    task_classes : list of ndarray
        Classes of every evaluation task: column ``j`` of the accuracy matrix
        is the accuracy on test samples whose label is in ``task_classes[j]``.
    kind : {"class-incremental", "iid"}, default="class-incremental"
        How the steps were made.
    random_state : int or None, default=None
        Seed the stream was made with (recorded in reports).
    """

    steps: list
    task_classes: list
    kind: str = "class-incremental"
    random_state: int | None = None

    def __iter__(self):
        return iter(self.steps)

    def __len__(self):
        return len(self.steps)

    @property
    def classes(self):
        """All classes of the stream, in task order."""
        return np.concatenate([np.asarray(c) for c in self.task_classes])

    @property
    def class_order(self):
        """Alias of :attr:`classes`: the order classes arrive in."""
        return self.classes

    def iid(self, n_steps=1, random_state=None):
        """The same training data shuffled into ``n_steps`` i.i.d. batches.

        Training on it gives the i.i.d. upper bound of a learner; the report
        keeps this stream's task partition, so its final row is comparable.

        Parameters
        ----------
        n_steps : int, default=1
            Number of batches, between 1 and the number of samples.
        random_state : int or None, default=None
            Seed of the shuffle; defaults to the stream's own seed.

        Returns
        -------
        Stream
            An i.i.d. stream (``kind="iid"``) with this stream's task partition.
        """
        X = np.concatenate([s[0] for s in self.steps])
        y = np.concatenate([s[1] for s in self.steps])
        seed = self.random_state if random_state is None else random_state
        return iid_stream(X, y, n_steps=n_steps, task_classes=self.task_classes,
                          random_state=seed)  # fmt: skip


def _resolve_order(class_order, classes, rng):
    if isinstance(class_order, str):
        if class_order == "fixed":
            return classes.copy()
        if class_order == "random":
            return rng.permutation(classes)
        raise ValueError(f"class_order must be 'random', 'fixed' or a list of classes, got {class_order!r}.")
    order = np.asarray(class_order)
    if order.ndim != 1 or order.shape[0] != classes.shape[0] or not np.array_equal(np.sort(order), classes):
        raise ValueError(
            "class_order must list every class of y exactly once; y has classes "
            f"{classes.tolist()}, got {order.tolist()}."
        )
    return order


def class_incremental_split(X, y, n_tasks=5, class_order="random", random_state=0, *, shuffle=True):
    """Split ``(X, y)`` into tasks with disjoint classes.

    The class order is cut into ``n_tasks`` consecutive groups of (nearly)
    equal size, and task ``t`` holds every sample whose label is in group
    ``t``. No task identity is passed to the learner.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Training inputs.
    y : array-like of shape (n_samples,)
        Class labels.
    n_tasks : int, default=5
        Number of tasks, between 1 and the number of classes.
    class_order : {"random", "fixed"} or array-like, default="random"
        ``"random"``: a permutation drawn from ``random_state`` (the paper
        shuffles the class order per seed); ``"fixed"``: sorted labels; or an
        explicit order listing every class once.
    random_state : int, RandomState instance or None, default=0
        Seed of the class order and of the sample order within tasks.
    shuffle : bool, default=True
        Shuffle samples within each task (they stay grouped by task).

    Returns
    -------
    Stream
        One step per task, with the task partition used for scoring.

    Examples
    --------
    >>> import numpy as np
    >>> from skdkvb.continual import class_incremental_split
    >>> X, y = np.arange(12.0).reshape(6, 2), np.array([0, 0, 1, 1, 2, 2])
    >>> stream = class_incremental_split(X, y, n_tasks=2, class_order="fixed")
    >>> [t.tolist() for t in stream.task_classes]
    [[0, 1], [2]]
    >>> [sorted(yt.tolist()) for _, yt in stream]
    [[0, 0, 1, 1], [2, 2]]
    """
    X, y = check_X_y(X, y, accept_sparse=False, dtype=None, allow_nd=True)
    check_classification_targets(y)
    classes = np.unique(y)
    if not isinstance(n_tasks, (int, np.integer)) or not 1 <= n_tasks <= classes.size:
        raise ValueError(
            f"n_tasks must be an integer between 1 and the number of classes ({classes.size}), got {n_tasks!r}."
        )
    rng = check_random_state(random_state)
    order = _resolve_order(class_order, classes, rng)
    groups = np.array_split(order, n_tasks)
    steps = []
    for group in groups:
        idx = np.flatnonzero(np.isin(y, group))
        if shuffle:
            idx = rng.permutation(idx)
        steps.append((X[idx], y[idx]))
    seed = random_state if isinstance(random_state, (int, np.integer)) else None
    return Stream(steps=steps, task_classes=list(groups), random_state=seed)


def iid_stream(X, y, n_steps=1, *, task_classes=None, random_state=0):
    """Shuffle ``(X, y)`` into ``n_steps`` batches drawn i.i.d.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Training inputs.
    y : array-like of shape (n_samples,)
        Class labels.
    n_steps : int, default=1
        Number of batches, between 1 and ``n_samples``.
    task_classes : list of array-like, default=None
        Task partition used for scoring; one class per task if None.
    random_state : int, RandomState instance or None, default=0
        Seed of the shuffle.

    Returns
    -------
    Stream
        ``n_steps`` shuffled batches, with ``kind="iid"``.

    Examples
    --------
    >>> import numpy as np
    >>> from skdkvb.continual import iid_stream
    >>> s = iid_stream(np.zeros((10, 1)), np.arange(10) % 2, n_steps=2)
    >>> len(s), [len(yt) for _, yt in s]
    (2, [5, 5])
    """
    X, y = check_X_y(X, y, dtype=None, allow_nd=True)
    check_classification_targets(y)
    if not isinstance(n_steps, (int, np.integer)) or not 1 <= n_steps <= y.size:
        raise ValueError(f"n_steps must be between 1 and n_samples, got {n_steps!r}.")
    if task_classes is None:
        task_classes = [np.array([c]) for c in np.unique(y)]
    rng = check_random_state(random_state)
    idx = rng.permutation(y.size)
    steps = [(X[i], y[i]) for i in np.array_split(idx, n_steps)]
    seed = random_state if isinstance(random_state, (int, np.integer)) else None
    return Stream(steps=steps, task_classes=[np.asarray(c) for c in task_classes],
                  kind="iid", random_state=seed)  # fmt: skip


def unlabeled_split(X, y, unlabeled_size=0.1, *, random_state=0):
    """Hold out a stratified share of the training inputs without labels.

    The held-out inputs serve unsupervised steps done before the stream
    starts (DKVB's key initialisation, a scaler, a PCA); the rest is streamed.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Training inputs.
    y : array-like of shape (n_samples,)
        Class labels; the split is stratified on them.
    unlabeled_size : float or int, default=0.1
        Share (or number) of samples whose labels are dropped.
    random_state : int, RandomState instance or None, default=0
        Seed of the split.

    Returns
    -------
    X_unlabeled : ndarray of shape (n_unlabeled, n_features)
        The held-out inputs, without their labels.
    X_labeled : ndarray of shape (n_samples - n_unlabeled, n_features)
        The inputs left for the stream.
    y_labeled : ndarray of shape (n_samples - n_unlabeled,)
        Labels of ``X_labeled``.

    Examples
    --------
    >>> import numpy as np
    >>> from skdkvb.continual import unlabeled_split
    >>> X_u, X_l, y_l = unlabeled_split(np.zeros((20, 3)), np.arange(20) % 2)
    >>> X_u.shape, X_l.shape
    ((2, 3), (18, 3))
    """
    X, y = check_X_y(X, y, dtype=None, allow_nd=True)
    X_l, X_u, y_l, _ = train_test_split(X, y, test_size=unlabeled_size, stratify=y, random_state=random_state)
    return X_u, X_l, y_l
