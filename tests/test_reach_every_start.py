"""Reach's chosen starts (`ReachEnv.start_next_episode_at`) and `experiments/reach_every_start.py` on a tiny online
Reach run: every start visited once, real clips that follow their actions, and position accounting that gives a
perfect world model 1 and a world model that never moves the agent only the stays."""

from pathlib import Path

import pytest
import torch
from helpers.scripts import load_experiment_script
from helpers.tiny_runs import tiny_online_reach_run
from hypothesis import given, settings
from hypothesis import strategies as st

from d4func.envs.reach import ReachEnv, make_reach_env, reach_positions

REPO = Path(__file__).resolve().parents[1]
N_CELLS = 8
script = load_experiment_script("reach_every_start")


@settings(max_examples=30, deadline=None)
@given(agent=st.integers(0, N_CELLS - 1), offset=st.integers(1, N_CELLS - 1), seed=st.integers(0, 2**31))
def test_a_chosen_start_is_used_once_and_leaves_the_drawn_starts_unchanged(agent, offset, seed):
    goal = (agent + offset) % N_CELLS
    chosen, plain = make_reach_env(seed=seed), make_reach_env(seed=seed)
    chosen.base_env.start_next_episode_at(agent, goal)
    td = chosen.reset()
    assert (chosen.base_env.agent, chosen.base_env.goal) == (agent, goal)
    assert [int(cell) for cell in reach_positions(td["pixels"], N_CELLS)] == [agent, goal]
    for _ in range(3):  # the chosen start drew nothing from the env's generator
        chosen.reset(), plain.reset()
        assert (chosen.base_env.agent, chosen.base_env.goal) == (plain.base_env.agent, plain.base_env.goal)


@pytest.mark.parametrize(("agent", "goal", "message"), [
    (3, 3, "different cells, got both in cell 3"), (-1, 2, "agent must be a cell in \\[0, 8\\), got -1"),
    (0, 8, "goal must be a cell in \\[0, 8\\), got 8"), (1.0, 2, "got 1.0"), (True, 2, "got True"),
])
def test_bad_starts_are_refused_by_name(agent, goal, message):
    with pytest.raises(ValueError, match=message):
        ReachEnv().start_next_episode_at(agent, goal)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_online_reach_run(tmp_path_factory.mktemp("reach_run"), env_steps=30)


@pytest.fixture(scope="module")
def cfg(run_dir):
    loaded = script.checkpoint.load_checkpoint(script.checkpoint.latest_checkpoint(run_dir))
    return script.saved_run_config(loaded.payload["config"])


def test_real_clips_start_where_asked_and_follow_their_actions(cfg):
    starts = script.every_start(N_CELLS)
    assert len(starts) == 56 == len(set(starts))
    horizon = 4
    sequences = torch.randint(3, (len(starts), horizon), generator=torch.Generator().manual_seed(0))
    frames, actions = script.real_clips(cfg, sequences)
    context = cfg.replay.context_len
    assert frames.shape[:2] == (len(starts), context + horizon) and actions.shape == (len(starts), context + horizon)
    agent, goal = reach_positions(frames, N_CELLS)
    for i, (start_agent, start_goal) in enumerate(starts):
        assert (goal[i] == start_goal).all()
        assert (agent[i, :context] == start_agent).all()  # the context stays put
        expected = start_agent
        for h in range(horizon):
            expected = min(max(expected + int(sequences[i, h]) - 1, 0), N_CELLS - 1)
            assert agent[i, context + h] == expected
        assert torch.equal(actions[i, context - 1:context - 1 + horizon], sequences[i])


def test_position_accounting_against_a_perfect_and_a_frozen_world_model(cfg, monkeypatch):
    starts = script.every_start(N_CELLS)
    horizon = 3
    sequences = torch.full((len(starts), horizon), script.RIGHT)
    context = cfg.replay.context_len
    # A perfect world model: the real frames themselves.
    monkeypatch.setattr(script, "predict_frames", lambda *args, **kw: script.real_clips(cfg, sequences)[0][:, context:])
    perfect = script.position_accuracy(cfg, None, None, None, None, sequences, seeds=2, n_cells=N_CELLS)
    assert perfect == {key: [1.0] * horizon for key in ("agent", "goal", "both")}
    # A world model that never moves anything: right is only right where the agent already stands at the wall.
    monkeypatch.setattr(script, "predict_frames", lambda tokenizer, tp, dynamics, dp, context_frames, *args, **kw:
                        context_frames[:, -1:].expand(-1, horizon, -1, -1, -1))
    frozen = script.position_accuracy(cfg, None, None, None, None, sequences, seeds=1, n_cells=N_CELLS)
    at_wall = [sum(min(a + h + 1, N_CELLS - 1) == a for a, _ in starts) / len(starts) for h in range(horizon)]
    assert frozen["agent"] == pytest.approx(at_wall, abs=1e-4) and frozen["goal"] == [1.0] * horizon


