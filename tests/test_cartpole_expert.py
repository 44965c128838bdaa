"""`experiments/cartpole_expert.py`: the simulator planner leaves the real episode as it would be without its
search, scores more than random actions, and refuses envs it cannot plan in."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from d4func.data.offline import load_offline
from d4func.envs.registry import make_env

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cartpole_expert", REPO / "experiments/cartpole_expert.py")
expert = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = expert
_spec.loader.exec_module(expert)

SIZE, REPEAT, STEPS = 16, 4, 25


def cartpole(seed: int = 0):
    return make_env("dmc:cartpole-swingup", seed=seed, image_size=SIZE, action_repeat=REPEAT)


def test_planning_leaves_the_episode_as_replaying_its_actions_does():
    env = cartpole()
    planner = expert.SimulatorPlanner(env, action_repeat=REPEAT, horizon=6, samples=6, noise=0.2)
    planned = env.rollout(STEPS, planner)
    replayed = cartpole().rollout(STEPS, _Replay(planned.get("action")))
    assert torch.equal(planned.get(("next", "pixels")), replayed.get(("next", "pixels")))
    assert torch.equal(planned.get(("next", "reward")), replayed.get(("next", "reward")))


@pytest.mark.slow  # ~8 s
def test_the_planner_scores_more_than_random_actions():
    # 60 decisions from the hanging start: the planner is swinging the pole up (36-69 on seeds 0-2), random actions
    # hardly move it (0.3-3.2).
    planner_env, random_env = cartpole(), cartpole()
    planner = expert.SimulatorPlanner(planner_env, action_repeat=REPEAT, horizon=20, samples=16)
    planned = planner_env.rollout(60, planner).get(("next", "reward")).sum()
    torch.manual_seed(0)
    random = random_env.rollout(60).get(("next", "reward")).sum()
    assert planned > random + 20.0, (float(planned), float(random))


@pytest.mark.slow  # ~10 s: one 250-step episode, rendered
def test_recording_prints_what_the_dataset_holds(tmp_path, capsys):
    out = tmp_path / "expert"
    assert expert.main(["--out", str(out), "--episodes", "1", "--horizon", "2", "--samples", "2",
                        "--image-size", str(SIZE)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rewards = load_offline(out, 1, 1).stored_transitions().get(("next", "reward"))
    assert printed["transitions"] == rewards.shape[0] == 250 and printed["episodes"] == 1  # 1000 steps / repeat 4
    assert printed["mean_return"] == pytest.approx(float(rewards.sum()), rel=1e-5) == printed["returns"][0]


def test_envs_without_a_simulator_or_with_bad_settings_are_refused():
    with pytest.raises(TypeError, match="not a DMControl env"):
        expert.SimulatorPlanner(make_env("reach", image_size=16), action_repeat=1)
    with pytest.raises(ValueError, match="horizon must be >= 1, got 0"):
        expert.SimulatorPlanner(cartpole(), action_repeat=REPEAT, horizon=0)
    with pytest.raises(ValueError, match="samples must be >= 1, got 0"):
        expert.SimulatorPlanner(cartpole(), action_repeat=REPEAT, samples=0)
    with pytest.raises(ValueError, match="action_repeat must be >= 1, got 0"):
        expert.SimulatorPlanner(cartpole(), action_repeat=0)


def test_the_planners_simulated_return_is_the_envs_return_for_the_same_actions():
    # The search must step the simulator as the env does (action repeat, dm_control's sub-steps, summed rewards),
    # or it ranks plans by a return the env never pays.
    env = cartpole()
    env.reset()
    planner = expert.SimulatorPlanner(env, action_repeat=REPEAT, horizon=5, samples=1)
    actions = np.array([1.0, -0.5, 0.8, 1.0, -1.0])
    simulated = planner._score(actions) * REPEAT  # per decision -> per env step (the env sums its repeats)
    fresh = cartpole()
    real = fresh.rollout(5, _Replay(torch.tensor(actions, dtype=torch.float32)[:, None]))
    assert simulated == pytest.approx(float(real.get(("next", "reward")).sum()), rel=1e-4, abs=1e-6)


def test_the_planner_follows_the_best_scoring_plan_and_shifts_it_forward(monkeypatch):
    env = cartpole()
    env.reset()
    planner = expert.SimulatorPlanner(env, action_repeat=REPEAT, horizon=4, samples=8, temperature=1e-4)
    seen: list[tuple[np.ndarray, float]] = []

    def score(actions: np.ndarray) -> float:  # best: the plan closest to 0.5 everywhere
        value = -float(np.abs(actions - 0.5).sum())
        seen.append((actions.copy(), value))
        return value

    monkeypatch.setattr(planner, "_score", score)
    td = planner(env.reset())
    best = max(seen, key=lambda item: item[1])[0]
    np.testing.assert_allclose(planner.plan, best, atol=1e-6)  # a near-zero temperature keeps only the best
    assert float(td.get("action")) == pytest.approx(best[0], abs=1e-6)  # noise 0: the plan's first action
    env.step(td)  # the clock moves on: the same episode, so the plan carries over
    seen.clear()
    planner(td)
    # The next decision's first candidate is the previous plan, one decision on, padded with 0.
    np.testing.assert_allclose(seen[0][0], np.concatenate([best[1:], [0.0]]))


def test_noise_goes_on_the_executed_and_recorded_action_not_on_the_plan(monkeypatch):
    env = cartpole()
    planner = expert.SimulatorPlanner(env, action_repeat=REPEAT, horizon=3, samples=2, noise=0.5, seed=1)
    monkeypatch.setattr(planner, "_score", lambda actions: 0.0)
    actions = [float(planner(env.reset()).get("action")) - planner.plan[0] for _ in range(5)]
    assert all(abs(a) > 1e-6 for a in actions), actions
    quiet = expert.SimulatorPlanner(cartpole(), action_repeat=REPEAT, horizon=3, samples=2, noise=0.0)
    monkeypatch.setattr(quiet, "_score", lambda actions: 0.0)
    assert float(quiet(quiet.env.reset()).get("action")) == pytest.approx(quiet.plan[0])


def test_the_command_line_settings_reach_the_planner(monkeypatch, capsys):
    planners = []

    def evaluate(env, planner, episodes):
        planners.append((planner, episodes))
        return [1.0, 2.0]

    monkeypatch.setattr(expert, "evaluate", evaluate)
    assert expert.main(["--eval-only", "--episodes", "2", "--horizon", "3", "--samples", "5", "--noise", "0.1",
                        "--action-repeat", "2", "--image-size", str(SIZE)]) == 0
    planner, episodes = planners[0]
    assert (planner.horizon, planner.samples, planner.noise, planner.action_repeat, episodes) == (3, 5, 0.1, 2, 2)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mean"] == 1.5


class _Replay(torch.nn.Module):
    """Acts a recorded action sequence, one per call."""

    def __init__(self, actions: torch.Tensor) -> None:
        super().__init__()
        self.actions, self.step = actions, 0

    def forward(self, td):
        td.set("action", self.actions[self.step])
        self.step += 1
        return td
