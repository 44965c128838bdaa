"""Import episodes recorded outside d4func (a robot's logs, another RL library's replay) as an offline dataset.

Dreamer 4 is meant to learn from recorded videos and actions (paper Sec. 3-4), and most such data never passed
through a TorchRL env. :func:`import_episodes` writes plain per-episode arrays into the same on-disk format as
``d4func collect`` (:mod:`d4func.data.offline`), so ``loop.mode=offline`` trains on them unchanged.

One episode is a mapping with

- ``"pixels"``: ``[T, H, W, C]`` frames (``[T, C, H, W]`` with ``channels_last=False``), uint8 or float in
  [0, 1]; several cameras as ``[T, V, H, W, C]`` or as a list of per-camera arrays (stacked in the given order);
- ``"action"``: ``[T, A]`` float in [-1, 1] (continuous; ``[T]`` is read as A = 1), or ``[T]`` integer indices
  (discrete). Rescale continuous actions to [-1, 1] first: the policy's distributions live there;
- ``"reward"``: ``[T]``;
- ``"terminated"`` (optional, default False): whether the episode ended in a terminal state (no bootstrapping
  past it) rather than being cut off; a bool, or one flag per step of which only the last may be True;
- ``"name"`` (optional): how error messages refer to the episode (e.g. its file).

Time alignment, ``rewards_on``:

- ``"action"`` (TorchRL's and d4func's layout): ``reward[t]`` and ``terminated[t]`` follow ``action[t]``, taken at
  ``pixels[t]``. ``pixels`` holds one frame more than the actions (the frame after the last action; samples
  read each transition's next frame as ``("next", "pixels")``, every frame stored once), or as many: then
  training needs ``replay.final_frame=false``, and the reward of each episode's last action is never learned (it
  has no frame to be predicted at).
- ``"arrival"`` (DreamerV3's layout): ``reward[t]`` and ``terminated[t]`` were received on arriving at
  ``pixels[t]``, so ``reward[0]`` is ignored and the last frame's action has no outcome: an episode of T frames
  gives T - 1 transitions, and the last frame is the one after the last of them.

Frames are stored as uint8 (float frames are rounded to multiples of 1/255), as in every d4func dataset. Every
episode must share the first one's frame shape and action kind; a bad value stops the import with a message
naming the episode and the value.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensordict
import torch
import torchrl
from einops import rearrange
from tensordict import TensorDict
from torch import Tensor

from d4func.data.chunk_chains import chain_chunks
from d4func.data.offline import (
    DATASET_FORMAT,
    META_FILE,
    dataset_capacity,
    removed_on_failure,
    storage_metadata,
)
from d4func.data.replay import DEFAULT_TRAJ_KEY, make_replay, save_replay

__all__ = ["REWARD_ALIGNMENTS", "NoTransitionError", "episode_transitions", "import_episodes", "import_npz_episodes"]

REWARD_ALIGNMENTS = ("action", "arrival")


class NoTransitionError(ValueError):
    """An episode too short to hold a transition: one frame under ``rewards_on="arrival"``, no action under
    ``"action"``. Such a piece is routine in chunked recordings (an episode that starts on a chunk's last step),
    so :func:`import_episodes` skips it and counts it."""


def _as_tensor(value: Any, what: str) -> Tensor:
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} cannot be read as an array: {e}") from e


def _frames(pixels: Any, channels_last: bool, where: str) -> Tensor:
    """Any accepted pixel layout -> uint8 ``[T, C, H, W]`` or ``[T, V, C, H, W]``."""
    if isinstance(pixels, (list, tuple)):
        cameras = [_as_tensor(p, f"{where} camera {i}") for i, p in enumerate(pixels)]
        if any(c.shape != cameras[0].shape for c in cameras):
            raise ValueError(f"{where}: cameras have different shapes {[list(c.shape) for c in cameras]}")
        if cameras[0].dim() != 4:
            raise ValueError(f"{where}: each camera must be [T, H, W, C] or [T, C, H, W], got {list(cameras[0].shape)}")
        frames = torch.stack(cameras, dim=1)
    else:
        frames = _as_tensor(pixels, where)
    if frames.dim() not in (4, 5):
        raise ValueError(f"{where} must be [T, H, W, C] (one camera) or [T, V, H, W, C] (V cameras), got shape "
                         f"{list(frames.shape)}")
    if channels_last:
        channels, other = frames.shape[-1], frames.shape[-3]
        if channels > 4 and other <= 4:
            raise ValueError(f"{where} has shape {list(frames.shape)}: {channels} channels last looks like channels "
                             f"first ({other} channels); pass channels_last=False (--channels-first)")
        frames = rearrange(frames, "... h w c -> ... c h w")
    elif frames.shape[-3] > 4 and frames.shape[-1] <= 4:
        raise ValueError(f"{where} has shape {list(frames.shape)}: {frames.shape[-3]} channels first looks like "
                         f"channels last ({frames.shape[-1]} channels); pass channels_last=True (no --channels-first)")
    if frames.shape[0] == 0:
        raise ValueError(f"{where} holds no frames")
    if frames.dtype == torch.uint8:
        return frames
    if not torch.is_floating_point(frames):
        raise ValueError(f"{where} must be uint8 or float in [0, 1], got dtype {frames.dtype}")
    if not torch.isfinite(frames).all() or frames.min() < 0 or frames.max() > 1:
        raise ValueError(f"{where} must lie in [0, 1] as floats, got min {frames.min().item():.6g}, max "
                         f"{frames.max().item():.6g} (pass uint8 for 0-255 values)")
    return frames.float().mul(255).round_().to(torch.uint8)


def _actions(action: Any, where: str) -> Tensor:
    """-> int64 ``[T]`` (discrete) or float32 ``[T, A]`` in [-1, 1] (continuous)."""
    actions = _as_tensor(action, where)
    if actions.dtype == torch.bool:
        raise ValueError(f"{where} is bool; give discrete actions as integer indices")
    if not torch.is_floating_point(actions):
        if actions.dim() == 2 and actions.shape[1] == 1:
            actions = actions[:, 0]
        if actions.dim() != 1:
            raise ValueError(f"{where}: discrete actions must be [T] integer indices, got shape {list(actions.shape)}")
        if actions.numel() and actions.min() < 0:
            raise ValueError(f"{where}: discrete actions must be >= 0, got {actions.min().item()}")
        return actions.long()
    if actions.dim() == 1:
        actions = actions[:, None]
    if actions.dim() != 2:
        raise ValueError(f"{where}: continuous actions must be [T, A] or [T], got shape {list(actions.shape)}")
    if actions.shape[1] > 1 and actions.numel() and ((actions == 0) | (actions == 1)).all() and (
            actions.sum(dim=1) == 1).all():
        raise ValueError(f"{where} looks one-hot ({actions.shape[1]} columns of 0/1, one 1 per step); give discrete "
                         "actions as integer indices (argmax)")
    if not torch.isfinite(actions).all():
        raise ValueError(f"{where} holds NaN or inf")
    low, high = actions.min().item() if actions.numel() else 0.0, actions.max().item() if actions.numel() else 0.0
    if low < -1 or high > 1:
        raise ValueError(f"{where}: continuous actions must lie in [-1, 1], got min {low:.6g}, max {high:.6g}; "
                         "rescale them (the policy acts in [-1, 1])")
    return actions.float()


def _rewards(value: Any, where: str) -> Tensor:
    """-> float32 ``[T]`` (``[T, 1]`` accepted), finite."""
    tensor = _as_tensor(value, where)
    if tensor.dim() == 2 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    if tensor.dim() != 1:
        raise ValueError(f"{where} must be [T], got shape {list(tensor.shape)}")
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{where} holds NaN or inf")
    return tensor


def _terminal_flag(terminated: Any, n_flags: int, ignore_first: bool, where: str) -> bool:
    """Whether the episode ends in a terminal state, from a bool or per-step flags (only the last may be set)."""
    if terminated is None:
        return False
    flags = _as_tensor(terminated, where).reshape(-1).bool()
    if flags.numel() == 1:
        return bool(flags.item())
    if flags.numel() != n_flags:
        raise ValueError(f"{where} has {flags.numel()} flags for {n_flags} steps; give one per step or one bool")
    early = flags[1 if ignore_first else 0 : -1].nonzero().reshape(-1)
    if early.numel():
        raise ValueError(f"{where} is set at step {int(early[0]) + int(ignore_first)} before the episode's last step "
                         f"{n_flags - 1}: split the episode there")
    return bool(flags[-1])


def _episode_label(episode_id: int, name: Any = None) -> str:
    """How errors name an episode: its index among those given, and its `name` (a file, a dataset) if it has one."""
    return f"episode {episode_id}" + (f" ({name})" if name else "")


def episode_transitions(
    episode: Mapping[str, Any],
    episode_id: int,
    *,
    channels_last: bool = True,
    rewards_on: str = "action",
) -> TensorDict:
    """One recorded episode -> its ``[T]`` transitions in d4func's replay layout (see the module docstring)."""
    if rewards_on not in REWARD_ALIGNMENTS:
        raise ValueError(f"rewards_on must be one of {REWARD_ALIGNMENTS}, got {rewards_on!r}")
    where = _episode_label(episode_id, episode.get("name"))
    missing = [key for key in ("pixels", "action", "reward") if key not in episode]
    if missing:
        raise ValueError(f"{where} has no {missing} (has {sorted(episode)})")
    frames = _frames(episode["pixels"], channels_last, f"{where} pixels")
    actions = _actions(episode["action"], f"{where} action")
    rewards = _rewards(episode["reward"], f"{where} reward")
    n_frames, n_actions, n_rewards = frames.shape[0], actions.shape[0], rewards.shape[0]
    if rewards_on == "action":
        if n_rewards != n_actions or n_frames not in (n_actions, n_actions + 1):
            raise ValueError(f"{where}: rewards_on='action' needs as many actions as rewards and as many frames or "
                             f"one more, got {n_frames} frames, {n_actions} actions, {n_rewards} rewards")
        steps = n_actions
        # The frame after each action, the last one included, when given: `replay.final_frame` trains on it.
        next_frames = frames[1:] if n_frames == n_actions + 1 else None
        frames = frames[:steps]
        terminal = _terminal_flag(episode.get("terminated"), steps, False, f"{where} terminated")
    else:
        if not n_frames == n_actions == n_rewards:
            raise ValueError(f"{where}: rewards_on='arrival' needs one frame, action and reward per step, got "
                             f"{n_frames} frames, {n_actions} actions, {n_rewards} rewards")
        steps = n_frames - 1
        # Transition t: frame t, action t, and what arriving at frame t + 1 gave.
        frames, next_frames, actions, rewards = frames[:steps], frames[1:], actions[:steps], rewards[1:]
        terminal = _terminal_flag(episode.get("terminated"), n_frames, True, f"{where} terminated")
    if steps < 1:
        raise NoTransitionError(f"{where} has no transition ({n_frames} frames, rewards_on={rewards_on!r})")
    last = torch.zeros(steps, 1, dtype=torch.bool)
    last[-1] = True
    first = torch.zeros(steps, 1, dtype=torch.bool)
    first[0] = True
    transitions = TensorDict(
        {
            "pixels": frames,
            "action": actions,
            "step_count": torch.arange(steps, dtype=torch.int64)[:, None],
            "is_init": first,
            "next": {
                "reward": rewards[:, None],
                "done": last,
                "terminated": last & terminal,
                "truncated": last & (not terminal),
            },
            "collector": {"traj_ids": torch.full((steps,), episode_id, dtype=torch.int64)},
        },
        batch_size=[steps],
    )
    if next_frames is not None:
        transitions["next", "pixels"] = next_frames
    return transitions


def _signature(transitions: TensorDict) -> str:
    """What every episode of a dataset must share: frame shape and action kind."""
    action = transitions["action"]
    kind = f"{action.shape[1]}-dim continuous" if torch.is_floating_point(action) else "discrete"
    final = "with" if ("next", "pixels") in transitions.keys(include_nested=True) else "without"
    return f"frames {list(transitions['pixels'].shape[1:])}, {kind} actions, {final} the frame after the last action"


def import_episodes(
    episodes: Iterable[Mapping[str, Any]],
    path: str | Path,
    *,
    channels_last: bool = True,
    rewards_on: str = "action",
    capacity: int | None = None,
    env_config: Mapping[str, Any] | None = None,
    source: str = "imported",
) -> dict[str, Any]:
    """Write recorded ``episodes`` (see the module docstring) as a d4func dataset at ``path``; returns its metadata.

    ``capacity``: the transitions to make room for. ``None`` counts them, which holds every episode in memory
    first; give it to stream episodes one at a time. ``env_config`` (:func:`d4func.envs.registry.env_config`)
    names an env the data comes from, so offline runs evaluate their policy in it; without one they train only.
    ``source`` is recorded as the dataset's policy (who acted).
    """
    if rewards_on not in REWARD_ALIGNMENTS:
        raise ValueError(f"rewards_on must be one of {REWARD_ALIGNMENTS}, got {rewards_on!r}")
    path = Path(path).absolute()
    if (path / META_FILE).exists():
        raise FileExistsError(f"{path} already holds a dataset; choose a new directory")
    if (path / "storage").exists():
        raise FileExistsError(f"{path} holds replay storage but no {META_FILE} (an interrupted import?): delete "
                              f"{path / 'storage'} or choose a new directory")
    if env_config is not None:
        try:
            json.dumps(dict(env_config))
        except TypeError as e:
            raise TypeError(f"env_config must be JSON-serialisable, got {env_config!r}") from e
    skipped: list[str] = []  # episodes without a transition (NoTransitionError): left out, counted
    names: dict[int, str] = {}  # how errors name an episode beyond its index (its file, or dataset)

    def convert_all() -> Iterator[TensorDict]:
        for i, episode in enumerate(episodes):
            if episode.get("name"):
                names[i] = episode["name"]
            try:
                yield episode_transitions(episode, i, channels_last=channels_last, rewards_on=rewards_on)
            except NoTransitionError as e:
                skipped.append(str(e))

    all_transitions: Iterable[TensorDict] = convert_all()
    if capacity is None:  # no episodes: _write_dataset says so
        all_transitions = list(all_transitions)
        capacity = sum(t.shape[0] for t in all_transitions)
    elif not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}")

    # A bad episode stops the import: leave the directory as it was, so a corrected rerun can write there.
    with removed_on_failure(path):
        return _write_dataset(all_transitions, path, capacity, env_config, source,
                              {"rewards_on": rewards_on, "channels_last": channels_last}, skipped, names)


