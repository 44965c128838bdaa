"""One training process per run_dir: a second holder is refused with the first one named, and the lock goes with
its holder, however that ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from d4func.train.run_lock import LOCK_NAME, TAKE_LOCK_FOR_S, RunDirInUseError, hold_run_dir, run_dir_holder

HOLD_SCRIPT = ("import sys, time\nfrom d4func.train.run_lock import hold_run_dir\n"
               "with hold_run_dir(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n")


def test_a_second_hold_is_refused_naming_the_holder_and_a_released_dir_can_be_held_again(tmp_path) -> None:
    run_dir = tmp_path / "run"
    with hold_run_dir(run_dir):
        assert (run_dir / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(RunDirInUseError, match=rf"run_dir {run_dir} is in use by pid {os.getpid()} on "):
            with hold_run_dir(run_dir):
                pass
    with hold_run_dir(run_dir):  # released when the block ended
        pass
    assert issubclass(RunDirInUseError, ValueError)  # the command line reports it in one line, exit code 2


def test_another_process_holding_it_is_named_and_its_sigkill_frees_the_dir(tmp_path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUseError, match=rf"in use by pid {proc.pid} on "):
            with hold_run_dir(tmp_path):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while True:  # the kernel drops a dead holder's lock (at once on a local filesystem)
        try:
            with hold_run_dir(tmp_path):
                break
        except RunDirInUseError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_train_refuses_a_run_dir_another_run_holds(tmp_path) -> None:
    from d4func.train.loop import train
    from d4func.train.run_config import load_run_config

    cfg = load_run_config("experiments/configs/debug.yaml", [f"run_dir={tmp_path}"])
    with hold_run_dir(tmp_path):
        with pytest.raises(RunDirInUseError, match="give this one another run_dir"):
            train(cfg, progress=False)
    assert not (tmp_path / "config.json").exists()  # refused before anything was written


def test_a_start_that_fails_before_writing_leaves_no_directory_but_a_used_one_keeps_its_files(tmp_path) -> None:
    fresh, used = tmp_path / "fresh", tmp_path / "used"
    with pytest.raises(RuntimeError, match="refused"):
        with hold_run_dir(fresh):
            raise RuntimeError("refused")
    assert not fresh.exists()
    used.mkdir()
    (used / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="refused"):
        with hold_run_dir(used):
            raise RuntimeError("refused")
    assert sorted(path.name for path in used.iterdir()) == [LOCK_NAME, "config.json"]


def test_run_dir_holder_names_the_holder_only_while_it_holds_and_creates_nothing(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert run_dir_holder(run_dir) is None and not (run_dir / LOCK_NAME).exists()
    with hold_run_dir(run_dir):
        assert run_dir_holder(run_dir) == f"pid {os.getpid()} on {socket.gethostname()}"
    assert run_dir_holder(run_dir) is None  # the note stays behind; the lock does not
    import fcntl

    with open(run_dir / LOCK_NAME) as other_probe:  # a probe does not take another probe for a holder
        fcntl.flock(other_probe.fileno(), fcntl.LOCK_SH)
        assert run_dir_holder(run_dir) is None


def test_a_start_waits_out_a_holder_probe_instead_of_refusing(tmp_path) -> None:
    # run_dir_holder holds the lock shared for a moment; a run starting in that moment must not be refused.
    import fcntl

    (tmp_path / LOCK_NAME).write_text("pid 1 on elsewhere\n")
    probe = open(tmp_path / LOCK_NAME)  # noqa: SIM115 (closed by the timer, as a probe ends)
    fcntl.flock(probe.fileno(), fcntl.LOCK_SH)
    threading.Timer(TAKE_LOCK_FOR_S / 4, probe.close).start()
    started = time.monotonic()
    with hold_run_dir(tmp_path):
        assert time.monotonic() - started >= TAKE_LOCK_FOR_S / 4 - 0.01  # it waited, then took it
        assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")
