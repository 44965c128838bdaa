"""A real Ctrl-C (SIGINT, under Python's own handler) sent by the training loop to itself at a chosen moment, for
the tests of what the exit save then holds."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def ctrl_c_as_grad_steps_reach(monkeypatch: pytest.MonkeyPatch, step: int) -> Iterator[None]:
    """Within the block, a `Trainer` sends itself SIGINT the moment its count of gradient steps becomes `step`:
    as the step's commit writes the count, inside the block that holds interrupts back."""
    from d4func.train import loop

    class CountersThatInterrupt(dict):
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            if key == "grad_steps" and value == step:
                os.kill(os.getpid(), signal.SIGINT)

    real_init = loop.Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.counters = CountersThatInterrupt(self.counters)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(loop.Trainer, "__init__", init)
            yield
    finally:
        signal.signal(signal.SIGINT, previous)
