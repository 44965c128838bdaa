"""`experiments/world_model_quality.py` on a tiny online Reach run: the JSON's keys and values, the baseline
recomputed by hand on the same held-out clips, open-loop consistency with next-frame sampling, the GIF, the clip
sampler, and clear errors for run directories without a config or checkpoint."""

import dataclasses
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from helpers.tiny_runs import tiny_online_reach_run
from hypothesis import given, settings
from hypothesis import strategies as st

from d4func.train.run_config import load_run_config

REPO = Path(__file__).resolve().parents[1]
EPISODES, CLIPS, HORIZON, SEED = 3, 5, 6, 1


def _load_script():
    spec = importlib.util.spec_from_file_location("world_model_quality", REPO / "experiments/world_model_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


wmq = _load_script()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_online_reach_run(tmp_path_factory.mktemp("reach_run"))


@pytest.fixture(scope="module")
def result(run_dir) -> dict:
    return wmq.evaluate_run(run_dir, episodes=EPISODES, clips=CLIPS, horizon=HORIZON, seed=SEED)


def _psnr_by_hand(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE), error floored at 1e-10 (so identical images count 100 dB)."""
    p, t = prediction.double().numpy(), target.double().numpy()
    p, t = p.reshape(-1, *p.shape[-3:]), t.reshape(-1, *t.shape[-3:])
    mse = np.maximum(((np.clip(p, 0, 1) - t) ** 2).mean(axis=(1, 2, 3)), 1e-10)
    return float(np.mean(10 * np.log10(1 / mse)))


def test_result_keys_and_values(run_dir, result):
    expected = {"psnr_k1", "psnr_k2", "psnr_k4", "psnr_copy_last", "psnr_reconstruction", "open_loop_psnr",
                "open_loop_copy_last", "episodes", "clips", "horizon", "seed", "env", "step", "reward_mse",
                "reward_constant_mse", "reward_r2", "reward_corr"}
    assert expected <= set(result)
    for key in ("psnr_k1", "psnr_k2", "psnr_k4", "psnr_copy_last", "psnr_reconstruction"):
        assert math.isfinite(result[key]), key
    assert len(result["open_loop_psnr"]) == len(result["open_loop_copy_last"]) == HORIZON
    assert all(math.isfinite(v) for v in result["open_loop_psnr"] + result["open_loop_copy_last"])
    assert (result["episodes"], result["clips"], result["horizon"], result["seed"]) == (EPISODES, CLIPS, HORIZON, SEED)
    assert result["env"] == "reach" and result["step"] == 40  # online checkpoints count env steps
    assert json.loads((run_dir / "world_model_quality.json").read_text()) == result  # floats round-trip exactly


def test_copy_last_matches_hand_computation(run_dir, result):
    run = wmq.load_run(run_dir)
    frames, _, _ = wmq.held_out_clips(run, EPISODES, CLIPS, HORIZON, SEED, max_steps=200)
    context = run.cfg.replay.context_len
    assert frames.shape == (CLIPS, context + HORIZON, 3, 16, 16)
    last = frames[:, context - 1]
    assert result["psnr_copy_last"] == pytest.approx(_psnr_by_hand(last, frames[:, context]), abs=1e-3)
    by_step = [_psnr_by_hand(last, frames[:, context + h]) for h in range(HORIZON)]
    assert result["open_loop_copy_last"] == pytest.approx(by_step, abs=1e-3)
    mse = ((last - frames[:, context]).double() ** 2).mean()
    assert result["pooled"]["copy_last"] == pytest.approx(float(10 * torch.log10(1 / mse)), abs=1e-3)


def test_reward_metrics_score_each_frame_against_the_reward_into_it(run_dir, result):
    run = wmq.load_run(run_dir)
    frames, actions, rewards = wmq.held_out_clips(run, EPISODES, CLIPS, HORIZON, SEED, max_steps=200)
    base = wmq.reward_metrics(run, frames, actions, rewards, SEED)
    assert {k: result[k] for k in base} == base  # evaluate_run reports the same figures
    assert base["reward_constant_mse"] == pytest.approx(float(rewards[:, :-1].double().var(unbiased=False)))
    if base["reward_r2"] is not None:
        assert base["reward_r2"] == pytest.approx(1 - base["reward_mse"] / base["reward_constant_mse"])
    # The last transition of a clip leads into no frame of it: it is never scored. The first one leads into frame 1.
    last_changed = rewards.clone()
    last_changed[:, -1] += 5.0
    assert wmq.reward_metrics(run, frames, actions, last_changed, SEED) == base
    # Frame t's agent token is scored against the reward into it: the last frame's token is scored (a changed last
    # frame changes the error; the causal model leaves every earlier token as it was). A few updates on rows
    # without a reward can leave the head's prediction constant, so this asks a head that reads its token.
    reading = dataclasses.replace(run, heads_params=_perturbed(run.heads_params, "reward"))
    last_frame_changed = frames.clone()
    last_frame_changed[:, -1] = 1.0 - last_frame_changed[:, -1]
    assert (wmq.reward_metrics(reading, last_frame_changed, actions, rewards, SEED)["reward_mse"]
            != wmq.reward_metrics(reading, frames, actions, rewards, SEED)["reward_mse"])
    shift = 0.5
    first_changed = rewards.clone()
    first_changed[:, 0] += shift
    moved = wmq.reward_metrics(run, frames, actions, first_changed, SEED)
    assert moved["reward_mean_actual"] == pytest.approx(base["reward_mean_actual"] + shift / (rewards.shape[1] - 1))
    # Shifting every scored reward by c: MSE(c) = MSE(0) - 2 c (mean predicted - mean actual) + c^2, variance kept.
    shifted = wmq.reward_metrics(run, frames, actions, rewards + shift, SEED)
    gap = base["reward_mean_predicted"] - base["reward_mean_actual"]
    assert shifted["reward_mse"] == pytest.approx(base["reward_mse"] - 2 * shift * gap + shift**2, rel=1e-6)
    assert shifted["reward_constant_mse"] == pytest.approx(base["reward_constant_mse"])
    assert shifted["reward_mean_predicted"] == base["reward_mean_predicted"]


def _perturbed(params, key: str):
    """`params` with `params[key]` moved by seeded noise (0.1 per weight)."""
    generator = torch.Generator().manual_seed(0)
    params = params.clone()
    params[key] = params[key].apply(lambda w: w + 0.1 * torch.randn(w.shape, generator=generator))
    return params


def test_action_conditioning_compares_own_with_other_clips_actions(run_dir, result):
    run = wmq.load_run(run_dir)
    frames, actions, _ = wmq.held_out_clips(run, EPISODES, CLIPS, HORIZON, SEED, max_steps=200)
    imagined, _, _ = wmq.open_loop(run, frames, actions, SEED)
    measured = wmq.action_conditioning(run, frames, actions, imagined, SEED)
    assert {k: result[k] for k in measured} == measured
    assert measured["action_effect"] > 0  # the dynamics reads its action tokens, trained or not
    # Every clip taking the same actions from the first predicted frame on: "another clip's actions" are the same
    # actions, so the two open loops (same context, same noise) agree exactly.
    context = run.cfg.replay.context_len
    same = actions.clone()
    same[:, context - 1:] = actions[:1, context - 1:]
    imagined_same, _, _ = wmq.open_loop(run, frames, same, SEED)
    unchanged = wmq.action_conditioning(run, frames, same, imagined_same, SEED)
    assert unchanged["action_effect"] == 0.0
    assert unchanged["open_loop_pooled_own_actions"] == unchanged["open_loop_pooled_other_actions"]
    assert set(wmq.action_conditioning(run, frames[:1], actions[:1], imagined[:1], SEED).values()) == {None}


def test_change_explained_on_hand_cases():
    real = torch.tensor([[[1.0, -1.0], [2.0, 0.0]]])  # [N=1, H=2, pixels]
    assert wmq.change_explained(real, real) == (1.0, [1.0, 1.0])
    assert wmq.change_explained(torch.zeros_like(real), real) == (0.0, [0.0, 0.0])  # ignores the actions
    # The opposite change misses by twice the real one: 1 - 4 = -3, worse than ignoring the actions.
    assert wmq.change_explained(-real, real) == (-3.0, [-3.0, -3.0])
    half = wmq.change_explained(real * torch.tensor([[[1.0], [0.0]]]), real)  # right at step 1, nothing at step 2
    assert half == (pytest.approx(1 - 4 / 6), [1.0, 0.0])
    assert wmq.change_explained(real, torch.zeros_like(real)) == (None, [None, None])


def test_counterfactual_actions_score_the_models_change_against_the_envs(run_dir, result):
    run = wmq.load_run(run_dir)
    clips = wmq.counterfactual_clips_for(run, 16, HORIZON, SEED, max_steps=200)  # Reach restores its state
    measured = wmq.counterfactual_action_metrics(run, clips, SEED)
    assert result["counterfactual_clips"] == 16
    assert {k: result[k] for k in measured} == measured
    # By hand: the model's two open loops from the same real history, against the env's two rollouts.
    imagined = [wmq._predict(run, clips["context"], a, HORIZON, run.cfg.dynamics.sampling_steps, SEED).clamp(0, 1)
                for a in clips["actions"]]
    model_change, real_change = imagined[0] - imagined[1], clips["frames"][0] - clips["frames"][1]
    expected = 1 - float((model_change - real_change).square().sum() / real_change.square().sum())
    assert measured["counterfactual_action_r2"] == pytest.approx(expected, rel=1e-5, abs=1e-6)  # float32 sums
    assert measured["counterfactual_model_change"] == pytest.approx(float(model_change.abs().mean()), rel=1e-5)
    assert measured["counterfactual_real_change"] == pytest.approx(float(real_change.abs().mean()), rel=1e-5)
    assert len(measured["counterfactual_action_r2_per_step"]) == HORIZON
    assert measured["counterfactual_real_change"] > 0  # Reach's agent moves where its actions send it
    # In latent space: the generated latents against the env's frames encoded after the same context.
    latents = [wmq._predict_latents(run, clips["context"], a, HORIZON, run.cfg.dynamics.sampling_steps, SEED)[1]
               for a in clips["actions"]]
    decoded = wmq.decode_after_context(run.tokenizer, run.tokenizer_params,
                                       wmq.encode(run.tokenizer, run.tokenizer_params, clips["context"]), latents[0],
                                       run.cfg.replay.row_frames)
    torch.testing.assert_close(decoded, imagined[0])  # what _predict shows
    # The env's frames encoded as the acting policy reads them (a training row at most; pinned in test_tokenizer).
    real = [wmq.encode_windowed(run.tokenizer, run.tokenizer_params, torch.cat([clips["context"], f], 1),
                                run.cfg.replay.row_frames)[:, -HORIZON:] for f in clips["frames"]]
    latent_change, real_latent_change = latents[0] - latents[1], real[0] - real[1]
    expected_latent = 1 - float((latent_change - real_latent_change).square().sum() / real_latent_change.square().sum())
    assert measured["counterfactual_latent_r2"] == pytest.approx(expected_latent, rel=1e-5)
    # The model's mean of the first step: the flow prediction from pure noise under each sequence's first action.
    context_len = clips["context"].shape[1]
    means = []
    for frames, actions in zip(clips["frames"], clips["actions"], strict=True):
        clip = wmq.encode(run.tokenizer, run.tokenizer_params, torch.cat([clips["context"], frames[:, :1]], 1))
        actions_in, mask = wmq.actions_into_frames(actions[:, :context_len + 1])
        means.append(wmq.predict_next_latent(run.dynamics, run.dynamics_params, clip, actions_in, mask, context_len,
                                             torch.Generator().manual_seed(SEED))[0])
    mean_change, real_first = means[0] - means[1], real_latent_change[:, 0]
    expected_mean = 1 - float((mean_change - real_first).square().sum() / real_first.square().sum())
    assert measured["counterfactual_next_latent_r2"] == pytest.approx(expected_mean, rel=1e-5, abs=1e-6)
    assert measured["counterfactual_next_latent_r2_per_step"][0] == measured["counterfactual_next_latent_r2"]
    # The last step: from the env's frames before it, at most a training row (the window) ending at the target.
    window = run.cfg.replay.row_frames
    end = context_len + HORIZON
    start = max(0, end - window)
    assert start > 0  # the window cuts this clip
    last = []
    for frames, actions in zip(clips["frames"], clips["actions"], strict=True):
        encoded = wmq.encode_windowed(run.tokenizer, run.tokenizer_params, torch.cat([clips["context"], frames], 1),
                                      window)
        actions_in, mask = wmq.actions_into_frames(actions[:, start:end])
        assert not mask[:, 0].any()  # the window's first frame reads no action, as a training row's first frame
        last.append(wmq.predict_next_latent(run.dynamics, run.dynamics_params, encoded[:, start:end], actions_in,
                                            mask, end - start - 1, torch.Generator().manual_seed(SEED))[0])
    last_change, real_last = last[0] - last[1], real_latent_change[:, -1]
    expected_last = 1 - float((last_change - real_last).square().sum() / real_last.square().sum())
    assert len(measured["counterfactual_next_latent_r2_per_step"]) == HORIZON
    assert measured["counterfactual_next_latent_r2_per_step"][-1] == pytest.approx(expected_last, rel=1e-5, abs=1e-6)
    open_loop_last = 1 - float((latent_change[:, -1] - real_last).square().sum() / real_last.square().sum())
    assert measured["counterfactual_latent_r2_per_step"][-1] == pytest.approx(open_loop_last, rel=1e-5, abs=1e-6)
    # The tokenizer's round trip of the env's own frames, decoded as the predictions are.
    round_trip = [wmq.decode_after_context(run.tokenizer, run.tokenizer_params, *torch.split(
        wmq.encode_windowed(run.tokenizer, run.tokenizer_params, torch.cat([clips["context"], f], 1),
                            run.cfg.replay.row_frames), [context_len, HORIZON], dim=1), run.cfg.replay.row_frames)
        for f in clips["frames"]]
    round_trip_change = round_trip[0] - round_trip[1]
    expected_round_trip = 1 - float((round_trip_change - real_change).square().sum() / real_change.square().sum())
    assert measured["counterfactual_reconstruction_r2"] == pytest.approx(expected_round_trip, rel=1e-5, abs=1e-6)
    assert len(measured["counterfactual_reconstruction_r2_per_step"]) == HORIZON
    assert measured["counterfactual_reconstruction_r2"] != measured["counterfactual_action_r2"]
    assert wmq.counterfactual_action_metrics(run, None, SEED) == dict.fromkeys(measured)
    assert wmq.counterfactual_clips_for(run, 0, HORIZON, SEED, max_steps=200) is None
    assert "counterfactual actions: the model's change explains R^2" in wmq.format_table(result)
    assert "the tokenizer's round trip of the env's frames R^2" in wmq.format_table(result)


def test_counterfactual_latent_figure_under_several_noise_draws(run_dir, result):
    """The first draw is the reported latent figure; the others take the same states and action sequences with the
    sampler's noise from the next seeds, each equal to the figure measured at that seed."""
    run = wmq.load_run(run_dir)
    clips = wmq.counterfactual_clips_for(run, 16, HORIZON, SEED, max_steps=200)
    draws = wmq.counterfactual_latent_r2_draws(run, clips, SEED, 3)
    assert result["counterfactual_latent_r2_draws"][0] == pytest.approx(result["counterfactual_latent_r2"], rel=1e-6)
    assert len(result["counterfactual_latent_r2_draws"]) == 4  # evaluate_run's default
    assert draws == pytest.approx(result["counterfactual_latent_r2_draws"][:3], rel=1e-6)
    assert draws[2] == pytest.approx(wmq.counterfactual_action_metrics(run, clips, SEED + 2)[
        "counterfactual_latent_r2"], rel=1e-6)
    assert len(set(draws)) == 3  # the noise moves a sampled figure: the draws are not one number three times
    assert wmq.counterfactual_latent_r2_draws(run, None, SEED, 3) is None
    with pytest.raises(ValueError, match="draws must be an int >= 1, got 0"):
        wmq.counterfactual_latent_r2_draws(run, clips, SEED, 0)
    assert "counterfactual R^2 in latents under 4 noise draws" in wmq.format_table(result)


def test_open_loop_first_step_is_next_frame_sample(result):
    # Same seed and K: the first open-loop frame draws the same noise as the one-frame sample, and the causal
    # decoder gives it the same pixels whatever frames follow.
    k = result["sampling_steps"]
    assert result["open_loop_psnr"][0] == pytest.approx(result[f"psnr_k{k}"], abs=1e-3)


def test_gif_real_over_imagined(result):
    gif = Path(result["gif"])
    assert gif.name == "world_model_quality.gif" and gif.parent.name == "gifs"
    frames = imageio.mimread(gif)
    assert len(frames) == HORIZON
    assert frames[0].shape[:2] == (2 * 16, min(4, CLIPS) * 16)


def test_cli_prints_table(run_dir, capsys):
    out_dir = run_dir.parent / "cli_run"
    shutil.copytree(run_dir, out_dir, ignore=shutil.ignore_patterns("replay", "logs"))
    result = wmq.main(["--run", str(out_dir), "--episodes", "1", "--clips", "1", "--horizon", "2", "--threads", "1",
                       "--seed", "2", "--max-steps", "50", "--counterfactual-clips", "0"])
    printed = capsys.readouterr().out
    assert "copy last" in printed and f"{result['psnr_copy_last']:.2f}" in printed
    # Every option reaches the measurement: 0 counterfactual clips skips that measure.
    assert (result["seed"], result["max_steps"], result["counterfactual_clips"]) == (2, 50, 0)
    assert result["env_seed"] == wmq.HELD_OUT_SEED_OFFSET + 2 and result["counterfactual_action_r2"] is None
    assert "counterfactual actions: n/a" in printed
    assert (out_dir / "world_model_quality.json").is_file()


def test_too_many_clips_is_a_clear_error(run_dir):
    with pytest.raises(ValueError, match="fewer than clips=100"):
        wmq.evaluate_run(run_dir, episodes=1, clips=100, horizon=HORIZON)


def test_missing_checkpoint_or_config_names_the_path(tmp_path, run_dir):
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    shutil.copy(run_dir / "config.json", no_ckpt / "config.json")
    with pytest.raises(FileNotFoundError, match=f"no checkpoint.*{no_ckpt}"):
        wmq.evaluate_run(no_ckpt)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    with pytest.raises(FileNotFoundError, match=str(no_config / "config.json")):
        wmq.evaluate_run(no_config)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        wmq.evaluate_run(tmp_path / "absent")


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4), length=st.integers(1, 6),
       clips=st.integers(1, 8), seed=st.integers(0, 100))
