"""Constant-action baselines on a run's evaluation starts: a policy that plays one fixed action every step.

    python experiments/constant_action_baseline.py --run runs/reacher32/seed0 --actions 0,0 1,0 0.3,0 1,1
    python experiments/constant_action_baseline.py --config experiments/configs/results_cartpole_expert.yaml \\
        --env dmc:cartpole-swingup --seed 777 --episodes 10 --actions 0 0.5 1 --out cartpole_constant.json

A greedy policy whose head has saturated plays nearly one action everywhere. On reacher-easy a constant full
torque spins the arm through the target on many starts, so a learned policy must beat these, not only a uniform
random policy, before its score says it learned anything (docs/results.md, section 2, "Reacher-easy at 32x32").
The env is reseeded before each action's episodes, with `eval_env_seed` as `Trainer.evaluate` does (or with
`--seed`, as `d4func eval --seed`), so every action is scored on the same starts as the run's evaluations.
The run's env is the one `d4func eval` uses (an offline run's dataset's; `--env` names another, e.g. when the
dataset is not on this machine). Prints a table; writes `--out` (JSON).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase
from torchrl.data import Bounded

from d4func.envs.registry import make_env
from d4func.train.evaluation import eval_env_seed, run_env_name, run_episodes
from d4func.train.run_config import RunConfig, load_run_config, saved_run_config


def parse_action(text: str, action_dim: int) -> torch.Tensor:
    """'1,0.5' -> tensor([1.0, 0.5]); the length must match the env's action dimension."""
    values = [float(part) for part in text.split(",")]
    if len(values) != action_dim:
        raise ValueError(f"action {text!r} has {len(values)} components; the env's actions have {action_dim}")
    return torch.tensor(values)


def constant_policy(action: torch.Tensor) -> Callable[[TensorDictBase], TensorDictBase]:
    """A policy for `EnvBase.rollout` that writes `action` at every step (one argument: TorchRL reads the
    signature of a plain callable and would otherwise bind its other parameters to observation keys)."""

    def play_constant(tensordict: TensorDictBase) -> TensorDictBase:
        return tensordict.set("action", action.clone())

    return play_constant


def constant_action_returns(
    cfg: RunConfig, actions: list[str], env_name: str | None = None, seed: int | None = None,
    episodes: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Mean return and per-episode returns of each constant action over `episodes` (default
    `env.eval_episodes`) episodes from the run's evaluation starts (or env seed `seed`'s)."""
    episodes = cfg.env.eval_episodes if episodes is None else episodes
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    env_name = env_name or run_env_name(cfg)
    env_seed = eval_env_seed(cfg.seed) if seed is None else seed
    env = make_env(env_name, seed=env_seed, image_size=cfg.env.image_size, action_repeat=cfg.env.action_repeat,
                   max_episode_steps=cfg.env.max_episode_steps)
    if not isinstance(env.action_spec, Bounded):
        env.close()
        raise ValueError(f"constant actions need a continuous (Bounded) action space; {env_name} has "
                         f"{type(env.action_spec).__name__}")
    low, high = env.action_spec.space.low, env.action_spec.space.high
    out = {}
    try:
        for text in (text.strip() for text in actions):
            action = parse_action(text, env.action_spec.shape[-1])
            if (action < low).any() or (action > high).any():
                raise ValueError(
                    f"action {text!r} lies outside the action space [{low.tolist()}, {high.tolist()}]"
                )
            env.set_seed(env_seed)  # every action from the same starts
            result = run_episodes(env, constant_policy(action), episodes, cfg.env.eval_max_steps)
            out[text] = {"mean_return": result["mean_return"], "returns": result["returns"]}
    finally:
        env.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory of d4func.train.loop (its config.json)")
    source.add_argument("--config", help="a run config (YAML), for a run that is not on this machine")
    parser.add_argument("--actions", nargs="+", required=True,
                        help="constant actions, components joined by commas; quote one with a leading space when it "
                        "starts with '-' and has several components (' -1,0'), as argparse reads '-1,0' as an option")
    parser.add_argument("--env", help="the env to play (default: the run's, as d4func eval)")
    parser.add_argument("--seed", type=int, help="the env's seed (default: the run's evaluation seed)")
    parser.add_argument("--episodes", type=int, help="episodes per action (default: the run's env.eval_episodes)")
    parser.add_argument("--out", help="JSON path (default: RUN/constant_action_baseline.json; required with "
                        "--config)")
    args = parser.parse_args()
    if args.run:
        cfg = saved_run_config(json.loads((Path(args.run) / "config.json").read_text()))
        out = Path(args.out) if args.out else Path(args.run) / "constant_action_baseline.json"
    else:
        if not args.out:
            parser.error("--out is required with --config")
        cfg, out = load_run_config(args.config), Path(args.out)
    env_name = args.env or run_env_name(cfg)
    env_seed = eval_env_seed(cfg.seed) if args.seed is None else args.seed
    results = constant_action_returns(cfg, args.actions, env_name, env_seed, args.episodes)
    print(f"{'action':>12} {'mean return':>12}  returns")
    for text, result in results.items():
        print(f"{text:>12} {result['mean_return']:12.1f}  {[round(r, 1) for r in result['returns']]}")
    out.write_text(json.dumps({"source": args.run or args.config, "env": env_name, "env_seed": env_seed,
                               "actions": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
