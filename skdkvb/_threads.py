"""How many CPUs this process may use, and the cap that keeps torch's intra-op threads within them.

torch sizes its thread pool from the machine's cores, not from the CPUs a
process may actually run on. In a container with a CPU quota, under ``taskset``
or on a shared machine, its threads then oversubscribe the allowed CPUs, and a
job can run many times slower than it should. :func:`cap_torch_threads`, called
once when skdkvb is imported, lowers ``torch.get_num_threads()`` to the number
of usable CPUs (:func:`available_cpus`: the CPU affinity mask and the cgroup
CPU quota). It never raises torch's setting.

Environment variable
--------------------
``SKDKVB_NUM_THREADS``
    A positive integer caps torch's threads at that number instead of the
    usable CPUs; ``0`` leaves torch's setting alone. A ``torch.set_num_threads``
    call made *after* importing skdkvb always wins; one made before importing
    skdkvb is lowered to the cap if it exceeds it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

ENV = "SKDKVB_NUM_THREADS"


@functools.lru_cache(maxsize=4)
def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup CPU quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), ``None`` if unlimited.

    Read once per process (the search asks on every call).
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max" and float(period) > 0:
            return float(quota) / float(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = float((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = float((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def available_cpus() -> int:
    """Number of CPUs this process may use: its affinity mask, bounded by the cgroup CPU quota.

    Returns
    -------
    int
        At least 1.

    Examples
    --------
    >>> from skdkvb._threads import available_cpus
    >>> available_cpus() >= 1
    True
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def thread_cap() -> int | None:
    """The most threads torch may use, from ``SKDKVB_NUM_THREADS`` or the usable CPUs.

    Returns
    -------
    int or None
        ``None`` when ``SKDKVB_NUM_THREADS=0`` (no cap).

    Raises
    ------
    ValueError
        If ``SKDKVB_NUM_THREADS`` is not a non-negative integer.
    """
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return available_cpus()
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{ENV}={raw!r} is not a non-negative integer; set it to a thread count, or 0 for no cap.")
    return None if value == 0 else value


@contextlib.contextmanager
def limit_torch_threads(n: int) -> Iterator[int]:
    """Run a block with at most ``n`` torch intra-op threads, then restore the previous count.

    For loops of many small torch ops (an SGD epoch over cached indices on
    ``(batch, n_classes)`` tensors): each op's thread hand-off costs more than
    the op, and on a loaded machine a descheduled worker thread stalls every
    op. torch's thread count is process-wide, so other threads of the process
    see the lower count while the block runs.

    Parameters
    ----------
    n : int
        The most threads inside the block (only lowers, never raises).

    Yields
    ------
    int
        The thread count inside the block.

    Examples
    --------
    >>> import torch
    >>> from skdkvb._threads import limit_torch_threads
    >>> before = torch.get_num_threads()
    >>> with limit_torch_threads(1) as inside:
    ...     inside
    1
    >>> torch.get_num_threads() == before
    True
    """
    import torch

    prev = torch.get_num_threads()
    if n < prev:
        torch.set_num_threads(max(1, n))
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != prev:
            torch.set_num_threads(prev)


def cap_torch_threads() -> int:
    """Lower torch's intra-op thread count to :func:`thread_cap` (never raise it).

    Returns
    -------
    int
        ``torch.get_num_threads()`` after the call. An invalid
        ``SKDKVB_NUM_THREADS`` gives a ``RuntimeWarning`` and no change.

    Examples
    --------
    >>> import torch
    >>> from skdkvb._threads import available_cpus, cap_torch_threads
    >>> cap_torch_threads() <= max(available_cpus(), torch.get_num_threads())
    True
    """
    import torch

    try:
        cap = thread_cap()
    except ValueError as exc:  # a bad setting must not break ``import skdkvb``
        warnings.warn(str(exc), RuntimeWarning, stacklevel=2)
        return torch.get_num_threads()
    if cap is not None and torch.get_num_threads() > cap:
        torch.set_num_threads(cap)
    return torch.get_num_threads()
