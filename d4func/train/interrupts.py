"""Interrupts of a training run: Ctrl-C (SIGINT) and termination (SIGTERM: a scheduler's preemption, `kill`).

Both end a single-process run the same way: the loop catches the `KeyboardInterrupt` and saves a checkpoint from
which the run resumes exactly (`Trainer.training`). SIGTERM's default action ends the process at once, so during
training `sigterm_raises` turns it into `Terminated`, a `KeyboardInterrupt`; a Ctrl-C then lets the run finish its
final evaluation, a SIGTERM only saves and stops (a scheduler allows seconds, not an evaluation, before SIGKILL).

A data-parallel run cannot stop where the signal lands: its exit save is a collective, and each rank would be
somewhere else. There `sigterm_recorded` only notes the SIGTERM, and the loop asks every rank at each step boundary
whether any got one (`Trainer.stop_if_terminated`, one all-reduce), so that all raise `Terminated` at the same
point and save together. A preempted multi-GPU job thus keeps everything up to its last finished step.

Some blocks must not be cut in two. The online loop stores each collected batch in the replay and then counts it
(episode ids, env steps, returns). TorchRL's writer moves its cursor before it writes the batch column by column, so
an interrupt raised in between would leave a batch half written but counted by the replay's position, which the
exit save records (resuming then reads rows that mix two laps of the ring, or stops on duplicate steps), or written
but not counted by the loop. `interrupts_deferred` runs such a block with SIGINT and SIGTERM recorded instead of
delivered, and delivers them (to the handlers that were installed) once the block is done.

The online loop also holds them while the collector steps the env for a batch, so that a stop lands where the env,
the replay and the counters agree and the run resumes exactly, mid-episode included. That costs at most one
batch's collection (`loop.collect_steps` env steps); a second Ctrl-C (or SIGTERM) during it stops at once, and the
resumed run then starts a new episode.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["Terminated", "interrupts_deferred", "sigterm_raises", "sigterm_recorded"]

DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while `sigterm_raises` was active: the run saves its state and stops."""


def _in_main_thread() -> bool:
    # Python runs signal handlers in the main thread only and refuses `signal.signal` in any other.
    return threading.current_thread() is threading.main_thread()


@contextmanager
def interrupts_deferred(repeat_stops_now: bool = False, notice: Callable[[], None] | None = None) -> Iterator[None]:
    """Run the block with SIGINT and SIGTERM held back; deliver them afterwards, SIGTERM first (the stronger
    request: a handler that raises ends the delivery), to whatever handler was in place (Python's SIGINT handler
    raises KeyboardInterrupt, `sigterm_raises`'s raises Terminated, SIG_DFL ends the process, SIG_IGN drops it).
    Outside the main thread the block runs unchanged, and so does a signal whose handler Python did not install
    (it cannot put one back). A block that raises drops what it held: its exception already stops the caller, and
    a KeyboardInterrupt raised over it would hide the error.

    For a long block that is worth finishing but not worth waiting for at any price (collecting a batch):
    `repeat_stops_now` delivers a second signal at once, inside the block, and `notice` is called when the first
    is held (to tell the user the run stops after the block, and that a second Ctrl-C stops it now). A nested
    deferred block holds its signals from this one until it is done."""
    if not _in_main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: object) -> None:
        if repeat_stops_now and received:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)  # Python's raises KeyboardInterrupt, sigterm_raises' Terminated
            elif handler == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
            return
        received.append(signum)
        if notice is not None and len(received) == 1:
            notice()

    previous = {signum: signal.getsignal(signum) for signum in DEFERRED_SIGNALS if signal.getsignal(signum) is not None}
    for signum in previous:  # `previous` is complete before `hold` can run
        signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    # Each once: a second Ctrl-C inside the block asks for nothing more than the first.
    for signum in sorted(set(received), key=lambda signum: signum != signal.SIGTERM):
        signal.raise_signal(signum)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"received {signal.Signals(signum).name}")


@contextmanager
def _sigterm_handled_by(handler: Callable[[int, object], None]) -> Iterator[None]:
    """`handler` takes SIGTERM for the block where SIGTERM has its default action (a handler the program installed
    stays in charge) and this is the main thread; the previous handler is back after the block."""
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (a KeyboardInterrupt) where it would otherwise end the process
    on the spot (its default action); a handler the program installed stays in charge, and outside the main thread
    nothing changes. The previous handler is back after the block."""
    with _sigterm_handled_by(_raise_terminated):
        yield


@contextmanager
def sigterm_recorded() -> Iterator[Callable[[], bool]]:
    """Within the block SIGTERM is noted, not acted on; yields a function that tells whether one came. Where the
    program installed its own SIGTERM handler, or outside the main thread, nothing changes and the function stays
    False. The previous handler is back after the block (a SIGTERM noted but not acted on is then dropped: the
    block's owner has had its chance to see it)."""
    received: list[int] = []
    with _sigterm_handled_by(lambda signum, frame: received.append(signum)):
        yield lambda: bool(received)
