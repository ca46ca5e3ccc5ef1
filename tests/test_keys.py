"""Key initialisation: EMA k-means and random keys."""

import numpy as np
import torch

from skdkvb._keys import init_keys_kmeans, init_keys_random
from skdkvb._search import nearest_keys


def blobs_queries(n=600, C=2, d=2, seed=0):
    rng = np.random.RandomState(seed)
    centres = rng.uniform(-5, 5, size=(6, C, d))
    labels = rng.randint(0, 6, n)
    data = torch.as_tensor(centres[labels] + 0.1 * rng.normal(size=(n, C, d)), dtype=torch.float32)
    return data, centres


def test_kmeans_is_deterministic_and_beats_random_keys():
    data, _ = blobs_queries()
    fn = lambda rows: data[torch.as_tensor(rows)]  # noqa: E731
    k1, info = init_keys_kmeans(fn, len(data), 12, np.random.RandomState(0), epochs=10, batch_size=128)
    k2, _ = init_keys_kmeans(fn, len(data), 12, np.random.RandomState(0), epochs=10, batch_size=128)
    assert torch.equal(k1, k2)
    kr = init_keys_random(fn, len(data), 12, np.random.RandomState(0))

    def quantisation_error(keys):
        idx = nearest_keys(data, keys)[:, :, 0]
        sel = keys[torch.arange(keys.shape[0])[None, :], idx]
        return float(((data - sel) ** 2).sum(-1).mean())

    assert quantisation_error(k1) < quantisation_error(kr)
    assert quantisation_error(k1) < 0.05  # every blob found a key of its own
    assert len(info["reseeded"]) == 10 and 0 < info["usage"] <= 1


def test_kmeans_reseeds_rarely_when_keys_outnumber_the_batch():
    # M >> batch: a per-batch dead-key rule would re-seed most keys each epoch.
    rng = np.random.RandomState(1)
    data = torch.as_tensor(rng.normal(size=(4000, 1, 2)), dtype=torch.float32)
    fn = lambda rows: data[torch.as_tensor(rows)]  # noqa: E731
    _, info = init_keys_kmeans(fn, len(data), 512, np.random.RandomState(0), epochs=4, batch_size=64)
    assert info["reseeded"][-1] < 0.25 * 512
    assert info["usage"] > 0.75


def test_random_keys_are_distinct_even_with_fewer_samples_than_keys():
    data = torch.zeros((3, 2, 4))
    data[:, :, 0] = torch.arange(3.0).view(3, 1)
    fn = lambda rows: data[torch.as_tensor(rows)]  # noqa: E731
    keys = init_keys_random(fn, 3, 10, np.random.RandomState(0))
    assert keys.shape == (2, 10, 4)
    assert torch.unique(keys[0], dim=0).shape[0] == 10
