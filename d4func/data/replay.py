"""Sequence replay: a TorchRL ``TensorDictReplayBuffer`` on ``LazyMemmapStorage`` that samples ``[B, T]`` slices.

Episode boundaries: **a sampled sequence never crosses one.** Every row of a batch is ``T`` consecutive agent
steps of a single episode, so the world model needs no ``is_first`` mask inside a sequence (its time attention
may read the whole row). This is TorchRL's ``SliceSampler`` with

- ``traj_key`` (default ``("collector", "traj_ids")``, written by TorchRL collectors and unique across the
  workers of a multi-process collector) naming the episode of each transition,
- ``fragmented=True`` with ``step_key="step_count"`` (written by the envs' ``StepCounter``): an episode is
  rebuilt from (episode id, step) pairs, so transitions of one episode need not be adjacent in storage (the
  batches of several collector workers interleave) and ring-buffer wrap-around is handled,
- ``strict_length=True``: a slice is drawn only where ``T`` consecutive steps of one episode are stored (and,
  with each frame stored once, the entry after them: see below); shorter episodes (and the overwritten head of
  the oldest one) are never sampled.

Slices are drawn by picking a stored episode run uniformly, then a start uniformly within it. So every stored
episode long enough for a row gets the same share of the rows: the transitions of short episodes (and of the
surviving tail of one that the ring buffer is overwriting) are drawn more often than those of long ones, unlike
uniform sampling over all valid windows. On fixed-length episodes (DMControl, Reach) the two agree. The sampler leaves
stored data untouched (``init_key=None``, ``truncated_key=None``): ``"is_init"`` stays True only at the real
first step of an episode (the env's ``InitTracker``), and ``("next", "truncated")`` is the env's own flag.

Ids must be unique over the buffer's life: reused ids make the sampler raise a duplicate-record error, or join
two episodes. The training loop shifts a resumed run's ids past every id its checkpoint recorded, puts back what a
killed run overwrote after that checkpoint (:meth:`SequenceReplayBuffer.keep_overwritten_entries`, the overwrite
journal) and retires (:meth:`SequenceReplayBuffer.retire_unrecorded_writes`) what it stored that the journal does
not cover.

Storage: float pixel entries in [0, 1] are stored as uint8 (``k / 255`` -> ``k``) and turned back into float32
on sampling as ``k / 255`` in float32, the value TorchRL's ``ToTensorImage`` produces, so frames read back are
bitwise equal to the frames written, at a quarter of the disk and page-cache footprint. Writing pixels that are not
multiples of 1/255 raises rather than silently losing precision.

On disk (``path`` given): ``path/storage/`` holds the memmapped tensors (written in place, no copies);
``rb.dumps(path)`` (or :func:`save_replay`) records length, write cursor and RNG state, and
:func:`make_replay` with the same ``path`` reopens it. A buffer whose owner keeps its position elsewhere (the
training loop records it once, then in every checkpoint: ``save_replay(rb, position_kept_in=...)``) carries a
note saying so, and reopening it with :func:`make_replay` alone warns (:class:`StaleReplayPositionWarning`),
since the length and cursor on disk are those of the first save.

Each frame is stored once (``share_next_pixels``, the default for new buffers). A transition's
``("next", "pixels")`` is the next transition's ``"pixels"`` within its episode, so storing it per transition
doubles the frames on disk and in the page cache. Instead, :meth:`SequenceReplayBuffer.extend` drops it and, where
a transition ends its episode (``("next", "done")``), stores its next frame as one extra *episode-end frame* entry
(``"episode_end_frame"`` True, step ``last + 1``). ``sample()`` draws ``T + 1`` consecutive entries and rebuilds
``("next", "pixels")`` of its ``T`` transitions from them, so rows read back exactly as from a buffer that stored
the next frames (``replay.final_frame`` needs them; the rebuild is tested bitwise). ``capacity`` counts stored
entries: transitions plus one per ended episode. The last transition of an unfinished episode has no stored next
frame yet, so a row ending there is drawn only once the episode goes on. Buffers written before this layout
(``replay_layout.json`` absent) keep per-transition next frames and are read as they were.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tensordict import NestedKey, TensorDictBase
from torchrl.data import LazyMemmapStorage, SliceSampler, TensorDictReplayBuffer
from torchrl.envs import Transform

from d4func.data.overwrite_journal import JOURNAL_DIR, forget_records, record_overwrites, undo_overwrites
from d4func.durable_files import fsync_tree

__all__ = [
    "DEFAULT_PIXEL_KEYS",
    "DEFAULT_TRAJ_KEY",
    "END_FRAME_KEY",
    "PixelsAsUint8",
    "SequenceReplayBuffer",
    "StaleReplayPositionWarning",
    "forget_episode_index",
    "make_replay",
    "replay_layout",
    "save_replay",
    "with_episode_end_frames",
]

DEFAULT_TRAJ_KEY: NestedKey = ("collector", "traj_ids")
DEFAULT_PIXEL_KEYS: tuple[NestedKey, ...] = ("pixels", ("next", "pixels"))
# Written by save_replay(rb, position_kept_in=...): the buffer's current length and cursor are kept elsewhere.
POSITION_NOTE = "position_kept_in.json"
# Written when a path-backed buffer is created: how it stores the frame after each transition.
LAYOUT_FILE = "replay_layout.json"
SHARED, PER_TRANSITION = "shared", "per_transition"
END_FRAME_KEY = "episode_end_frame"
NEXT_PIXELS: NestedKey = ("next", "pixels")
# Every stored entry's number in write order: which entries a resumed run's checkpoint does not account for.
WRITE_INDEX_KEY = "write_index"
# Episode ids of entries retired by `retire_unrecorded_writes`: this plus the slot (collectors count from 0 up).
RETIRED_TRAJ_BASE = 2**62


class StaleReplayPositionWarning(UserWarning):
    """A replay directory was reopened with the length and cursor of its first save, while its owner (e.g. a
    training run) records the current ones elsewhere; the note in the directory says where."""


class PixelsAsUint8(Transform):
    """Replay transform: float pixels in [0, 1] -> uint8 on write (``inv``), uint8 -> float32 on read.

    Missing keys are skipped, so data without ``("next", "pixels")`` passes through. ``exclude_keys`` are
    dropped on write (e.g. ``("next", "pixels")``, which repeats the following step's frame).
    """

    def __init__(self, pixel_keys: Sequence[NestedKey] = DEFAULT_PIXEL_KEYS, exclude_keys: Sequence[NestedKey] = ()):
        keys = list(pixel_keys)
        super().__init__(in_keys=keys, out_keys=keys, in_keys_inv=keys, out_keys_inv=keys)
        self.exclude_keys = list(exclude_keys)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        for key in self.in_keys:
            value = tensordict.get(key, None)
            if value is not None and value.dtype == torch.uint8:
                # k -> fl(k / 255) in float32, the value ToTensorImage's x.div(255) produces (IEEE division is
                # correctly rounded, so bitwise identical); converting first is ~2x faster than a promoting div.
                tensordict.set(key, value.to(torch.float32).div_(255))
        return tensordict

    def _inv_call(self, tensordict: TensorDictBase) -> TensorDictBase:
        if self.exclude_keys:
            tensordict = tensordict.exclude(*self.exclude_keys)
        for key in self.in_keys_inv:
            value = tensordict.get(key, None)
            if value is None or value.dtype == torch.uint8:
                continue
            if not torch.is_floating_point(value):
                raise TypeError(f"pixel entry {key!r} must be float in [0, 1] or uint8, got dtype {value.dtype}")
            quantized = value.mul(255).round_().clamp_(0, 255).to(torch.uint8)
            if not torch.equal(quantized.to(value.dtype).div_(255), value):  # k/255 in the value's own precision
                raise ValueError(
                    f"pixel entry {key!r} holds values that are not multiples of 1/255 in [0, 1] "
                    f"(min {value.min().item():.6g}, max {value.max().item():.6g}); storing them as uint8 would "
                    "lose precision. Pass compress_pixels=False to make_replay to store floats."
                )
            tensordict.set(key, quantized)
        return tensordict


class SequenceReplayBuffer(TensorDictReplayBuffer):
    """``TensorDictReplayBuffer`` whose ``sample()`` returns ``[B, T]`` sequences instead of ``[B * T]``.

    ``extend`` accepts ``[N]`` or ``[n_envs, N]`` batches (multi-env collector output is flattened; the
    fragmented slice sampler re-assembles episodes from their ids and step counts). With ``share_next_pixels``
    (module docstring) each frame is stored once; ``sample()`` returns the same rows either way.
    """

    def __init__(self, *, seq_len: int, path: str | Path | None = None, share_next_pixels: bool = False,
                 traj_key: NestedKey = DEFAULT_TRAJ_KEY, step_key: NestedKey = "step_count", **kwargs) -> None:
        super().__init__(**kwargs)
        self.seq_len = seq_len
        self.path = None if path is None else Path(path)
        self.share_next_pixels = share_next_pixels
        self.traj_key = traj_key
        self.step_key = step_key
        # Entries written so far (numbered in `WRITE_INDEX_KEY`); None for a storage written before the numbering.
        self.entries_written: int | None = 0
        self.journal_dir: Path | None = None  # `keep_overwritten_entries` turns the overwrite journal on

    @property
    def slice_len(self) -> int:
        """Stored entries behind one sampled row: ``seq_len``, plus the entry holding the last next frame."""
        return self.seq_len + int(self.share_next_pixels)

    def extend(self, tensordicts: TensorDictBase, **kwargs) -> torch.Tensor:
        if tensordicts.ndim > 1:
            tensordicts = tensordicts.reshape(-1)
        if self.share_next_pixels:
            tensordicts = with_episode_end_frames(tensordicts, self.traj_key, self.step_key)
        if self.entries_written is None:
            return super().extend(tensordicts, **kwargs)
        n = tensordicts.shape[0]
        tensordicts = tensordicts.copy()  # shallow: the caller's TensorDict keeps its keys
        tensordicts.set(WRITE_INDEX_KEY, torch.arange(self.entries_written, self.entries_written + n))
        if self.journal_dir is not None and len(self):
            # The slots TorchRL's round-robin writer fills next; those below the length hold entries to keep.
            cursor = int(self._writer.state_dict()["_cursor"])
            slots = (cursor + torch.arange(n)) % self.storage.max_size
            record_overwrites(self.storage._storage, slots[slots < len(self)], self.entries_written,
                              self.journal_dir)
        index = super().extend(tensordicts, **kwargs)
        self.entries_written += n  # only once written: a write that raised numbered nothing
        return index

    def keep_overwritten_entries(self) -> None:
        """Journal what each write overwrites (``data/overwrite_journal.py``, in ``path/overwritten/``), so that
        ``undo_unrecorded_overwrites`` can put back a ring that its owner, killed after a checkpoint, wrapped past
        it. The owner lets go of records with ``forget_overwrites_before`` at each checkpoint: the journal then holds
        at most the entries written since the last one. Needs a path-backed buffer that numbers its entries."""
        if self.path is None or self.entries_written is None:
            raise ValueError("the overwrite journal needs a path-backed replay that numbers its entries (written "
                             f"since entries were numbered), got path={self.path}, entries_written="
                             f"{self.entries_written}")
        self.journal_dir = self.path / JOURNAL_DIR

    def undo_unrecorded_overwrites(self) -> int:
        """Right after ``restore_replay_position`` to a checkpoint, before ``retire_unrecorded_writes``: put back
        the entries that writes the checkpoint does not count (numbered ``entries_written`` on) overwrote, make that
        durable, and drop those writes' records; returns the slots restored. What no record covers (a journal turned
        on later, an unreadable record) is left to ``retire_unrecorded_writes``. Writes to the storage: only the
        buffer's owner calls it."""
        if self.journal_dir is None:
            return 0
        restored = 0
        if self.storage.initialized:
            restored = undo_overwrites(self.storage._storage, self.journal_dir, since=self.entries_written)
        if restored:
            fsync_tree(self.path / "storage")  # on disk before the records that could redo it are deleted
            forget_episode_index(self)
        forget_records(self.journal_dir, since=self.entries_written)
        return restored

    def forget_overwrites_before(self, entries_written: int) -> None:
        """A checkpoint that counts ``entries_written`` entries is on disk: the records of earlier writes are no
        longer needed (a resume from an older checkpoint retires what they would have restored)."""
        if self.journal_dir is not None:
            forget_records(self.journal_dir, before=entries_written)

    def retire_unrecorded_writes(self, first_unrecorded_episode: int | None = None) -> int:
        """Make the stored entries a checkpoint does not account for never part of a sampled row; returns how many
        are stored. Call it right after ``restore_replay_position``, before sampling.

        Those are the entries numbered at or past ``entries_written`` (the checkpoint's count) and, given
        ``first_unrecorded_episode`` (the checkpoint's next episode id), those of episodes it had not started:
        what a run killed after its last checkpoint wrote (the id test also covers storages from before the
        numbering, and a numbering column an OS crash lost). A resumed run overwrites them as it writes, but once
        the ring buffer has wrapped they stay among the sampled entries until then, and the resumed run reuses
        their episode ids. Each gets an episode id of its own (``RETIRED_TRAJ_BASE`` + its slot), so no slice joins
        it to another entry: every slice spans two or more entries with each frame stored once (or ``seq_len`` >=
        2), while a one-entry slice could still draw it alone. This writes to the storage: only the run that owns
        the buffer calls it, never a reader of a live run's replay."""
        if len(self) == 0:
            return 0
        stored = self.storage._storage
        traj = stored.get(self.traj_key)
        stale = torch.zeros(len(self), dtype=torch.bool)
        if self.entries_written is not None:
            stale |= stored.get(WRITE_INDEX_KEY)[: len(self)].reshape(-1) >= self.entries_written
        if first_unrecorded_episode is not None:
            stale |= traj[: len(self)].reshape(-1) >= first_unrecorded_episode
        slots = stale.nonzero().reshape(-1)
        if slots.numel():
            traj[slots] = RETIRED_TRAJ_BASE + slots.to(traj.dtype).reshape(traj[slots].shape)
            forget_episode_index(self)  # it still holds the old ids
        return slots.numel()

    def sample(
        self, batch_size: int | None = None, return_info: bool = False, **kwargs: Any
    ) -> TensorDictBase | tuple[TensorDictBase, dict[str, Any] | None]:
        """``[B, seq_len]`` rows (``batch_size`` counts stored entries, ``B * slice_len``; default: the buffer's).
        With ``return_info``, the info describes the ``slice_len`` stored entries behind each row."""
        if batch_size is not None and batch_size % self.slice_len:
            raise ValueError(f"batch_size counts stored entries, a multiple of slice_len={self.slice_len} "
                             f"(seq_len={self.seq_len} plus the row's final frame when shared), got {batch_size}")
        out = super().sample(batch_size, return_info=return_info, **kwargs)
        data, info = out if return_info else (out, None)
        data = data.reshape(-1, self.slice_len)
        if self.share_next_pixels:
            data = self._rows_with_next_pixels(data)
        else:
            data = data.exclude(WRITE_INDEX_KEY)
        return (data, info) if return_info else data

    def transition_count(self) -> int:
        """Stored transitions of the buffer's episodes: ``len(self)`` counts entries, episode-end frames and
        retired entries (``retire_unrecorded_writes``) included."""
        if len(self) == 0:
            return 0
        stored = self.storage[: len(self)]
        steps = stored.get(self.traj_key).reshape(-1) < RETIRED_TRAJ_BASE
        if self.share_next_pixels:
            steps &= ~stored.get(END_FRAME_KEY).reshape(-1)
        return int(steps.sum())

    def stored_transitions(self) -> TensorDictBase:
        """Every stored transition, in storage order, as a buffer that stores next frames per transition holds them.

        With ``share_next_pixels``, episode-end frame entries are left out and each transition's
        ``("next", "pixels")`` is rebuilt from the entry of its episode's next step; the last transition of an
        unfinished episode, whose next frame is not stored yet, is left out too. Retired entries
        (``retire_unrecorded_writes``) belong to no episode and are left out."""
        entries = self[: len(self)].exclude("index", WRITE_INDEX_KEY)
        entries = entries[entries.get(self.traj_key).reshape(-1) < RETIRED_TRAJ_BASE]
        if not self.share_next_pixels:
            return entries
        if entries.shape[0] == 0:  # nothing stored, or every entry retired
            return entries.exclude(END_FRAME_KEY).set(NEXT_PIXELS, entries.get("pixels"))
        # Episode ranks, not ids, keep the (episode, step) -> number map below int64's range (retired ids are huge).
        traj = torch.unique(entries.get(self.traj_key).reshape(-1), return_inverse=True)[1]
        step = entries.get(self.step_key).reshape(-1)
        key = traj * (int(step.max()) + 2) + step  # (episode, step) -> one sortable number
        sorted_keys, order = key.sort()
        at = torch.searchsorted(sorted_keys, key + 1).clamp(max=key.numel() - 1)
        keep = ~entries.get(END_FRAME_KEY) & (sorted_keys[at] == key + 1)
        out = entries[keep].exclude(END_FRAME_KEY)
        out.set(NEXT_PIXELS, entries.get("pixels")[order[at[keep]]])
        return out

    def _rows_with_next_pixels(self, entries: TensorDictBase) -> TensorDictBase:
        """``[B, T + 1]`` consecutive stored entries -> ``[B, T]`` transitions with their ``("next", "pixels")``."""
        T = self.seq_len
        if entries.get(END_FRAME_KEY)[:, :T].any():
            # An episode-end frame is its episode's last entry, so it can only be the (T+1)-th of a slice.
            raise RuntimeError("a sampled row holds an episode-end frame before its last entry: the stored steps "
                               f"of an episode ({self.step_key!r}) are not consecutive")
        rows = entries[:, :T].exclude(END_FRAME_KEY, WRITE_INDEX_KEY)
        rows.set(NEXT_PIXELS, entries.get("pixels")[:, 1:])
        return rows


