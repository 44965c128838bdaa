"""Checkpoints that cannot be half-written, and exact resume (DESIGN principle 4: a checkpoint is the state on disk).

A checkpoint is one file `run_dir/ckpt-<step>.pt` holding

* `payload`: whatever the loop passes, typically the train states of its models (TensorDicts: params, AdamW
  moments, EMA, step, running loss statistics), step counters, the config as a plain dict
  (`config_to_dict`) and the replay buffer's position (`replay_position`; the memmapped data stays on disk, and
  the loop `fsync`s it with `sync_replay_files` before writing the checkpoint that counts it);
* `rng`: every RNG state, one entry per data-parallel rank: torch CPU, CUDA (all devices, when available),
  numpy's global RNG, python's `random`, and the explicit generators the loop names (`torch.Generator`,
  `numpy.random.Generator`, `random.Random`).

Writing (`save_checkpoint`): the file is written under a temporary name in the same directory (`.ckpt-...tmp-<pid>`,
which never matches the checkpoint pattern), flushed and `fsync`ed, renamed with `os.replace` (atomic on POSIX
within one filesystem) and the directory is `fsync`ed so the rename itself survives a crash. A process killed at any
moment therefore leaves either the previous set of checkpoints or the previous set plus the complete new one, and a
stale temporary file that the next save removes. Only the last `keep_last` checkpoints are kept.

Format: `torch.save` of plain dicts of tensors, loaded with `torch.load(weights_only=True)`, so loading a
checkpoint runs no pickled code. TensorDicts are stored as `{"__tensordict__": {batch_size, device, entries}}` and
rebuilt on load, nested batch sizes included; tensors round-trip bitwise. One file rather than tensordict's memmap
directory (`td.memmap(prefix)`): a single file is renamed atomically with one call (a directory cannot atomically
replace a non-empty one), needs one fsync, and keeps RNG states, config and counters next to the weights. The cost
is that a load reads the whole file into memory (pass `mmap=True` to `load_checkpoint` for large models).

Resume: `state = restore(run_dir, generators={...})` loads the newest checkpoint that loads (falling back to older
ones with a warning if the newest is unreadable), restores every RNG state in place and returns the `Checkpoint`;
`None` when the directory holds none. Continuing from there reproduces the uninterrupted run bit for bit on the
same hardware and library versions (tests/test_checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from d4func.durable_files import fsync_dir, fsync_tree, save_whole

if TYPE_CHECKING:
    from d4func.data.replay import SequenceReplayBuffer  # torchrl: imported only when a replay is opened

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "capture_rng_state",
    "checkpoint_name",
    "config_from_dict",
    "config_to_dict",
    "fsync_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "newest_readable_checkpoint",
    "open_run_replay",
    "rank_payload",
    "replay_position",
    "restore",
    "restore_replay_position",
    "restore_rng_state",
    "run_replay_dir",
    "sync_replay_files",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "d4func-checkpoint-v1"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
UNREADABLE_SUFFIX = ".unreadable"  # `restore` moves a damaged checkpoint aside under its name + this
_TMP = re.compile(r"^\.ckpt-\d+\.pt\.tmp-(\d+)$")
_TD_MARK = "__tensordict__"

# Test seam for the kill-during-write tests: when set, called as `_write_hook(stage, tmp_path)` with stage
# "partial" (after the first chunk of the file is written) and "written" (complete and fsynced, not yet renamed).
_write_hook: Callable[[str, Path], None] | None = None

AnyGenerator = torch.Generator | np.random.Generator | random.Random


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: `payload` as saved (TensorDicts rebuilt), `rng` one dict per data-parallel rank."""

    path: Path
    step: int
    payload: dict[str, Any]
    rng: list[dict[str, Any]]


# ----------------------------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------------------------


def _generator_state(name: str, gen: AnyGenerator) -> dict[str, Any]:
    if isinstance(gen, torch.Generator):
        return {"kind": "torch", "device": str(gen.device), "state": gen.get_state()}
    if isinstance(gen, np.random.Generator):
        return {"kind": "numpy", "state": gen.bit_generator.state}
    if isinstance(gen, random.Random):
        return {"kind": "python", "state": gen.getstate()}
    raise TypeError(f"generator {name!r} must be a torch.Generator, numpy.random.Generator or random.Random, "
                    f"got {type(gen).__name__}")


