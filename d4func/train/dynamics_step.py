"""The world-model training step: shortcut forcing on tokenizer latents (paper Section 3.2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tensordict import TensorDictBase
from torch import Tensor

from d4func.dynamics import Dynamics
from d4func.functional import apply, grad_and_value
from d4func.objectives import Denoiser, shortcut_forcing_loss
from d4func.optim import AdamWConfig
from d4func.train.state import checked_update


def denoiser(
    model: Dynamics,
    params: TensorDictBase,
    actions: Tensor | None,
    action_mask: Tensor | None = None,
    tasks: Tensor | None = None,
) -> Denoiser:
    """The dynamics model as a function (z_tau, tau, d) -> x_hat for fixed params and actions."""

    def denoise(z_tau: Tensor, tau: Tensor, d: Tensor) -> Tensor:
        return apply(model, params, z_tau, tau, d, actions, action_mask, None, tasks)[0]

    return denoise


def dynamics_loss(
    params: TensorDictBase,
    latents: Tensor,
    actions: Tensor | None,
    generator: torch.Generator | None,
    *,
    model: Dynamics,
    action_mask: Tensor | None = None,
    tasks: Tensor | None = None,
    self_forcing: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Shortcut-forcing loss of the dynamics model on clean latents `[B, T, S, Dz]` and their actions.
    `self_forcing`: the share of self-forced rows (None: the model's `self_forcing`; a training loop passes
    `DynamicsConfig.self_forcing_at(update)`)."""
    online = denoiser(model, params, actions, action_mask, tasks)
    stopped = denoiser(model, params.detach(), actions, action_mask, tasks)
    cfg = model.cfg
    loss, metrics, _ = shortcut_forcing_loss(online, stopped, latents, cfg.k_max, generator, cfg.bootstrap_fraction,
                                             cfg.clean_context_fraction, cfg.context_signal, cfg.noise_scale,
                                             cfg.forcing, cfg.loss_weight,
                                             cfg.self_forcing if self_forcing is None else self_forcing,
                                             cfg.sampling_steps, cfg.self_forcing_frames)
    return loss, metrics


def dynamics_train_step(
    state: TensorDictBase,
    latents: Tensor,
    actions: Tensor | None,
    generator: torch.Generator | None,
    *,
    model: Dynamics,
    opt: AdamWConfig,
    ema_decay: float | None = None,
    action_mask: Tensor | None = None,
    grad_fn: Callable[..., Any] = grad_and_value,
    self_forcing: float | None = None,
) -> tuple[TensorDictBase, dict[str, Tensor]]:
    """One AdamW update of `state` on the shortcut-forcing loss of `latents` `[B, T, S, Dz]` and their actions.

    `grad_fn(loss_fn, has_aux=True)(params, *args) -> (grads, (loss, metrics))` computes the gradients:
    `functional.grad_and_value` in one process, `distributed.data_parallel_grad_and_value` to average gradients and
    metrics over ranks, each rank passing its shard of the batch and its own generator. `self_forcing` as in
    `dynamics_loss`.
    """
    grads, (_, metrics) = grad_fn(dynamics_loss, has_aux=True)(
        state["params"], latents, actions, generator, model=model, action_mask=action_mask, self_forcing=self_forcing
    )
    return checked_update(state, grads, metrics, opt, ema_decay)