def with_episode_end_frames(
    transitions: TensorDictBase, traj_key: NestedKey = DEFAULT_TRAJ_KEY, step_key: NestedKey = "step_count"
) -> TensorDictBase:
    """``[N]`` transitions -> the entries a shared-next-frame buffer stores (module docstring).

    ``("next", "pixels")`` is dropped; every transition that ends its episode is followed by an episode-end frame
    entry holding its next frame (step + 1, zero action and reward, ``END_FRAME_KEY`` True). Within the batch, a
    next frame that differs from the following step's frame of the same episode raises, naming the episode and
    step: dropping it would lose data. The input is not modified.
    """
    keys = transitions.keys(include_nested=True)
    if NEXT_PIXELS not in keys:
        raise ValueError("this replay stores each frame once and rebuilds ('next', 'pixels') from the following "
                         "step; the transitions given have no ('next', 'pixels'). Build it with "
                         "share_next_pixels=False to store transitions without their next frames")
    pixels, next_pixels = transitions.get("pixels"), transitions.get(NEXT_PIXELS)
    traj, step = transitions.get(traj_key).reshape(-1), transitions.get(step_key).reshape(-1)
    follows = ((traj[1:] == traj[:-1]) & (step[1:] == step[:-1] + 1)).nonzero().reshape(-1)
    if follows.numel():
        differ = (next_pixels[follows] != pixels[follows + 1]).flatten(1).any(1)
        if differ.any():
            i = int(follows[differ.nonzero()[0, 0]])
            raise ValueError(f"episode {int(traj[i])}: the next frame of step {int(step[i])} differs from the frame "
                             f"stored at step {int(step[i]) + 1}; a replay that stores each frame once needs them "
                             "equal (use share_next_pixels=False)")
    if ("next", "done") not in keys:
        raise ValueError("a replay that stores each frame once needs ('next', 'done') to find episode ends; the "
                         "transitions given have none")
    ends = transitions.get(("next", "done")).reshape(-1).nonzero().reshape(-1)
    n, m = transitions.shape[0], ends.numel()
    marked = transitions.copy()  # shallow: the caller's TensorDict keeps its keys
    marked.set(END_FRAME_KEY, torch.zeros(n, dtype=torch.bool))
    end_frames = marked[ends].clone()
    end_frames.set("pixels", end_frames.get(NEXT_PIXELS))
    end_frames.set(step_key, end_frames.get(step_key) + 1)
    end_frames.set(END_FRAME_KEY, torch.ones(m, dtype=torch.bool))
    for key in ("action", ("next", "reward"), "is_init"):
        if key in keys:  # the end frame takes no action and is no first step
            end_frames.set(key, torch.zeros_like(end_frames.get(key)))
    # Each end frame right after its transition: transition i moves down by the end frames before it.
    position = torch.cat([torch.arange(n) + torch.searchsorted(ends, torch.arange(n)), ends + torch.arange(m) + 1])
    order = torch.empty(n + m, dtype=torch.long)
    order[position] = torch.arange(n + m)
    return torch.cat([marked, end_frames]).exclude(NEXT_PIXELS)[order]


