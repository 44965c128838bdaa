"""A DMControl demonstrator that plans with the true simulator, and a recorder for an offline dataset of it.

`SimulatorPlanner` is MPPI (model-predictive path integral control): before each decision it plays `samples`
perturbations of its previous plan (`horizon` decisions ahead, each repeated `action_repeat` env steps) from the
env's current physics state, stepped as the env steps, weights them by exp(return per decision / temperature), and
acts the weighted plan's first action. The env's state is saved and restored around the search
(`d4func.envs.counterfactual`), so the real episode goes on exactly as if no search had happened. Gaussian noise on
the executed action (`noise`) makes the data show recoveries from the demonstrator's own mistakes, which behaviour
cloning needs.

On cartpole-swingup (action repeat 4, 32 samples, 20 decisions ahead, noise 0.3) its 20 recorded episodes score
536.8 on average, where a uniform random policy scores about 90; one episode takes about 1.5 minutes of one CPU core,
rendering included (docs/results.md).

    python experiments/cartpole_expert.py --out data/cartpole_expert --episodes 12 --noise 0.3
    python experiments/cartpole_expert.py --eval-only --episodes 2          # returns of the planner alone
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.envs import EnvBase

from d4func.data.merge_datasets import dataset_episodes
from d4func.data.offline import record_episodes
from d4func.envs.counterfactual import dm_control_env, restore_env, snapshot_env
from d4func.envs.registry import env_config, make_env


class SimulatorPlanner(TensorDictModuleBase):
    """MPPI on the env's own simulator; writes `"action"` (`[1]`, in [-1, 1]) for the env's current state."""

    def __init__(self, env: EnvBase, *, action_repeat: int, horizon: int = 20, samples: int = 32,
                 temperature: float = 0.5, spread: float = 0.6, noise: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.in_keys, self.out_keys = [], ["action"]
        control = dm_control_env(env)
        if control is None:
            raise TypeError(f"{type(env).__name__} is not a DMControl env: the planner needs its simulator")
        # The planner steps the simulator as dm_control's `control.Environment.step` does, sub-steps included.
        self.env, self.physics, self.task, self.sub_steps = env, control.physics, control.task, control._n_sub_steps
        shape = env.action_spec.shape
        if tuple(shape) != (1,):
            raise ValueError(f"SimulatorPlanner plans one action dimension, the env has action shape {tuple(shape)}")
        for name, value in (("action_repeat", action_repeat), ("horizon", horizon), ("samples", samples)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.action_repeat, self.horizon, self.samples = action_repeat, horizon, samples
        self.temperature, self.spread, self.noise = temperature, spread, noise
        self.rng = np.random.default_rng(seed)
        self.plan = np.zeros(horizon)
        self.last_time = float("inf")

    def _score(self, actions: np.ndarray) -> float:
        """The return of one action sequence from the current physics state (which it leaves moved), stepped as the
        env steps: each decision repeated `action_repeat` times, each repeat one dm_control step of `sub_steps`
        physics steps. Divided by `action_repeat`, so that `temperature` reads in rewards per decision."""
        total = 0.0
        for action in actions:
            for _ in range(self.action_repeat):  # the env sums the reward of each repeat
                self.task.before_step(np.array([action]), self.physics)
                self.physics.step(self.sub_steps)
                self.task.after_step(self.physics)
                total += float(self.task.get_reward(self.physics))
        return total / self.action_repeat

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        now = float(self.physics.data.time)
        # A new episode (the clock went back, or stands at 0 again after the collector's dry run): plan from scratch.
        if now < self.last_time or now == 0.0:
            self.plan = np.zeros(self.horizon)
        snapshot = snapshot_env(self.env)
        guess = np.concatenate([self.plan[1:], [0.0]])
        candidates = np.clip(guess + self.spread * self.rng.standard_normal((self.samples, self.horizon)), -1, 1)
        candidates[0] = guess  # the previous plan, shifted, always competes
        scores = np.empty(self.samples)
        for index, candidate in enumerate(candidates):
            restore_env(self.env, snapshot)
            scores[index] = self._score(candidate)
        restore_env(self.env, snapshot)
        weights = np.exp((scores - scores.max()) / self.temperature)
        self.plan = np.clip(weights @ candidates / weights.sum(), -1, 1)
        action = float(np.clip(self.plan[0] + self.noise * self.rng.standard_normal(), -1, 1))
        self.last_time = now
        td.set("action", torch.tensor([action], dtype=self.env.action_spec.dtype))
        return td


def evaluate(env: EnvBase, planner: SimulatorPlanner, episodes: int) -> list[float]:
    returns = []
    for _ in range(episodes):
        rollout = env.rollout(10_000, planner, break_when_any_done=True)
        returns.append(float(rollout.get(("next", "reward")).sum()))
    return returns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="dmc:cartpole-swingup")
    parser.add_argument("--out", default="", help="dataset directory (d4func's offline format)")
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--noise", type=float, default=0.3, help="std of the Gaussian noise on executed actions")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--action-repeat", type=int, default=4)
    parser.add_argument("--horizon", type=int, default=20)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-only", action="store_true", help="print the planner's returns, record nothing")
    args = parser.parse_args(argv)
    if not args.eval_only and not args.out:
        parser.error("--out is required unless --eval-only")
    env = make_env(args.env, seed=args.seed, image_size=args.image_size, action_repeat=args.action_repeat)
    planner = SimulatorPlanner(env, action_repeat=args.action_repeat, horizon=args.horizon, samples=args.samples,
                               noise=args.noise, seed=args.seed)
    started = time.perf_counter()
    if args.eval_only:
        returns = evaluate(env, planner, args.episodes)
        print(json.dumps({"returns": returns, "mean": float(np.mean(returns)), "noise": args.noise,
                          "seconds": time.perf_counter() - started}))
        return 0
    cfg = env_config(args.env, seed=args.seed, image_size=args.image_size, action_repeat=args.action_repeat)
    metadata = record_episodes(env, args.out, n_episodes=args.episodes, policy=planner, seed=args.seed,
                               env_config=cfg, policy_name=f"mppi_simulator_noise{args.noise:g}")
    returns = [float(episode["reward"].sum()) for episode in dataset_episodes(args.out)]
    print(json.dumps({"out": args.out, "transitions": metadata["n_steps"], "episodes": len(returns),
                      "mean_return": float(np.mean(returns)), "returns": returns,
                      "seconds": time.perf_counter() - started}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
