"""Does an env, a dataset or a run directory's checkpoint fit the run config? Checked before the first step.

A mismatch found here stops the run with a message naming both sides and where each comes from (the env's name,
the dataset's path, the run directory), instead of a shape error deep inside a model call a few steps later.

Resuming: `config_changes` compares the config a run directory was trained with (its `config.json`) with the one
given now. Keys that size the models, the replay or the data (`RESUME_MUST_MATCH`) cannot change: the saved
states would not load into the new models, or would train on other data. Keys that only set the budget or the
reporting (`RESUME_FREE`) may change silently: training `loop.env_steps` further is how a run is extended. Any
other change (a learning rate, the train ratio, a precision flag, another dataset path) is allowed but reported,
since the resumed run no longer equals an uninterrupted one. A config.json written by an older d4func is compared
with the keys added since filled in at their defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from d4func.train.run_config import RunConfig

RESUME_MUST_MATCH = (
    "seed",
    "env.name",
    "env.image_size",
    "env.action_repeat",
    "env.max_episode_steps",
    "replay.capacity",
    "device",  # the train generator's state is device-specific
    "tokenizer",
    "dynamics",
    "heads",
    "loop.mode",
    "finetune.normalize",  # the world-model train state holds the running statistics only when normalising
)
# Not free: loop.threads (CPU kernels split their reductions by thread count, so the resumed run may differ from an
# uninterrupted one in the last bits), and anything that changes what or how the run trains.
RESUME_FREE = (
    "run_dir",
    "loop.env_steps",
    "loop.offline_steps",
    "loop.eval_every",
    "loop.eval_bc",
    "loop.eval_greedy",
    "loop.checkpoint_every",
    "loop.keep_checkpoints",
    "loop.log_every",
    "loop.gif_every",
    "loop.logger",
    "env.eval_episodes",
    "env.eval_max_steps",
)


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> `{"a.b.c": leaf}`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def _same_device(a: Any, b: Any) -> bool:
    """Two spellings of one device ("cuda" and "cuda:0", "cpu" and "cpu:0"): a bare type means index 0."""
    try:
        da, db = torch.device(a), torch.device(b)
    except (TypeError, RuntimeError):
        return False
    return da.type == db.type and (da.index or 0) == (db.index or 0)


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """`(forbidden, reported)`: the changed keys between two nested config dicts, each as `"key: old -> new"`.

    `forbidden` are changes under `RESUME_MUST_MATCH`; `reported` are the others not under `RESUME_FREE`.
    """
    old, new = flatten_config(saved), flatten_config(current)
    forbidden, reported = [], []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, "<absent>"), new.get(key, "<absent>")
        if before == after or _under(key, RESUME_FREE) or (key == "device" and _same_device(before, after)):
            continue
        line = f"{key}: {before!r} -> {after!r}"
        (forbidden if _under(key, RESUME_MUST_MATCH) else reported).append(line)
    return forbidden, reported


def with_defaults(saved: Mapping[str, Any]) -> Mapping[str, Any]:
    """A config dict written by an older d4func, with every key added since filled in at its default, or at the
    behaviour the run had for keys in `run_config.LEGACY_VALUES` (a key that no longer exists stays, and shows up
    as a change)."""
    from d4func.train.checkpoint import config_to_dict
    from d4func.train.run_config import saved_run_config

    try:
        return config_to_dict(saved_run_config(saved))
    except Exception:  # noqa: BLE001 (a removed or renamed key: compare the raw dicts, which names it)
        return saved


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], run_dir: str) -> list[str]:
    """Raise naming every forbidden change; return the reported ones (for a warning). Keys missing from `saved`
    (added to d4func since the run started) count at their defaults."""
    forbidden, reported = config_changes(with_defaults(saved), current)
    if forbidden:
        raise ValueError(
            f"run_dir {run_dir} holds checkpoints trained with another config, which cannot resume under this one: "
            f"{'; '.join(forbidden)}. Restore these values, or start a fresh run with another run_dir"
        )
    return reported


def _frame_shape(cfg: RunConfig) -> tuple[int, ...]:
    tok = cfg.tokenizer
    image = (tok.channels, tok.height, tok.width)
    return image if tok.n_cameras == 1 else (tok.n_cameras, *image)


def _frames_message(shape: tuple[int, ...], cfg: RunConfig) -> str:
    tok = cfg.tokenizer
    return (
        f"frames of shape {list(shape)}, but the tokenizer takes {list(_frame_shape(cfg))} "
        f"(tokenizer.n_cameras={tok.n_cameras}, channels={tok.channels}, height={tok.height}, width={tok.width})"
    )


def check_first_batch(cfg: RunConfig) -> None:
    """Online: the replay must hold a row when training starts, after the collection round that completes
    `loop.prefill_steps`; a row needs `replay.seq_len` steps of one episode and the frame after them."""
    rounds = max(1, -(-cfg.loop.prefill_steps // cfg.loop.collect_steps))
    stored = rounds * cfg.loop.collect_steps
    if stored <= cfg.replay.seq_len:
        raise ValueError(f"training starts after {stored} env steps (loop.prefill_steps={cfg.loop.prefill_steps}, "
                         f"loop.collect_steps={cfg.loop.collect_steps}), too few for one row of replay.seq_len="
                         f"{cfg.replay.seq_len} steps and the frame after them: raise loop.prefill_steps")
    longest = longest_episode(cfg)
    if longest is not None and longest[0] < cfg.replay.seq_len:
        raise ValueError(f"episodes of {cfg.env.name!r} last at most {longest[0]} env steps ({longest[1]}), fewer "
                         f"than a row's replay.seq_len={cfg.replay.seq_len}: no row fits in one episode")
    needed = cfg.loop.collect_steps + cfg.replay.seq_len + 1
    if cfg.replay.capacity < needed:
        raise ValueError(f"replay.capacity={cfg.replay.capacity} entries cannot hold a round (loop.collect_steps="
                         f"{cfg.loop.collect_steps}) beside a row of replay.seq_len={cfg.replay.seq_len} and the "
                         f"frame after it: give at least {needed}")
    # Once the ring wraps, it may hold just the tail of one episode and the start of the next; unless one of the
    # two has a row and its next frame (seq_len + 1 entries), no row can be drawn and the sampler fails deep inside
    # TorchRL after the run has collected and trained for a while.
    spanning = 2 * cfg.replay.seq_len + 1
    if cfg.replay.capacity < spanning:
        raise ValueError(f"replay.capacity={cfg.replay.capacity} entries may hold, once full, only the end of one "
                         f"episode and the start of the next, both shorter than a row of replay.seq_len="
                         f"{cfg.replay.seq_len} steps and the frame after it: give at least {spanning}")


def longest_episode(cfg: RunConfig) -> tuple[int, str] | None:
    """The most env steps an episode of the run's env lasts, and why, where that is known before it runs:
    `env.max_episode_steps`, or the env's own length (Reach's 12 steps)."""
    from d4func.envs.reach import REACH_LENGTH
    from d4func.envs.registry import env_config

    limits = []
    if cfg.env.max_episode_steps is not None:
        limits.append((cfg.env.max_episode_steps, "env.max_episode_steps"))
    if env_config(cfg.env.name)["kind"] == "reach":
        limits.append((REACH_LENGTH, "Reach's episode length"))
    return min(limits) if limits else None


def check_env_fits(cfg: RunConfig, env: Any, env_name: str) -> None:
    """The env's pixel frames and action space must be the models' (`env_name` names the env in the message)."""
    pixels = tuple(env.observation_spec["pixels"].shape)
    if pixels != _frame_shape(cfg):
        raise ValueError(f"env {env_name!r} gives {_frames_message(pixels, cfg)}")
    spec = env.action_spec
    if spec.dtype in (torch.int64, torch.int32):
        n = int(spec.space.n)
        if cfg.dynamics.n_actions != n:
            raise ValueError(
                f"env {env_name!r} has {n} discrete actions but dynamics.n_actions={cfg.dynamics.n_actions}"
            )
    else:
        dim = int(spec.shape[-1])
        if cfg.dynamics.action_dim != dim:
            raise ValueError(
                f"env {env_name!r} has {dim}-dimensional actions but dynamics.action_dim={cfg.dynamics.action_dim}"
            )


def check_dataset_fits(cfg: RunConfig, metadata: Mapping[str, Any], path: str) -> None:
    """A recorded dataset's frames and actions (its `dataset.json` entries) must fit the models."""
    entries = metadata.get("entries", {})
    if "pixels" not in entries or "action" not in entries:
        raise ValueError(f"dataset {path} has no 'pixels' or 'action' entry (has {sorted(entries)})")
    recorded = metadata.get("env_config") or {}
    repeat = recorded.get("action_repeat")
    if recorded.get("kind") == "dmc" and repeat is not None and repeat != cfg.env.action_repeat:
        # Evaluation and held-out clips are played in a fresh env at env.action_repeat: another repeat than the
        # data's would score the agent in dynamics (and per-step rewards) it never saw.
        raise ValueError(f"dataset {path} was recorded at action_repeat={repeat} but env.action_repeat="
                         f"{cfg.env.action_repeat}: set env.action_repeat={repeat} or record it again")
    if cfg.replay.final_frame and "next.pixels" not in entries:
        raise ValueError(f"dataset {path} does not store the frame after each transition ('next.pixels'), which "
                         "replay.final_frame=true trains on: set replay.final_frame=false, or import the episodes "
                         "with their final frames")
    longest = metadata.get("longest_episode")
    if longest is not None and cfg.replay.seq_len > longest:
        # Sequences never cross an episode boundary, so no [B, T] slice could be drawn.
        raise ValueError(f"dataset {path}'s longest episode has {longest} steps, fewer than replay.seq_len="
                         f"{cfg.replay.seq_len}: lower replay.seq_len")
    pixels = tuple(entries["pixels"]["shape"])
    if pixels != _frame_shape(cfg):
        raise ValueError(f"dataset {path} holds {_frames_message(pixels, cfg)}")
    action = entries["action"]
    discrete = action["dtype"].startswith("int")
    if discrete and cfg.dynamics.n_actions == 0:
        raise ValueError(
            f"dataset {path} holds discrete actions ({action['dtype']}) but the config's dynamics.n_actions=0 "
            "(continuous actions)"
        )
    largest = metadata.get("largest_discrete_action")
    if discrete and largest is not None and largest >= cfg.dynamics.n_actions:
        raise ValueError(f"dataset {path} holds discrete action {largest}, but dynamics.n_actions="
                         f"{cfg.dynamics.n_actions} allows 0 .. {cfg.dynamics.n_actions - 1}")
    if not discrete:
        if cfg.dynamics.n_actions > 0:
            raise ValueError(
                f"dataset {path} holds continuous actions of shape {action['shape']} but the config's "
                f"dynamics.n_actions={cfg.dynamics.n_actions} (discrete)"
            )
        dim = action["shape"][-1] if action["shape"] else 1
        if dim != cfg.dynamics.action_dim:
            raise ValueError(
                f"dataset {path} holds {dim}-dimensional actions but dynamics.action_dim={cfg.dynamics.action_dim}"
            )
