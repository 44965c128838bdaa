"""End to end on Reach: record noisy-expert demonstrations, train every phase offline, compare with random and BC.

The whole Dreamer 4 pipeline on the tiny pixel env the project ships (`d4func.envs.reach`):

1. collect: `record_episodes` with `ReachExpertPolicy(epsilon)` (a demonstrator that acts at random 30% of the time);
2. train (`experiments/configs/reach.yaml`, offline loop, 800 gradient steps): tokenizer, dynamics + BC + reward
   heads, then imagination training of the policy and value heads (PMPO, TD(lambda)) from `loop.agent_start` on;
3. evaluate greedily on fresh episodes: the final policy, the BC head alone (same run, `loop.eval_bc`), a uniform
   random policy and the demonstrator itself, each over `env.eval_episodes` episodes.

    python experiments/reach_e2e.py --seeds 0 1 2            # writes runs/reach_e2e/result.json
    python experiments/reach_e2e.py --seeds 0 loop.offline_steps=1600 loop.agent_start=800

`tests/test_learning_e2e.py` runs this at the config's budget and fails when the final policy does not beat the
random policy by a clear margin.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from d4func.data.offline import UniformRandomPolicy, record_episodes
from d4func.envs.reach import ReachExpertPolicy
from d4func.envs.registry import env_config, make_env
from d4func.train.evaluation import eval_env_seed, run_episodes
from d4func.train.loop import train
from d4func.train.run_config import RunConfig, load_run_config

CONFIG = Path(__file__).resolve().parent / "configs" / "reach.yaml"


def baseline_return(policy, seed: int, cfg: RunConfig) -> float:
    """`policy`'s mean return on the run's evaluation episodes: its env, episode length and step cap."""
    env = make_env("reach", seed=seed, image_size=cfg.env.image_size, max_episode_steps=cfg.env.max_episode_steps)
    return run_episodes(env, policy, cfg.env.eval_episodes, cfg.env.eval_max_steps)["mean_return"]


def run_seed(run_dir: Path, seed: int, overrides: list[str], steps: int, epsilon: float,
             progress: bool = False) -> dict[str, Any]:
    """Collect, train and evaluate one seed; returns the mean evaluation returns of every policy."""
    started = time.perf_counter()
    seed_dir = run_dir / f"seed{seed}"
    data = seed_dir / "data"
    cfg = load_run_config(str(CONFIG), [f"run_dir={seed_dir / 'train'}", f"seed={seed}",
                                        f"loop.offline_data={data}", *overrides])
    if cfg.loop.threads:
        torch.set_num_threads(cfg.loop.threads)
    size = cfg.env.image_size
    if not (data / "dataset.json").exists():
        record_episodes(make_env("reach", seed=seed, image_size=size), data, n_steps=steps,
                        policy=ReachExpertPolicy(epsilon=epsilon, seed=seed),
                        env_config=env_config("reach", seed=seed, image_size=size),
                        policy_name=f"reach_expert(epsilon={epsilon})")
    summary = train(cfg, progress=progress)
    episodes, eval_seed = cfg.env.eval_episodes, eval_env_seed(seed)  # the loop's own evaluation starts
    action_spec = make_env("reach", image_size=size).action_spec
    return {
        "seed": seed,
        "final": summary["eval"]["mean_return"],
        "bc": summary["eval"]["bc"]["mean_return"],
        "random": baseline_return(UniformRandomPolicy(action_spec, seed=seed), eval_seed, cfg),
        "demonstrator": baseline_return(ReachExpertPolicy(epsilon=epsilon, seed=seed), eval_seed, cfg),
        "episodes": episodes,
        "grad_steps": summary["grad_steps"],
        "wall_seconds": time.perf_counter() - started,
    }


def plot_result(result: dict[str, Any], path: Path) -> Path:
    """Grouped bars per seed: random, BC alone, the final (imagination-trained) policy, the demonstrator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("random", "bc", "final", "demonstrator")
    labels = ("random policy", "BC head alone", "final policy (after imagination)", "demonstrator (eps-greedy)")
    rows = result["seeds"]
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
    width = 0.2
    for i, (name, label) in enumerate(zip(names, labels, strict=True)):
        ax.bar([j + (i - 1.5) * width for j in range(len(rows))], [row[name] for row in rows], width, label=label)
    ax.set_xticks(range(len(rows)), [f"seed {row['seed']}" for row in rows])
    ax.set_ylabel(f"mean return ({rows[0]['episodes']} episodes)")
    epsilon = result.get("epsilon", 0.3)
    ax.set_title("Reach, offline from random actions" if epsilon >= 1.0
                 else f"Reach, offline from noisy demonstrations (epsilon {epsilon})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--run-dir", default="runs/reach_e2e")
    parser.add_argument("--steps", type=int, default=3000, help="demonstration transitions per seed")
    parser.add_argument("--epsilon", type=float, default=0.3, help="demonstrator's random-action probability")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--plot", type=Path, help="also draw the per-seed returns into this PNG")
    parser.add_argument("overrides", nargs="*", help="run-config overrides, key.sub=value")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    rows = [run_seed(run_dir, seed, args.overrides, args.steps, args.epsilon, args.progress) for seed in args.seeds]
    means = {k: statistics.fmean(row[k] for row in rows) for k in ("final", "bc", "random", "demonstrator")}
    result = {"seeds": rows, "mean": means, "steps": args.steps, "epsilon": args.epsilon,
              "overrides": args.overrides}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    if args.plot is not None:
        plot_result(result, args.plot)
    print(f"{'seed':>6} {'random':>8} {'demo':>8} {'BC':>8} {'final':>8} {'wall s':>8}")
    for row in rows:
        print(f"{row['seed']:>6} {row['random']:>8.2f} {row['demonstrator']:>8.2f} {row['bc']:>8.2f} "
              f"{row['final']:>8.2f} {row['wall_seconds']:>8.0f}")
    print(f"{'mean':>6} {means['random']:>8.2f} {means['demonstrator']:>8.2f} {means['bc']:>8.2f} "
          f"{means['final']:>8.2f}")
    return result


if __name__ == "__main__":
    main()
