"""`experiments/reward_probe.py`: its net's pooling, its figures on hand cases, the frames it reads, and a run on a
tiny online Reach run that leaves the run directory as it was."""

import json
import math
from pathlib import Path

import pytest
import torch
from einops import rearrange
from helpers.scripts import load_experiment_script
from helpers.tiny_runs import tiny_online_reach_run
from hypothesis import given, settings
from hypothesis import strategies as st

from d4func.functional import apply, init, template

SEED = 1
probe = load_experiment_script("reward_probe")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_online_reach_run(tmp_path_factory.mktemp("reach_run"))


@settings(max_examples=20, deadline=None)
@given(first=st.tuples(st.integers(18, 44), st.integers(18, 44)),
       second=st.tuples(st.integers(18, 44), st.integers(18, 44)), seed=st.integers(0, 50))
def test_reward_conv_scores_a_small_blob_alike_wherever_it_lies_away_from_the_border(first, second, seed):
    """Convolutions and a global mean and max: the reading of a 2x2 blob does not depend on where it is, so a
    fingertip in the target counts the same in any corner of the arena. The border's zero padding aside: the
    receptive field reaches 9 pixels and the border's own features reach 9 pixels in, so a 64x64 frame keeps the
    two apart for blobs at rows and columns 18-44."""
    model = template(probe.RewardConv, 3, 8)
    # float64: five random layers shrink a 4-pixel change of a 1,024-pixel mean below float32's resolution.
    params = init(model, seed, dtype=torch.float64)
    empty = torch.full((1, 3, 64, 64), 0.2, dtype=torch.float64)

    def frame_with_blob(row: int, col: int) -> torch.Tensor:
        frame = empty.clone()
        frame[:, 0, row:row + 2, col:col + 2] = 0.9
        return frame

    a = apply(model, params, frame_with_blob(*first))
    b = apply(model, params, frame_with_blob(*second))
    assert a.shape == (1,)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert (a - apply(model, params, empty)).abs() > 1e-9  # it does see the blob


def test_reward_fit_by_hand():
    actual = torch.tensor([0.0, 0.0, 1.0, 3.0])
    perfect = probe.wmq.reward_fit(actual.clone(), actual)
    assert perfect["reward_r2"] == pytest.approx(1.0) and perfect["reward_corr"] == pytest.approx(1.0)
    constant = probe.wmq.reward_fit(torch.full((4,), float(actual.mean())), actual)
    assert constant["reward_r2"] == pytest.approx(0.0) and constant["reward_corr"] is None
    assert constant["reward_mse"] == pytest.approx(constant["reward_constant_mse"]) == pytest.approx(1.5)
    # Halfway to the mean: MSE is a quarter of the variance, the correlation stays 1.
    halfway = probe.wmq.reward_fit(0.5 * actual + 0.5 * actual.mean(), actual)
    assert halfway["reward_r2"] == pytest.approx(0.75) and halfway["reward_corr"] == pytest.approx(1.0)
    assert probe.wmq.reward_fit(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))["reward_r2"] is None


def test_pixels_space_reads_each_frame_as_it_is(run_dir):
    run = probe.wmq.load_run(run_dir)
    frames = torch.rand(2, 3, 3, run.cfg.env.image_size, run.cfg.env.image_size)
    torch.testing.assert_close(probe.as_grid(run, "pixels", frames), rearrange(frames, "b t c h w -> (b t) c h w"))
    # Reach's tokenizer lets every latent read every patch: its latents have no place on a grid.
    with pytest.raises(ValueError, match="latent_attention='global'"):
        probe.as_grid(run, "latents", frames)