def test_sample_clips_are_distinct_windows_inside_episodes(lengths, length, clips, seed):
    # Frame values encode (episode, step), so every clip can be traced back to where it came from.
    episodes = [(torch.arange(n, dtype=torch.float32)[:, None] + 100 * e, torch.arange(n) + 100 * e)
                for e, n in enumerate(lengths)]
    available = sum(max(0, n - length + 1) for n in lengths)
    if available < clips:
        with pytest.raises(ValueError, match=f"{available} windows"):
            wmq.sample_clips(episodes, length, clips, seed)
        return
    frames, actions = wmq.sample_clips(episodes, length, clips, seed)
    assert frames.shape == (clips, length, 1) and actions.shape == (clips, length)
    starts = set()
    for clip, acts in zip(frames[..., 0].long().tolist(), actions.tolist(), strict=True):
        episode, start = divmod(clip[0], 100)
        assert clip == [100 * episode + start + t for t in range(length)] == acts  # one episode, consecutive
        assert start + length <= lengths[episode]
        starts.add((episode, start))
    assert len(starts) == clips  # no window twice


def _load_more_steps_script():
    spec = importlib.util.spec_from_file_location("more_world_model_steps",
                                                  REPO / "experiments/more_world_model_steps.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _tree_digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_more_world_model_steps_trains_a_copy_and_measures_it(run_dir):
    mws = _load_more_steps_script()
    assert mws.wmq is wmq  # one LoadedRun class for both scripts
    watched = [run_dir / "replay", *sorted(run_dir.glob("ckpt-*.pt"))]
    before = {str(p): _tree_digest(p) if p.is_dir() else p.read_bytes() for p in watched}
    lines: list[str] = []
    result = mws.continue_world_model(run_dir, steps=3, eval_every=2, episodes=2, clips=3, horizon=3, seed=SEED,
                                      log=lines.append)
    rows = result["rows"]
    assert [row["extra_steps"] for row in rows] == [0, 2, 3] and len(lines) == 3
    assert rows[0]["world_model_loss"] is None and all(math.isfinite(row["world_model_loss"]) for row in rows[1:])
    # Row 0 is the checkpoint's own world model, measured as world_model_quality.py measures it.
    run = wmq.load_run(run_dir)
    frames, actions, rewards = wmq.held_out_clips(run, 2, 3, 3, SEED, max_steps=200)
    imagined, _, _ = wmq.open_loop(run, frames, actions, SEED)
    assert {k: rows[0][k] for k in ("action_effect", "open_loop_pooled_own_actions")} == {
        k: wmq.action_conditioning(run, frames, actions, imagined, SEED)[k]
        for k in ("action_effect", "open_loop_pooled_own_actions")}
    assert rows[0]["reward_r2"] == wmq.reward_metrics(run, frames, actions, rewards, SEED)["reward_r2"]
    counterfactual = wmq.counterfactual_clips_for(run, 3, 3, SEED, max_steps=200)
    assert rows[0]["counterfactual_action_r2"] == wmq.counterfactual_action_metrics(run, counterfactual, SEED)[
        "counterfactual_action_r2"]
    assert rows[-1]["counterfactual_action_r2"] != rows[0]["counterfactual_action_r2"]
    assert rows[0]["counterfactual_latent_r2"] == wmq.counterfactual_action_metrics(run, counterfactual, SEED)[
        "counterfactual_latent_r2"]
    context = run.cfg.replay.context_len
    latents = wmq.encode(run.tokenizer, run.tokenizer_params, frames[:, :context + 1])
    assert rows[0]["latent_copy_last_mse"] == pytest.approx(
        float((latents[:, context] - latents[:, context - 1]).square().mean()))
    assert rows[-1]["latent_next_mse"] != rows[0]["latent_next_mse"]
    # The gradient steps change the model (same clips, same noise), copy-last does not move, and the run directory
    # (checkpoints, replay files) is left byte for byte as it was.
    assert rows[-1]["open_loop_pooled_own_actions"] != rows[0]["open_loop_pooled_own_actions"]
    assert rows[-1]["psnr_copy_last_pooled"] == rows[0]["psnr_copy_last_pooled"]
    assert result["tokenizer"] == "frozen"
    assert rows[-1]["psnr_reconstruction_pooled"] == rows[0]["psnr_reconstruction_pooled"]
    trained = mws.continue_world_model(run_dir, steps=1, eval_every=1, episodes=2, clips=3, horizon=3, seed=SEED,
                                       train_tokenizer=True, log=lines.append)
    assert trained["tokenizer"] == "trained"
    assert trained["rows"][1]["psnr_reconstruction_pooled"] != trained["rows"][0]["psnr_reconstruction_pooled"]
    assert {str(p): _tree_digest(p) if p.is_dir() else p.read_bytes() for p in watched} == before
    assert "extra steps" in mws.format_table(result)
    # --set changes a training option of the same model; a shape-changing one needs --fresh (new dynamics and
    # heads on the checkpoint's tokenizer), whose step-0 model is an untrained one, unlike the checkpoint's.
    override = mws.continue_world_model(run_dir, steps=1, eval_every=1, episodes=2, clips=3, horizon=3, seed=SEED,
                                        overrides=["dynamics.clean_context_fraction=1.0"], log=lines.append)
    assert override["overrides"] == ["dynamics.clean_context_fraction=1.0"] and override["rows"][0] == rows[0]
    with pytest.raises(ValueError, match="replay.batch_size=4'] cannot apply"):
        mws.continue_world_model(run_dir, steps=1, eval_every=1, overrides=["replay.batch_size=4"])
    with pytest.raises(ValueError, match="change the dynamics's parameters"):
        mws.continue_world_model(run_dir, steps=1, eval_every=1, overrides=["dynamics.n_registers=5"])
    fresh = mws.continue_world_model(run_dir, steps=1, eval_every=1, episodes=2, clips=3, horizon=3, seed=SEED,
                                     overrides=["dynamics.transformer.rope_base=100"], fresh=True,
                                     log=lines.append)
    assert fresh["fresh"]
    assert fresh["rows"][0]["open_loop_pooled_own_actions"] != rows[0]["open_loop_pooled_own_actions"]
    assert fresh["rows"][0]["psnr_reconstruction_pooled"] == rows[0]["psnr_reconstruction_pooled"]
    with pytest.raises(ValueError, match="change the tokenizer's parameters"):
        mws.continue_world_model(run_dir, steps=1, eval_every=1, overrides=["tokenizer.encoder.d_model=48"], fresh=True)
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        mws.continue_world_model(run_dir, steps=0, eval_every=1)
    with pytest.raises(ValueError, match="clips must be an int >= 2, got 1"):
        mws.continue_world_model(run_dir, steps=1, eval_every=1, clips=1)


def test_more_world_model_steps_latent_columns_are_the_errors_they_name(run_dir):
    from d4func.dynamics import actions_into_frames
    from d4func.next_latent import next_latent_errors

    mws = _load_more_steps_script()
    run = wmq.load_run(run_dir)
    frames, actions, rewards = wmq.held_out_clips(run, 2, 3, 3, SEED, max_steps=200)
    measured = mws.measure(run, frames, actions, rewards, SEED)
    context = run.cfg.replay.context_len
    latents = wmq.encode(run.tokenizer, run.tokenizer_params, frames[:, :context + 1])
    actions_in, mask = actions_into_frames(actions[:, :context + 1])
    errors = next_latent_errors(run.dynamics, run.dynamics_params, latents, actions_in, mask, context,
                                torch.Generator().manual_seed(SEED))
    assert measured["latent_context_mean_mse"] == pytest.approx(
        float((latents[:, :context].mean(dim=1) - latents[:, context]).square().mean()))
    assert {key: measured[f"latent_{name}"] for key, name in (
        ("model_mse", "next_mse"), ("copy_last_mse", "copy_last_mse"),
        ("copy_noisy_last_mse", "copy_noisy_last_mse"), ("context_mean_mse", "context_mean_mse"))} == errors
    assert measured["latent_copy_noisy_last_mse"] != measured["latent_copy_last_mse"]


def test_more_world_model_steps_loss_columns_average_only_the_steps_since_the_last_row(run_dir, monkeypatch):
    mws = _load_more_steps_script()
    losses, dynamics_losses, tokenizer_steps = [], [], []
    real_step, real_tokenizer_step = mws.agent_finetune_step, mws.tokenizer_train_step

    def recording_step(*args, **kwargs):
        state, metrics = real_step(*args, **kwargs)
        losses.append(float(metrics["loss"]))
        dynamics_losses.append(float(metrics["dynamics_loss"]))
        return state, metrics

    def recording_tokenizer_step(*args, **kwargs):
        tokenizer_steps.append(1)
        return real_tokenizer_step(*args, **kwargs)

    monkeypatch.setattr(mws, "agent_finetune_step", recording_step)
    monkeypatch.setattr(mws, "tokenizer_train_step", recording_tokenizer_step)
    result = mws.continue_world_model(run_dir, steps=3, eval_every=2, episodes=2, clips=2, horizon=2, seed=SEED,
                                      train_tokenizer=True, overrides=["loop.tokenizer_every=2"],
                                      log=lambda _: None)
    rows = result["rows"]
    assert rows[1]["world_model_loss"] == pytest.approx((losses[0] + losses[1]) / 2)
    assert rows[2]["world_model_loss"] == pytest.approx(losses[2])
    assert rows[0]["dynamics_loss"] is None
    assert rows[1]["dynamics_loss"] == pytest.approx((dynamics_losses[0] + dynamics_losses[1]) / 2)
    assert rows[2]["dynamics_loss"] == pytest.approx(dynamics_losses[2])
    assert dynamics_losses != losses  # the column is the dynamics term, not the whole loss
    assert len(tokenizer_steps) == 1  # every loop.tokenizer_every-th step, as the loop trains it


def test_more_world_model_steps_command_line_reaches_continue_world_model(monkeypatch, tmp_path):
    mws = _load_more_steps_script()
    calls = []

    class Stop(Exception):
        pass

    def capture(*args):
        calls.append(args)
        raise Stop

    monkeypatch.setattr(mws, "continue_world_model", capture)
    with pytest.raises(Stop):
        mws.main(["--run", str(tmp_path), "--steps", "7", "--eval-every", "3", "--episodes", "4", "--clips", "5",
                  "--horizon", "6", "--seed", "2", "--max-steps", "50", "--train-tokenizer", "--fresh",
                  "--set", "dynamics.clean_context_fraction=0.5"])
    assert calls == [(str(tmp_path), 7, 3, 4, 5, 6, 2, 50, True, ["dynamics.clean_context_fraction=0.5"], True)]


def test_more_world_model_steps_samples_an_offline_runs_dataset(tmp_path):
    """An offline run has no replay of its own: the script samples the dataset the run trained on."""
    from d4func.data.offline import record_episodes
    from d4func.envs.reach import make_reach_env

    mws = _load_more_steps_script()
    meta = record_episodes(make_reach_env(seed=0), tmp_path / "data", n_episodes=3, seed=0, frames_per_batch=12)
    cfg = load_run_config(str(REPO / "experiments/configs/reach.yaml"),
                          [f"run_dir={tmp_path / 'run'}", f"loop.offline_data={tmp_path / 'data'}"])
    replay = mws.run_replay(tmp_path / "run", cfg, seed=0)
    assert replay.transition_count() == meta["n_steps"] == 36
    assert len(replay) == meta["stored_entries"] == 39  # and the final frame of each episode
    sample = replay.sample()
    assert sample.batch_size == torch.Size([cfg.replay.batch_size, cfg.replay.seq_len])
    online = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, mode="online", offline_data=None))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        mws.run_replay(tmp_path / "run", online, seed=0)  # online: the run's own replay, found via its checkpoint


