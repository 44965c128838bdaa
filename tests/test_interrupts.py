"""A Ctrl-C inside `sigint_deferred` is held until the block has run, then delivered as the handler in place would."""

import os
import signal
import threading

import pytest

from d4func.train.interrupts import sigint_deferred


@pytest.fixture
def sigint_handler():
    """Install a SIGINT handler for the test (earlier tests and libraries may have replaced Python's), then restore."""
    previous = signal.getsignal(signal.SIGINT)
    yield lambda handler: signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_inside_the_block_is_delivered_after_it(sigint_handler) -> None:
    sigint_handler(signal.default_int_handler)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("rest of the block")
    assert done == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_custom_handler_runs_after_the_block_and_an_ignored_signal_stays_ignored(sigint_handler) -> None:
    order = []
    sigint_handler(lambda signum, frame: order.append("handler"))
    with sigint_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        order.append("block")
    assert order == ["block", "handler"]
    sigint_handler(signal.SIG_IGN)
    with sigint_deferred():
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    with sigint_deferred():  # no signal, nothing delivered
        pass


def test_under_the_default_action_a_held_ctrl_c_still_ends_the_process(tmp_path) -> None:
    import subprocess
    import sys

    script = ("import os, signal\nfrom d4func.train.interrupts import sigint_deferred\n"
              "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
              "with sigint_deferred():\n    os.kill(os.getpid(), signal.SIGINT)\n    print('block done', flush=True)\n"
              "print('after the block', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGINT and proc.stdout == "block done\n"


def test_outside_the_main_thread_the_block_runs_unchanged(sigint_handler) -> None:
    """Python runs signal handlers in the main thread only and refuses `signal.signal` elsewhere: a block entered
    from another thread must run without error and leave the main thread's handler alone."""
    sigint_handler(signal.default_int_handler)
    ran, errors = [], []

    def worker() -> None:
        try:
            with sigint_deferred():
                ran.append("block")
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=30)
    assert errors == [] and ran == ["block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