def test_train_probe_scores_the_reward_heads_clips_and_writes_nothing_into_the_run(run_dir, tmp_path):
    before = {str(p): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    out = tmp_path / "probe.json"
    result = probe.main(["--run", str(run_dir), "--steps", "3", "--eval-every", "2", "--episodes", "2", "--clips",
                         "3", "--seed", str(SEED), "--width", "4", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["rows"]
    assert [row["step"] for row in rows] == [0, 2, 3]
    assert rows[0]["loss"] is None and all(math.isfinite(row["loss"]) for row in rows[1:])
    assert rows[0]["loss_r2"] is None and all(row["loss_r2"] is None or row["loss_r2"] <= 1.0 for row in rows[1:])
    assert result["data"] is None  # the run's own replay
    # The reward head is scored on the same held-out clips, as world_model_quality.reward_metrics scores it.
    run = probe.wmq.load_run(run_dir)
    cfg = run.cfg
    frames, actions, rewards = probe.wmq.held_out_clips(run, 2, 3, cfg.replay.seq_len - cfg.replay.context_len,
                                                        SEED, 200)
    assert result["reward_head"] == probe.wmq.reward_metrics(run, frames, actions, rewards, SEED)
    assert result["held_out_rewards"]["count"] == rewards[:, :-1].numel()
    after = {str(p): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    assert after == before


def test_a_dataset_of_another_env_is_refused_by_what_differs(run_dir, tmp_path):
    from d4func.data.offline import DATASET_FORMAT, META_FILE

    other = tmp_path / "cartpole_data"
    other.mkdir()
    run = probe.wmq.load_run(run_dir)
    (other / META_FILE).write_text(json.dumps({"format": DATASET_FORMAT, "env_config": {
        "name": "dmc:cartpole-swingup", "image_size": run.cfg.env.image_size, "action_repeat": 2}}))
    with pytest.raises(ValueError, match="'name': 'dmc:cartpole-swingup'") as caught:
        probe.train_probe(run_dir, steps=1, eval_every=1, episodes=1, clips=2, data=other)
    assert "image_size" not in str(caught.value).split("records")[1].split(", the run")[0]  # only what differs


def test_a_dataset_of_the_runs_env_must_still_fit_its_models(run_dir, tmp_path):
    """Past the env's name, the loop's own offline-dataset checks apply: here frames of another size."""
    from d4func.data.offline import DATASET_FORMAT, META_FILE

    small = tmp_path / "small_frames"
    small.mkdir()
    run = probe.wmq.load_run(run_dir)
    (small / META_FILE).write_text(json.dumps({
        "format": DATASET_FORMAT, "env_config": {"name": run.env_name},
        "entries": {"pixels": {"shape": [3, 4, 4], "dtype": "float32"}, "action": {"shape": [], "dtype": "int64"},
                    "next.pixels": {"shape": [3, 4, 4], "dtype": "float32"}}}))
    with pytest.raises(ValueError, match=r"small_frames holds .*4"):
        probe.train_probe(run_dir, steps=1, eval_every=1, episodes=1, clips=2, data=small)


def test_bad_arguments_are_named(run_dir):
    with pytest.raises(ValueError, match="width must be an int >= 1, got 0"):
        probe.train_probe(run_dir, steps=1, eval_every=1, width=0)
    with pytest.raises(ValueError, match="clips must be an int >= 2, got 1"):
        probe.train_probe(run_dir, steps=1, eval_every=1, clips=1)


def test_the_twohot_probe_starts_at_zero_as_the_reward_head_does_and_trains(run_dir, tmp_path):
    result = probe.main(["--run", str(run_dir), "--steps", "3", "--eval-every", "3", "--episodes", "2", "--clips",
                         "3", "--seed", str(SEED), "--width", "4", "--loss", "twohot",
                         "--out", str(tmp_path / "probe.json")])
    assert result["loss"] == "twohot"
    run = probe.wmq.load_run(run_dir)
    cfg = run.cfg
    _, _, rewards = probe.wmq.held_out_clips(run, 2, 3, cfg.replay.seq_len - cfg.replay.context_len, SEED, 200)
    # A zero readout gives uniform logits over antisymmetric bins: every prediction exactly 0.
    assert result["rows"][0]["reward_mse"] == pytest.approx(float(rewards[:, :-1].double().square().mean()))
    last = result["rows"][-1]
    assert math.isfinite(last["loss"]) and last["loss"] >= 0.0  # the expectation's MSE on the training batches


def test_an_unknown_loss_is_named(run_dir):
    with pytest.raises(ValueError, match="loss must be one of \\('mse', 'twohot'\\), got 'l1'"):
        probe.train_probe(run_dir, steps=1, eval_every=1, loss="l1")
