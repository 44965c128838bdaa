"""`experiments/reward_readout_probe.py`: the event and its alignment with the frames, the references' learning, the
head's training rows, and clear errors."""

import json
import math

import pytest
import torch
from helpers.scripts import EXPERIMENTS, load_experiment_script
from hypothesis import given, settings
from hypothesis import strategies as st

from d4func.train.run_config import load_run_config

probe_script = load_experiment_script("reward_readout_probe")
CONFIG = str(EXPERIMENTS / "configs/results_reacher32.yaml")


def test_the_event_is_a_token_with_both_first_elements_above_the_threshold():
    frames = torch.zeros(4, 3, 4)  # 4 frames of 3 tokens
    frames[1, 2, :2] = torch.tensor([0.8, 0.9])  # the event in the last token
    frames[2, 0, :2] = torch.tensor([0.8, 0.9])  # the event in the first token
    frames[3, 0, :2] = torch.tensor([0.8, 0.1])  # one element only: no event
    frames[3, 1, 2:] = 0.95  # the other elements do not count
    assert probe_script.event_rewards(frames, 0.7, "any").tolist() == [0.0, 1.0, 1.0, 0.0]
    assert probe_script.event_rewards(frames, 0.7, "first").tolist() == [0.0, 0.0, 1.0, 0.0]
    assert probe_script.event_rewards(frames, 0.85, "any").tolist() == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="where must be one of .* got 'last'"):
        probe_script.event_rewards(frames, 0.7, "last")
    with pytest.raises(ValueError, match="latent_dim must be >= 2, got 1"):
        probe_script.event_rewards(frames[..., :1], 0.7)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(2, 9), where=st.sampled_from(probe_script.PLACES))
def test_each_reward_is_the_event_in_the_frame_its_transition_leads_to(seed, steps, where):
    cfg = load_run_config(CONFIG).dynamics
    gen = torch.Generator().manual_seed(seed)
    latents, actions, rewards = probe_script.reward_rows(cfg, 8, steps, 0.3, gen, 0.5, where)
    assert latents.shape == (8, steps, cfg.latent_tokens, cfg.latent_dim)
    assert actions.shape == (8, steps, cfg.action_dim) and rewards.shape == (8, steps)
    # TorchRL's convention: rewards[:, t] pays for the transition out of frame t, into frame t + 1.
    assert torch.equal(rewards[:, :-1], probe_script.event_rewards(latents[:, 1:], 0.5, where))


def test_the_last_transition_is_paid_for_the_frame_past_the_row(monkeypatch):
    cfg = load_run_config(CONFIG).dynamics
    walk = torch.zeros(2, 4, cfg.latent_tokens, cfg.latent_dim)
    walk[0, 3, 0, :2] = 0.9  # the event only in the frame after row 0's last one

    def fixed_walk(cfg_, batch, steps, step_std, generator):
        assert (batch, steps) == (2, 4)  # one frame more than the row
        return walk, torch.zeros(batch, steps, cfg.action_dim), torch.atanh(walk)

    monkeypatch.setattr(probe_script, "random_walk_rows", fixed_walk)
    latents, _, rewards = probe_script.reward_rows(cfg, 2, 3, 0.1, torch.Generator(), 0.5, "first")
    assert torch.equal(latents, walk[:, :3])
    assert rewards.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize(("reference", "where", "threshold"), [("pooled", "any", 0.7), ("flat", "first", 0.3)])
def test_the_reference_readers_learn_their_event(reference, where, threshold):
    # Measured: both explain about 0.5 of the held-out variance by 500 updates and 0.65 by 1,000.
    cfg = load_run_config(CONFIG)
    result = probe_script.probe(cfg, 600, 300, threshold, where, eval_rows=128, reference=reference, width=64,
                                log=lambda _: None)
    first, last = result["rows"][0], result["rows"][-1]
    assert first["step"] == 0 and first["reward_r2"] < 0.0  # the zero readout predicts 0, below the best constant
    assert last["step"] == 600 and last["reward_r2"] > 0.3
    assert last["train_ce"] < result["rows"][1]["train_ce"]
    assert last["train_dynamics_loss"] is None  # no dynamics in a reference
    assert 0.05 < result["reward_rate"] < 0.5


def test_the_head_probe_trains_the_loops_update_and_writes_its_rows(tmp_path):
    out = tmp_path / "probe.json"
    result = probe_script.main(["--config", CONFIG, "--steps", "4", "--eval-every", "2", "--eval-rows", "8",
                                "--set", "finetune.bc_coef=0", "--out", str(out)])
    assert [r["step"] for r in result["rows"]] == [0, 2, 4]
    assert result["reference"] is None and result["finetune"]["bc_coef"] == 0.0
    assert result["context_signal"] == load_run_config(CONFIG).dynamics.context_signal
    for row in result["rows"][1:]:
        assert math.isfinite(row["train_ce"]) and math.isfinite(row["reward_mse"])
        assert math.isfinite(row["train_dynamics_loss"]) and row["train_dynamics_loss"] > 0
    assert json.loads(out.read_text())["rows"] == result["rows"]


def test_bad_arguments_are_named():
    cfg = load_run_config(CONFIG)
    with pytest.raises(ValueError, match="threshold must lie in \\(-1, 1\\).* got 1.5"):
        probe_script.probe(cfg, 1, 1, 1.5)
    with pytest.raises(ValueError, match="reference must be None or one of .* got 'conv'"):
        probe_script.probe(cfg, 1, 1, reference="conv")
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        probe_script.probe(cfg, 0, 1)
