"""A tiny online Reach run of `d4func.train.loop`, for the tests of scripts that read a run directory."""

from pathlib import Path

from d4func.train.loop import train
from d4func.train.run_config import load_run_config

REACH_CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "reach.yaml"


def tiny_online_reach_run(path: Path, env_steps: int = 40) -> Path:
    """Train `reach.yaml` online into `path` for `env_steps` env steps (20 random, then 10 per collection, a
    gradient step every 5 env steps, no imagination, one evaluation episode at the end); returns `path`."""
    cfg = load_run_config(str(REACH_CONFIG), [
        f"run_dir={path}", "loop.mode=online", "loop.offline_data=null", f"loop.env_steps={env_steps}",
        "loop.prefill_steps=20", "loop.collect_steps=10", "loop.train_ratio=0.2", "loop.agent_start=1000",
        "loop.eval_every=1000", "loop.gif_every=1000", "env.eval_episodes=1",
    ])
    train(cfg, progress=False)
    return path
