"""skdkvb: the Discrete Key-Value Bottleneck as a scikit-learn classifier.

A frozen encoder, frozen keys and trainable values: a classifier that keeps
learning new classes from a stream without forgetting old ones.
"""

from ._bottleneck import DiscreteKeyValueBottleneck
from ._classifier import PRESETS, DKVBClassifier

__version__ = "0.1.0"

__all__ = ["DKVBClassifier", "DiscreteKeyValueBottleneck", "PRESETS", "__version__"]
