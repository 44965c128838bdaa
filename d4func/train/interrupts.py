"""Holding a Ctrl-C back until a block that must not be cut in two has run.

The online loop stores each collected batch in the replay and then counts it (episode ids, env steps, returns).
TorchRL's writer moves its cursor before it writes the batch column by column, so a `KeyboardInterrupt` raised in
between would leave a batch half written but counted by the replay's position, which the exit save records
(resuming then reads rows that mix two laps of the ring, or stops on duplicate steps), or written but not counted
by the loop. `sigint_deferred` runs such a block with SIGINT recorded instead of raised, and raises it (or runs the
handler that was installed) once the block is done.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["sigint_deferred"]


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Run the block with SIGINT held back; deliver it afterwards, to whatever handler was in place (Python's raises
    KeyboardInterrupt, SIG_DFL ends the process, SIG_IGN drops it). Outside the main thread (where Python delivers
    signals), or under a handler Python did not install (it cannot put one back), the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        signal.raise_signal(signal.SIGINT)
