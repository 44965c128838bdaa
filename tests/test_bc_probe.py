"""experiments/bc_probe.py: its probes find action information where there is some and none where there is none,
and the script runs end to end on an offline run with a held-out dataset."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from d4func.cli import main as cli
from d4func.heads import HeadsConfig
from d4func.train.loop import train
from d4func.train.run_config import load_run_config

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("bc_probe", REPO / "experiments/bc_probe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bc_probe"] = module
    spec.loader.exec_module(module)
    return module


probe = _load_script()


def _actions(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, 1, generator=generator) * 1.8 - 0.9


@pytest.mark.parametrize("informative", [True, False])
def test_a_probe_beats_the_marginal_exactly_when_its_input_carries_the_action(informative):
    generator = torch.Generator().manual_seed(0)
    heads_cfg = HeadsConfig(d_model=8, action_dim=1)
    train_y, test_y = _actions(2000, generator), _actions(500, generator)
    if informative:  # the action plus a little noise, among distractors
        def features(y):
            return torch.cat([y + 0.05 * torch.randn(y.shape, generator=generator),
                              torch.randn(y.shape[0], 7, generator=generator)], dim=1)
    else:
        def features(y):
            return torch.randn(y.shape[0], 8, generator=generator)
    fitted = probe.fit_probe(features(train_y), train_y, features(test_y), test_y, heads_cfg, steps=600,
                             eval_every=100)
    marginal = probe.fit_probe(torch.zeros(2000, 1), train_y, torch.zeros(500, 1), test_y, heads_cfg, steps=600,
                               eval_every=100)
    # Uniform actions on [-0.9, 0.9]: the marginal's NLL is about log(1.8) = 0.59.
    assert marginal["held_out_nll"] == pytest.approx(0.6, abs=0.12)
    if informative:
        assert fitted["held_out_nll"] < marginal["held_out_nll"] - 0.3
    else:
        assert fitted["held_out_nll"] > marginal["held_out_nll"] - 0.05
    assert [point["step"] for point in fitted["curve"]] == [100, 200, 300, 400, 500, 600]
    best = min(fitted["curve"], key=lambda point: point["held_out_nll"])
    assert (fitted["held_out_nll"], fitted["train_nll"], fitted["best_step"]) == (
        best["held_out_nll"], best["train_nll"], best["step"])  # the training NLL at the best evaluation


def test_previous_actions_are_the_k_before_each_step_flagged_and_zero_before_the_start():
    actions = torch.tensor([[0.1], [0.2], [0.3], [0.4]])
    history = probe.previous_actions(actions, 2)  # per step: (a_{t-2}, flag, a_{t-1}, flag)
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.1, 1.0], [0.1, 1.0, 0.2, 1.0], [0.2, 1.0, 0.3, 1.0]])
    torch.testing.assert_close(history, expected)
    discrete = probe.previous_actions(torch.tensor([2, 0, 1]), 1, n_actions=3)
    torch.testing.assert_close(discrete, torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0],
                                                       [1.0, 0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="action history must be >= 1, got 0"):
        probe.previous_actions(actions, 0)


def test_the_probe_script_on_an_offline_run_with_a_held_out_dataset(tmp_path, capsys):
    for name, seed in (("data", 0), ("held_out", 1)):
        assert cli(["collect", "--env", "reach", "--out", str(tmp_path / name), "--steps", "60", "--seed", str(seed),
                    "--image-size", "16", "--action-repeat", "1"]) == 0
    run = tmp_path / "run"
    train(load_run_config(str(REPO / "experiments/configs/reach.yaml"), [
        f"run_dir={run}", "loop.mode=offline", f"loop.offline_data={tmp_path / 'data'}", "loop.offline_steps=2",
        "loop.agent_start=100", "loop.eval_every=100", "loop.gif_every=100", "loop.checkpoint_every=100",
        "env.eval_episodes=0"]), progress=False)
    result = probe.main(["--run", str(run), "--held-out", str(tmp_path / "held_out"), "--steps", "20",
                         "--eval-every", "10", "--history", "2"])
    assert json.loads((run / probe.RESULT_FILE).read_text()) == result
    assert result["held_out_seen_by_run"] is False and result["step"] == 2
    # 60 steps per dataset in windows of replay.seq_len = 8 frames, of which positions 1..7 have 2 frames of history
    assert result["pairs"]["train"] % 7 == 0 and result["pairs"]["held_out"] % 7 == 0
    assert 0 < result["pairs"]["held_out"] <= 60 and 0 < result["pairs"]["train"] <= 60
    assert set(result["probes"]) == {"marginal (no input)", "latents of frame t", "latents of frames t-1..t",
                                     "agent token at t", "actions t-7..t-1 of the episode"}
    assert result["action_history"] == 7
    assert all(torch.isfinite(torch.tensor(p["held_out_nll"])) for p in result["probes"].values())
    # The BC head at the context level (the acting condition) and at the three levels asked for by default.
    by_signal = result["bc_head_nll_by_signal"]
    assert list(by_signal) == ["1", f"{result['context_signal']:g}", "0.5", "0"]
    assert by_signal[f"{result['context_signal']:g}"] == result["bc_head_nll"]
    assert by_signal["1"] != by_signal["0"]
    out = capsys.readouterr().out
    assert "| the run's BC head (step 2) |" in out and "| the BC head, pure noise for frames |" in out

    only_noise = probe.probe_run(run, held_out_data=tmp_path / "held_out", steps=10, eval_every=10, history=2,
                                 action_history=3, signal_levels=(0.0,))
    assert list(only_noise["bc_head_nll_by_signal"]) == [f"{result['context_signal']:g}", "0"]
    assert only_noise["bc_head_nll_by_signal"]["0"] == by_signal["0"]  # its own noise draws
    assert only_noise["bc_head_nll"] == result["bc_head_nll"]
    assert "actions t-3..t-1 of the episode" in only_noise["probes"]
    with pytest.raises(ValueError, match=r"signal levels must be in \[0, 1\], got \[2.0\]"):
        probe.probe_run(run, signal_levels=(2.0,))

    split = probe.probe_run(run, steps=10, eval_every=10, history=2, held_out_every=2)
    assert split["held_out_seen_by_run"] is True
    with pytest.raises(ValueError, match="held_out_every must be >= 2"):
        probe.probe_run(run, held_out_every=1)
    with pytest.raises(ValueError, match="history must be in 1..replay.seq_len=8, got 9"):
        probe.probe_run(run, history=9)


class _AgentReadsAction:
    """Stands in for the BC head's distribution: the NLL of an action is its distance from the agent token's value."""

    def __init__(self, agent: torch.Tensor):
        self.agent = agent

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        return -(self.agent[..., 0, 0] - actions[..., 0]).abs()


def test_probe_pairs_and_bc_nll_align_each_frame_with_its_action_and_split_by_episode(monkeypatch):
    # Four episodes of one window of 4 frames each; every per-step input and the action at that step carry the same
    # value, 10 * episode + t, so a misaligned pair or an episode on the wrong side of the split shows by value.
    # Held out (held_out_every=2): episodes 1 and 3. The agent tokens of held-out episodes are off by one from their
    # actions, so the BC head's NLL is 0 on the training episodes and 1 on the held-out ones.
    seq_len, episodes, history = 4, 4, 2
    run = SimpleNamespace(cfg=SimpleNamespace(replay=SimpleNamespace(seq_len=seq_len),
                                              loop=SimpleNamespace(offline_data="data")),
                          dynamics=SimpleNamespace(cfg=SimpleNamespace(context_signal=0.1)),
                          heads=SimpleNamespace(cfg=HeadsConfig(d_model=8, action_dim=1)),
                          heads_params={"policy": None}, step=0, checkpoint="ckpt")
    values = (10 * torch.arange(episodes)[:, None] + torch.arange(seq_len)).float()  # [N, T]

    def fake_windows(run_, data, held_out, max_episodes, *, action_history, signal_levels):
        assert signal_levels == ()
        split = torch.tensor([held_out(i) for i in range(episodes)])
        return {"latents": values[:, :, None, None], "agent": (values + split[:, None])[:, :, None, None],
                "actions": values[:, :, None], "previous_actions": values[:, :, None], "held_out": split}

    fitted = {}

    def fake_fit(train_x, train_y, test_x, test_y, heads_cfg, *, steps, eval_every):
        fitted[len(fitted)] = (train_x, train_y, test_x, test_y)
        return {"held_out_nll": 0.0, "train_nll": 0.0, "best_step": steps, "curve": []}

    monkeypatch.setattr(probe, "load_run", lambda run_dir: run)
    monkeypatch.setattr(probe, "episode_windows", fake_windows)
    monkeypatch.setattr(probe, "fit_probe", fake_fit)
    monkeypatch.setattr(probe, "policy_dist", lambda heads, params, agent: _AgentReadsAction(agent))
    result = probe.probe_run("run", history=history, held_out_every=2, steps=1, eval_every=1, signal_levels=())
    assert result["bc_head_nll"] == {"train": 0.0, "held_out": 1.0}
    assert result["held_out_seen_by_run"] is True
    positions = seq_len - history + 1  # frames with `history` frames in their window: t = 1, 2, 3
    assert result["pairs"] == {"train": 2 * positions, "held_out": 2 * positions}
    expected_train = torch.tensor([1.0, 2.0, 3.0, 21.0, 22.0, 23.0])[:, None]
    expected_test = expected_train + 10
    assert len(fitted) == len(result["probes"]) == 5
    for _, train_y, _, test_y in fitted.values():
        torch.testing.assert_close(train_y, expected_train)
        torch.testing.assert_close(test_y, expected_test)
    # Every input but the marginal ends with the value of frame t (the history's newest frame last).
    for index in (1, 2, 4):
        train_x, train_y, test_x, test_y = fitted[index]
        torch.testing.assert_close(train_x[:, -1:], train_y)
        torch.testing.assert_close(test_x[:, -1:], test_y)
    torch.testing.assert_close(fitted[2][0][:, :1], expected_train - 1)  # latents of frames t-1..t
    torch.testing.assert_close(fitted[3][0], expected_train)  # agent token at t (a training episode's is exact)
    torch.testing.assert_close(fitted[3][2], expected_test + 1)
