"""`experiments/plot_results.py` on a tiny online Reach run: the figure, the table with the BC-alone column and a
random baseline evaluated on the loop's own evaluation env, and the filmstrip of the loop's real-vs-imagined GIF."""

import importlib.util
import json
import sys
from pathlib import Path

import imageio.v2 as imageio
import pytest

from d4func.data.offline import UniformRandomPolicy
from d4func.envs.registry import make_env
from d4func.train.loop import run_episodes, train
from d4func.train.run_config import load_run_config

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("plot_results", REPO / "experiments/plot_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_plot_results_writes_figure_table_and_filmstrip(tmp_path):
    run = tmp_path / "reach_run"
    train(load_run_config(str(REPO / "experiments/configs/reach.yaml"), [
        f"run_dir={run}", "loop.mode=online", "loop.offline_data=null", "loop.env_steps=40", "loop.prefill_steps=20",
        "loop.collect_steps=10", "loop.train_ratio=0.2", "loop.agent_start=30", "loop.eval_every=20",
        "loop.gif_every=40", "env.eval_episodes=2", "loop.eval_bc=true",
    ]), progress=False)
    plot_results = _load_script()
    table = plot_results.plot(run, tmp_path / "out", random_episodes=3)
    assert (tmp_path / "out" / "reach_run.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "reach_run.json").read_text()) == table
    assert [row["env_steps"] for row in table["eval"]] == [20, 40] and table["step_unit"] == "env steps"
    assert table["demonstrator"] is None
    assert all(row["bc"] is not None for row in table["eval"])
    # The random baseline is scored as the evaluations are: blocks of eval_episodes (2) episodes, the evaluation
    # env (seed + 10000) reseeded before each, the run's seed for its actions; 3 episodes round up to 2 blocks.
    env = make_env("reach", seed=10_000, image_size=16)
    policy = UniformRandomPolicy(env.action_spec, seed=0)
    blocks = []
    for _ in range(2):
        env.set_seed(10_000)
        blocks.append(run_episodes(env, policy, 2)["mean_return"])
    random = table["random"]
    assert (random["blocks"], random["episodes_per_block"], random["episodes"]) == (2, 2, 4)
    assert random["mean_return_blocks"] == pytest.approx(blocks)
    assert random["mean_return"] == pytest.approx(sum(blocks) / 2)
    gif = sorted((run / "gifs").glob("*.gif"))[-1]
    png = plot_results.gif_to_filmstrip(gif, tmp_path / "strip.png", max_frames=3, max_clips=1)
    strip, first = imageio.imread(png), imageio.mimread(gif)[0]
    clip = first.shape[0] // 2  # one 16x16 real frame above its imagined one
    assert strip.shape[0] == first.shape[0] and strip.shape[1] == 3 * clip + 2 * 2
    assert (strip[:, :clip] == first[:, :clip]).all()
