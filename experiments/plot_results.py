"""The figures and tables of docs/results.md from finished runs of the loop, with a random-policy baseline.

    python experiments/plot_results.py --run runs/results_cartpole --out docs/results --random-episodes 10
    python experiments/plot_results.py --run runs/results_crafter --out docs/results --random-episodes 20

For each run: the greedy evaluations of the imagination-trained policy (`eval/*`) and of the BC head alone
(`eval/bc_*`, same run, `loop.eval_bc`) against env steps, the training episodes, and a uniform random policy
evaluated on the same evaluation env (same seed, hence the same starting states as every evaluation of the run).
Crafter runs are scored with the Crafter score (geometric mean of achievement success rates, in percent);
others with the episode return. Writes `OUT/<run name>.png` (small) and `OUT/<run name>.json` (the table).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from d4func.data.offline import UniformRandomPolicy
from d4func.envs.registry import make_env
from d4func.train.evaluation import env_name_of_run, eval_env_seed, run_episodes
from d4func.train.run_logs import metric_series, read_metrics


def config_env_name(config: dict[str, Any]) -> str:
    """The env a run (its saved `config.json`) was evaluated in: an offline run's dataset's, as the loop's."""
    loop = config.get("loop", {})
    return env_name_of_run(loop.get("mode", "online"), loop.get("offline_data"), config["env"]["name"])