def capture_rng_state(generators: Mapping[str, AnyGenerator] | None = None) -> dict[str, Any]:
    """Every RNG state of this process: torch CPU, CUDA (when available), numpy's and python's global RNGs, and the
    named explicit `generators`."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # weights_only loading accepts tensors, not numpy arrays: the MT19937 key (uint32[624]) travels as int64.
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
        "generators": {name: _generator_state(name, gen) for name, gen in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, AnyGenerator] | None = None) -> None:
    """Put back the global RNG states of `capture_rng_state` and those of the named `generators` (in place).

    Every generator named here must have been captured; captured generators not named here are left alone.
    """
    torch.set_rng_state(state["torch"])
    cuda = list(state["cuda"])
    if cuda:
        if not torch.cuda.is_available():
            warnings.warn("checkpoint holds CUDA RNG states but CUDA is not available; they are not restored",
                          stacklevel=2)
        elif torch.cuda.device_count() != len(cuda):
            # Another machine or CUDA_VISIBLE_DEVICES: the run resumes (moving it is the user's call), on the devices
            # both have, but not bit for bit where it draws on the others.
            shared = min(len(cuda), torch.cuda.device_count())
            warnings.warn(f"checkpoint holds CUDA RNG states for {len(cuda)} devices, this process sees "
                          f"{torch.cuda.device_count()}: restored for devices 0-{shared - 1} only; resume with the "
                          "same CUDA_VISIBLE_DEVICES for an exact resume", stacklevel=2)
            for index in range(shared):
                torch.cuda.set_rng_state(cuda[index], device=index)
        else:
            torch.cuda.set_rng_state_all(cuda)
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": np_state["bit_generator"],
        "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
        "has_gauss": np_state["has_gauss"],
        "gauss": np_state["gauss"],
    })
    random.setstate(_as_tuples(state["python"]))
    saved = state["generators"]
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"checkpoint holds no state for generator {name!r}; it has {sorted(saved)}")
        entry = saved[name]
        kind = _generator_state(name, gen)["kind"]
        if entry["kind"] != kind:
            raise TypeError(f"generator {name!r} was saved as a {entry['kind']} generator, got a {kind} one")
        if kind == "torch":
            gen.set_state(entry["state"])
        elif kind == "numpy":
            gen.bit_generator.state = entry["state"]
        else:
            gen.setstate(_as_tuples(entry["state"]))


def _as_tuples(value: Any) -> Any:
    """random.setstate wants nested tuples; a round trip may have turned them into lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


# ----------------------------------------------------------------------------------------------------------------
# Payload encoding
# ----------------------------------------------------------------------------------------------------------------


def _encode(value: Any, where: str) -> Any:
    """Plain dicts / lists / tensors / primitives only, so the file loads with weights_only=True."""
    if isinstance(value, TensorDictBase):
        entries = {}
        for key, item in value.items():
            entries[key] = _encode(item, f"{where}.{key}")
        return {_TD_MARK: {"batch_size": list(value.batch_size),
                           "device": None if value.device is None else str(value.device),
                           "entries": entries}}
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint payload key {where}[{key!r}] must be str or int, got {type(key).__name__}")
            out[key] = _encode(item, f"{where}.{key}")
        if _TD_MARK in out:
            raise ValueError(f"checkpoint payload key {_TD_MARK!r} at {where} is reserved")
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(_encode(item, f"{where}[{i}]") for i, item in enumerate(value))
    if value is None or type(value) in (bool, int, float, str):  # exact types: subclasses need globals to load
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        raise TypeError(f"checkpoint payload {where} is a {type(value).__name__} dataclass; store "
                        "config_to_dict(cfg) and rebuild it with config_from_dict(schema, d)")
    raise TypeError(f"checkpoint payload {where} has unsupported type {type(value).__name__}; use tensors, "
                    "TensorDicts, dicts, lists, tuples, str, int, float, bool or None")


