"""Read a d4func dataset back as episodes, and merge several datasets into one.

Offline runs train on one dataset directory (`loop.offline_data`). Recordings are often made in pieces: several
processes recording side by side (one core each), a second session adding episodes to the first. `merge_datasets`
writes the episodes of several datasets, in the order given, into a new one through
:func:`d4func.data.import_episodes.import_episodes`, so the result is an ordinary dataset with every frame stored once
and a fresh `dataset_id`. The sources stay as they are.

What carries over is what training reads: frames (the frame after each episode's last action included), actions,
rewards and whether an episode ended in a terminal state or was cut off. Env-specific entries (Crafter's
`achievements`) do not; a warning names them. Merged datasets must come from the same env: their `env_config`s may
differ only in the seed they were recorded with, and the merged dataset keeps the first one's.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase

from d4func.data.import_episodes import import_episodes
from d4func.data.offline import load_offline, read_metadata
from d4func.data.replay import DEFAULT_TRAJ_KEY, END_FRAME_KEY, NEXT_PIXELS, RETIRED_TRAJ_BASE, WRITE_INDEX_KEY

__all__ = ["dataset_episodes", "merge_datasets"]

# Entries every d4func dataset holds (or that the import writes afresh): anything else is env-specific.
_CARRIED = {"pixels", "action", "step_count", "is_init", "done", "terminated", "truncated", "index", END_FRAME_KEY,
            WRITE_INDEX_KEY, ("next", "reward"), ("next", "done"), ("next", "terminated"), ("next", "truncated"),
            ("next", "step_count"), ("next", "is_init"), NEXT_PIXELS, DEFAULT_TRAJ_KEY}


def _stored_entries(path: Path) -> tuple[TensorDictBase, bool]:
    """The dataset's stored entries as memory maps (nothing is read until indexed: frames stay uint8 on disk), and
    whether each frame is stored once (episode-end frame entries) rather than beside every transition."""
    rb = load_offline(path, seq_len=1, batch_size=1)
    return rb.storage[: len(rb)], rb.share_next_pixels


def _dropped_keys(entries: TensorDictBase) -> list[str]:
    keys = entries.keys(include_nested=True, leaves_only=True)
    return sorted(".".join(key) if isinstance(key, tuple) else key for key in keys if key not in _CARRIED)


def dataset_episodes(path: str | Path) -> Iterator[dict[str, Any]]:
    """The episodes of the dataset at `path`, in the order they were stored, as `import_episodes` reads them
    (`channels_last=False`, rewards on actions): `pixels` `[T + 1, ...]` uint8 (the frame after the last action
    included; `[T, ...]` for a dataset imported without it), `action` `[T, A]` (or `[T]` class indices), `reward`
    `[T]`, `terminated` and `name`. One episode at a time is read from disk.

    As `SequenceReplayBuffer.stored_transitions` does, an episode whose last transition has no next frame stored
    (the newest episode of a replay still being written) ends one transition early, at that transition's frame."""
    path = Path(path)
    entries, shared = _stored_entries(path)
    traj = entries.get(DEFAULT_TRAJ_KEY).reshape(-1).clone()
    step = entries.get("step_count").reshape(-1).clone()
    end_frame = entries.get(END_FRAME_KEY).reshape(-1).clone() if shared else torch.zeros_like(traj, dtype=torch.bool)
    per_transition_next = not shared and NEXT_PIXELS in entries.keys(include_nested=True)
    for episode_id in dict.fromkeys(traj.tolist()):  # first appearance: the order they were stored in
        if episode_id >= RETIRED_TRAJ_BASE:  # entries a resumed online run retired: no episode's
            continue
        at = (traj == episode_id).nonzero().reshape(-1)
        steps = at[~end_frame[at]]
        steps = steps[torch.argsort(step[steps], stable=True)]
        ends = at[end_frame[at]]
        frames = entries.get("pixels")[steps]
        action, reward = entries.get("action")[steps], entries.get(("next", "reward"))[steps].reshape(-1)
        terminated = entries.get(("next", "terminated"))[steps].reshape(-1)
        if ends.numel():
            frames = torch.cat([frames, entries.get("pixels")[ends[:1]]])
        elif per_transition_next:
            frames = torch.cat([frames, entries.get(NEXT_PIXELS)[steps[-1:]]])
        elif shared:  # the last transition's next frame is not stored: its own frame ends the episode
            action, reward, terminated = action[:-1], reward[:-1], terminated[:-1]
        yield {
            "pixels": frames,
            "action": action if torch.is_floating_point(action) else action.reshape(-1),
            "reward": reward,
            "terminated": bool(terminated[-1]) if terminated.numel() else False,
            "name": f"{path} episode {episode_id}",
        }


def _same_env(first: dict[str, Any] | None, other: dict[str, Any] | None, first_path: Path, other_path: Path) -> None:
    def without_seed(config: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if config is None else {key: value for key, value in config.items() if key != "seed"}

    if without_seed(first) != without_seed(other):
        raise ValueError(f"dataset {other_path} comes from env_config {other}, {first_path} from {first}: merged "
                         "datasets must come from the same env (only the seed may differ)")


def merge_datasets(sources: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Write the episodes of every dataset in `sources`, in order, as one new dataset at `out`; returns its
    metadata (`policy` names the sources' policies). See the module docstring for what carries over."""
    sources = [Path(source) for source in sources]
    if len(sources) < 2:
        raise ValueError(f"merge needs at least two datasets, got {[str(s) for s in sources]}")
    if len(set(map(Path.resolve, sources))) != len(sources):
        raise ValueError(f"a dataset is named twice in {[str(s) for s in sources]}")
    metas = [read_metadata(source) for source in sources]  # each names a missing dataset before anything is written
    for source, meta in zip(sources[1:], metas[1:], strict=True):
        _same_env(metas[0].get("env_config"), meta.get("env_config"), sources[0], source)
    for source in sources:
        dropped = _dropped_keys(_stored_entries(source)[0])
        if dropped:
            warnings.warn(f"{source} holds entries the merged dataset does not carry: {dropped}", stacklevel=2)
    capacity = sum(int(meta["n_steps"]) for meta in metas)
    policies = list(dict.fromkeys(str(meta.get("policy")) for meta in metas))

    def episodes() -> Iterator[dict[str, Any]]:
        for source in sources:
            yield from dataset_episodes(source)

    return import_episodes(episodes(), out, channels_last=False, capacity=capacity,
                           env_config=metas[0].get("env_config"), source=f"merged: {', '.join(policies)}")
