"""`experiments/dynamics_copy_probe.py`: random-walk rows, the baselines computed by hand, the training loop's
rows, and clear errors."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from d4func.train.run_config import load_run_config

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("dynamics_copy_probe", REPO / "experiments/dynamics_copy_probe.py")
probe_script = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = probe_script
spec.loader.exec_module(probe_script)

CONFIG = str(REPO / "experiments/configs/reach.yaml")


def test_random_walk_rows_stay_inside_the_bottleneck_and_take_the_given_steps():
    cfg = load_run_config(CONFIG).dynamics
    latents, actions, walk = probe_script.random_walk_rows(cfg, 64, 6, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(latents, torch.tanh(walk))
    assert latents.shape == (64, 6, cfg.latent_tokens, cfg.latent_dim)
    assert latents.abs().max() < 1
    moves = torch.atanh(latents[:, 1:]) - torch.atanh(latents[:, :-1])
    assert moves.std().item() == pytest.approx(0.2, rel=0.05)
    assert actions.shape == ((64, 6) if cfg.discrete else (64, 6, cfg.action_dim))


@pytest.mark.parametrize("config", [CONFIG, str(REPO / "experiments/configs/results_cartpole.yaml")])
def test_actions_move_the_walk_by_their_directions(config):
    cfg = load_run_config(config).dynamics
    directions = probe_script.action_directions(cfg, torch.Generator().manual_seed(0))
    count = cfg.n_actions if cfg.discrete else cfg.action_dim
    assert directions.shape == (count, cfg.latent_tokens, cfg.latent_dim)
    if cfg.discrete:  # a uniformly random action moves nothing on average
        assert directions.mean(dim=0).abs().max() < 1e-6
    gen = torch.Generator().manual_seed(1)
    _, actions, walk = probe_script.random_walk_rows(cfg, 16, 5, 1e-6, gen, 0.3, directions)
    steps = walk[:, 1:] - walk[:, :-1]
    expected = 0.3 * probe_script.action_moves(actions[:, :-1], directions, cfg.discrete)
    assert torch.allclose(steps, expected, atol=1e-4)
    with pytest.raises(ValueError, match="action_gain > 0 needs the action directions"):
        probe_script.random_walk_rows(cfg, 2, 3, 0.1, gen, 0.3)


@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize("config", [CONFIG, str(REPO / "experiments/configs/results_cartpole.yaml")])
def test_pose_dependent_actions_turn_with_the_frame_before_them(config, local):
    cfg = load_run_config(config).dynamics
    directions = probe_script.action_directions(cfg, torch.Generator().manual_seed(0), pose_dependent=True)
    count = cfg.n_actions if cfg.discrete else cfg.action_dim
    assert directions.shape == (2, count, cfg.latent_tokens, cfg.latent_dim)
    gen = torch.Generator().manual_seed(1)
    _, actions, walk = probe_script.random_walk_rows(cfg, 16, 5, 1e-6, gen, 0.3, directions, local)
    poses = probe_script.pose_of(torch.tanh(walk[:, :-1]), local)
    expected = 0.3 * probe_script.action_moves(actions[:, :-1], directions, cfg.discrete, poses)
    assert torch.allclose(walk[:, 1:] - walk[:, :-1], expected, atol=1e-4)
    # Pose 0 moves along the first set, pose 1/2 along the second: the same action, another direction.
    first, second = (probe_script.action_moves(actions[:, 0], directions, cfg.discrete,
                                               torch.full((16, cfg.latent_tokens), pose))
                     for pose in (0.0, 0.5))
    assert torch.allclose(first, probe_script.action_moves(actions[:, 0], directions[0], cfg.discrete), atol=1e-6)
    assert torch.allclose(second, probe_script.action_moves(actions[:, 0], directions[1], cfg.discrete), atol=1e-6)
    # Which tokens a pose element turns: its own token only (local), or every token from the first one (global).
    frame = torch.tanh(walk[:, 0])
    nudged = [frame.clone(), frame.clone()]
    nudged[0][:, 0, 0] += 0.5
    nudged[1][:, 1, 0] += 0.5
    base = probe_script.action_moves(actions[:, 0], directions, cfg.discrete, probe_script.pose_of(frame, local))
    changed = [(probe_script.action_moves(actions[:, 0], directions, cfg.discrete, probe_script.pose_of(f, local))
                - base).abs().amax(dim=(0, 2)) > 1e-6 for f in nudged]  # [S]: which tokens' moves changed
    token = torch.arange(cfg.latent_tokens)
    assert torch.equal(changed[0], token == 0 if local else token >= 0)
    assert torch.equal(changed[1], token == 1 if local else token < 0)
    with pytest.raises(ValueError, match="need the previous frame's pose"):
        probe_script.action_moves(actions[:, 0], directions, cfg.discrete)


def test_the_probe_scores_pose_dependent_actions_against_the_truth():
    cfg = load_run_config(CONFIG, ["replay.seq_len=6", "replay.batch_size=4"])
    result = probe_script.probe(cfg, steps=1, eval_every=1, eval_rows=8, seed=1, action_gain=0.5, action_pose="global",
                                log=lambda _: None)
    directions = probe_script.action_directions(cfg.dynamics, torch.Generator().manual_seed(5), pose_dependent=True)
    _, actions, walk = probe_script.random_walk_rows(cfg.dynamics, 8, 6, 0.15, torch.Generator().manual_seed(3),
                                                     0.5, directions)
    pose = probe_script.pose_of(torch.tanh(walk[:, 2]))
    move = probe_script.action_moves(actions[:, 2], directions, cfg.dynamics.discrete, pose)
    other = probe_script.action_moves(actions.roll(1, dims=0)[:, 2], directions, cfg.dynamics.discrete, pose)
    moved = torch.tanh(walk[:, 3] + 0.5 * (other - move))
    row = result["rows"][0]
    assert row["true_action_effect"] == pytest.approx(float((moved - torch.tanh(walk[:, 3])).abs().mean()), rel=1e-5)
    assert result["action_pose"] and "pose-dependent" in probe_script.format_table(result)


def test_probe_rows_and_baselines(tmp_path):
    cfg = load_run_config(CONFIG, ["replay.seq_len=6", "replay.batch_size=4"])
    lines: list[str] = []
    result = probe_script.probe(cfg, steps=3, eval_every=2, eval_rows=8, seed=1, log=lines.append)
    assert [row["step"] for row in result["rows"]] == [2, 3] and len(lines) == 2
    assert result["target_frame"] == 3 and result["context_signal"] == cfg.dynamics.context_signal
    # The baselines, by hand on the same evaluation rows (drawn from seed + 2).
    latents, _, _ = probe_script.random_walk_rows(cfg.dynamics, 8, 6, 0.15, torch.Generator().manual_seed(3))
    copy_last = float((latents[:, 2] - latents[:, 3]).square().mean())
    context_mean = float((latents[:, :3].mean(dim=1) - latents[:, 3]).square().mean())
    for row in result["rows"]:
        assert row["copy_last_mse"] == pytest.approx(copy_last)
        assert row["context_mean_mse"] == pytest.approx(context_mean)
    # Training moves the model's error (same rows, same noise at every measurement).
    assert result["rows"][0]["model_mse"] != result["rows"][1]["model_mse"]
    assert "copy last" in probe_script.format_table(result)
    out = tmp_path / "probe.json"
    printed = probe_script.main(["--config", CONFIG, "--steps", "1", "--eval-every", "1", "--out", str(out),
                                 "--set", "replay.seq_len=4"])
    assert json.loads(out.read_text())["rows"] == printed["rows"]


@pytest.mark.parametrize("config", [CONFIG, str(REPO / "experiments/configs/results_cartpole.yaml")])
def test_mlp_reference_starts_from_the_last_frame_and_learns_a_fixed_action_effect(config):
    """`--mlp-reference`: frame t plus an MLP's change, so with its output layer at zero it is copying the last
    frame; trained on the probe's rows (discrete actions on Reach, continuous on cartpole) it learns a fixed action
    effect within 300 updates, which is what makes it a reference for the slower cases."""
    cfg = load_run_config(config)
    model = probe_script.mlp_reference_model(cfg.dynamics, 32)
    params = probe_script.init(model, 0)
    params["net", "4", "weight"] = torch.zeros_like(params["net", "4", "weight"])
    params["net", "4", "bias"] = torch.zeros_like(params["net", "4", "bias"])
    directions = probe_script.action_directions(cfg.dynamics, torch.Generator().manual_seed(0))
    latents, actions, _ = probe_script.random_walk_rows(cfg.dynamics, 4, 6, 0.15, torch.Generator().manual_seed(1),
                                                        0.5, directions)
    predict = probe_script.mlp_predictor(model, params, 3)
    assert torch.equal(predict(latents, actions), latents[:, 2])

    result = probe_script.probe(cfg, steps=300, eval_every=300, seed=0, action_gain=0.5, mlp_reference=64,
                                log=lambda _: None)
    row = result["rows"][-1]
    assert row["action_effect_r2"] > 0.3 and row["model_mse"] < row["copy_last_mse"]
    assert row["copy_noisy_last_mse"] == row["copy_last_mse"] and result["context_signal"] == 1.0
    assert "an MLP of width 64" in probe_script.format_table(result)
    with pytest.raises(ValueError, match="mlp_reference must be an int >= 0.*got -1"):
        probe_script.probe(cfg, steps=1, eval_every=1, mlp_reference=-1)


def test_a_pool_of_rows_is_all_that_training_sees():
    """`--pool-rows`: every batch is made of the pool's rows (each row whole, its actions with it), and draws
    reach every row of the pool."""
    cfg = load_run_config(CONFIG).dynamics
    latents, actions, _ = probe_script.random_walk_rows(cfg, 5, 6, 0.15, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(20):
        batch_latents, batch_actions = probe_script.pool_batch(latents, actions, 4, gen)
        for row, row_actions in zip(batch_latents, batch_actions, strict=True):
            index = [i for i in range(5) if torch.equal(latents[i], row)]
            assert len(index) == 1 and torch.equal(actions[index[0]], row_actions)
            seen.add(index[0])
    assert seen == set(range(5))
    small = load_run_config(CONFIG, ["replay.seq_len=6", "replay.batch_size=4"])
    pooled = probe_script.probe(small, steps=2, eval_every=2, eval_rows=8, seed=1, pool_rows=3, log=lambda _: None)
    fresh = probe_script.probe(small, steps=2, eval_every=2, eval_rows=8, seed=1, log=lambda _: None)
    assert pooled["pool_rows"] == 3 and pooled["rows"][0]["loss"] != fresh["rows"][0]["loss"]
    with pytest.raises(ValueError, match="pool_rows must be an int >= 0.*got -2"):
        probe_script.probe(load_run_config(CONFIG), steps=1, eval_every=1, pool_rows=-2)


@pytest.mark.parametrize("config", [CONFIG, str(REPO / "experiments/configs/results_cartpole.yaml")])
def test_probe_with_informative_actions_scores_their_effect(config):
    cfg = load_run_config(config, ["replay.seq_len=6", "replay.batch_size=4"])
    result = probe_script.probe(cfg, steps=2, eval_every=2, eval_rows=8, seed=1, action_gain=0.5, log=lambda _: None)
    row = result["rows"][0]
    # By hand: swapping the action into frame 3 for the previous row's moves the truth by the difference of moves.
    directions = probe_script.action_directions(cfg.dynamics, torch.Generator().manual_seed(5))
    _, actions, walk = probe_script.random_walk_rows(cfg.dynamics, 8, 6, 0.15, torch.Generator().manual_seed(3),
                                                     0.5, directions)
    move = probe_script.action_moves(actions[:, 2], directions, cfg.dynamics.discrete)
    other = probe_script.action_moves(actions.roll(1, dims=0)[:, 2], directions, cfg.dynamics.discrete)
    moved = torch.tanh(walk[:, 3] + 0.5 * (other - move))
    assert row["true_action_effect"] == pytest.approx(float((moved - torch.tanh(walk[:, 3])).abs().mean()), rel=1e-5)
    oracle = torch.tanh(walk[:, 2] + 0.5 * move)
    assert row["action_oracle_mse"] == pytest.approx(float((oracle - torch.tanh(walk[:, 3])).square().mean()),
                                                     rel=1e-5)
    assert row["action_oracle_mse"] < row["copy_last_mse"]
    # A model reads its actions: swapping one changes its prediction (it starts with random weights), but not by
    # the true change, which it has not learned.
    assert row["model_action_effect"] > 0 and row["action_effect_r2"] < 0.5
    assert "effect model/true" in probe_script.format_table(result)
    with pytest.raises(ValueError, match="eval_rows must be an int >= 2, got 1"):  # a swap needs another row
        probe_script.probe(cfg, steps=1, eval_every=1, eval_rows=1, action_gain=0.5)
    with pytest.raises(ValueError, match="action_gain must be >= 0, got -0.1"):
        probe_script.probe(cfg, steps=1, eval_every=1, action_gain=-0.1)


def test_probe_rejects_bad_arguments():
    cfg = load_run_config(CONFIG)
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        probe_script.probe(cfg, steps=0, eval_every=1)
    with pytest.raises(ValueError, match="step_std must be > 0, got -1"):
        probe_script.probe(cfg, steps=1, eval_every=1, step_std=-1.0)
    with pytest.raises(ValueError, match="context_len=1 must be < seq_len=1"):  # a row with no frame to predict
        load_run_config(CONFIG, ["replay.seq_len=1", "replay.context_len=1", "imagination.horizon=1"])


def test_the_command_line_walk_and_action_settings_reach_the_probe():
    printed = probe_script.main(["--config", CONFIG, "--steps", "1", "--eval-every", "1", "--step-std", "0.3",
                                 "--action-gain", "0.5", "--seed", "2", "--set", "replay.seq_len=4"])
    assert (printed["step_std"], printed["action_gain"], printed["seed"]) == (0.3, 0.5, 2)
    assert "action_effect_r2" in printed["rows"][0]  # the action-effect columns come with a gain


def test_every_measurement_scores_the_same_rows_with_the_same_noise(monkeypatch):
    # With an update that changes nothing, the model's error must not move between measurements: the rows differ
    # only by the params, so the table shows what training did.
    def no_update(state, *args, **kwargs):
        return state, {"loss": torch.tensor(0.0)}

    monkeypatch.setattr(probe_script, "dynamics_train_step", no_update)
    cfg = load_run_config(CONFIG, ["replay.seq_len=6", "replay.batch_size=2"])
    result = probe_script.probe(cfg, steps=3, eval_every=1, eval_rows=4, seed=1, log=lambda _: None)
    assert len({row["model_mse"] for row in result["rows"]}) == 1, result["rows"]