def test_clips_longer_than_a_row_are_predicted_through_a_row_long_window():
    # Reach's rows are 8 frames; 3 context + 7 predicted frames are generated and decoded beside at most 7 earlier
    # ones, as imagination and acting see them: the first 5 predictions (within one row) are those of the whole
    # span, the later ones those of the window alone.
    from d4func.functional import init
    from d4func.tokenizer import decode
    from d4func.train.phases import build_models
    from d4func.train.video import decode_after_context, predict_frames

    cfg = load_run_config(str(REPO / "experiments/configs/reach.yaml"))
    models = build_models(cfg)
    tok, dyn = init(models.tokenizer, 0), init(models.dynamics, 1)
    g = torch.Generator().manual_seed(0)
    context = torch.randint(0, 256, (2, 3, 3, 16, 16), generator=g).float() / 255
    actions = torch.randint(0, 3, (2, 10), generator=g)
    window = cfg.replay.row_frames
    whole = predict_frames(models.tokenizer, tok, models.dynamics, dyn, context, actions, horizon=7, seed=3)
    slid = predict_frames(models.tokenizer, tok, models.dynamics, dyn, context, actions, horizon=7, seed=3,
                          window=window)
    torch.testing.assert_close(whole[:, :5], slid[:, :5])  # to rounding: decoded from a shorter span
    assert (whole[:, 5:] - slid[:, 5:]).abs().amax() > 1e-3
    latents = torch.randn(2, 10, cfg.dynamics.latent_tokens, cfg.dynamics.latent_dim, generator=g).tanh()
    windowed = decode_after_context(models.tokenizer, tok, latents[:, :3], latents[:, 3:], window)
    torch.testing.assert_close(windowed[:, -1], decode(models.tokenizer, tok, latents[:, -window:])[:, -1].clamp(0, 1))
    torch.testing.assert_close(windowed[:, :5], decode_after_context(models.tokenizer, tok, latents[:, :3],
                                                                     latents[:, 3:8]))


