"""skdkvb: the Discrete Key-Value Bottleneck as a scikit-learn classifier.

A frozen encoder, frozen keys and trainable values: a classifier that keeps
learning new classes from a stream without forgetting old ones.
"""

from ._bottleneck import DiscreteKeyValueBottleneck
from ._classifier import PRESETS, DKVBClassifier
from ._show_versions import show_versions
from ._threads import cap_torch_threads

__version__ = "0.1.0"

# Never run more torch threads than the CPUs this process may use (affinity,
# cgroup quota): oversubscribed cores made small ops 2-30x slower under load.
# SKDKVB_NUM_THREADS=N sets the cap, 0 leaves torch alone.
cap_torch_threads()

__all__ = ["PRESETS", "DKVBClassifier", "DiscreteKeyValueBottleneck", "__version__", "show_versions"]