def _decode(value: Any, keep_device: bool) -> Any:
    """Rebuild TensorDicts. Their saved device is kept only without a map_location (the tensors already sit where
    map_location put them; re-imposing a saved "cuda:0" would fail on a CPU-only machine)."""
    if isinstance(value, dict):
        if set(value) == {_TD_MARK}:
            spec = value[_TD_MARK]
            entries = {key: _decode(item, keep_device) for key, item in spec["entries"].items()}
            return TensorDict(entries, batch_size=spec["batch_size"], device=spec["device"] if keep_device else None)
        return {key: _decode(item, keep_device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_decode(item, keep_device) for item in value)
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A (nested) dataclass config as a plain dict, for the checkpoint payload (and YAML via OmegaConf)."""
    from omegaconf import OmegaConf

    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {type(cfg).__name__}")
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def config_from_dict(schema: type, data: Mapping[str, Any]) -> Any:
    """Rebuild (and re-validate) a dataclass config saved with `config_to_dict`."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(dict(data))))


# ----------------------------------------------------------------------------------------------------------------
# Replay position (the memmapped data stays on disk)
# ----------------------------------------------------------------------------------------------------------------


def replay_position(rb: Any) -> dict[str, Any]:
    """Length, write cursor and sampler RNG of a TorchRL replay buffer (e.g. `make_replay(..., path=...)`).

    The transitions themselves live in the memmapped storage, written in place. Reopen the buffer with
    `make_replay(capacity, ..., path=same)` and call `restore_replay_position`; entries written after the checkpoint
    are then overwritten by the resumed run; the run that owns the buffer retires them first, right after this
    restore (`retire_unrecorded_writes`). Reopening needs the storage metadata, which TorchRL writes in
    `save_replay(rb)`: call it once after the first `extend` (its files are not written atomically, so do not repeat
    it at every checkpoint; the checkpoint carries the position). Once the ring has wrapped, later writes overwrite
    entries the checkpoint counts: exact resume then needs the buffer's overwrite journal
    (`SequenceReplayBuffer.keep_overwritten_entries`, on in the training loop), which puts them back.
    """
    rng = getattr(rb, "_rng", None)
    return {
        "path": None if getattr(rb, "path", None) is None else str(rb.path),
        "len": len(rb),
        "writer": {key: int(value) for key, value in rb._writer.state_dict().items()},
        "rng": None if rng is None else rng.get_state(),
        "written": getattr(rb, "entries_written", None),  # entries written so far (SequenceReplayBuffer numbers them)
    }


def restore_replay_position(rb: Any, position: Mapping[str, Any]) -> None:
    """Set a buffer's length, write cursor and sampler RNG to those of `replay_position` (in place): a reopened one
    on resume, or a live one rewound (after a NaN, or past frames written only to draw a GIF)."""
    capacity = rb._storage.max_size
    if position["len"] > capacity:
        raise ValueError(f"checkpointed replay length {position['len']} exceeds this buffer's capacity {capacity}")
    rb._storage._len = int(position["len"])  # TorchRL has no public setter; this is what storage.loads does
    rb._writer.load_state_dict(dict(position["writer"]))
    if position.get("written") is not None and getattr(rb, "entries_written", None) is not None:
        rb.entries_written = int(position["written"])  # the next entry's number (checkpoints before it: none)
    from d4func.data.replay import forget_episode_index

    forget_episode_index(rb)  # a buffer sampled before this rewind would still draw slots past the new end
    if position["rng"] is not None:
        if getattr(rb, "_rng", None) is None:
            rb.set_rng(torch.Generator())
        rb._rng.set_state(position["rng"])


def sync_replay_files(rb: Any) -> list[Path]:
    """`fsync` every file of a replay's memmapped storage; returns the files synced (none for an in-memory one).

    A killed process loses no memmapped write (the pages sit in the OS's page cache), but an OS crash or power
    loss may lose transitions that a checkpoint's `replay_position` already counts. Called before each checkpoint
    is written, so the data a checkpoint points at is on disk first (`durable_files.fsync_tree`).
    """
    path = getattr(rb, "path", None)
    return [] if path is None else fsync_tree(Path(path) / "storage")


def run_replay_dir(run_dir: str | Path, rank: int = 0) -> Path:
    """Where rank `rank` of an online run keeps its memmapped replay: `replay`, then `replay-rank1`, ..."""
    return Path(run_dir) / ("replay" if rank == 0 else f"replay-rank{rank}")


def rank_payload(payload: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """A checkpoint payload with data-parallel rank `rank`'s own part (counters, replay position, collector state)
    merged in and `ranks` dropped; a single-process payload is returned as it is."""
    if "ranks" not in payload:
        return dict(payload)
    ranks = payload["ranks"]
    if not 0 <= rank < len(ranks):
        raise ValueError(f"rank={rank} is not one of the {len(ranks)} ranks this checkpoint was saved with")
    return {**{key: value for key, value in payload.items() if key != "ranks"}, **ranks[rank]}


def reopen_run_replay(
    replay_dir: Path, capacity: int, seq_len: int, batch_size: int, seed: int | None = None
) -> SequenceReplayBuffer:
    """`make_replay` on a run's replay directory, for a caller that restores the position from a checkpoint next
    (so the reopened buffer's stale length and cursor, and make_replay's warning about them, do not matter)."""
    from d4func.data.replay import StaleReplayPositionWarning, make_replay

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StaleReplayPositionWarning)
        return make_replay(capacity, seq_len, batch_size, path=replay_dir, seed=seed)


def open_run_replay(run_dir: str | Path, rank: int = 0, seed: int | None = None) -> SequenceReplayBuffer:
    """The replay buffer of an online run of the loop as of its newest checkpoint, for reading and sampling.

    `make_replay(..., path=RUN/replay)` alone reopens the storage with the length recorded at the run's first
    `extend` (the loop keeps later positions in its checkpoints only), so it would sample from the first batch of
    transitions. `rank` picks a data-parallel rank's own replay (`replay-rank1`, ...); `seed` reseeds the sampler
    (default: the sampler RNG as checkpointed). Sampling moves only this buffer's RNG; do not `extend` it while the
    run may resume. A run killed after its newest checkpoint and not resumed yet may have overwritten stored
    entries since (a wrapped ring): a reader sees those slots as the killed run left them, and only the resume
    puts the checkpoint's entries back (from the replay's overwrite journal, which readers leave alone).
    """
    run_dir = Path(run_dir)
    found = newest_readable_checkpoint(run_dir)  # the one a resume would take
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: the replay's position is only recorded in checkpoints")
    newest, payload = found.path, found.payload
    if "ranks" not in payload and rank != 0:
        raise ValueError(f"rank={rank}: {newest} comes from a single-process run (rank 0 only)")
    payload = rank_payload(payload, rank)
    if "replay" not in payload or payload["replay"].get("path") is None:
        raise ValueError(f"{newest} holds no replay position (an offline run, or a replay without a directory)")
    replay_cfg = payload["config"]["replay"]
    rb = reopen_run_replay(run_replay_dir(run_dir, rank), replay_cfg["capacity"], replay_cfg["seq_len"],
                           replay_cfg["batch_size"])
    restore_replay_position(rb, payload["replay"])
    if seed is not None:
        rb.set_rng(torch.Generator().manual_seed(seed))
    return rb


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:012d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `run_dir`, oldest step first (temporary files of unfinished writes never match)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in `run_dir`, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(run_dir: Path) -> None:
    """Delete temporary files left by writes that never finished: those of processes no longer running, and any
    named with this process's PID. Called once this process's own write is renamed into place, so a temp with its
    PID comes from an earlier process that had the same PID (a restarted container's trainer often does), killed
    mid-write. A single writer per run_dir is assumed (the run_dir lock: `hold_run_dir`)."""
    for path in run_dir.iterdir():
        match = _TMP.match(path.name)
        if match and (int(match.group(1)) == os.getpid() or not _pid_alive(int(match.group(1)))):
            path.unlink(missing_ok=True)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    payload: Mapping[str, Any],
    keep_last: int | None = 3,
    *,
    generators: Mapping[str, AnyGenerator] | None = None,
    rng: list[dict[str, Any]] | None = None,
) -> Path:
    """Atomically write `run_dir/ckpt-<step>.pt` and keep the newest `keep_last` checkpoints (None keeps all).

    `payload`: TensorDicts, tensors, dicts, lists, tuples and primitives (configs as `config_to_dict(cfg)`).
    RNG states: by default this process's (`capture_rng_state(generators)`); data-parallel runs pass `rng`, the
    list of every rank's states (`d4func.train.distributed.gather_rng_states`), from rank 0, the only writer.
    Returns the checkpoint's path. An existing checkpoint of the same step is replaced atomically.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
    if rng is not None and generators is not None:
        raise ValueError("pass either generators (this process's RNGs are captured) or rng (already captured)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "payload": _encode(dict(payload), "payload"),
        "rng": list(rng) if rng is not None else [capture_rng_state(generators)],
        "versions": {"torch": str(torch.__version__)},
    }
    final = run_dir / checkpoint_name(step)
    save_whole(blob, final, hook=_write_hook)  # read at call time: the tests set the seam on this module
    _remove_stale_temps(run_dir)
    if keep_last is not None:
        others = [path for path in list_checkpoints(run_dir) if path != final]
        # The file just written always survives, even if higher-step files of an abandoned run sort after it.
        for path in others[: max(0, len(others) - (keep_last - 1))]:
            path.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu", mmap: bool = False
                    ) -> Checkpoint:
    """Read a checkpoint file (weights_only: no pickled code runs); TensorDicts come back bitwise equal.

    `map_location` as in `torch.load` (default: everything on CPU; None: the devices it was saved from).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (OSError, MemoryError):
        # Not the file's content but reading it (an I/O error, a network filesystem's hiccup, no memory): raised as
        # it is, so that `restore` does not take it for a damaged checkpoint and roll the run back past it.
        raise
    except Exception as error:
        # A ValueError, as for any unusable input: the command line reports it in one line (exit code 2).
        raise ValueError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error})") from error
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} file (found {found!r})")
    payload = _decode(blob["payload"], keep_device=map_location is None)
    return Checkpoint(path=path, step=int(blob["step"]), payload=payload, rng=list(blob["rng"]))


