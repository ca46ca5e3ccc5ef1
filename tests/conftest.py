"""Owns the shared test configuration: torch threads, the gpu and slow markers, common fixtures.

Tests assert behaviour, never speed. Torch's intra-op thread pool is limited
to one thread so that tests stay quick when several processes (GridSearchCV
workers, pytest-xdist) share the two CI cores: spinning OpenMP pools fighting
over cores can make tiny ops hundreds of times slower.
"""

import signal
import threading

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

# A shell without job control starts background jobs with SIGINT ignored, and
# Python then keeps ignoring it: a simulated or real Ctrl-C would do nothing and
# the interrupt tests would fail for a reason that has nothing to do with the
# code. Give Python's own handler back, as in an interactive run.
if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

HAS_CUDA = torch.cuda.is_available()

# A test whose call phase takes longer than this and is not marked slow is
# listed at the end of the run, so that `pytest -m "not slow"` stays quick.
SLOW_SECONDS = 5.0
_unmarked_slow: list[tuple[str, float]] = []


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report):
    if report.when == "call" and report.duration > SLOW_SECONDS and "slow" not in report.keywords:
        _unmarked_slow.append((report.nodeid, report.duration))


def pytest_terminal_summary(terminalreporter):
    if _unmarked_slow:
        terminalreporter.section("tests slower than 5 s without @pytest.mark.slow")
        for nodeid, duration in sorted(_unmarked_slow, key=lambda item: -item[1]):
            terminalreporter.write_line(f"{duration:6.1f} s  {nodeid}")


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


@pytest.fixture(scope="module")
def client():
    """A Dask client on a 2-process LocalCluster, one per test module.

    Worker processes, not threads: every model shipped to a worker really goes
    through pickling. Skips where the ``dask`` extra is not installed.
    """
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            worker_dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c
