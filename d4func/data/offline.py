"""Offline datasets: episodes recorded through a TorchRL ``Collector`` into the replay format on disk.

Dreamer 4 learns its world model from offline videos and actions (paper Sec. 3-4); here a dataset is exactly a
saved :func:`d4func.data.replay.make_replay` buffer, so offline training reads the same ``[B, T]`` within-episode
slices as online training. A dataset directory holds

- ``storage/``: the memmapped transitions (TorchRL layout: ``pixels``, ``action``, ``("next", "reward")``,
  ``("next", "done" | "terminated" | "truncated")``, ``step_count``, ``is_init``, ``("collector", "traj_ids")``,
  env-specific entries such as Crafter's ``achievements``; pixels stored as uint8). Each frame is stored once:
  samples rebuild a transition's ``("next", "pixels")`` (the frame its action led to: ``replay.final_frame``
  trains on a row's last one) from the next step's entry or, after an episode's last step, from an episode-end
  frame entry (``episode_end_frame`` True; :mod:`d4func.data.replay`); ``replay_layout.json`` says so. Episodes
  recorded elsewhere are written in this format by :mod:`d4func.data.import_episodes`;
- the buffer's own state files (``buffer_metadata.json``, ``writer/``, ...) from ``rb.dumps``;
- ``dataset.json``: what was recorded (env name and config, policy, seed, step and episode counts, the stored
  entries ``stored_entries`` (transitions plus episode-end frames) and ``next_pixels`` layout, the specs of what
  a sampled transition holds, and ``capacity``: room for twice the steps, the worst case of one end frame per
  step, free in sparse memmap files).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tensordict
import torch
import torchrl
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.collectors import Collector
from torchrl.data import Bounded, Categorical, OneHot, TensorSpec
from torchrl.envs import EnvBase

from d4func.data.replay import (
    DEFAULT_TRAJ_KEY,
    END_FRAME_KEY,
    NEXT_PIXELS,
    PER_TRANSITION,
    SHARED,
    WRITE_INDEX_KEY,
    SequenceReplayBuffer,
    make_replay,
    save_replay,
)

__all__ = [
    "DATASET_FORMAT",
    "META_FILE",
    "UniformRandomPolicy",
    "collect",
    "dataset_capacity",
    "entry_specs",
    "load_offline",
    "read_metadata",
    "record_episodes",
    "sampled_entry_specs",
    "storage_metadata",
]

DATASET_FORMAT = "d4func-replay-v1"
META_FILE = "dataset.json"


class UniformRandomPolicy(TensorDictModuleBase):
    """Uniform random actions from an explicit ``torch.Generator`` (reproducible from ``seed`` alone).

    TorchRL's ``RandomPolicy`` draws from the global RNG; a dataset should be reproducible from its metadata.
    Supports bounded continuous (uniform in [low, high]), categorical and one-hot action specs.
    """

    def __init__(self, action_spec: TensorSpec, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(action_spec, (Bounded, Categorical, OneHot)):
            raise TypeError(
                f"UniformRandomPolicy supports Bounded, Categorical and OneHot action specs, got {type(action_spec)}"
            )
        self.action_spec = action_spec
        self.generator = torch.Generator().manual_seed(seed)
        self.in_keys = []
        self.out_keys = ["action"]

    def _sample(self, batch_shape: torch.Size) -> torch.Tensor:
        spec = self.action_spec
        shape = batch_shape + spec.shape
        if isinstance(spec, Bounded):
            low, high = spec.space.low, spec.space.high
            u = torch.rand(shape, generator=self.generator, dtype=spec.dtype)
            return low + u * (high - low)
        if isinstance(spec, Categorical):
            return torch.randint(spec.space.n, shape, generator=self.generator, dtype=spec.dtype)
        n = spec.space.n
        idx = torch.randint(n, batch_shape + spec.shape[:-1], generator=self.generator)
        return torch.nn.functional.one_hot(idx, n).to(spec.dtype)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        tensordict.set("action", self._sample(tensordict.batch_size))
        return tensordict


def entry_specs(data: TensorDictBase) -> dict[str, dict[str, Any]]:
    """Per-step shape and dtype of every stored entry (batch dim dropped), keyed by ``"a.b"`` paths."""
    out = {}
    for key, value in data.items(include_nested=True, leaves_only=True):
        name = key if isinstance(key, str) else ".".join(key)
        out[name] = {"shape": list(value.shape[1:]), "dtype": str(value.dtype).removeprefix("torch.")}
    return out


def dataset_capacity(transitions: int) -> int:
    """Stored entries to make room for in a dataset of up to ``transitions`` steps: one episode-end frame per step,
    the worst case (one-step episodes). Memmaps are sparse files, so unused room takes no disk."""
    return 2 * transitions


def sampled_entry_specs(rb: SequenceReplayBuffer) -> dict[str, dict[str, Any]]:
    """:func:`entry_specs` of what a sampled transition of ``rb`` holds (``("next", "pixels")`` included where the
    buffer rebuilds it from shared frames), from its first stored entry."""
    specs = entry_specs(rb[:1].exclude("index", END_FRAME_KEY, WRITE_INDEX_KEY))
    if rb.share_next_pixels:
        specs[".".join(NEXT_PIXELS)] = specs["pixels"]
    return specs


def storage_metadata(rb: SequenceReplayBuffer) -> dict[str, Any]:
    """The dataset.json fields that describe ``rb``'s storage: entries stored, next-frame layout, entry specs, and
    a fresh ``dataset_id``."""
    return {"stored_entries": len(rb), "next_pixels": SHARED if rb.share_next_pixels else PER_TRANSITION,
            "entries": sampled_entry_specs(rb),
            # New for every dataset written: a run resuming on a dataset recorded again at its path is refused.
            "dataset_id": uuid.uuid4().hex}


@contextmanager
def removed_on_failure(path: Path) -> Iterator[None]:
    """What the block writes under ``path`` is removed if it raises (Ctrl-C included), so that a corrected rerun
    can write there; entries that were there before it stay."""
    existing = set(path.iterdir()) if path.is_dir() else None
    try:
        yield
    except BaseException:
        if existing is None:
            shutil.rmtree(path, ignore_errors=True)
        else:
            for entry in set(path.iterdir()) - existing:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        raise


def record_episodes(
    env: EnvBase | Callable[[], EnvBase],
    path: str | Path,
    *,
    n_steps: int | None = None,
    n_episodes: int | None = None,
    policy: TensorDictModuleBase | None = None,
    seed: int = 0,
    frames_per_batch: int = 200,
    max_steps: int = 100_000,
    env_config: dict[str, Any] | None = None,
    policy_name: str | None = None,
) -> dict[str, Any]:
    """Record transitions of ``env`` into a dataset directory at ``path`` and return its metadata.

    Stops after ``n_steps`` transitions, or after ``n_episodes`` complete episodes (exactly one of the two);
    in step mode the last episode may be cut short: its last stored step is then marked truncated (``done``),
    as the recording ended it, so its next frame is kept.
    ``policy`` defaults to :class:`UniformRandomPolicy` seeded with ``seed``. ``max_steps`` caps the storage in
    episode mode. ``env_config`` (e.g. from :func:`d4func.envs.registry.env_config`) is saved in the metadata.
    The collector closes ``env`` when recording ends.
    """
    if (n_steps is None) == (n_episodes is None):
        raise ValueError(f"give exactly one of n_steps and n_episodes, got n_steps={n_steps}, n_episodes={n_episodes}")
    if n_steps is not None and n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if n_episodes is not None and n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if frames_per_batch < 1:
        raise ValueError(f"frames_per_batch must be >= 1, got {frames_per_batch}")
    path = Path(path).absolute()
    if (path / META_FILE).exists() or (path / "storage").exists():
        raise FileExistsError(f"{path} already holds a dataset; choose a new directory")
    capacity = n_steps if n_steps is not None else max_steps
    if env_config is not None:
        try:
            json.dumps(env_config)
        except TypeError as e:
            raise TypeError(f"env_config must be JSON-serialisable, got {env_config!r}") from e

    if not isinstance(env, EnvBase):
        env = env()
    if policy is None:
        policy = UniformRandomPolicy(env.action_spec, seed=seed)
        policy_name = policy_name or "uniform_random"
    policy_name = policy_name or type(policy).__name__

    with removed_on_failure(path):
        return _record(env, policy, path, capacity, n_steps, n_episodes, frames_per_batch, {
            "format": DATASET_FORMAT, "capacity": dataset_capacity(capacity), "seed": seed, "policy": policy_name,
            "env": repr(env), "env_config": env_config})


def _record(env: EnvBase, policy: TensorDictModuleBase, path: Path, capacity: int, n_steps: int | None,
            n_episodes: int | None, frames_per_batch: int, meta: dict[str, Any]) -> dict[str, Any]:
    """:func:`record_episodes` once its arguments are checked: fill the storage, then write its metadata."""
    # seq_len=1 only because make_replay needs one; readers pick their own with load_offline.
    rb = make_replay(dataset_capacity(capacity), 1, 1, path=path)
    collector = Collector(env, policy, frames_per_batch=min(frames_per_batch, capacity), total_frames=-1)
    written = 0
    completed = 0
    try:
        for batch in collector:
            batch = batch.reshape(-1)
            if n_episodes is not None:
                ends = batch["next", "done"].reshape(-1).nonzero().reshape(-1)
                need = n_episodes - completed
                if ends.numel() >= need:
                    batch = batch[: int(ends[need - 1]) + 1]
            batch = batch[: capacity - written]
            completed += int(batch["next", "done"].sum())  # the env's ends, not the recording's
            if n_steps is not None and written + batch.shape[0] == capacity:
                batch = _end_recording(batch)
            rb.extend(batch)
            written += batch.shape[0]
            if written >= capacity or (n_episodes is not None and completed >= n_episodes):
                break
    finally:
        collector.shutdown()
    if n_episodes is not None and completed < n_episodes:
        raise RuntimeError(f"{n_episodes} episodes do not fit in max_steps={capacity} transitions ({completed} "
                           f"complete after {written} steps); raise max_steps")

    save_replay(rb)
    meta = {
        **meta,
        "n_steps": written,
        "n_episodes_complete": completed,
        "traj_key": list(DEFAULT_TRAJ_KEY),
        "step_key": "step_count",
        **storage_metadata(rb),
        "versions": {"torch": torch.__version__, "torchrl": torchrl.__version__, "tensordict": tensordict.__version__},
    }
    (path / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def _end_recording(batch: TensorDictBase) -> TensorDictBase:
    """The recording's last ``[N]`` batch with the last step of every episode still running marked truncated (the
    recording, not the env, ended them), so their next frames are stored (:mod:`d4func.data.replay`)."""
    traj = batch.get(DEFAULT_TRAJ_KEY).reshape(-1)
    done = batch.get(("next", "done")).reshape(-1)
    position = torch.arange(traj.numel())
    last_of_episode = torch.stack([position[traj == t].max() for t in traj.unique()])
    cut = last_of_episode[~done[last_of_episode]]
    batch = batch.clone()
    for key in ("done", "truncated"):
        if ("next", key) in batch.keys(include_nested=True):
            batch["next", key][cut] = True
    return batch


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``dataset.json`` of a recorded dataset; raises a clear error for anything else."""
    meta_file = Path(path) / META_FILE
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not a d4func dataset: {meta_file} is missing")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != DATASET_FORMAT:
        raise ValueError(f"{meta_file} has format {meta.get('format')!r}, expected {DATASET_FORMAT!r}")
    return meta