def test_pooled_psnr_clamps_the_prediction_and_pools_the_error_before_the_log():
    # Image 0: predicted 1.5 where the target is 1, clamped to 1: no error. Image 1: 0.1 off everywhere.
    target = torch.stack([torch.ones(1, 2, 2), torch.zeros(1, 2, 2)])
    prediction = torch.stack([torch.full((1, 2, 2), 1.5), torch.full((1, 2, 2), 0.1)])
    # Pooled MSE 0.005 over both images: 10 log10(1 / 0.005) = 23.01 dB (per-image PSNR would count 100 and 20 dB).
    assert wmq.pooled_psnr(prediction, target) == pytest.approx(10 * math.log10(200), abs=1e-4)
    assert wmq.pooled_psnr(target, target) == pytest.approx(100.0)  # the error is floored at 1e-10


def test_next_frame_psnr_by_hand_for_each_k_and_the_reconstruction(run_dir, result):
    # Each K's entry is a sample with that many steps, of the first frame after the context; the reconstruction
    # decodes the context with the target (the decoder is causal) and scores the target's frame.
    run = wmq.load_run(run_dir)
    frames, actions, _ = wmq.held_out_clips(run, EPISODES, CLIPS, HORIZON, SEED, max_steps=200)
    context = run.cfg.replay.context_len
    target = frames[:, context:context + 1]
    for k in wmq.K_VALUES:
        sample = wmq._predict(run, frames[:, :context], actions[:, :context + 1], 1, k, SEED)
        assert result[f"psnr_k{k}"] == pytest.approx(_psnr_by_hand(sample, target), abs=1e-3), k
        assert result["pooled"][f"k{k}"] == pytest.approx(wmq.pooled_psnr(sample, target), abs=1e-4), k
    assert len({result[f"psnr_k{k}"] for k in wmq.K_VALUES}) == len(wmq.K_VALUES)  # the K's samples differ
    latents = wmq.encode(run.tokenizer, run.tokenizer_params, frames[:, :context + 1])
    reconstruction = wmq.decode(run.tokenizer, run.tokenizer_params, latents)[:, context:context + 1]
    assert result["psnr_reconstruction"] == pytest.approx(_psnr_by_hand(reconstruction, target), abs=1e-3)
    assert result["pooled"]["reconstruction"] == pytest.approx(wmq.pooled_psnr(reconstruction, target), abs=1e-4)