def random_baseline(config: dict[str, Any], episodes: int, max_steps: int) -> dict[str, Any]:
    """A uniform random policy scored as the run's evaluations are: blocks of `env.eval_episodes` episodes, the
    evaluation env reseeded before each (`eval_env_seed`), so every block starts where every evaluation starts;
    `episodes` is rounded up to whole blocks. The figure is the mean of the block scores, with their spread: a
    Crafter score (a geometric mean over episodes' success rates) over more episodes than an evaluation holds would
    run higher than any evaluation could, and episodes past an evaluation's count would start elsewhere."""
    env_cfg = config["env"]
    per_block = env_cfg["eval_episodes"] or episodes
    blocks = max(1, -(-episodes // per_block))
    env = make_env(config_env_name(config), seed=eval_env_seed(config["seed"]), image_size=env_cfg["image_size"],
                   action_repeat=env_cfg["action_repeat"], max_episode_steps=env_cfg.get("max_episode_steps"))
    policy = UniformRandomPolicy(env.action_spec, seed=config["seed"])
    results = []
    for _ in range(blocks):
        env.set_seed(eval_env_seed(config["seed"]))  # as Trainer.evaluate does before every evaluation
        results.append(run_episodes(env, policy, per_block, max_steps))
    out: dict[str, Any] = {"episodes": blocks * per_block, "blocks": blocks, "episodes_per_block": per_block,
                           "returns": [r for result in results for r in result["returns"]]}
    for key in ("mean_return", "crafter_score"):
        if key in results[0]:
            values = [result[key] for result in results]
            out[key] = statistics.fmean(values)
            out[f"{key}_blocks"] = values
            out[f"{key}_std_over_blocks"] = statistics.pstdev(values) if blocks > 1 else 0.0
    out["std_return"] = statistics.pstdev(out["returns"]) if len(out["returns"]) > 1 else 0.0
    return out


def training_windows(rows: list[dict[str, float]], window: int) -> list[dict[str, Any]]:
    """Training episodes grouped by the env-step window they ended in: count, mean return and, for Crafter, mean
    achievements per episode and the score over all episodes up to the window's end."""
    episodes = [row for row in rows if "episode/return" in row]
    out = []
    for end in range(window, max((int(r["step"]) for r in episodes), default=0) + window, window):
        inside = [r for r in episodes if end - window < r["step"] <= end]
        if not inside:
            continue
        entry = {"env_steps_end": end, "episodes": len(inside),
                 "mean_return": statistics.fmean(r["episode/return"] for r in inside)}
        if "episode/achievements" in inside[-1]:
            entry["mean_achievements"] = statistics.fmean(r["episode/achievements"] for r in inside)
            entry["crafter_score_so_far"] = inside[-1]["episode/crafter_score"]
        out.append(entry)
    return out


def plot(run_dir: Path, out_dir: Path, random_episodes: int, demonstrator: float | None = None) -> dict[str, Any]:
    """The run's figure and table; `demonstrator` (an offline dataset's mean return) adds a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    crafter = config_env_name(config) == "crafter"
    metric = "crafter_score" if crafter else "mean_return"
    label = "Crafter score (%)" if crafter else "episode return"
    random = random_baseline(config, random_episodes, config["env"]["eval_max_steps"])
    how = "greedy" if config["loop"].get("eval_greedy", True) else "sampled"
    episodes = config["env"]["eval_episodes"]
    curves = {
        f"imagination policy ({how}, {episodes} eval episodes)": metric_series(rows, f"eval/{metric}"),
        f"BC head alone ({how}, {episodes} eval episodes)": metric_series(rows, f"eval/bc_{metric}"),
        ("training episodes: score over all so far" if crafter else "training episodes (sampled)"): metric_series(
            rows, "episode/crafter_score" if crafter else "episode/return"),
    }
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
    for (name, points), style in zip(curves.items(), ("o-", "s--", "."), strict=True):
        if points:
            ax.plot(*zip(*points, strict=True), style, label=name, alpha=0.45 if style == "." else 1.0)
    ax.axhline(random[metric], color="gray", linestyle=":",
               label=f"random policy ({random['blocks']} x {random['episodes_per_block']} episodes)")
    if demonstrator is not None:
        ax.axhline(demonstrator, color="black", linestyle="-.", label="demonstrator (the dataset's episodes)")
    offline = config["loop"]["mode"] == "offline"
    step_unit = "gradient steps (offline)" if offline else "env steps"
    ax.set_xlabel(step_unit)
    ax.set_ylabel(label)
    ax.set_title(config["env"]["name"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = run_dir.name
    fig.savefig(out_dir / f"{name}.png")
    plt.close(fig)
    bc_by_step = dict(metric_series(rows, f"eval/bc_{metric}"))
    table = {
        "run": str(run_dir),
        "env": config["env"]["name"],
        "metric": metric,
        "random": random,
        "eval": [{"env_steps": step, "policy": value, "bc": bc_by_step.get(step)}
                 for step, value in metric_series(rows, f"eval/{metric}")],
        "eval_actions": how,
        "step_unit": step_unit,  # what each eval row's "env_steps" counts: an offline run's steps are updates
        "demonstrator": demonstrator,
        "training_windows": training_windows(rows, window=config["loop"]["eval_every"]),
        "wall_seconds": summary.get("wall_seconds"),
        "grad_steps": summary.get("grad_steps"),
        "env_steps": summary.get("env_steps"),
        "eval_episodes": config["env"]["eval_episodes"],
    }
    (out_dir / f"{name}.json").write_text(json.dumps(table, indent=2))
    return table


def gif_to_filmstrip(gif: Path, png: Path, max_frames: int = 6, max_clips: int = 2) -> Path:
    """The first `max_frames` frames of a real-vs-imagined GIF side by side in one small PNG (videos stay in the
    ignored run folders; the filmstrip goes into the docs). Each GIF frame holds clips of square images, real above
    imagined; only the first `max_clips` clips are kept."""
    import imageio.v2 as imageio
    import numpy as np

    frames = imageio.mimread(gif)[:max_frames]
    if not frames:
        raise ValueError(f"{gif} holds no frames")
    clip_width = frames[0].shape[0] // 2  # two rows of square images
    frames = [frame[:, : max_clips * clip_width] for frame in frames]
    gap = np.full((frames[0].shape[0], 2, frames[0].shape[2]), 255, dtype=np.uint8)
    strip = np.concatenate([part for frame in frames for part in (frame, gap)][:-1], axis=1)
    png.parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(png, strip)
    return png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--out", default=Path("docs/results"), type=Path)
    parser.add_argument("--random-episodes", type=int, default=10, help="episodes of the random baseline, rounded "
                        "up to whole blocks of env.eval_episodes (each block on the evaluation starts)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--demonstrator", type=float, help="the offline dataset's mean episode return (a line)")
    parser.add_argument("--filmstrip", type=Path, help="also turn this real-vs-imagined GIF into OUT/<run>_wm.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.filmstrip is not None:
        print("filmstrip:", gif_to_filmstrip(args.filmstrip, args.out / f"{args.run.name}_wm.png"))
    table = plot(args.run, args.out, args.random_episodes, args.demonstrator)
    print(f"{table['env']}: random {table['random'][table['metric']]:.2f}")
    print(f"{table['step_unit']:>10} {'policy':>10} {'BC alone':>10}")
    for row in table["eval"]:
        bc = "" if row["bc"] is None else f"{row['bc']:.2f}"
        print(f"{row['env_steps']:>10} {row['policy']:>10.2f} {bc:>10}")


if __name__ == "__main__":
    main()