def load_offline(
    path: str | Path, seq_len: int, batch_size: int, *, seed: int | None = None
) -> SequenceReplayBuffer:
    """Reopen a recorded dataset as a replay buffer sampling ``[batch_size, seq_len]`` within-episode slices.

    The memmaps are opened in place (no copy): the buffer is meant for reading; writing to it changes the files.
    """
    meta = read_metadata(path)
    rb = make_replay(meta["capacity"], seq_len, batch_size, path=path, seed=seed)
    stored = meta.get("stored_entries", meta["n_steps"])  # datasets written before the key: one per transition
    if len(rb) != stored:
        raise RuntimeError(f"dataset at {path} should hold {stored} stored entries, found {len(rb)}")
    return rb


def collect(
    env_name: str,
    out: str | Path,
    steps: int,
    seed: int = 0,
    policy: str = "random",
    *,
    image_size: int = 64,
    action_repeat: int = 2,
) -> dict[str, Any]:
    """``d4func collect``: record ``steps`` transitions of env ``env_name`` with a random policy into ``out``.

    ``env_name``: ``"dmc:cartpole-swingup"``, ``"dmc:cartpole-swingup@0,1"`` (cameras 0 and 1) or ``"crafter"``.
    Returns the dataset metadata.
    """
    from d4func.envs.registry import env_config, make_env

    if policy != "random":
        raise ValueError(
            f"collect supports policy='random' only, got {policy!r}; record a trained policy with record_episodes"
        )
    cfg = env_config(env_name, seed=seed, image_size=image_size, action_repeat=action_repeat)
    env = make_env(env_name, seed=seed, image_size=image_size, action_repeat=action_repeat)
    return record_episodes(env, out, n_steps=steps, seed=seed, env_config=cfg, policy_name="uniform_random")
