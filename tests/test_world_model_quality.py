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
from hypothesis import given, settings
from hypothesis import strategies as st

from d4func.train.loop import train
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
    path = tmp_path_factory.mktemp("reach_run")
    cfg = load_run_config(str(REPO / "experiments/configs/reach.yaml"), [
        f"run_dir={path}", "loop.mode=online", "loop.offline_data=null", "loop.env_steps=40",
        "loop.prefill_steps=20", "loop.collect_steps=10", "loop.train_ratio=0.2", "loop.agent_start=1000",
        "loop.eval_every=1000", "loop.gif_every=1000", "env.eval_episodes=1",
    ])
    train(cfg, progress=False)
    return path


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
    assert wmq.counterfactual_action_metrics(run, None, SEED) == dict.fromkeys(measured)
    assert wmq.counterfactual_clips_for(run, 0, HORIZON, SEED, max_steps=200) is None
    assert "counterfactual actions: the model's change explains R^2" in wmq.format_table(result)


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
    result = wmq.main(["--run", str(out_dir), "--episodes", "1", "--clips", "1", "--horizon", "2", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "copy last" in printed and f"{result['psnr_copy_last']:.2f}" in printed
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
    from d4func.train.loop import build_models
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
