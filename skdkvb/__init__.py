"""skdkvb: the Discrete Key-Value Bottleneck as a scikit-learn classifier.

A frozen encoder, frozen keys and trainable values: a classifier that keeps
learning new classes from a stream without forgetting old ones.

The estimator and the torch core are imported on first use (PEP 562), so that
``python -m skdkvb.benchmark --help`` and other torch-free entry points start
fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._show_versions import show_versions

__version__ = "0.1.0"

# Public name -> module that defines it (imported lazily).
_LAZY = {
    "DKVBClassifier": "._classifier",
    "PRESETS": "._classifier",
    "DiscreteKeyValueBottleneck": "._bottleneck",
}

__all__ = ["PRESETS", "DKVBClassifier", "DiscreteKeyValueBottleneck", "__version__", "show_versions"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
