"""Shared test configuration.

Tests assert behaviour, never speed. Torch's intra-op thread pool is limited
to one thread so that tests stay quick when several processes (GridSearchCV
workers, pytest-xdist) share the two CI cores: spinning OpenMP pools fighting
over cores can make tiny ops hundreds of times slower.
"""

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def blobs():
    """A small 4-class, 6-feature problem that DKVB separates easily."""
    from sklearn.datasets import make_blobs

    X, y = make_blobs(n_samples=240, centers=4, n_features=6, cluster_std=1.0, random_state=0)
    return X.astype(np.float64), y


@pytest.fixture
def small_params():
    """A configuration small enough for fast tests."""
    return dict(n_heads=8, n_keys=32, key_dim=3, key_init_epochs=2, max_epochs=5, device="cpu", random_state=0)
