"""World-model quality of a finished training run: next-frame PSNR at K = 1, 2, 4 sampling steps against copying
the last frame, open-loop PSNR over a horizon, and a GIF of real vs imagined rollouts for the same actions.

The run is one of `d4func/train/loop.py` (online or offline): its `config.json` and newest `ckpt-*.pt`. Clips come
from held-out episodes: a fresh env on a seed neither training (`cfg.seed`) nor the loop's evaluation
(`cfg.seed + 10_000`) used, driven by a uniform random policy. Every clip holds `replay.context_len` context frames
and `horizon` frames after them. Clips longer than a training row (`replay.row_frames`) are predicted and decoded
through a sliding window of that many frames, as imagination and the acting policy see them (before this, Reach's
3 + 8 frames were predicted with the whole 11-frame span its 8-frame rows never showed: steps 6-8 changed).

* next-frame PSNR, K = 1, 2, 4: the first frame after the context, sampled with K shortcut steps (paper Sec. 3.2:
  K = 4 is the paper's inference setting; fewer steps test how far the shortcut objective carries), decoded;
* copy last: the last context frame as the prediction, the baseline a world model has to beat on motion;
* reconstruction: the tokenizer's own encode -> decode of the target frame, the ceiling any prediction decoded by
  this tokenizer can reach;
* open loop: the whole horizon generated from the context under the real actions with K = `dynamics.sampling_steps`
  (errors compound, paper Sec. 3.2), per step, with the copy-last baseline per step;
* action conditioning: the open loop again, from the same context with the same noise, but with the actions from
  the one leading into the first predicted frame on taken from another clip (rolled by one across the clips).
  A world model that reads its actions predicts the real frames better under their own actions; one that ignores
  them predicts the same frames either way (`action_effect`, the mean absolute pixel difference between the two
  rollouts, is then 0), and its agent can learn nothing in imagination;
* counterfactual actions (envs that can restore a state mid-episode: DMControl, Reach, Crafter;
  `d4func.envs.counterfactual`): from one real state, the env plays two random action sequences, and the world
  model predicts both from the same real history and noise. `counterfactual_action_r2` is how much of the real
  change between the two rollouts the model's change explains, 1 - sum((model change - real change)^2) /
  sum(real change^2) over all pixels of the horizon: 1 when the model knows what the actions change, 0 when it
  ignores them, below 0 when it responds but wrongly. Unlike `action_effect`, an untrained model that responds
  at random does not score well. `counterfactual_latent_r2` is the same in latent space: the model's generated
  latents against the env's frames encoded after the same context. Imagination works on latents, and a decoder
  that amplifies small latent errors (Reach's) can push the pixel figure below 0 where the latents are right.
  Both score sampled rollouts, whose draws differ from the model's mean by the sampler's noise, counted as error;
  `counterfactual_next_latent_r2` scores the mean instead, one step: the flow prediction of the first frame after
  the context from pure noise (`d4func.next_latent`) under each sequence's first action. Its `_per_step` list
  makes that prediction at every step of the horizon from the env's own frames before it (teacher-forced), beside
  `counterfactual_latent_r2_per_step`, the open loop's: where the first stays up and the second falls, the model
  knows each step and loses the action by reading its own frames back. `counterfactual_reconstruction_r2` is the
  tokenizer's ceiling on the pixel figure: the env's two branches encoded and decoded as the predictions are, so
  what of the actions' effect the round trip loses (a thin arm blurred away) no dynamics can show.
  `counterfactual_latent_r2_draws` repeats the latent figure under `--noise-draws` draws of the sampler's noise
  (default 4): a model that answers an action on some draws only scores anywhere in a wide range on one;
* reward: the reward head (offset 0) on the agent tokens of the real clip, each frame committed as the agent
  observes one (`imagination.commit_frames`), against the rewards the env gave. Its mean squared error is compared
  with the best constant prediction (the held-out rewards' own mean, so the baseline is optimistic), as
  R^2 = 1 - MSE / variance, with the correlation. Imagination learns from these predicted rewards (paper Sec. 3.4):
  a head that explains none of the variance gives the policy nothing to climb.

PSNR is `d4func.tokenizer_loss.psnr`: the mean over images of per-image PSNR (peak 1), so an image predicted exactly
counts 100 dB (its error is floored at 1e-10) and copy-last scores high wherever the scene stands still (Reach's
"stay", Crafter's no-op). The next-frame comparisons are therefore also given as PSNR of the pooled MSE (`pooled`).

Writes `RUN_DIR/world_model_quality.json` and `RUN_DIR/gifs/world_model_quality.gif` (real frames on top, imagined
below, up to 4 clips, the horizon open loop), and prints a table.

    python experiments/world_model_quality.py --run runs/reach [--episodes 8] [--clips 16] [--horizon 8] [--seed 0] \
        [--counterfactual-clips 16] [--noise-draws 4]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from tensordict import TensorDictBase
from torch import Tensor

from d4func.dynamics import Dynamics, actions_into_frames
from d4func.heads import AgentHeads, reward_dist
from d4func.imagination import commit_frames, world_model_fn
from d4func.next_latent import predict_next_latent
from d4func.tokenizer import Tokenizer, decode, encode, encode_windowed
from d4func.tokenizer_loss import psnr
from d4func.train import checkpoint
from d4func.train.evaluation import run_env_name
from d4func.train.phases import build_models
from d4func.train.run_config import RunConfig, saved_run_config
from d4func.train.video import decode_after_context, predict_frames, predict_latents, write_comparison_gif
from d4func.transformer import empty_cache, keep_last_steps

K_VALUES = (1, 2, 4)
# Env seeds: training uses cfg.seed, the loop's evaluation `eval_env_seed(cfg.seed)` (cfg.seed + 10_000); held-out
# clips start past both.
HELD_OUT_SEED_OFFSET = 20_000
GIF_CLIPS = 4
RESULT_FILE = "world_model_quality.json"
GIF_FILE = Path("gifs") / "world_model_quality.gif"


@dataclass(frozen=True)
class LoadedRun:
    """A run's config and the models of its newest checkpoint."""

    cfg: RunConfig
    checkpoint: Path
    step: int
    env_name: str
    tokenizer: Tokenizer
    tokenizer_params: TensorDictBase
    dynamics: Dynamics
    dynamics_params: TensorDictBase
    heads: AgentHeads
    heads_params: TensorDictBase


