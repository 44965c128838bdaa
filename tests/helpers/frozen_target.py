"""The shortcut-forcing loss with its bootstrap targets from a frozen copy of the params: what the paper's
stop-gradient on the target must make the dynamics losses' gradients equal to."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from d4func.dynamics import Dynamics
from d4func.objectives import shortcut_forcing_loss
from d4func.train.dynamics_step import denoiser


def frozen_target_loss(params: TensorDictBase, model: Dynamics, frozen: TensorDictBase, latents: torch.Tensor,
                       actions: torch.Tensor | None, action_mask: torch.Tensor | None, seed: int) -> torch.Tensor:
    """`dynamics_loss`'s draws (generator seeded `seed`) and terms, the targets computed from `frozen`, a constant
    to `torch.func.grad` over `params`."""
    cfg = model.cfg
    return shortcut_forcing_loss(denoiser(model, params, actions, action_mask),
                                 denoiser(model, frozen, actions, action_mask), latents, cfg.k_max,
                                 torch.Generator().manual_seed(seed), cfg.bootstrap_fraction,
                                 cfg.clean_context_fraction, cfg.context_signal, cfg.noise_scale, cfg.forcing,
                                 cfg.loss_weight)[0]
