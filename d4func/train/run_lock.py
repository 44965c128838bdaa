"""One training process per run_dir.

Two processes training in the same run_dir (a requeued job whose first copy still runs, a command started twice)
would both resume from the same checkpoint, then write the same memmapped replay and the same `ckpt-<step>.pt`
names and prune each other's files: the run is corrupted without an error. `hold_run_dir` takes an exclusive
advisory lock (`flock`) on `run_dir/.lock` for the length of a run and refuses a second holder with a message naming
the first. The kernel drops the lock when its holder ends, SIGKILL included, so a killed run never blocks the rerun
that resumes it. Under data parallelism only global rank 0 takes it (`train`); every rank of that job is one run.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # not POSIX (Windows): runs go unlocked
    fcntl = None

__all__ = ["LOCK_NAME", "RunDirInUseError", "hold_run_dir", "run_dir_holder"]

LOCK_NAME = ".lock"
# How long a start waits for the lock before refusing: `run_dir_holder` holds it (shared) for a moment to look.
TAKE_LOCK_FOR_S = 1.0


class RunDirInUseError(ValueError):
    """Another process holds the run_dir (a ValueError: the command line reports it in one line, exit code 2)."""


@contextmanager
def hold_run_dir(run_dir: str | Path) -> Iterator[None]:
    """Hold `run_dir`'s lock for the block (creating the directory); raise `RunDirInUseError` naming the holder
    (its PID and host) if another process, or another hold in this one, has it. On a filesystem without locks
    (some network filesystems) it warns and runs unlocked. `run_dir/.lock` stays behind, naming its last holder
    (deleting it would let a process that opened it just before lock a file no longer in the directory), except
    where the block created the directory and failed having written nothing else: a refused start leaves no
    trace."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    with open(path, "a+") as file, _removed_if_left_empty(run_dir, created):  # closing the file releases the lock
        locked = False
        if fcntl is not None:
            try:
                _take(file, fcntl.LOCK_EX, patience_s=TAKE_LOCK_FOR_S)
                locked = True
            except BlockingIOError:
                file.seek(0)
                holder = file.read().strip() or "another process"
                raise RunDirInUseError(f"run_dir {run_dir} is in use by {holder} (it holds {path}): two runs in one "
                                       "run_dir would write the same replay and checkpoints. Stop that run, or "
                                       "give this one another run_dir") from None
            except OSError as error:  # ENOLCK, EOPNOTSUPP: no locking here
                warnings.warn(f"cannot lock {path} ({error}): nothing stops a second run in {run_dir}",
                              stacklevel=3)
        if locked:
            file.seek(0)
            file.truncate()
            file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            file.flush()
            os.fsync(file.fileno())  # readers on other machines (`run_dir_holder`, a refused start) see the note
        yield


def run_dir_holder(run_dir: str | Path) -> str | None:
    """Who trains in `run_dir` now: its lock's note ("pid N on host") while a process holds the lock, None while none
    does. An OSError where it cannot tell: no `flock` on this platform, or a filesystem that refuses locks (where
    `hold_run_dir` only warns, so a run may be in it). To look it holds the lock shared for a moment, which a run
    starting then waits out (`hold_run_dir` tries for `TAKE_LOCK_FOR_S`). It sees holders on other machines only
    where the filesystem's locks span them (NFS with its lock manager; not `local_lock=flock` mounts). Never creates
    the lock file."""
    path = Path(run_dir) / LOCK_NAME
    if fcntl is None:
        raise OSError("no flock on this platform: runs here are not locked")
    if not path.is_file():
        return None
    with open(path) as file:
        try:
            _take(file, fcntl.LOCK_SH, patience_s=0.0)
        except BlockingIOError:
            return file.read().strip() or "another process"
    return None  # closing the file released the shared lock


def _take(file: IO[str], operation: int, patience_s: float) -> None:
    """flock `operation` without blocking, retried for `patience_s`; raises BlockingIOError if still refused."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(file.fileno(), operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


@contextmanager
def _removed_if_left_empty(run_dir: Path, created: bool) -> Iterator[None]:
    """After a block that raised: remove `run_dir` if the block created it and it holds nothing but the lock."""
    try:
        yield
    except BaseException:
        if created and [entry.name for entry in run_dir.iterdir()] == [LOCK_NAME]:
            (run_dir / LOCK_NAME).unlink()
            run_dir.rmdir()
        raise
