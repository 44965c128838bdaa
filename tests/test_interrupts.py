"""A Ctrl-C or SIGTERM inside `interrupts_deferred` is held until the block has run, then delivered as the handler in
place would; `sigterm_raises` turns SIGTERM's default action into `Terminated`, a KeyboardInterrupt."""

import os
import signal
import threading

import pytest

from d4func.train.interrupts import Terminated, interrupts_deferred, sigterm_raises, sigterm_recorded


@pytest.fixture
def sigterm_default():
    """SIGTERM at its default action for the test, and whatever was there put back after it."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


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
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("rest of the block")
    assert done == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_block_that_raises_keeps_its_error_and_drops_the_held_ctrl_c(sigint_handler) -> None:
    sigint_handler(signal.default_int_handler)
    with pytest.raises(ValueError, match="the block's own error"):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            raise ValueError("the block's own error")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_custom_handler_runs_after_the_block_and_an_ignored_signal_stays_ignored(sigint_handler) -> None:
    order = []
    sigint_handler(lambda signum, frame: order.append("handler"))
    with interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        order.append("block")
    assert order == ["block", "handler"]
    sigint_handler(signal.SIG_IGN)
    with interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    with interrupts_deferred():  # no signal, nothing delivered
        pass


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_under_the_default_action_a_held_signal_still_ends_the_process(signum) -> None:
    import subprocess
    import sys

    script = ("import os, signal\nfrom d4func.train.interrupts import interrupts_deferred\n"
              f"signal.signal({int(signum)}, signal.SIG_DFL)\n"
              f"with interrupts_deferred():\n    os.kill(os.getpid(), {int(signum)})\n"
              "    print('block done', flush=True)\n"
              "print('after the block', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signum and proc.stdout == "block done\n"


def test_outside_the_main_thread_the_block_runs_unchanged(sigint_handler) -> None:
    """Python runs signal handlers in the main thread only and refuses `signal.signal` elsewhere: a block entered
    from another thread must run without error and leave the main thread's handler alone."""
    sigint_handler(signal.default_int_handler)
    ran, errors = [], []

    def worker() -> None:
        try:
            with interrupts_deferred():
                ran.append("block")
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=30)
    assert errors == [] and ran == ["block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_raises_terminated_within_the_block_and_its_default_action_is_back_after(sigterm_default) -> None:
    with pytest.raises(Terminated, match="SIGTERM"):
        with sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("the SIGTERM did not raise")  # Python runs the handler before this line
    assert issubclass(Terminated, KeyboardInterrupt)  # the loop's Ctrl-C handling saves the run
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_sigterm_handler_the_program_installed_stays_in_charge(sigterm_default) -> None:
    seen = []
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    with sigterm_raises():
        os.kill(os.getpid(), signal.SIGTERM)
    assert seen == [signal.SIGTERM]


def test_a_sigterm_inside_a_deferred_block_raises_after_it_and_before_a_ctrl_c(sigterm_default, sigint_handler):
    sigint_handler(signal.default_int_handler)
    done = []
    with pytest.raises(Terminated):  # both came: the termination wins, the Ctrl-C asks for nothing more
        with sigterm_raises(), interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("rest of the block")
    assert done == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_recorded_sigterm_is_only_noted_also_when_it_came_inside_a_deferred_block(sigterm_default) -> None:
    with sigterm_recorded() as received:
        assert not received()
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            assert not received()  # held back until the block is done
        assert received()  # noted, and the process runs on: data-parallel ranks stop together at a step boundary
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_with_repeat_stops_now_the_first_ctrl_c_waits_for_the_block_and_a_second_stops_it(sigint_handler) -> None:
    sigint_handler(signal.default_int_handler)
    notices, done = [], []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred(repeat_stops_now=True, notice=lambda: notices.append("told")):
            os.kill(os.getpid(), signal.SIGINT)
            done.append("rest of the block")
    assert done == ["rest of the block"] and notices == ["told"]
    notices.clear()
    done.clear()
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred(repeat_stops_now=True, notice=lambda: notices.append("told")):
            os.kill(os.getpid(), signal.SIGINT)
            done.append("before the second")
            os.kill(os.getpid(), signal.SIGINT)
            done.append("never reached")
    assert done == ["before the second"] and notices == ["told"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_nested_deferred_block_is_not_cut_by_the_second_ctrl_c(sigint_handler) -> None:
    # The outer block (collecting) may be cut by a second Ctrl-C, the inner one (storing) never: the second
    # reaches the outer block once the inner is done, and stops it there.
    sigint_handler(signal.default_int_handler)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred(repeat_stops_now=True):
            os.kill(os.getpid(), signal.SIGINT)
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("inner block finished")
            done.append("never reached")
    assert done == ["inner block finished"]


def test_a_second_sigterm_stops_a_repeat_stops_now_block_with_terminated(sigterm_default) -> None:
    done = []
    with pytest.raises(Terminated):
        with sigterm_raises(), interrupts_deferred(repeat_stops_now=True):
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("held")
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("never reached")
    assert done == ["held"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