def test_evaluate_writes_each_start_for_policy_bc_and_each_sequence(run_dir, monkeypatch):
    starts = [(0, 7), (3, 2), (6, 4), (7, 6)]  # a few of the 56, for time: every start is one greedy episode each
    monkeypatch.setattr(script, "every_start", lambda n_cells: starts)
    result = script.evaluate(run_dir, horizon=2, seeds=1, random_sequences=1)
    assert result["best"] == [6, 12, 11, 12] and result["best_mean"] == 10.25  # length 12 - distance + 1
    for name in ("policy", "bc"):
        returns = result[name]["returns"]
        assert len(returns) == 4 and all(0 <= r <= b for r, b in zip(returns, result["best"], strict=True))
        assert result[name]["solved"] == sum(r == b for r, b in zip(returns, result["best"], strict=True))
    assert set(result["position_accuracy"]) == {"left", "stay", "right", "random"}
    for acc in result["position_accuracy"].values():
        assert all(len(acc[key]) == 2 and all(0 <= v <= 1 for v in acc[key]) for key in ("agent", "goal", "both"))
        assert all(b <= min(a, g) for a, g, b in zip(acc["agent"], acc["goal"], acc["both"], strict=True))
    assert (run_dir / script.RESULT_FILE).is_file()
    assert "best return on" in script.format_table(result)
    with pytest.raises(ValueError, match="horizon=11"):
        script.evaluate(run_dir, horizon=11)


def test_position_accuracy_averages_over_the_sampling_seeds(cfg, monkeypatch):
    # One sample per seed 0 .. seeds-1, each with its own noise: a model that is right only under seed 0 scores 1/3.
    starts = script.every_start(N_CELLS)
    horizon = 2
    sequences = torch.full((len(starts), horizon), script.STAY)
    real = script.real_clips(cfg, sequences)[0][:, cfg.replay.context_len:]
    seeds = []

    def right_under_seed_zero(*args, seed, **kw):
        seeds.append(seed)
        return real if seed == 0 else real.flip(-1)  # mirrored: agent and goal in other cells

    monkeypatch.setattr(script, "predict_frames", right_under_seed_zero)
    accuracy = script.position_accuracy(cfg, None, None, None, None, sequences, seeds=3, n_cells=N_CELLS)
    assert seeds == [0, 1, 2]
    assert accuracy["both"] == pytest.approx([1 / 3] * horizon, abs=1e-4)


def test_evaluate_counts_solved_starts_and_averages_the_random_sequences(run_dir, monkeypatch):
    starts = [(0, 7), (3, 2), (6, 4)]
    best = [6, 12, 11]  # length 12 - distance + 1
    monkeypatch.setattr(script, "every_start", lambda n_cells: starts)
    # The acting policy reaches the best return on the first start only (solved 1); the BC head on none.
    monkeypatch.setattr(script, "policy_returns",
                        lambda cfg, states, bc: [0.0, 0.0, 0.0] if bc else [float(best[0]), 11.0, 3.0])
    calls = []

    def numbered_accuracy(cfg, tokenizer, tp, dynamics, dp, sequences, seeds, n_cells):
        calls.append(sequences)
        value = float(len(calls))  # 1, 2, 3 for left, stay, right; 4 and 5 for the two random sequences
        return {key: [value] * sequences.shape[1] for key in ("agent", "goal", "both")}

    monkeypatch.setattr(script, "position_accuracy", numbered_accuracy)
    horizon = 10  # the longest that fits: 3 context frames, then 10 steps, in a 12-step episode
    result = script.evaluate(run_dir, horizon=horizon, seeds=3, random_sequences=2)
    assert result["best"] == best
    assert (result["policy"]["solved"], result["bc"]["solved"]) == (1, 0)
    assert result["policy"]["mean"] == pytest.approx((6 + 11 + 3) / 3)
    for sequences, action in zip(calls[:3], (script.LEFT, script.STAY, script.RIGHT), strict=True):
        assert sequences.shape == (len(starts), horizon) and (sequences == action).all()
    assert result["position_accuracy"]["random"] == {key: [4.5] * horizon for key in ("agent", "goal", "both")}
