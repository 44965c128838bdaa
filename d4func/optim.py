"""AdamW as a pure function over parameter TensorDicts (the optimizer state is part of the train state)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from d4func.functional import tree_norm, zeros_like_tree

LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class AdamWConfig:
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    # Which leaves weight decay shrinks: by default the matrices (ndim >= 2: linear weights, embedding tables, learned
    # tokens), not the vectors: norm gains start at 1 and mean a scale, biases an offset, and decay pulling them to 0
    # is no regulariser (GPT-2 / nanoGPT practice). True decays every leaf, as torch.optim.AdamW on one group does.
    decay_vectors: bool = False
    max_grad_norm: float | None = 1.0
    # Clip each top-level entry of the params (phase 3: "policy" and "value") by its own norm instead of all by one.
    # Not the default: under one global norm the value head's gradients (norm ~6 against the policy's ~0.2 on
    # Reach) set the clip factor of the policy's update too, which then varies with the value loss. DreamerV3 gives
    # actor and critic optimizers of their own.
    clip_per_part: bool = False
    # Learning-rate schedule, a pure function of the update count held in the train state (so a resumed run follows
    # the same curve): a linear ramp from lr / warmup_steps to lr over the first `warmup_steps` updates, then
    # `schedule` takes lr down to lr * final_lr_ratio over the next `decay_steps` updates and holds it there.
    # The paper gives none (paper-facts.md); constant is the default so that every recorded result keeps its recipe.
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0
    final_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"AdamWConfig.lr must be > 0, got {self.lr}")
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"AdamWConfig.schedule must be one of {LR_SCHEDULES}, got {self.schedule!r}")
        for name in ("warmup_steps", "decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"AdamWConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.schedule != "constant" and self.decay_steps < 1:
            raise ValueError(f"AdamWConfig.schedule={self.schedule!r} needs decay_steps >= 1 (the updates the decay "
                             f"takes), got {self.decay_steps}")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError(f"AdamWConfig.final_lr_ratio must lie in [0, 1], got {self.final_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"AdamWConfig.{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            # A parameter whose first gradient is exactly 0 (a head that a phase does not train) would get the
            # update 0 / 0 = NaN: NaN params, found only when a later loss reads them.
            raise ValueError(f"AdamWConfig.eps must be > 0, got {self.eps}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"AdamWConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")


def adamw_init(params: TensorDictBase) -> TensorDict:
    """First and second moments, zero, shaped like `params`."""
    return TensorDict({"m": zeros_like_tree(params), "v": zeros_like_tree(params)})


def clip_by_global_norm(grads: TensorDictBase, max_norm: float | None) -> tuple[TensorDictBase, Tensor]:
    norm = tree_norm(grads)
    if max_norm is None:
        return grads, norm
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return grads.apply(lambda g: g * scale.to(g.dtype)), norm


def clip_gradients(grads: TensorDictBase, cfg: AdamWConfig) -> tuple[TensorDictBase, Tensor]:
    """Gradients clipped as `cfg` says (one global norm, or each top-level entry by its own); returns them and
    the global norm before clipping."""
    if not cfg.clip_per_part:
        return clip_by_global_norm(grads, cfg.max_grad_norm)
    clipped = grads.clone(recurse=False)
    for key in grads.keys():
        part = clip_by_global_norm(grads.select(key), cfg.max_grad_norm)[0]
        clipped[key] = part[key]
    return clipped, tree_norm(grads)


def learning_rate(step: Tensor | int, cfg: AdamWConfig) -> Tensor:
    """The learning rate of update `step` (0 for the first) under `cfg`'s warmup and schedule, as a float32
    tensor: tensor ops only, so that a compiled or vmapped step keeps `step` a tensor."""
    t = torch.as_tensor(step, dtype=torch.float32)
    factor = torch.ones_like(t)
    if cfg.warmup_steps > 0:
        # Update 0 already moves (lr / warmup_steps): a zero first step would only waste an update.
        factor = torch.clamp((t + 1.0) / cfg.warmup_steps, max=1.0)
    if cfg.schedule != "constant":
        progress = torch.clamp((t - cfg.warmup_steps) / cfg.decay_steps, min=0.0, max=1.0)
        if cfg.schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + torch.cos(math.pi * progress))
        factor = factor * (cfg.final_lr_ratio + (1.0 - cfg.final_lr_ratio) * shape)
    return cfg.lr * factor


def adamw_update(
    params: TensorDictBase,
    grads: TensorDictBase,
    opt: TensorDictBase,
    step: Tensor | int,
    cfg: AdamWConfig,
) -> tuple[TensorDictBase, TensorDictBase, dict[str, Tensor]]:
    """One AdamW step. `step` counts updates already taken (0 for the first). Returns new params, new moments and
    metrics (`grad_norm` before clipping, `lr` the scheduled learning rate this update used)."""
    grads, grad_norm = clip_gradients(grads, cfg)
    lr = learning_rate(step, cfg)
    t = torch.as_tensor(step, dtype=torch.float32) + 1.0
    m = opt["m"].apply(lambda m_, g: torch.lerp(m_, g, 1.0 - cfg.beta1), grads)
    v = opt["v"].apply(lambda v_, g: torch.lerp(v_, g * g, 1.0 - cfg.beta2), grads)
    bias1 = 1.0 - cfg.beta1**t
    bias2 = 1.0 - cfg.beta2**t

    def update(p: Tensor, m_: Tensor, v_: Tensor) -> Tensor:
        direction = (m_ / bias1) / ((v_ / bias2).sqrt() + cfg.eps)
        # Decoupled weight decay scales with the scheduled lr, as torch.optim.AdamW under an LR scheduler does.
        # (`lr` is a 0-dim tensor, so the result keeps p's dtype.)
        decay = cfg.weight_decay if (p.dim() >= 2 or cfg.decay_vectors) else 0.0
        return p * (1.0 - lr * decay) - lr * direction

    new_params = params.apply(update, m, v)
    return new_params, TensorDict({"m": m, "v": v}), {"grad_norm": grad_norm, "lr": lr}