def _current_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def restore(
    run_dir: str | Path,
    generators: Mapping[str, AnyGenerator] | None = None,
    *,
    map_location: str | torch.device | None = "cpu",
    restore_rng: bool = True,
) -> Checkpoint | None:
    """Load the newest readable checkpoint of `run_dir` and restore this rank's RNG states (in place).

    Returns None when `run_dir` holds no checkpoint. An unreadable newest checkpoint (damaged content: a storage
    fault; the atomic write rules out half-written ones) is skipped with a warning in favour of the one before, and
    (rank 0) renamed to `<name>.unreadable`: kept for a look, but out of every later listing, so that neither
    `keep_last` counts it (it would push out the good checkpoint the run resumed from) nor `latest_checkpoint`
    picks it (`newest_readable_checkpoint`). If none is readable this raises rather than silently starting over.
    An error in reading a file (OSError, MemoryError) is raised as it is. Under `torch.distributed` each rank
    restores its own RNG states; resuming on a different number of ranks raises (pass `restore_rng=False` to accept
    fresh RNG streams).
    """
    ckpt = newest_readable_checkpoint(run_dir, map_location=map_location,
                                      move_aside=_current_rank()[0] == 0, stacklevel=3)
    if ckpt is None:
        return None
    if restore_rng:
        rank, world = _current_rank()
        if len(ckpt.rng) != world:
            raise ValueError(f"checkpoint {ckpt.path} holds RNG states of {len(ckpt.rng)} ranks, this run has "
                             f"{world}: resume on {len(ckpt.rng)} processes (torchrun --nproc_per_node), or "
                             "from Python restore(..., restore_rng=False) for fresh RNG streams")
        restore_rng_state(ckpt.rng[rank], generators)
    return ckpt