class _FixedRewards:
    """Stands in for the reward head's distribution: its mean is a tensor the test chose."""

    def __init__(self, values: torch.Tensor):
        self.values = values

    def mean(self) -> torch.Tensor:
        return self.values


def test_reward_metrics_by_hand_with_a_head_that_predicts_chosen_rewards(run_dir, monkeypatch):
    run = wmq.load_run(run_dir)
    frames, actions, _ = wmq.held_out_clips(run, EPISODES, CLIPS, HORIZON, SEED, max_steps=200)
    steps = frames.shape[1]
    # Distinct rewards per (clip, step); frame t's prediction is scored against rewards[:, t - 1].
    rewards = torch.arange(CLIPS * steps, dtype=torch.float32).reshape(CLIPS, steps) % 7
    scored = rewards[:, :-1].double()

    def measure(predicted: torch.Tensor) -> dict:
        def fake_reward_dist(heads, params, agent):
            assert agent.shape[:2] == (CLIPS, steps - 1)  # the agent tokens of frames 1 .. T-1
            return _FixedRewards(predicted)

        monkeypatch.setattr(wmq, "reward_dist", fake_reward_dist)
        return wmq.reward_metrics(run, frames, actions, rewards, SEED)

    exact = measure(scored.clone())
    assert (exact["reward_mse"], exact["reward_r2"]) == (0.0, 1.0)
    assert exact["reward_corr"] == pytest.approx(1.0)
    # An affine prediction: correlation 1 and -1 whatever the scale; R^2 = 1 - MSE / variance by hand.
    variance = float(scored.var(unbiased=False))
    doubled = measure(2 * scored + 1)
    mse = float((scored + 1).square().mean())
    assert doubled["reward_mse"] == pytest.approx(mse)
    assert doubled["reward_constant_mse"] == pytest.approx(variance)
    assert doubled["reward_r2"] == pytest.approx(1 - mse / variance)
    assert doubled["reward_corr"] == pytest.approx(1.0)
    assert measure(-0.5 * scored)["reward_corr"] == pytest.approx(-1.0)
    assert measure(torch.full_like(scored, 3.0))["reward_corr"] is None  # a constant prediction has no spread


