"""Continual-learning evaluation: streams, metrics, baselines, data sets and plots.

Everything needed to measure a learner on a class-incremental stream lives
here, apart from the learner itself: :mod:`~skdkvb.continual.streams` cuts a
data set into tasks, :mod:`~skdkvb.continual.evaluation` drives a learner
through them, :mod:`~skdkvb.continual.metrics` scores the accuracy matrix,
:mod:`~skdkvb.continual.baselines` holds the comparison learners,
:mod:`~skdkvb.continual.datasets` the offline data sets and
:mod:`~skdkvb.continual.plotting` the figures (``matplotlib``, optional).
"""

from .evaluation import ContinualReport, evaluate_seeds, evaluate_stream, summarize
from .streams import Stream, class_incremental_split, iid_stream, unlabeled_split

__all__ = [
    "ContinualReport",
    "Stream",
    "class_incremental_split",
    "evaluate_seeds",
    "evaluate_stream",
    "iid_stream",
    "summarize",
    "unlabeled_split",
]
