"""A Ctrl-C inside `sigint_deferred` is held until the block has run, then delivered as the handler in place would."""

import os
import signal

import pytest

from d4func.train.interrupts import sigint_deferred


def test_a_ctrl_c_inside_the_block_is_delivered_after_it() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("rest of the block")
    assert done == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_no_ctrl_c_no_interrupt_and_an_ignored_one_stays_ignored() -> None:
    with sigint_deferred():
        pass
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
