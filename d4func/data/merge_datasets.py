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
from torch import Tensor

from d4func.data.import_episodes import import_episodes
from d4func.data.offline import load_offline, read_metadata
from d4func.data.replay import NEXT_PIXELS

__all__ = ["dataset_episodes", "merge_datasets"]

# Entries every d4func dataset holds (or that the import writes afresh): anything else is env-specific.
_CARRIED = {"pixels", "action", "step_count", "is_init", "done", "terminated", "truncated", ("next", "reward"),
            ("next", "done"), ("next", "terminated"), ("next", "truncated"), ("next", "step_count"),
            ("next", "is_init"), NEXT_PIXELS, ("collector", "traj_ids")}


def _stored_transitions(path: Path) -> TensorDictBase:
    """Every stored transition of the dataset, each with its next frame (`SequenceReplayBuffer.stored_transitions`)."""
    return load_offline(path, seq_len=1, batch_size=1).stored_transitions()


def _dropped_keys(transitions: TensorDictBase) -> list[str]:
    keys = transitions.keys(include_nested=True, leaves_only=True)
    return sorted(".".join(key) if isinstance(key, tuple) else key for key in keys if key not in _CARRIED)


def _as_stored(pixels: Tensor) -> Tensor:
    """Frames as the dataset stores them, uint8: sampling reads them as floats k / 255, which round back exactly."""
    return pixels if pixels.dtype == torch.uint8 else (pixels * 255).round().to(torch.uint8)


def dataset_episodes(path: str | Path) -> Iterator[dict[str, Any]]:
    """The episodes of the dataset at `path`, in the order they were stored, as `import_episodes` reads them
    (`channels_last=False`, rewards on actions): `pixels` `[T + 1, ...]` uint8 (the frame after the last action
    included; `[T, ...]` for a dataset imported without it), `action` `[T, A]` (or `[T]` class indices), `reward`
    `[T]`, `terminated` and `name`."""
    path = Path(path)
    transitions = _stored_transitions(path)
    # Datasets imported without the frame after each episode's last action store no next frames at all.
    has_final = NEXT_PIXELS in transitions.keys(include_nested=True)
    traj = transitions.get(("collector", "traj_ids")).reshape(-1)
    for episode_id in dict.fromkeys(traj.tolist()):  # first appearance: the order they were stored in
        steps = (traj == episode_id).nonzero().reshape(-1)
        episode = transitions[steps[torch.argsort(transitions.get("step_count")[steps].reshape(-1), stable=True)]]
        action = episode.get("action")
        pixels = episode.get("pixels")
        if has_final:
            pixels = torch.cat([pixels, episode.get(NEXT_PIXELS)[-1:]])
        yield {
            "pixels": _as_stored(pixels),
            "action": action if torch.is_floating_point(action) else action.reshape(-1),
            "reward": episode.get(("next", "reward")).reshape(-1),
            "terminated": bool(episode.get(("next", "terminated"))[-1].item()),
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
        dropped = _dropped_keys(_stored_transitions(source))
        if dropped:
            warnings.warn(f"{source} holds entries the merged dataset does not carry: {dropped}", stacklevel=2)
    capacity = sum(int(meta["n_steps"]) for meta in metas)
    policies = list(dict.fromkeys(str(meta.get("policy")) for meta in metas))

    def episodes() -> Iterator[dict[str, Any]]:
        for source in sources:
            yield from dataset_episodes(source)

    return import_episodes(episodes(), out, channels_last=False, capacity=capacity,
                           env_config=metas[0].get("env_config"), source=f"merged: {', '.join(policies)}")