def forget_episode_index(rb: TensorDictReplayBuffer) -> None:
    """Drop the index of where each episode's steps sit that ``SliceSampler(fragmented=True)`` keeps and updates on
    writes only: after the storage changes otherwise (a rewound length, rewritten ids) it would still draw what
    is no longer there. The sampler rebuilds it on the next sample."""
    empty = getattr(rb._sampler, "_empty", None)
    if empty is not None:
        empty()


def replay_layout(path: str | Path) -> str | None:
    """How the buffer at ``path`` stores next frames (``"shared"`` / ``"per_transition"``), None if none is there."""
    path = Path(path)
    if (path / LAYOUT_FILE).exists():
        return json.loads((path / LAYOUT_FILE).read_text())["next_pixels"]
    if (path / "storage" / f"{END_FRAME_KEY}.memmap").exists():
        return SHARED  # the layout file was lost; the storage says it
    if (path / "storage" / "storage_metadata.json").exists():
        return PER_TRANSITION  # saved before the layout was recorded: next frames were stored per transition
    return None


def _write_layout(path: Path, layout: str) -> None:
    with open(path / LAYOUT_FILE, "w") as f:
        f.write(json.dumps({"next_pixels": layout}))
        f.flush()
        os.fsync(f.fileno())


def make_replay(
    capacity: int,
    seq_len: int,
    batch_size: int,
    path: str | Path | None = None,
    *,
    traj_key: NestedKey = DEFAULT_TRAJ_KEY,
    step_key: NestedKey = "step_count",
    compress_pixels: bool = True,
    pixel_keys: Sequence[NestedKey] = DEFAULT_PIXEL_KEYS,
    exclude_keys: Sequence[NestedKey] = (),
    share_next_pixels: bool | None = None,
    seed: int | None = None,
    prefetch: int | None = None,
) -> SequenceReplayBuffer:
    """Replay of up to ``capacity`` entries; ``sample()`` gives ``[batch_size, seq_len]`` within-episode slices.

    ``path``: directory for the memmapped storage (``path/storage``); a buffer saved there with
    :func:`save_replay` is reopened (its stored capacity must equal ``capacity``). ``None`` uses a temporary
    directory removed at exit. ``seed`` seeds the sampler's generator (reproducible batches).
    ``share_next_pixels``: store each frame once (see the module docstring); ``None`` keeps the layout of the
    buffer at ``path``, and shares for a new one. See the module docstring for the episode-boundary rule and the
    pixel storage format.
    """
    for name, value in (("capacity", capacity), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if prefetch is not None and prefetch < 1:
        raise ValueError(f"prefetch must be None or >= 1, got {prefetch}")

    path = None if path is None else Path(path).absolute()
    on_disk = None if path is None else replay_layout(path)
    if share_next_pixels is None:
        share_next_pixels = on_disk != PER_TRANSITION
    elif on_disk is not None and share_next_pixels != (on_disk == SHARED):
        raise ValueError(f"replay at {path} stores next frames {on_disk!r}, got share_next_pixels={share_next_pixels}")
    slice_len = seq_len + int(share_next_pixels)
    if slice_len > capacity:
        raise ValueError(f"seq_len ({seq_len}, {slice_len} stored entries per row) cannot exceed capacity "
                         f"({capacity})")
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        if on_disk is None:
            _write_layout(path, SHARED if share_next_pixels else PER_TRANSITION)
    storage = LazyMemmapStorage(
        capacity,
        scratch_dir=None if path is None else path / "storage",
        existsok=True,
    )
    sampler = SliceSampler(
        slice_len=slice_len,
        traj_key=traj_key,
        step_key=step_key,
        fragmented=True,
        strict_length=True,
        init_key=None,
        truncated_key=None,
    )
    transform = PixelsAsUint8(pixel_keys, exclude_keys) if compress_pixels else None
    if transform is None and exclude_keys:
        raise ValueError("exclude_keys needs compress_pixels=True (they are dropped by the write transform)")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    rb = SequenceReplayBuffer(
        seq_len=seq_len,
        path=path,
        share_next_pixels=share_next_pixels,
        traj_key=traj_key,
        step_key=step_key,
        storage=storage,
        sampler=sampler,
        batch_size=batch_size * slice_len,
        transform=transform,
        generator=generator,
        prefetch=prefetch,
    )
    if path is not None and (path / "storage" / "storage_metadata.json").exists():
        note = path / POSITION_NOTE
        if note.exists():
            kept_in = json.loads(note.read_text())["position_kept_in"]
            warnings.warn(
                f"{path} was reopened as of its first save: its current length and write cursor are kept in "
                f"{kept_in}. For a d4func run's replay use d4func.train.checkpoint.open_run_replay(run_dir).",
                StaleReplayPositionWarning,
                stacklevel=2,
            )
        rb.loads(path)
        if rb.storage.initialized:
            keys = rb.storage._storage.keys()
            if (END_FRAME_KEY in keys) != share_next_pixels:
                raise ValueError(f"replay at {path}: {LAYOUT_FILE} says next frames are stored "
                                 f"{'once' if share_next_pixels else 'per transition'}, its storage says otherwise")
            if WRITE_INDEX_KEY not in keys:
                rb.entries_written = None  # written before entries were numbered
            elif len(rb):
                rb.entries_written = int(rb.storage._storage.get(WRITE_INDEX_KEY)[: len(rb)].max()) + 1
        # loads() restores the saved batch size; the caller's batch shape wins.
        rb._batch_size = batch_size * slice_len
        stored = rb.storage.max_size if not rb.storage.initialized else rb.storage._storage.shape[0]
        if stored != capacity:
            raise ValueError(f"replay at {path} was created with capacity {stored}, got capacity={capacity}")
        if seed is not None:
            # loads() restores the saved RNG state; an explicit seed wins.
            rb.set_rng(torch.Generator().manual_seed(seed))
    return rb


def save_replay(rb: SequenceReplayBuffer, position_kept_in: str | None = None) -> Path:
    """Record a path-backed buffer's length, cursor and RNG state next to its memmaps (data is already there).

    ``position_kept_in``: where the owner records the position from now on (e.g. a run's checkpoints), for a
    buffer saved once and then extended; reopening it with :func:`make_replay` alone then warns, naming it."""
    if rb.path is None:
        raise ValueError("this replay buffer has no path; build it with make_replay(..., path=DIR) to save it")
    rb.dumps(rb.path)
    note = rb.path / POSITION_NOTE
    if position_kept_in is not None:
        note.write_text(json.dumps({"position_kept_in": position_kept_in}))
    else:
        note.unlink(missing_ok=True)  # the position on disk is current again
    return rb.path
