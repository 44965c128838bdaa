"""`experiments/constant_action_baseline.py`: one fixed action every step, on a run's evaluation starts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from d4func.envs.registry import make_env
from d4func.train.evaluation import eval_env_seed
from d4func.train.run_config import load_run_config

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("constant_action_baseline",
                                               REPO / "experiments/constant_action_baseline.py")
cab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cab)

SHORT_CARTPOLE = ["env.name=dmc:cartpole-swingup", "env.image_size=32", "env.action_repeat=4",
                  "env.max_episode_steps=15", "env.eval_episodes=2", "seed=3"]


def _returns_by_hand(action: float, env_seed: int, episodes: int = 2) -> list[float]:
    """As `d4func eval` starts its episodes: a fresh env made with `env_seed`, then the action every step until
    the episode ends."""
    env = make_env("dmc:cartpole-swingup", seed=env_seed, image_size=32, action_repeat=4, max_episode_steps=15)
    returns = []
    for _ in range(episodes):
        td, total = env.reset(), 0.0
        for _ in range(100):
            td = env.step(td.set("action", torch.tensor([action])))
            total += float(td.get(("next", "reward")).sum())
            if bool(td.get(("next", "done")).any()):
                break
            td = td.get("next")
        returns.append(total)
    env.close()
    return returns


def test_constant_actions_score_the_same_episodes_as_playing_them_by_hand():
    cfg = load_run_config(str(REPO / "experiments/configs/debug.yaml"), SHORT_CARTPOLE)
    results = cab.constant_action_returns(cfg, ["0.5", " -1", "0"])
    for text, action in (("0.5", 0.5), ("-1", -1.0)):
        returns = _returns_by_hand(action, eval_env_seed(3))
        assert results[text]["returns"] == pytest.approx(returns, abs=1e-5), text
        assert results[text]["mean_return"] == pytest.approx(sum(returns) / 2, abs=1e-5)
    assert results["0.5"]["returns"] != results["-1"]["returns"]  # the action matters


def test_an_explicit_seed_and_episode_count_choose_the_starts():
    # `--seed` (as `d4func eval --seed`) replaces the run's evaluation seed; `episodes` the run's eval_episodes.
    cfg = load_run_config(str(REPO / "experiments/configs/debug.yaml"), SHORT_CARTPOLE)
    results = cab.constant_action_returns(cfg, ["0.5"], seed=7, episodes=3)
    assert results["0.5"]["returns"] == pytest.approx(_returns_by_hand(0.5, 7, episodes=3), abs=1e-5)
    assert results["0.5"]["returns"][:2] != pytest.approx(_returns_by_hand(0.5, eval_env_seed(3)), abs=1e-5)


def test_bad_actions_are_refused_by_value():
    cfg = load_run_config(str(REPO / "experiments/configs/debug.yaml"), SHORT_CARTPOLE)
    with pytest.raises(ValueError, match=r"action '1.5' lies outside the action space"):
        cab.constant_action_returns(cfg, ["1.5"])
    with pytest.raises(ValueError, match=r"action '-1.5' lies outside the action space"):  # below the low bound too
        cab.constant_action_returns(cfg, ["-1.5"])
    with pytest.raises(ValueError, match=r"action '0,0' has 2 components; the env's actions have 1"):
        cab.constant_action_returns(cfg, ["0,0"])
    with pytest.raises(ValueError, match="episodes must be >= 1, got 0"):
        cab.constant_action_returns(cfg, ["0"], episodes=0)
    reach = load_run_config(str(REPO / "experiments/configs/reach.yaml"))
    with pytest.raises(ValueError, match="continuous .*Categorical"):
        cab.constant_action_returns(reach, ["1"], env_name="reach")
