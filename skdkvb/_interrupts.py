"""Ctrl-C held back over short sections that must not be cut in half.

A KeyboardInterrupt can surface at any bytecode of the main thread. Two places
must not be split by one: the commit of a training call (the model would be
half-written) and the hand-out of work to the native search's threads (a
worker could still be writing into buffers that the caller has released).
"""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def defer_sigint():
    """Hold back SIGINT (Ctrl-C) during a short section; re-deliver it after.

    Only the main thread receives signals and can install handlers; elsewhere
    this is a no-op. A SIGINT that the process ignores stays ignored.

    Examples
    --------
    >>> from skdkvb._interrupts import defer_sigint
    >>> with defer_sigint():
    ...     total = sum(range(10))
    >>> total
    45
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except (ValueError, OSError):  # e.g. an embedded interpreter without signals
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt
