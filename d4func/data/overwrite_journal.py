"""Undo records for the entries a replay ring overwrites: what lets an online run killed after its last checkpoint
resume bit-identically once its ring buffer has wrapped.

A run's checkpoint records the replay's length, cursor and entry count, while the entries live in memmaps written in
place. A process killed after that checkpoint leaves what it wrote since in two kinds of slot: past the recorded
length, which is harmless (the resumed run writes there again), and, once the ring has wrapped, over entries the
checkpoint still counts, which would be gone. With the journal on, each write first saves the entries it is about to
overwrite (one record per write, `overwritten/w<number of the write's first entry>.pt`, whole and fsynced before the
ring is touched). A resume puts back, newest write first, what every record of a write the checkpoint does not
count saved, so each slot ends with what it held before the first uncounted write reached it: the ring as the
checkpoint saw it. Each checkpoint lets go of the records it no longer needs.

Records are plain dicts of tensors (`torch.load(weights_only=True)` reads them): `slots`, then the storage's leaves
as `keys` (each a list of names) and `values`, row i of each the entry that was in `slots[i]`.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from tensordict import TensorDictBase
from torch import Tensor

from d4func.durable_files import fsync_dir, save_whole

__all__ = ["JOURNAL_DIR", "forget_records", "list_records", "record_overwrites", "undo_overwrites"]

JOURNAL_DIR = "overwritten"  # beside the replay's `storage/`
_RECORD = re.compile(r"w(\d+)\.pt")


def list_records(directory: Path) -> list[tuple[int, Path]]:
    """(number of the write's first entry, record path), oldest write first."""
    if not directory.is_dir():
        return []
    found = ((_RECORD.fullmatch(path.name), path) for path in directory.iterdir())
    return sorted((int(match.group(1)), path) for match, path in found if match)


def record_overwrites(stored: TensorDictBase, slots: Tensor, first_entry: int, directory: Path) -> Path | None:
    """Save what `slots` of the storage `stored` hold, before a write whose first entry is numbered `first_entry`
    overwrites them; nothing when `slots` is empty (the write fills free slots only)."""
    if slots.numel() == 0:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    leaves = list(stored.items(include_nested=True, leaves_only=True))
    record = {
        "slots": slots.clone(),
        "keys": [list(key) if isinstance(key, tuple) else [key] for key, _ in leaves],
        # advanced indexing of a memmap gives plain tensors, which load with weights_only=True
        "values": [value[slots].clone() for _, value in leaves],
    }
    return save_whole(record, directory / f"w{first_entry:015d}.pt")


def undo_overwrites(stored: TensorDictBase, directory: Path, since: int) -> int:
    """Put back into `stored` what the records of writes numbered `since` or later saved, newest write first, so
    the oldest of them sets each slot last; returns the slots restored. A record that cannot be read is skipped with
    a warning: its slots keep the uncounted entries, which the buffer then retires
    (`SequenceReplayBuffer.retire_unrecorded_writes`)."""
    names = {key if isinstance(key, tuple) else (key,) for key in stored.keys(include_nested=True, leaves_only=True)}
    restored = 0
    for first_entry, path in reversed(list_records(directory)):
        if first_entry < since:
            break
        try:
            record = torch.load(path, weights_only=True)
        except Exception as error:  # noqa: BLE001 (any unreadable file: skipped, its slots retired instead)
            warnings.warn(f"replay journal record {path} cannot be read ({error}): the entries it saved stay "
                          "overwritten and are retired", stacklevel=2)
            continue
        keys = [tuple(key) for key in record["keys"]]
        if set(keys) != names:
            raise ValueError(f"replay journal record {path} holds keys {sorted(keys)}, the storage "
                             f"{sorted(names)}: it belongs to another buffer")
        for key, value in zip(keys, record["values"], strict=True):
            stored.get(key)[record["slots"]] = value
        restored += record["slots"].numel()
    return restored


def forget_records(directory: Path, *, before: int | None = None, since: int | None = None) -> int:
    """Delete the records of writes numbered below `before` (a checkpoint counts them; oldest first) or at `since`
    and later (undone; newest first), and the temporary files of record writes a kill cut short; returns how many
    records were deleted.

    The order keeps a deletion that a kill cuts short harmless. Pruning oldest first leaves the newest of the old
    records, which an undo to an older checkpoint applies as it would have (each slot's oldest remaining write
    still sets it last). Dropping undone records newest first leaves the oldest of them, and undoing those again
    sets each slot they cover to what it held at the checkpoint, as the undo before did: newest first instead, the
    newer records left would write the killed run's entries back over it."""
    records = list_records(directory)
    doomed = [(first_entry, path) for first_entry, path in records if before is not None and first_entry < before]
    doomed += [(first_entry, path) for first_entry, path in reversed(records)
               if since is not None and first_entry >= since]
    for _, path in doomed:
        path.unlink()
    stale = list(directory.glob(".w*.pt.tmp-*")) if directory.is_dir() else []
    for path in stale:  # a record write killed before its rename (durable_files.save_whole)
        path.unlink(missing_ok=True)
    if doomed or stale:
        fsync_dir(directory)
    return len(doomed)
