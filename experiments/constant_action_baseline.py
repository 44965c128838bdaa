"""Constant-action baselines on a run's evaluation starts: a policy that plays one fixed action every step.

    python experiments/constant_action_baseline.py --run runs/reacher32/seed0 --actions 0,0 1,0 0.3,0 1,1

A greedy policy whose head has saturated plays nearly one action everywhere. On reacher-easy a constant full
torque spins the arm through the target on many starts, so a learned policy must beat these, not only a uniform
random policy, before its score says it learned anything (docs/results.md, section 2, "Reacher-easy at 32x32").
The env is reseeded with `eval_env_seed` before each action's episodes, as `Trainer.evaluate` does, so every
action is scored on the same starts as every evaluation of the run. Prints a table; writes `--out` (JSON).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase

from d4func.envs.registry import make_env
from d4func.train.loop import eval_env_seed, run_episodes


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


def constant_action_returns(config: dict[str, Any], actions: list[str]) -> dict[str, dict[str, Any]]:
    """Mean return and per-episode returns of each constant action over `env.eval_episodes` evaluation starts."""
    env_cfg = config["env"]
    env = make_env(env_cfg["name"], seed=eval_env_seed(config["seed"]), image_size=env_cfg["image_size"],
                   action_repeat=env_cfg["action_repeat"], max_episode_steps=env_cfg.get("max_episode_steps"))
    low, high = env.action_spec.space.low, env.action_spec.space.high
    out = {}
    for text in actions:
        action = parse_action(text, env.action_spec.shape[-1])
        if (action < low).any() or (action > high).any():
            raise ValueError(f"action {text!r} lies outside the action space [{low.tolist()}, {high.tolist()}]")

        env.set_seed(eval_env_seed(config["seed"]))  # the starts of every evaluation of the run
        result = run_episodes(env, constant_policy(action), env_cfg["eval_episodes"])
        out[text] = {"mean_return": result["mean_return"], "returns": result["returns"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory of d4func.train.loop (its config.json)")
    parser.add_argument("--actions", nargs="+", required=True, help="constant actions, components joined by commas")
    parser.add_argument("--out", help="JSON path (default: RUN/constant_action_baseline.json)")
    args = parser.parse_args()
    run = Path(args.run)
    config = json.loads((run / "config.json").read_text())
    results = constant_action_returns(config, args.actions)
    print(f"{'action':>12} {'mean return':>12}  returns")
    for text, result in results.items():
        print(f"{text:>12} {result['mean_return']:12.1f}  {result['returns']}")
    out = Path(args.out) if args.out else run / "constant_action_baseline.json"
    out.write_text(json.dumps({"run": str(run), "env": config["env"]["name"], "actions": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