def load_run(run_dir: str | Path) -> LoadedRun:
    """The config (`RUN_DIR/config.json`) and the newest checkpoint's tokenizer and dynamics of a loop run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: {run_dir} is not a run of d4func.train.loop")
    cfg = saved_run_config(json.loads(config_file.read_text()))
    path = checkpoint.latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint (ckpt-*.pt) in {run_dir}: the run has not saved one yet")
    ckpt = checkpoint.load_checkpoint(path)
    states = ckpt.payload.get("states", {})
    for name in ("tokenizer", "world_model"):
        if name not in states:
            raise KeyError(f"checkpoint {path} holds no {name!r} train state; it has {sorted(states)}")
    models = build_models(cfg)
    return LoadedRun(
        cfg=cfg,
        checkpoint=path,
        step=ckpt.step,
        env_name=_env_name(cfg),
        tokenizer=models.tokenizer,
        tokenizer_params=states["tokenizer"]["params"],
        dynamics=models.dynamics,
        dynamics_params=states["world_model"]["params", "dynamics"],
        heads=models.heads,
        heads_params=states["world_model"]["params", "heads"],
    )


def _env_name(cfg: RunConfig) -> str:
    """The env the world model was trained on (`run_env_name`); the run's `env.name` if its dataset has moved."""
    try:
        return run_env_name(cfg)
    except (FileNotFoundError, ValueError):
        return cfg.env.name


def held_out_env(cfg: RunConfig, env_name: str, seed: int):
    """A fresh env of the run on the held-out seed (`cfg.seed + HELD_OUT_SEED_OFFSET + seed`), as the run made it."""
    from d4func.envs.registry import make_env

    return make_env(env_name, seed=cfg.seed + HELD_OUT_SEED_OFFSET + seed, image_size=cfg.env.image_size,
                    action_repeat=cfg.env.action_repeat, max_episode_steps=cfg.env.max_episode_steps)


