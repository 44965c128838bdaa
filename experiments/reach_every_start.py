"""Reach from every start: where a trained run's policy fails, and whether its world model moves the agent right.

Reach (`d4func.envs.reach`) has 8 cells and so 56 starts (agent cell, goal cell), and both positions can be read
back from any frame, real or imagined (`reach_positions`). That makes two exact measurements possible where other
envs only allow averages:

* policy: one greedy episode from each start, for the run's acting policy and for its BC head alone, against the
  best return from that start (walk straight to the goal and stay: `length - distance + 1`). `solved` counts the
  starts where the policy gets that best return;
* world model: from each start, `context_len` real frames (the agent staying put), then `horizon` steps under a
  given action sequence, predicted open loop exactly as imagination rolls (K = `dynamics.sampling_steps`, a window
  of `replay.row_frames` frames) and decoded. The figure is the share of starts whose imagined agent (goal) sits in
  the cell the real env puts it in, per step, for the sequences all-left, all-stay, all-right and `random`
  uniformly random ones. A world model whose imagined agent is in the wrong cell half the time gives imagination
  rewards for moves that do not reach the goal.

Writes `RUN_DIR/reach_every_start.json` and prints a table; the checkpoint is the run's newest unless `--checkpoint`
names one.

    python experiments/reach_every_start.py --run runs/results_reach_online_s0 [--horizon 6] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase
from torch import Tensor

from d4func.dynamics import Dynamics
from d4func.envs.reach import REACH_N_ACTIONS, ReachEnv, reach_positions
from d4func.envs.registry import make_env
from d4func.tokenizer import Tokenizer
from d4func.train import checkpoint
from d4func.train.evaluation import make_eval_policy
from d4func.train.phases import build_models
from d4func.train.run_config import RunConfig, saved_run_config
from d4func.train.video import predict_frames

RESULT_FILE = "reach_every_start.json"
LEFT, STAY, RIGHT = range(REACH_N_ACTIONS)
CONSTANT_SEQUENCES = {"left": LEFT, "stay": STAY, "right": RIGHT}


def reach_env_of(cfg: RunConfig) -> tuple[Any, ReachEnv]:
    """The run's env as it evaluates (its image size and episode cap) and its base `ReachEnv`."""
    if cfg.env.name != "reach":
        raise ValueError(f"this measurement needs a run on the Reach env, got env.name={cfg.env.name!r}")
    env = make_env("reach", seed=0, image_size=cfg.env.image_size, max_episode_steps=cfg.env.max_episode_steps)
    return env, env.base_env


def every_start(n_cells: int) -> list[tuple[int, int]]:
    return [(agent, goal) for agent in range(n_cells) for goal in range(n_cells) if agent != goal]


def best_return(agent: int, goal: int, length: int) -> int:
    """Walking straight to the goal and staying there: rewarded on every step from the arrival on."""
    return max(length - abs(agent - goal) + 1, 0)


def policy_returns(cfg: RunConfig, states: dict[str, Any], bc: bool) -> list[float]:
    """One greedy episode from every start (order of `every_start`), for the acting policy or the BC head alone."""
    env, base = reach_env_of(cfg)
    models = build_models(cfg)
    if bc:
        states = {name: state for name, state in states.items() if name != "agent"}
    policy = make_eval_policy(cfg, models, states, env.action_spec)
    returns = []
    for agent, goal in every_start(base.n_cells):
        base.start_next_episode_at(agent, goal)
        policy.reset_context()
        rollout = env.rollout(10_000, policy, break_when_any_done=True)
        returns.append(float(rollout.get(("next", "reward")).sum()))
    env.close()
    return returns


def real_clips(cfg: RunConfig, sequences: Tensor) -> tuple[Tensor, Tensor]:
    """The real frames `[N, context_len + horizon, 3, H, W]` and actions (TorchRL's convention) of every start under
    `sequences` `[N, horizon]` (one row per start, in `every_start` order): `context_len` frames of the agent staying
    put, then the sequence."""
    env, base = reach_env_of(cfg)
    context_len = cfg.replay.context_len
    frames, actions = [], []
    for (agent, goal), sequence in zip(every_start(base.n_cells), sequences, strict=True):
        base.start_next_episode_at(agent, goal)
        td = env.reset()
        clip_actions = torch.cat([torch.full((context_len - 1,), STAY), sequence, torch.tensor([STAY])])
        clip = [td["pixels"]]
        for action in clip_actions[:-1]:
            td["action"] = action
            td = env.step(td)["next"]
            clip.append(td["pixels"])
        frames.append(torch.stack(clip))
        actions.append(clip_actions)
    env.close()
    return torch.stack(frames), torch.stack(actions)


