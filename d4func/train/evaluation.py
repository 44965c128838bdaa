"""Evaluating a run's policy: episodes in its env, their returns and Crafter score, the env seeds evaluations and
resumes use, and the real-vs-imagined GIF of replay rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase
from torch import Tensor
from torchrl.data import TensorSpec
from torchrl.envs import EnvBase

from d4func.train.acting import WorldModelPolicy, agent_params_from_states
from d4func.train.phases import Models, replay_batch
from d4func.train.run_config import RunConfig
from d4func.train.video import predict_frames, write_comparison_gif


def run_episodes(env: EnvBase, policy: WorldModelPolicy, episodes: int, max_steps: int = 10_000) -> dict[str, Any]:
    """Roll `episodes` full episodes with `policy`; returns their returns (and Crafter achievements)."""
    if episodes < 1:  # the mean of no returns would read as a return of 0
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    returns, achievements = [], []
    for _ in range(episodes):
        if hasattr(policy, "reset_context"):  # a world-model policy forgets the last episode's frames
            policy.reset_context()
        rollout = env.rollout(max_steps, policy, break_when_any_done=True)
        returns.append(float(rollout.get(("next", "reward")).sum()))
        if "achievements" in rollout.get("next").keys():
            achievements.append(rollout.get(("next", "achievements"))[-1])
    out: dict[str, Any] = {"returns": returns, "mean_return": sum(returns) / len(returns)}
    if achievements:
        out["crafter_score"] = crafter_score_of(achievements)
    return out


def crafter_score_of(episode_achievements: list[Tensor]) -> float:
    """Crafter score (geometric mean of per-achievement success rates) over the given episodes."""
    from d4func.envs.crafter_env import achievement_success_rates, crafter_score

    return crafter_score(achievement_success_rates(torch.stack(episode_achievements)))


def run_env_name(cfg: RunConfig) -> str:
    """The env a run acts and is evaluated in: an offline run's dataset names it (`env_config` in its metadata),
    otherwise `env.name`. A dataset that names none (episodes imported without `--env`) has no env to act in:
    its run trains without evaluations, and evaluating it needs an env named explicitly (a ValueError here)."""
    return env_name_of_run(cfg.loop.mode, cfg.loop.offline_data, cfg.env.name)


def env_name_of_run(mode: str, offline_data: str | None, env_name: str) -> str:
    """`run_env_name` from the three config values it reads (for a run's saved `config.json`, say)."""
    if mode == "offline" and offline_data:
        from d4func.data.offline import read_metadata

        name = (read_metadata(offline_data).get("env_config") or {}).get("name")
        if not name:
            raise ValueError(f"the run's dataset {offline_data} names no env to evaluate in; name one "
                             "(d4func eval --env NAME)")
        return name
    return env_name


# Env seeds stay below 2**32: dm_control seeds numpy's RandomState, which refuses larger ones.
ENV_SEED_BITS = 32


def eval_env_seed(seed: int) -> int:
    """The evaluation env's seed for a run seeded `seed`: apart from the training env's, and the same at every
    evaluation (the scripts that add baselines on the same starting states use it too)."""
    return (seed + 10_000) % 2**ENV_SEED_BITS


def resume_env_seed(seed: int, env_steps: int) -> int:
    """The training env's seed for a resume at `env_steps` that starts new episodes: new starting states at every
    resume, never those of the evaluation env (`eval_env_seed`, which lies below 2**30 for any usual seed)."""
    return (seed + 2**30 + env_steps) % 2**ENV_SEED_BITS


def acting_params(states: dict[str, TensorDictBase]) -> tuple[TensorDictBase, TensorDictBase]:
    """(tokenizer params, agent params) for a `WorldModelPolicy`, on the CPU: the envs and the acting policy run
    there whatever `device` the learner uses."""
    agent = agent_params_from_states(states["world_model"], states.get("agent"))
    return states["tokenizer"]["params"].to("cpu"), agent.to("cpu")


def make_eval_policy(
    cfg: RunConfig, models: Models, states: dict[str, TensorDictBase], action_spec: TensorSpec
) -> WorldModelPolicy:
    """The policy a run is evaluated with: its current params on the CPU, a context of a training row's frames,
    greedy unless `loop.eval_greedy` is off, its own sampling seed."""
    policy = WorldModelPolicy(models.tokenizer, models.dynamics, models.heads, action_spec,
                              context=cfg.replay.row_frames, seed=cfg.seed + 7, greedy=cfg.loop.eval_greedy)
    policy.update_params(*acting_params(states))
    return policy


def write_gif(cfg: RunConfig, models: Models, states: dict[str, TensorDictBase], sample: TensorDictBase,
              path: Path) -> Path:
    """Real vs imagined frames for the same actions: the first `context_len` frames of up to 4 replay rows as
    context, the rest of each row predicted open loop."""
    batch = replay_batch(sample[:4])
    context = cfg.replay.context_len
    horizon = batch["frames"].shape[1] - context
    imagined = predict_frames(models.tokenizer, states["tokenizer"]["params"].to("cpu"), models.dynamics,
                              states["world_model"]["params", "dynamics"].to("cpu"), batch["frames"][:, :context],
                              batch["actions"], horizon)
    return write_comparison_gif(path, batch["frames"][:, context:], imagined)