def _check_env_frames(env_config: Mapping[str, Any], frame_shape: Sequence[int]) -> None:
    """Frames `[(V,) C, H, W]` against the size and cameras of the env the dataset says it comes from."""
    size = env_config.get("image_size")
    if size is not None and tuple(frame_shape[-2:]) != (size, size):
        raise ValueError(f"frames are {list(frame_shape[-2:])} pixels, but env_config says image_size={size} "
                         f"({env_config.get('name')}): pass the env's size (--image-size)")
    cameras = len(env_config.get("camera_ids") or [0])
    if cameras != (frame_shape[0] if len(frame_shape) == 4 else 1):
        raise ValueError(f"frames of shape {list(frame_shape)} do not have the {cameras} camera(s) of env "
                         f"{env_config.get('name')}")


def _write_dataset(all_transitions: Iterable[TensorDict], path: Path, capacity: int,
                   env_config: Mapping[str, Any] | None, source: str, layout: dict[str, Any],
                   skipped: list[str], names: Mapping[int, str]) -> dict[str, Any]:
    rb = None
    first = ""
    written = 0
    lengths: list[int] = []
    has_final = False
    first_signature = None
    largest_action = -1  # discrete datasets: checked against dynamics.n_actions before training
    for transitions in all_transitions:
        i = int(transitions["collector", "traj_ids"][0])  # the episode's index among those given
        label = _episode_label(i, names.get(i))
        signature = _signature(transitions)
        if first_signature is None:
            first_signature, first = signature, label
            if env_config is not None:
                _check_env_frames(env_config, transitions["pixels"].shape[1:])
            # Final frames given: each frame is stored once (d4func.data.replay), the last as an episode-end entry.
            has_final = ("next", "pixels") in transitions.keys(include_nested=True)
            # seq_len=1: readers pick theirs with load_offline.
            rb = make_replay(dataset_capacity(capacity), 1, 1, path=path, share_next_pixels=has_final)
        elif signature != first_signature:
            raise ValueError(f"{label} has {signature}, the first episode ({first}) has {first_signature}")
        if written + transitions.shape[0] > capacity:
            raise ValueError(f"{label} does not fit: {written} + {transitions.shape[0]} transitions exceed "
                             f"capacity={capacity}")
        rb.extend(transitions)
        written += transitions.shape[0]
        lengths.append(transitions.shape[0])
        if not torch.is_floating_point(transitions["action"]):
            largest_action = max(largest_action, int(transitions["action"].max()))
    if rb is None:
        raise ValueError(f"no episodes to import into {path}" + (
            f": all {len(skipped)} hold no transition ({skipped[0]})" if skipped else ""))
    if skipped:
        warnings.warn(f"{len(skipped)} episode(s) hold no transition and were left out, e.g. {skipped[0]}",
                      stacklevel=3)

    save_replay(rb)
    meta = {
        "format": DATASET_FORMAT,
        "capacity": dataset_capacity(capacity),
        "n_steps": written,
        "n_episodes_complete": len(lengths),
        "seed": None,
        "policy": source,
        "env": None,
        "env_config": None if env_config is None else dict(env_config),
        "traj_key": list(DEFAULT_TRAJ_KEY),
        "step_key": "step_count",
        **storage_metadata(rb),
        "longest_episode": max(lengths),
        "largest_discrete_action": None if largest_action < 0 else largest_action,
        "imported": {**layout, "shortest_episode": min(lengths), "skipped_without_transition": len(skipped)},
        "versions": {"torch": torch.__version__, "torchrl": torchrl.__version__, "tensordict": tensordict.__version__},
    }
    (path / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


NPZ_NAMES = {"pixels": "pixels", "action": "action", "reward": "reward", "terminated": "terminated",
             "is_first": "is_first"}


def import_npz_episodes(
    files: Sequence[str | Path],
    path: str | Path,
    *,
    keys: Mapping[str, str | Sequence[str]] | None = None,
    join_chunks: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """``d4func import``: episodes from ``.npz`` files (read in the given order) -> a dataset at ``path``.

    ``keys`` maps d4func's names (``pixels``, ``action``, ``reward``, ``terminated``, ``is_first``) to the files'
    own, e.g. ``{"pixels": "image", "terminated": "is_terminal"}`` for DreamerV3's replay (with
    ``rewards_on="arrival"``); ``pixels`` may name several arrays, one per camera. A file holds one episode, or
    several when it has an ``is_first`` array: it is split where ``is_first`` is set. A file of one episode may hold
    one frame more than steps (the frame after the last action); a file of several holds one per step.
    ``terminated`` absent from a file means False, unless its name was given in ``keys`` (then it must be there).

    Without ``join_chunks``, episodes are never joined across files: the part of a file before its first
    ``is_first`` (an episode begun in another file) becomes an episode of its own. With it, the files are
    DreamerV3 replay chunks, named ``{time}-{uuid}-{successor}-{length}.npz``: they are chained into the streams
    they were recorded as (:func:`d4func.data.chunk_chains.chain_chunks`, whatever order they are given in), and an
    episode that goes on in its stream's next chunk is imported whole. Every array of a chained chunk holds one
    entry per step, and the name's length must match them.

    ``options`` go to :func:`import_episodes`. Files are read one at a time (a first pass reads only the rewards
    and ``is_first``, to size the storage), so a dataset larger than memory imports. Errors name the file and step
    range.
    """
    if not files:
        raise ValueError("no .npz episode files given")
    if "capacity" in options:
        raise ValueError("capacity is counted from the files; do not pass it")
    unknown = set(keys or {}) - set(NPZ_NAMES)
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; d4func's names are {sorted(NPZ_NAMES)}")
    names: dict[str, Any] = {**NPZ_NAMES, **(keys or {})}
    terminated_required = "terminated" in (keys or {})
    arrival = options.get("rewards_on", "action") == "arrival"
    # Each stream: its files in recording order, with the step count a chunk's name promises (None: unnamed).
    streams: list[list[tuple[Path, int | None]]] = (
        [[(chunk.path, chunk.length) for chunk in stream] for stream in chain_chunks(files)] if join_chunks
        else [[(Path(file), None)] for file in files])

    def need(data: Any, file: Path, name: str) -> np.ndarray:
        if name not in data:
            raise ValueError(f"{file} has no array {name!r} (has {sorted(data.files)})")
        return data[name]

    def open_npz(file: Path) -> Any:
        try:
            data = np.load(file)
        except Exception as error:  # not a file numpy reads: name it
            raise ValueError(f"{file} cannot be read as .npz ({type(error).__name__}: {error})") from error
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"{file} holds one array ({type(data).__name__}), not an .npz archive of named arrays")
        return data

    def step_count(data: Any, file: Path, named_length: int | None) -> int:
        reward = need(data, file, names["reward"])
        if reward.ndim == 0:
            raise ValueError(f"{file}: {names['reward']!r} must be [T], got a scalar")
        if len(reward) == 0:
            raise ValueError(f"{file} holds no steps ({names['reward']!r} is empty)")
        if named_length is not None and named_length != len(reward):
            raise ValueError(f"{file}: its name says {named_length} steps, {names['reward']!r} holds {len(reward)}")
        return len(reward)

    def segment_bounds(data: Any, file: Path, length: int) -> tuple[list[int], set[int]]:
        """The file cut where episodes start: segment k is steps bounds[k] .. bounds[k+1] - 1; and those starts."""
        starts: set[int] = set()
        if names["is_first"] in data:
            flags = np.asarray(data[names["is_first"]]).reshape(-1).astype(bool)
            if flags.shape[0] != length:
                raise ValueError(f"{file}: {names['is_first']!r} has {flags.shape[0]} flags for {length} steps")
            starts = set(np.flatnonzero(flags).tolist())
        return sorted({0, *starts, length}), starts

    def episode_lengths(stream: list[tuple[Path, int | None]]) -> list[int]:
        starts, offset = {0}, 0
        for file, named_length in stream:
            with open_npz(file) as data:
                length = step_count(data, file, named_length)
                starts |= {offset + step for step in segment_bounds(data, file, length)[1]}
                offset += length
        return np.diff([*sorted(starts), offset]).tolist()

    def read(file: Path, named_length: int | None) -> tuple[dict[str, np.ndarray], list[int], set[int]]:
        """A file's arrays, with its segment bounds and episode starts (``segment_bounds``)."""
        with open_npz(file) as data:
            length = step_count(data, file, named_length)
            pixel_names = names["pixels"]
            pixels = (need(data, file, pixel_names) if isinstance(pixel_names, str)
                      else np.stack([need(data, file, n) for n in pixel_names], axis=1))
            arrays = {"pixels": pixels, "action": need(data, file, names["action"]),
                      "reward": need(data, file, names["reward"])}
            if names["terminated"] in data:
                arrays["terminated"] = np.asarray(data[names["terminated"]]).reshape(-1)
            elif terminated_required:
                need(data, file, names["terminated"])
            return arrays, *segment_bounds(data, file, length)

    def joined(pieces: list[tuple[dict[str, np.ndarray], str]]) -> dict[str, Any]:
        """One episode from its consecutive pieces (several when it spans chained chunks)."""
        episode: dict[str, Any] = {key: np.concatenate([piece[key] for piece, _ in pieces])
                                   for key in ("pixels", "action", "reward")}
        if any("terminated" in piece for piece, _ in pieces):
            episode["terminated"] = np.concatenate([
                piece["terminated"] if "terminated" in piece else np.zeros(len(piece["reward"]), dtype=bool)
                for piece, _ in pieces])
        episode["name"] = " + ".join(where for _, where in pieces)
        return episode

    def episodes() -> Iterator[dict[str, Any]]:
        for stream in streams:
            pending: list[tuple[dict[str, np.ndarray], str]] = []  # the pieces of the episode running so far
            for file, named_length in stream:
                arrays, bounds, starts = read(file, named_length)
                # Only a file holding one episode may end on the frame after its last step: in a chained chunk or
                # a file split at is_first, an extra frame would end an episode that is not the last one.
                if (len(stream) > 1 or len(bounds) > 2) and len(arrays["pixels"]) != bounds[-1]:
                    holder = "a chained chunk" if len(stream) > 1 else f"a file of {len(bounds) - 1} episodes"
                    raise ValueError(f"{file} holds {len(arrays['pixels'])} frames for {bounds[-1]} steps: "
                                     f"{holder} holds one frame per step")
                for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                    if start in starts and pending:
                        yield joined(pending)
                        pending = []
                    # Frames may hold one more than the steps (the final frame) only in a single-episode file.
                    stop = len(arrays["pixels"]) if len(bounds) == 2 else end
                    piece = {"pixels": arrays["pixels"][start:stop], "action": arrays["action"][start:end],
                             "reward": arrays["reward"][start:end]}
                    if "terminated" in arrays:
                        piece["terminated"] = arrays["terminated"][start:end]
                    pending.append((piece, f"{file}, steps {start}..{end - 1}"))
            yield joined(pending)

    capacity = sum(max(n - int(arrival), 0) for stream in streams for n in episode_lengths(stream))
    return import_episodes(episodes(), path, capacity=max(capacity, 1), **options)