def test_action_conditioning_swaps_the_action_into_the_first_predicted_frame(run_dir):
    # Clips that differ only in the action leading into the first predicted frame (context_len - 1, TorchRL's
    # convention): that action is part of "another clip's actions", so the two open loops differ.
    run = wmq.load_run(run_dir)
    frames, actions, _ = wmq.held_out_clips(run, EPISODES, CLIPS, HORIZON, SEED, max_steps=200)
    context = run.cfg.replay.context_len
    first_only = actions[:1].expand_as(actions).clone()
    first_only[:, context - 1] = torch.arange(CLIPS) % 3  # Reach's 3 actions: neighbouring clips differ
    imagined, _, _ = wmq.open_loop(run, frames, first_only, SEED)
    measured = wmq.action_conditioning(run, frames, first_only, imagined, SEED)
    assert measured["action_effect"] > 0
    # The own-actions figure is the given open loop's pooled PSNR against the real frames; the action effect is the
    # mean absolute difference from the other open loop (here moved by exactly 0.25 from the own one).
    other = first_only.clone()
    other[:, context - 1:] = first_only.roll(1, dims=0)[:, context - 1:]
    imagined_other = wmq._predict(run, frames[:, :context], other, HORIZON, run.cfg.dynamics.sampling_steps, SEED)
    real = frames[:, context:]
    assert measured["open_loop_pooled_own_actions"] == pytest.approx(wmq.pooled_psnr(imagined, real), abs=1e-4)
    assert measured["open_loop_pooled_other_actions"] == pytest.approx(wmq.pooled_psnr(imagined_other, real),
                                                                       abs=1e-4)
    shifted = wmq.action_conditioning(run, frames, first_only, imagined_other + 0.25, SEED)
    assert shifted["action_effect"] == pytest.approx(0.25, abs=1e-5)