RELISTS = 3  # times newest_readable_checkpoint lists a run again when every file it listed vanished


def newest_readable_checkpoint(
    run_dir: str | Path,
    *,
    map_location: str | torch.device | None = "cpu",
    move_aside: bool = False,
    stacklevel: int = 2,
    mmap: bool = False,
) -> Checkpoint | None:
    """The newest checkpoint of `run_dir` that loads, skipping damaged ones with a warning; None when there is none,
    a ValueError naming each failure when none loads. `move_aside` (the resuming rank 0, `restore`) renames each
    damaged one to `<name>.unreadable`; readers (`d4func eval`, `open_run_replay`) leave the directory as it is.
    Errors in reading a file (OSError, MemoryError: `load_checkpoint`) are raised as they are. `mmap`: tensors stay
    in the file until read (`torch.load(mmap=True)`), for a reader that wants the counters, not the states."""
    # A file listed and gone when read was renamed aside by the resuming rank 0 (which found it unreadable) or
    # pruned by a live run's next save (loop.keep_checkpoints=1); when every one listed went so, list again.
    for _ in range(RELISTS + 1):
        candidates = list_checkpoints(run_dir)
        errors = []
        vanished = 0
        for path in reversed(candidates):
            try:
                return load_checkpoint(path, map_location=map_location, mmap=mmap)
            except FileNotFoundError:
                vanished += 1
            except (RuntimeError, ValueError) as error:
                errors.append(str(error))
                if move_aside:
                    aside = path.with_name(path.name + UNREADABLE_SUFFIX)
                    path.replace(aside)
                    fsync_dir(path.parent)
                    warnings.warn(f"skipping unreadable checkpoint, renamed to {aside.name}: {error}",
                                  stacklevel=stacklevel)
                else:
                    warnings.warn(f"skipping unreadable checkpoint: {error}", stacklevel=stacklevel)
        if not candidates or vanished < len(candidates):
            break
    if candidates:
        # A ValueError, as for any unusable input: the command line reports it in one line (exit code 2).
        raise ValueError(f"no readable checkpoint in {run_dir}: "
                         + ("; ".join(errors) or "every one listed vanished while being read"))
    return None
