"""Writes that survive a killed process and a crashed machine: fsync of files and directories, and whole-or-nothing
writes of a `torch.save` and of a text file. Checkpoints (`train/checkpoint.py`), the replay's memmaps and its
overwrite journal (`data/overwrite_journal.py`), a run's config.json and its rewound logs (`train/run_logs.py`)
rely on them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["fsync_dir", "fsync_tree", "replace_text", "save_whole"]


def fsync_dir(directory: Path) -> None:
    """Make the renames and new entries in `directory` durable (where the platform lets a directory be fsynced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows): rename durability is the OS's business
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories (EINVAL); the rename is still atomic
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> list[Path]:
    """`fsync` every file under `root`, then every directory (their entries: files created since the last sync);
    returns the files synced. On Linux, fsync of a file flushes the pages dirtied through a shared memory mapping of
    it too (one page cache), so this makes memmapped writes durable."""
    if not root.is_dir():
        return []
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fsync_dir(directory)
    return files


class _HookedWriter:
    """File wrapper that calls `hook("partial", tmp)` once, after the first chunk is written and flushed, so a test
    can kill the process mid-write."""

    def __init__(self, file: Any, tmp: Path, hook: Callable[[str, Path], None]) -> None:
        self.file, self.tmp, self.hook, self.fired = file, tmp, hook, False

    def write(self, data: bytes) -> int:
        written = self.file.write(data)
        if not self.fired:
            self.fired = True
            self.file.flush()
            self.hook("partial", self.tmp)
        return written

    def flush(self) -> None:
        self.file.flush()


def _replace_whole(path: Path, tmp: Path, write: Callable[[Any], None], mode: str,
                   hook: Callable[[str, Path], None] | None = None) -> Path:
    """`write(file)` into `tmp` (opened with `mode`), flushed and fsynced, renamed over `path`, the rename made
    durable; on any failure `tmp` is removed. `hook`: `save_whole`'s test seam."""
    try:
        with open(tmp, mode) as file:
            write(file if hook is None else _HookedWriter(file, tmp, hook))
            file.flush()
            os.fsync(file.fileno())
        if hook is not None:
            hook("written", tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def save_whole(obj: Any, path: Path, hook: Callable[[str, Path], None] | None = None) -> Path:
    """`torch.save(obj)` to `path` whole or not at all: a temporary name, flushed and fsynced, renamed over `path`,
    the rename made durable. A kill mid-write leaves a `.{name}.tmp-<pid>` file beside it, never a torn `path`; a
    failed write (disk full, ...) leaves nothing. `hook` is a test seam for the kill-during-write tests: called as
    `hook(stage, tmp)` with stage "partial" (after the first chunk is written) and "written" (complete and fsynced,
    not yet renamed)."""
    return _replace_whole(path, path.with_name(f".{path.name}.tmp-{os.getpid()}"), lambda file: torch.save(obj, file),
                          "wb", hook)


def replace_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a temporary file, fsynced, renamed over it): a kill mid-write keeps the old
    file, and a crash of the machine cannot leave an empty one under the new name (which would stop every resume:
    config.json is read at each start)."""
    _replace_whole(path, path.with_name(path.name + ".tmp"), lambda file: file.write(text), "w")