def held_out_episodes(
    cfg: RunConfig, env_name: str, episodes: int, seed: int, max_steps: int
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """`episodes` random-policy episodes (at most `max_steps` steps each) of a fresh env on a held-out seed.

    Returns `(frames [T, ...], actions [T, ...], rewards [T])` per episode, TorchRL's convention (action t follows
    frame t, reward t is that transition's)."""
    from d4func.data.offline import UniformRandomPolicy

    env = held_out_env(cfg, env_name, seed)
    policy = UniformRandomPolicy(env.action_spec, seed=cfg.seed + HELD_OUT_SEED_OFFSET + seed)
    out = []
    try:
        for _ in range(episodes):
            rollout = env.rollout(max_steps, policy, break_when_any_done=True)
            rewards = rollout.get(("next", "reward")).float().reshape(-1)
            out.append((rollout.get("pixels").float(), rollout.get("action"), rewards))
    finally:
        env.close()
    return out


def sample_clips(episodes: list[tuple[Tensor, ...]], length: int, clips: int, seed: int) -> tuple[Tensor, ...]:
    """`clips` distinct windows of `length` consecutive steps, drawn uniformly from all windows inside episodes.

    Each episode is a tuple of per-step tensors of equal length (frames, actions, ...). Returns one tensor per
    field, `[clips, length, ...]`."""
    windows = [(e, start) for e, fields in enumerate(episodes) for start in range(fields[0].shape[0] - length + 1)]
    if len(windows) < clips:
        lengths = [fields[0].shape[0] for fields in episodes]
        raise ValueError(f"the held-out episodes (lengths {lengths}) hold {len(windows)} windows of {length} steps "
                         f"(context + horizon), fewer than clips={clips}; use more episodes, fewer clips or a "
                         "shorter horizon")
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:clips]
    picked = [windows[i] for i in order.tolist()]
    n_fields = len(episodes[0])
    return tuple(torch.stack([episodes[e][f][s:s + length] for e, s in picked]) for f in range(n_fields))