@pytest.mark.parametrize(("name", "value"), [("episodes", 0), ("clips", 0), ("horizon", 0), ("max_steps", 0),
                                             ("seed", -1), ("counterfactual_clips", -1), ("clips", 2.0),
                                             ("noise_draws", 0)])
def test_evaluate_run_refuses_bad_sizes_by_name(tmp_path, name, value):
    # Checked before the run is read: the directory need not exist.
    with pytest.raises(ValueError, match=f"{name} must be an int"):
        wmq.evaluate_run(tmp_path / "absent", **{name: value})


def test_reward_metrics_commit_a_clip_longer_than_a_row_beside_at_most_a_row(run_dir, monkeypatch):
    # As the policy acts: frame by frame, each beside at most `row_frames - 1` earlier ones (a sliding window).
    run = wmq.load_run(run_dir)
    frames, actions, rewards = wmq.held_out_clips(run, EPISODES, CLIPS, HORIZON, SEED, max_steps=200)
    window = run.cfg.replay.row_frames
    assert frames.shape[1] > window
    seen = []
    commit = wmq.commit_frames

    def recording_commit(model_fn, cfg, latents, actions_in, mask_in, cache, generator):
        seen.append((latents.shape[1], int(cache["valid"].shape[1])))  # (frames committed, frames beside them)
        return commit(model_fn, cfg, latents, actions_in, mask_in, cache, generator)

    monkeypatch.setattr(wmq, "commit_frames", recording_commit)
    wmq.reward_metrics(run, frames, actions, rewards, SEED)
    assert seen == [(1, min(t, window - 1)) for t in range(frames.shape[1])]
