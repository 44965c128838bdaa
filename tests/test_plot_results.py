"""`experiments/plot_results.py` on a tiny online Reach run: the figure, the table with the BC-alone column and a
random baseline evaluated on the loop's own evaluation env, and the filmstrip of the loop's real-vs-imagined GIF."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import imageio.v2 as imageio
import pytest

from d4func.data.offline import UniformRandomPolicy
from d4func.envs.registry import make_env
from d4func.train.evaluation import run_episodes
from d4func.train.loop import train
from d4func.train.run_config import load_run_config
from d4func.train.run_logs import metric_series, read_metrics

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
    # Each row's BC figure is the BC evaluation logged at that row's step, not the policy's own.
    assert [(row["env_steps"], row["bc"]) for row in table["eval"]] == metric_series(read_metrics(run),
                                                                                    "eval/bc_mean_return")
    # The random baseline is scored as the evaluations are: blocks of eval_episodes (2) episodes, the evaluation
    # env (seed + 10000) reseeded before each, the run's seed for its actions; 3 episodes round up to 2 blocks.
    env = make_env("reach", seed=10_000, image_size=16)
    policy = UniformRandomPolicy(env.action_spec, seed=0)
    blocks, returns = [], []
    for _ in range(2):
        env.set_seed(10_000)
        played = run_episodes(env, policy, 2)
        blocks.append(played["mean_return"])
        returns += played["returns"]
    random = table["random"]
    assert (random["blocks"], random["episodes_per_block"], random["episodes"]) == (2, 2, 4)
    assert random["mean_return_blocks"] == pytest.approx(blocks)
    assert random["mean_return"] == pytest.approx(sum(blocks) / 2)
    # The spreads are population standard deviations: over the 2 block means and over all 4 episodes.
    assert random["returns"] == pytest.approx(returns)
    assert random["mean_return_std_over_blocks"] == pytest.approx(statistics.pstdev(blocks))
    assert random["std_return"] == pytest.approx(statistics.pstdev(returns))
    gif = sorted((run / "gifs").glob("*.gif"))[-1]
    png = plot_results.gif_to_filmstrip(gif, tmp_path / "strip.png", max_frames=3, max_clips=1)
    strip, first = imageio.imread(png), imageio.mimread(gif)[0]
    clip = first.shape[0] // 2  # one 16x16 real frame above its imagined one
    assert strip.shape[0] == first.shape[0] and strip.shape[1] == 3 * clip + 2 * 2
    assert (strip[:, :clip] == first[:, :clip]).all()


def test_training_windows_group_episodes_by_the_window_they_ended_in():
    # Windows (end - 10, end]: an episode ending exactly on a window's end belongs to that window; empty windows
    # are left out; rows without an episode (losses) are ignored; Crafter's score so far is the window's last.
    rows = [
        {"step": 5, "episode/return": 1.0, "episode/achievements": 1.0, "episode/crafter_score": 2.0},
        {"step": 10, "episode/return": 3.0, "episode/achievements": 3.0, "episode/crafter_score": 4.0},
        {"step": 10, "loss": 0.5},
        {"step": 11, "episode/return": 5.0, "episode/achievements": 0.0, "episode/crafter_score": 4.5},
        {"step": 35, "episode/return": 7.0, "episode/achievements": 2.0, "episode/crafter_score": 6.0},
    ]
    windows = _load_script().training_windows(rows, window=10)
    assert windows == [
        {"env_steps_end": 10, "episodes": 2, "mean_return": 2.0, "mean_achievements": 2.0,
         "crafter_score_so_far": 4.0},
        {"env_steps_end": 20, "episodes": 1, "mean_return": 5.0, "mean_achievements": 0.0,
         "crafter_score_so_far": 4.5},
        {"env_steps_end": 40, "episodes": 1, "mean_return": 7.0, "mean_achievements": 2.0,
         "crafter_score_so_far": 6.0},
    ]
    plain = [{key: value for key, value in row.items() if not key.startswith("episode/a")
              and key != "episode/crafter_score"} for row in rows]
    assert [set(entry) for entry in _load_script().training_windows(plain, window=10)] == [
        {"env_steps_end", "episodes", "mean_return"}] * 3


def test_each_eval_row_pairs_the_policy_with_the_bc_evaluation_of_its_step(tmp_path, monkeypatch):
    # Logged rows chosen by hand (a tiny run's policy and BC head can score alike); the BC head was not evaluated at
    # step 40. The random baseline is stubbed: it is checked against the env in the test above.
    plot_results = _load_script()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "seed": 0, "env": {"name": "reach", "eval_episodes": 2, "eval_max_steps": 50},
        "loop": {"mode": "online", "eval_every": 20}}))
    rows = [{"step": 20, "eval/mean_return": 1.0, "eval/bc_mean_return": 5.0}, {"step": 30, "loss": 0.5},
            {"step": 40, "eval/mean_return": 2.0}, {"step": 60, "eval/bc_mean_return": 7.0, "eval/mean_return": 3.0}]
    monkeypatch.setattr(plot_results, "read_metrics", lambda run_dir: rows)
    monkeypatch.setattr(plot_results, "random_baseline", lambda config, episodes, max_steps: {
        "mean_return": 0.5, "blocks": 1, "episodes_per_block": 2})
    table = plot_results.plot(run, tmp_path / "out", random_episodes=2)
    assert table["eval"] == [{"env_steps": 20, "policy": 1.0, "bc": 5.0}, {"env_steps": 40, "policy": 2.0, "bc": None},
                             {"env_steps": 60, "policy": 3.0, "bc": 7.0}]


def test_an_offline_runs_random_baseline_plays_its_datasets_env_as_its_evaluations_do(tmp_path):
    # The loop evaluates an offline run in the env its dataset names, whatever the config's env.name says.
    from d4func.data.offline import DATASET_FORMAT, META_FILE

    data = tmp_path / "data"
    data.mkdir()
    (data / META_FILE).write_text(json.dumps({"format": DATASET_FORMAT, "env_config": {"name": "reach"}}))
    plot_results = _load_script()
    config = {"env": {"name": "dmc:cartpole-swingup"}, "loop": {"mode": "offline", "offline_data": str(data)}}
    assert plot_results.config_env_name(config) == "reach"
    assert plot_results.config_env_name({**config, "loop": {"mode": "online"}}) == "dmc:cartpole-swingup"