def held_out_clips(
    run: LoadedRun, episodes: int, clips: int, horizon: int, seed: int, max_steps: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Clips of `replay.context_len + horizon` frames (with their actions and rewards) from held-out episodes."""
    data = held_out_episodes(run.cfg, run.env_name, episodes, seed, max_steps)
    frames, actions, rewards = sample_clips(data, run.cfg.replay.context_len + horizon, clips, seed)
    return frames, actions, rewards


def _predict(run: LoadedRun, context: Tensor, actions: Tensor, horizon: int, steps: int, seed: int) -> Tensor:
    return predict_frames(run.tokenizer, run.tokenizer_params, run.dynamics, run.dynamics_params, context, actions,
                          horizon=horizon, steps=steps, seed=seed, window=run.cfg.replay.row_frames)


def _predict_latents(run: LoadedRun, context: Tensor, actions: Tensor, horizon: int, steps: int, seed: int
                     ) -> tuple[Tensor, Tensor]:
    """The context's latents and the generated ones that `_predict` decodes (same noise for the same seed)."""
    return predict_latents(run.tokenizer, run.tokenizer_params, run.dynamics, run.dynamics_params, context, actions,
                           horizon=horizon, steps=steps, seed=seed, window=run.cfg.replay.row_frames)


def pooled_psnr(prediction: Tensor, target: Tensor) -> float:
    """PSNR (peak 1) of the mean squared error over all images: unlike the mean of per-image PSNR, an exactly
    predicted image (a static scene under copy-last) does not count 100 dB, it adds zero error."""
    err = (prediction.clamp(0.0, 1.0) - target).square().mean()
    return float(10.0 * torch.log10(1.0 / err.clamp_min(1e-10)))


@torch.no_grad()
def next_frame_metrics(run: LoadedRun, frames: Tensor, actions: Tensor, seed: int) -> dict[str, Any]:
    """PSNR of the first frame after the context: K-step samples, copy-last and the tokenizer's reconstruction.

    K above the model's `k_max` (its finest step is 1 / k_max) cannot be sampled: its entry is None. `pooled`
    holds the same comparisons as PSNR of the pooled MSE (see `pooled_psnr`)."""
    context_len = run.cfg.replay.context_len
    context, target = frames[:, :context_len], frames[:, context_len:context_len + 1]
    step_actions = actions[:, :context_len + 1]
    predictions: dict[str, Tensor | None] = {}
    for k in K_VALUES:
        fits = k <= run.cfg.dynamics.k_max
        predictions[f"k{k}"] = _predict(run, context, step_actions, 1, k, seed) if fits else None
    predictions["copy_last"] = context[:, -1:]
    # The decoder is causal in time: decode the context with the target, as predict_frames decodes its samples.
    latents = encode(run.tokenizer, run.tokenizer_params, frames[:, :context_len + 1])
    predictions["reconstruction"] = decode(run.tokenizer, run.tokenizer_params, latents)[:, context_len:]
    out: dict[str, Any] = {}
    for name, prediction in predictions.items():
        out[f"psnr_{name}"] = None if prediction is None else float(psnr(prediction, target))
    out["pooled"] = {name: None if prediction is None else pooled_psnr(prediction, target)
                     for name, prediction in predictions.items()}
    return out


@torch.no_grad()
def reward_metrics(run: LoadedRun, frames: Tensor, actions: Tensor, rewards: Tensor, seed: int) -> dict[str, Any]:
    """The reward head against the env's rewards on real clips (see the module docstring).

    The agent token of frame t, t >= 1, predicts the reward into frame t, `rewards[:, t - 1]` (offset 0,
    `d4func/train/agent_step.py`); frame 0's incoming transition is not in the clip. R^2 is None when the
    held-out rewards do not vary."""
    latents = encode_windowed(run.tokenizer, run.tokenizer_params, frames, run.cfg.replay.row_frames)
    actions_in, mask_in = actions_into_frames(actions)
    model_fn = world_model_fn(run.dynamics, run.dynamics_params)
    generator = torch.Generator(device=frames.device).manual_seed(seed)
    cache = empty_cache(frames.shape[0], frames.device)
    window = run.cfg.replay.row_frames
    if frames.shape[1] <= window:
        agent_out, _ = commit_frames(model_fn, run.dynamics.cfg, latents, actions_in, mask_in, cache, generator)
    else:  # longer than a training row: frame by frame beside at most `window - 1` others, as the policy acts
        outs = []
        for t in range(frames.shape[1]):
            out, cache = commit_frames(model_fn, run.dynamics.cfg, latents[:, t:t + 1], actions_in[:, t:t + 1],
                                       mask_in[:, t:t + 1], keep_last_steps(cache, window - 1), generator)
            outs.append(out)
        agent_out = torch.cat(outs, dim=1)
    predicted = reward_dist(run.heads, run.heads_params["reward"], agent_out[:, 1:]).mean().double().flatten()
    actual = rewards[:, :-1].double().flatten()
    return {**reward_fit(predicted, actual), "reward_mean_actual": float(actual.mean()),
            "reward_mean_predicted": float(predicted.mean())}


def reward_fit(predicted: Tensor, actual: Tensor) -> dict[str, float | None]:
    """How well `predicted` rewards fit `actual` ones: `reward_mse`, `reward_constant_mse` (the best constant's,
    the rewards' variance), `reward_r2` (None when the rewards do not vary) and `reward_corr` (None when either
    side is constant)."""
    predicted, actual = predicted.double().flatten(), actual.double().flatten()
    variance = float(actual.var(unbiased=False))
    mse = float((predicted - actual).square().mean())
    spread = float(predicted.std(unbiased=False)) * variance ** 0.5
    covariance = float(((predicted - predicted.mean()) * (actual - actual.mean())).mean())
    return {"reward_mse": mse, "reward_constant_mse": variance,
            "reward_r2": 1.0 - mse / variance if variance > 0 else None,
            "reward_corr": covariance / spread if spread > 0 else None}


@torch.no_grad()
def action_conditioning(run: LoadedRun, frames: Tensor, actions: Tensor, imagined: Tensor, seed: int) -> dict[str, Any]:
    """`imagined` (the open loop under each clip's own actions) against the open loop under another clip's actions
    (see the module docstring). Needs 2 or more clips; with one, every entry is None."""
    context_len = run.cfg.replay.context_len
    keys = ("open_loop_pooled_own_actions", "open_loop_pooled_other_actions", "action_effect")
    if frames.shape[0] < 2:
        return dict.fromkeys(keys)
    other = actions.clone()
    other[:, context_len - 1:] = actions.roll(1, dims=0)[:, context_len - 1:]
    horizon = frames.shape[1] - context_len
    imagined_other = _predict(run, frames[:, :context_len], other, horizon, run.cfg.dynamics.sampling_steps, seed)
    real = frames[:, context_len:]
    return dict(zip(keys, (pooled_psnr(imagined, real), pooled_psnr(imagined_other, real),
                           float((imagined - imagined_other).abs().mean())), strict=True))


def counterfactual_clips_for(run: LoadedRun, clips: int, horizon: int, seed: int, max_steps: int
                             ) -> dict[str, Tensor] | None:
    """`d4func.envs.counterfactual.counterfactual_clips` on a fresh env of the run on the held-out seed, or None when
    the env cannot restore a state mid-episode or `clips` is 0."""
    from d4func.envs.counterfactual import MAX_WARMUP, counterfactual_clips, supports_counterfactuals

    if clips == 0:
        return None
    cfg = run.cfg
    env = held_out_env(cfg, run.env_name, seed)
    try:
        if not supports_counterfactuals(env):
            return None
        # The usual warm-up, within the cap on a held-out episode's steps.
        warmup = max(0, min(MAX_WARMUP, max_steps - cfg.replay.context_len - horizon))
        return counterfactual_clips(env, cfg.replay.context_len, horizon, clips, seed=seed, max_warmup=warmup)
    finally:
        env.close()


COUNTERFACTUAL_KEYS = ("counterfactual_action_r2", "counterfactual_action_r2_per_step",
                       "counterfactual_model_change", "counterfactual_real_change", "counterfactual_latent_r2",
                       "counterfactual_latent_r2_per_step", "counterfactual_next_latent_r2",
                       "counterfactual_next_latent_r2_per_step", "counterfactual_reconstruction_r2",
                       "counterfactual_reconstruction_r2_per_step")


def change_explained(model_change: Tensor, real_change: Tensor) -> tuple[float | None, list[float | None]]:
    """R^2 of `model_change` against `real_change` (`[N, H, ...]`), 1 - sum((model - real)^2) / sum(real^2), over
    everything and per step of the horizon (None where the real change is 0)."""
    miss = rearrange((model_change - real_change).square(), "n h ... -> h (n ...)").sum(dim=1)
    total = rearrange(real_change.square(), "n h ... -> h (n ...)").sum(dim=1)
    per_step = [1.0 - m / t if t > 0 else None for m, t in zip(miss.tolist(), total.tolist(), strict=True)]
    overall = float(1 - miss.sum() / total.sum()) if total.sum() > 0 else None
    return overall, per_step


@torch.no_grad()
def encoded_branches(run: LoadedRun, clips: dict[str, Tensor]) -> list[Tensor]:
    """The env's two branches, each encoded after the shared context as the acting policy encodes frames (at most a
    training row's frames at once): `[N, C + H, S, Dz]` per branch."""
    return [encode_windowed(run.tokenizer, run.tokenizer_params, torch.cat([clips["context"], frames], dim=1),
                            run.cfg.replay.row_frames) for frames in clips["frames"]]


def counterfactual_action_metrics(run: LoadedRun, clips: dict[str, Tensor] | None, seed: int) -> dict[str, Any]:
    """The world model's change between two action sequences from the same real history against the env's (module
    docstring); every entry None without `clips`."""
    if clips is None:
        return dict.fromkeys(COUNTERFACTUAL_KEYS)
    horizon = clips["frames"].shape[2]
    steps = run.cfg.dynamics.sampling_steps
    branches = [_predict_latents(run, clips["context"], actions, horizon, steps, seed) for actions in clips["actions"]]
    predicted = [decode_after_context(run.tokenizer, run.tokenizer_params, *branch, run.cfg.replay.row_frames)
                 for branch in branches]
    predicted_latents = [generated for _, generated in branches]
    model_change = predicted[0] - predicted[1]
    real_change = clips["frames"][0] - clips["frames"][1]
    overall, per_step = change_explained(model_change, real_change)
    # The same in latent space, where imagination works: the env's frames encoded after the same context, as the
    # acting policy would encode them (at most a training row's frames at once).
    context_len = clips["context"].shape[1]
    encoded = encoded_branches(run, clips)
    real_latents = [latents[:, context_len:] for latents in encoded]
    latent_r2, latent_per_step = change_explained(predicted_latents[0] - predicted_latents[1],
                                                  real_latents[0] - real_latents[1])
    # The tokenizer's ceiling on the pixel figure: the env's own frames encoded and decoded as the predictions are
    # decoded. What of the actions' effect their round trip loses, no dynamics decoded through it can show.
    window = run.cfg.replay.row_frames
    reconstructed = [decode_after_context(run.tokenizer, run.tokenizer_params, latents[:, :context_len],
                                          latents[:, context_len:], window) for latents in encoded]
    reconstruction_r2, reconstruction_per_step = change_explained(reconstructed[0] - reconstructed[1], real_change)
    # The model's mean one step ahead: a sampler's draw differs from the conditional mean by its own noise, which the
    # figures above count as error; the flow prediction from pure noise (`d4func.next_latent`) does not, and is what
    # a regression model (experiments/latent_mlp_reference.py) is scored on. At every step of the horizon it reads
    # the env's own frames before it (the last training row's worth), so against the open loop's per-step figure it
    # separates what one step knows from what the rollout loses by reading its own frames back.
    next_latent_per_step = []
    for step in range(horizon):
        end = context_len + step + 1
        start = max(0, end - window)
        means = []
        for latents, actions in zip(encoded, clips["actions"], strict=True):
            actions_in, mask = actions_into_frames(actions[:, start:end])
            means.append(predict_next_latent(run.dynamics, run.dynamics_params, latents[:, start:end], actions_in,
                                             mask, end - start - 1, torch.Generator().manual_seed(seed))[0])
        step_r2, _ = change_explained((means[0] - means[1])[:, None],
                                      (real_latents[0] - real_latents[1])[:, step:step + 1])
        next_latent_per_step.append(step_r2)
    return dict(zip(COUNTERFACTUAL_KEYS, (overall, per_step, float(model_change.abs().mean()),
                                          float(real_change.abs().mean()), latent_r2, latent_per_step,
                                          next_latent_per_step[0], next_latent_per_step, reconstruction_r2,
                                          reconstruction_per_step), strict=True))


@torch.no_grad()
def open_loop(run: LoadedRun, frames: Tensor, actions: Tensor, seed: int) -> tuple[Tensor, list[float], list[float]]:
    """Generate every frame after the context open loop (K = `dynamics.sampling_steps`) under the real actions.

    Returns the imagined frames `[B, horizon, ...]`, their PSNR per step and the copy-last PSNR per step."""
    context_len = run.cfg.replay.context_len
    horizon = frames.shape[1] - context_len
    imagined = _predict(run, frames[:, :context_len], actions, horizon, run.cfg.dynamics.sampling_steps, seed)
    real = frames[:, context_len:]
    last = frames[:, context_len - 1]
    model = [float(psnr(imagined[:, h], real[:, h])) for h in range(horizon)]
    copy_last = [float(psnr(last, real[:, h])) for h in range(horizon)]
    return imagined, model, copy_last


def counterfactual_latent_r2_draws(run: LoadedRun, clips: dict[str, Tensor] | None, seed: int, draws: int
                                   ) -> list[float | None] | None:
    """`counterfactual_latent_r2` under `draws` noise draws of the sampler (seeds `seed`, `seed + 1`, ...; the first
    is the figure `counterfactual_action_metrics` reports): the same states and action sequences, only the rollouts'
    noise differs. A sampled world model can answer an action on one draw and ignore it on the next, and then one
    draw over 16 states ranks nothing (on a Crafter model: 0.23 on one draw, -0.02 to -0.17 over 64 states and
    other draws; docs/results.md, section 3). None without `clips`."""
    if clips is None:
        return None
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an int >= 1, got {draws!r}")
    context_len = clips["context"].shape[1]
    real = [latents[:, context_len:] for latents in encoded_branches(run, clips)]
    horizon = clips["frames"].shape[2]
    out = []
    for draw in range(draws):
        generated = [_predict_latents(run, clips["context"], actions, horizon, run.cfg.dynamics.sampling_steps,
                                      seed + draw)[1] for actions in clips["actions"]]
        out.append(change_explained(generated[0] - generated[1], real[0] - real[1])[0])
    return out


def evaluate_run(
    run_dir: str | Path,
    episodes: int = 8,
    clips: int = 16,
    horizon: int = 8,
    seed: int = 0,
    max_steps: int = 200,
    counterfactual_clips: int = 16,
    noise_draws: int = 4,
) -> dict[str, Any]:
    """Evaluate the world model of the run in `run_dir`; writes the JSON and the GIF there and returns the results.

    `max_steps` caps the env steps of one held-out episode (Crafter's episodes run to 10,000 steps);
    `counterfactual_clips` states are played under two action sequences each (0: skip that measure), and their
    latent figure is also taken under `noise_draws` draws of the sampler's noise
    (`counterfactual_latent_r2_draws`)."""
    for name, value, low in (("episodes", episodes, 1), ("clips", clips, 1), ("horizon", horizon, 1),
                             ("max_steps", max_steps, 1), ("seed", seed, 0),
                             ("counterfactual_clips", counterfactual_clips, 0), ("noise_draws", noise_draws, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    run = load_run(run_dir)
    frames, actions, rewards = held_out_clips(run, episodes, clips, horizon, seed, max_steps)
    result: dict[str, Any] = dict(next_frame_metrics(run, frames, actions, seed))
    result.update(reward_metrics(run, frames, actions, rewards, seed))
    imagined, model, copy_last = open_loop(run, frames, actions, seed)
    result["open_loop_psnr"] = model
    result["open_loop_copy_last"] = copy_last
    result.update(action_conditioning(run, frames, actions, imagined, seed))
    counterfactual = counterfactual_clips_for(run, counterfactual_clips, horizon, seed, max_steps)
    result.update(counterfactual_action_metrics(run, counterfactual, seed))
    result["counterfactual_clips"] = 0 if counterfactual is None else counterfactual_clips
    result["counterfactual_latent_r2_draws"] = counterfactual_latent_r2_draws(run, counterfactual, seed, noise_draws)
    context_len = run.cfg.replay.context_len
    gif = write_comparison_gif(Path(run_dir) / GIF_FILE, frames[:GIF_CLIPS, context_len:], imagined[:GIF_CLIPS])
    result.update({
        "env": run.env_name,
        "env_seed": run.cfg.seed + HELD_OUT_SEED_OFFSET + seed,
        "episodes": episodes,
        "clips": clips,
        "horizon": horizon,
        "seed": seed,
        "max_steps": max_steps,
        "context_len": context_len,
        "sampling_steps": run.cfg.dynamics.sampling_steps,
        "step": run.step,
        "checkpoint": str(run.checkpoint),
        "gif": str(gif),
    })
    (Path(run_dir) / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return result


def _num(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.2g}"


def format_table(result: dict[str, Any]) -> str:
    rows = [(f"K={k}", f"k{k}") for k in K_VALUES] + [("copy last", "copy_last"), ("reconstruction", "reconstruction")]
    lines = [
        f"world model of {result['checkpoint']} (step {result['step']}), env {result['env']}: {result['clips']} "
        f"clips from {result['episodes']} held-out episodes, context {result['context_len']}",
        f"next-frame PSNR (dB)  {'per image':>10} {'pooled MSE':>11}",
        *(f"  {label:<19} {_num(result[f'psnr_{key}']):>10} {_num(result['pooled'][key]):>11}" for label, key in rows),
        f"reward head, per step: MSE {result['reward_mse']:.4g} against {result['reward_constant_mse']:.4g} for "
        f"the best constant (R^2 {_num(result['reward_r2'])}, correlation {_num(result['reward_corr'])})",
        f"open loop under other clips' actions: pooled PSNR {_num(result['open_loop_pooled_other_actions'])} dB "
        f"against {_num(result['open_loop_pooled_own_actions'])} under their own; mean pixel change "
        f"{_num(result['action_effect'])}",
        "counterfactual actions: " + ("n/a (the env cannot restore a state)" if result["counterfactual_clips"] == 0
                                      else f"the model's change explains R^2 {_num(result['counterfactual_action_r2'])}"
                                      f" of the env's (mean pixel change {_num(result['counterfactual_model_change'])}"
                                      f" against {_num(result['counterfactual_real_change'])}; in latent space "
                                      f"R^2 {_num(result.get('counterfactual_latent_r2'))}; the model's mean of the "
                                      f"first step R^2 {_num(result.get('counterfactual_next_latent_r2'))}; the "
                                      "tokenizer's round trip of the env's frames R^2 "
                                      f"{_num(result.get('counterfactual_reconstruction_r2'))}), "
                                      f"{result['counterfactual_clips']} states"),
        *([] if not result.get("counterfactual_latent_r2_draws") else [
            f"counterfactual R^2 in latents under {len(result['counterfactual_latent_r2_draws'])} noise draws: "
            + " ".join(_num(v) for v in result["counterfactual_latent_r2_draws"])
            + " (one draw's figure over 16 states can mislead: look at the spread)"]),
        *([] if not result.get("counterfactual_latent_r2_per_step") else [
            "counterfactual R^2 in latents per step: open loop "
            + " ".join(_num(v) for v in result["counterfactual_latent_r2_per_step"])
            + "; the model's mean from the env's frames " +
            " ".join(_num(v) for v in result["counterfactual_next_latent_r2_per_step"])]),
        f"open-loop PSNR (dB, per image), K={result['sampling_steps']}",
        f"  {'step':>4} {'model':>8} {'copy last':>10}",
        *(f"  {h + 1:>4} {_num(m):>8} {_num(c):>10}"
          for h, (m, c) in enumerate(zip(result["open_loop_psnr"], result["open_loop_copy_last"], strict=True))),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run directory of d4func.train.loop (config.json, ckpt-*.pt)")
    parser.add_argument("--episodes", type=int, default=8, help="held-out episodes to roll")
    parser.add_argument("--clips", type=int, default=16, help="clips drawn from them")
    parser.add_argument("--horizon", type=int, default=8, help="frames predicted after the context")
    parser.add_argument("--seed", type=int, default=0, help="held-out env, clip choice and sampling noise")
    parser.add_argument("--max-steps", type=int, default=200, help="cap on the env steps of one episode")
    parser.add_argument("--counterfactual-clips", type=int, default=16,
                        help="states played under two action sequences each (0 skips the measure)")
    parser.add_argument("--noise-draws", type=int, default=4,
                        help="sampler noise draws the counterfactual latent figure is also taken under")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = evaluate_run(args.run, episodes=args.episodes, clips=args.clips, horizon=args.horizon, seed=args.seed,
                          max_steps=args.max_steps, counterfactual_clips=args.counterfactual_clips,
                          noise_draws=args.noise_draws)
    print(format_table(result))
    print(f"wrote {Path(args.run) / RESULT_FILE} and {result['gif']}")
    return result


if __name__ == "__main__":
    main()