def position_accuracy(cfg: RunConfig, tokenizer: Tokenizer, tokenizer_params: TensorDictBase, dynamics: Dynamics,
                      dynamics_params: TensorDictBase, sequences: Tensor, seeds: int, n_cells: int
                      ) -> dict[str, list[float]]:
    """Per imagined step, the share of starts (and sampling seeds) whose imagined agent / goal / both sit in the
    real env's cells."""
    frames, actions = real_clips(cfg, sequences)
    context_len, horizon = cfg.replay.context_len, sequences.shape[1]
    real_agent, real_goal = reach_positions(frames[:, context_len:], n_cells)
    hits = {"agent": torch.zeros(horizon), "goal": torch.zeros(horizon), "both": torch.zeros(horizon)}
    for seed in range(seeds):
        imagined = predict_frames(tokenizer, tokenizer_params, dynamics, dynamics_params, frames[:, :context_len],
                                  actions, horizon, seed=seed, window=cfg.replay.row_frames)
        agent, goal = reach_positions(imagined, n_cells)
        agent_ok, goal_ok = agent == real_agent, goal == real_goal
        for key, ok in (("agent", agent_ok), ("goal", goal_ok), ("both", agent_ok & goal_ok)):
            hits[key] += ok.float().mean(dim=0) / seeds
    return {key: [round(float(v), 4) for v in value] for key, value in hits.items()}


@torch.no_grad()
def evaluate(run_dir: str | Path, ckpt: str | Path | None = None, horizon: int = 6, seeds: int = 3,
             random_sequences: int = 4) -> dict[str, Any]:
    for name, value in (("horizon", horizon), ("seeds", seeds), ("random_sequences", random_sequences)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    run_dir = Path(run_dir)
    path = Path(ckpt) if ckpt is not None else checkpoint.latest_checkpoint(run_dir)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no checkpoint {'in ' + str(run_dir) if ckpt is None else str(ckpt)!r}")
    loaded = checkpoint.load_checkpoint(path)
    cfg = saved_run_config(loaded.payload["config"])
    states = loaded.payload["states"]
    _, base = reach_env_of(cfg)
    if cfg.replay.context_len - 1 + horizon > base.length:
        raise ValueError(f"horizon={horizon} after {cfg.replay.context_len} context frames runs past the episode's "
                         f"{base.length} steps; use a horizon <= {base.length - cfg.replay.context_len + 1}")
    starts = every_start(base.n_cells)
    best = [best_return(agent, goal, base.length) for agent, goal in starts]
    result: dict[str, Any] = {"checkpoint": str(path), "step": loaded.step, "starts": starts, "best": best,
                              "best_mean": sum(best) / len(best), "horizon": horizon, "seeds": seeds}
    for name, bc in (("policy", False), ("bc", True)):
        returns = policy_returns(cfg, states, bc)
        result[name] = {"returns": returns, "mean": sum(returns) / len(returns),
                        "solved": sum(r >= b for r, b in zip(returns, best, strict=True))}
    models = build_models(cfg)
    world = (models.tokenizer, states["tokenizer"]["params"], models.dynamics,
             states["world_model"]["params", "dynamics"])
    accuracy = {}
    for name, action in CONSTANT_SEQUENCES.items():
        sequences = torch.full((len(starts), horizon), action, dtype=torch.long)
        accuracy[name] = position_accuracy(cfg, *world, sequences, seeds, base.n_cells)
    generator = torch.Generator().manual_seed(0)
    random_runs = [position_accuracy(cfg, *world, torch.randint(REACH_N_ACTIONS, (len(starts), horizon),
                                                                generator=generator), seeds, base.n_cells)
                   for _ in range(random_sequences)]
    accuracy["random"] = {key: [round(sum(run[key][h] for run in random_runs) / random_sequences, 4)
                                for h in range(horizon)] for key in ("agent", "goal", "both")}
    result["position_accuracy"] = accuracy
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['checkpoint']} (env step {result['step']}): greedy return from each of the "
             f"{len(result['starts'])} starts, best possible {result['best_mean']:.2f} on average"]
    for name in ("policy", "bc"):
        lines.append(f"  {name:<7} mean {result[name]['mean']:.2f}, best return on {result[name]['solved']} starts")
    lines.append(f"world model: share of starts with the imagined agent in the real cell, per step (goal in "
                 f"brackets), {result['seeds']} sampling seeds")
    for name, acc in result["position_accuracy"].items():
        cells = " ".join(f"{a:.2f} ({g:.2f})" for a, g in zip(acc["agent"], acc["goal"], strict=True))
        lines.append(f"  {name:<7} {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run directory of a Reach run (config.json, ckpt-*.pt)")
    parser.add_argument("--checkpoint", help="a checkpoint file instead of the run's newest")
    parser.add_argument("--horizon", type=int, default=6, help="imagined steps after the context")
    parser.add_argument("--seeds", type=int, default=3, help="sampling seeds per action sequence")
    parser.add_argument("--random-sequences", type=int, default=4, help="random action sequences per start")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = evaluate(args.run, args.checkpoint, args.horizon, args.seeds, args.random_sequences)
    print(format_table(result))
    print(f"wrote {Path(args.run) / RESULT_FILE}")
    return result


if __name__ == "__main__":
    main()
