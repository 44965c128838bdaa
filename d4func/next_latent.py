"""How well the dynamics predicts the next latent frame from its history, against what the history alone gives.

A world model's first job on the next frame is to carry the last one forward; whatever actions change comes on top.
`next_latent_errors` measures that directly in latent space, where neither the tokenizer's decoder nor the sampler's
later steps blur the answer: frame `target` starts as pure noise (tau = 0, step d_min: the flow prediction, i.e. the
model's conditional mean), frames before it sit at the sampler's context level tau_ctx (paper Sec. 3.2), and the
prediction is scored against two predictions that read only the history:

* `copy_last_mse`: frame `target - 1` itself;
* `copy_noisy_last_mse`: frame `target - 1` as the model sees it, re-noised to tau_ctx (and divided by tau_ctx, so
  unbiased): where a frame's change is as small as the context noise, as with small latents at tau_ctx = 0.125,
  this is the better guide to what carrying the last frame forward can reach;
* `context_mean_mse`: the mean of the frames before `target`, what a model that blurs its history together gets.

A model below `copy_last_mse` uses the last frame and more (motion, actions); one near `context_mean_mse` does not
yet single out the last frame, and cannot respond to actions more finely than that blur.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torch import Tensor

from d4func.dynamics import Dynamics
from d4func.functional import apply
from d4func.objectives import add_noise, sample_noise


@torch.no_grad()
def predict_next_latent(
    model: Dynamics,
    params: TensorDictBase,
    latents: Tensor,
    actions_in: Tensor,
    action_mask: Tensor | None,
    target: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The flow prediction `[B, S, Dz]` of frame `target` of clean `latents` `[B, T, S, Dz]` from pure noise, with
    the frames before it at tau_ctx (actions `actions_in` in the dynamics' convention, leading into each frame), and
    the noisy clip `[B, target + 1, S, Dz]` the model saw. Two calls with generators seeded alike see the same noise,
    so they differ only by what else differs (the actions, the params)."""
    steps = latents.shape[1]
    if not 1 <= target < steps:
        raise ValueError(f"target must index a frame with history, 1 <= target < {steps}, got {target}")
    cfg = model.cfg
    clip = latents[:, : target + 1]
    tau = torch.full(clip.shape[:2], cfg.context_signal, device=clip.device)
    tau[:, target] = 0.0
    d = torch.full_like(tau, cfg.d_min)
    noise = sample_noise(clip, generator, cfg.noise_scale)
    mask = None if action_mask is None else action_mask[:, : target + 1]
    noisy = add_noise(clip, tau, noise)
    predicted = apply(model, params, noisy, tau, d, actions_in[:, : target + 1], mask, None, None)[0][:, target]
    return predicted, noisy


def history_baseline_errors(latents: Tensor, target: int) -> dict[str, float]:
    """MSE against frame `target` of clean `latents` `[B, T, S, Dz]` of the two baselines that read only its
    history: copying the last frame, and the mean of the frames before it."""
    truth = latents[:, target]
    return {
        "copy_last_mse": float((latents[:, target - 1] - truth).square().mean()),
        "context_mean_mse": float((latents[:, :target].mean(dim=1) - truth).square().mean()),
    }


@torch.no_grad()
def next_latent_errors(
    model: Dynamics,
    params: TensorDictBase,
    latents: Tensor,
    actions_in: Tensor,
    action_mask: Tensor | None,
    target: int,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """MSE of the flow prediction of frame `target` of clean `latents` `[B, T, S, Dz]` (actions `actions_in` in the
    dynamics' convention, leading into each frame) and of the two history baselines (module docstring)."""
    predicted, noisy = predict_next_latent(model, params, latents, actions_in, action_mask, target, generator)
    truth = latents[:, target]
    baselines = history_baseline_errors(latents, target)
    return {
        "model_mse": float((predicted - truth).square().mean()),
        "copy_last_mse": baselines["copy_last_mse"],
        "copy_noisy_last_mse": float((noisy[:, target - 1] / model.cfg.context_signal - truth).square().mean()),
        "context_mean_mse": baselines["context_mean_mse"],
    }
