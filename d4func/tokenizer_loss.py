"""Tokenizer objective and train step (paper Section 3.1): MSE + 0.2 · LPIPS under MAE masking, each term divided
by a running estimate of its own root mean square.

Loss normalisation (`d4func.loss_rms`): the loss is sum_i w_i · L_i / sg(RMS_i), each term divided by a running
estimate of its own root mean square, kept in the train state as `state["loss_rms"]`. Every term thus contributes
on the scale of its own typical size, whatever its units, and the weights w_i mean what they say.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from einops import rearrange
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from d4func.functional import apply, grad_and_value
from d4func.loss_rms import init_loss_rms, normalize_losses, update_loss_rms
from d4func.optim import AdamWConfig
from d4func.tokenizer import Tokenizer
from d4func.train.state import checked_update_with_loss_rms, new_train_state

LOSS_TERMS = ("mse", "lpips")
LPIPSFn = Any  # callable (x [N, 3, H, W], y [N, 3, H, W]) in [0, 1] -> distances [N]; see d4func.lpips_loss


# Smallest image side each LPIPS trunk can run on (its strided convolutions and poolings need at least this many
# pixels); here rather than in d4func.lpips_loss so that configs are checked without importing lpips.
LPIPS_MIN_SIDE = {"alex": 31, "vgg": 16, "squeeze": 17}


@dataclass(frozen=True)
class TokenizerLossConfig:
    mse_weight: float = 1.0
    lpips_weight: float = 0.2  # paper: MSE + 0.2 · LPIPS
    mask: bool = True  # MAE patch dropping while training (paper Section 3.1)
    rms_decay: float = 0.99  # EMA decay of the running mean of each term's square
    rms_eps: float = 1e-8
    lpips_net: str = "alex"
    lpips_backbone_path: str | None = None  # else the torch hub cache; see d4func.lpips_loss

    def __post_init__(self) -> None:
        for name in ("mse_weight", "lpips_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"TokenizerLossConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.mse_weight == 0 and self.lpips_weight == 0:
            raise ValueError("TokenizerLossConfig: mse_weight and lpips_weight cannot both be 0")
        if not 0.0 <= self.rms_decay < 1.0:
            raise ValueError(f"TokenizerLossConfig.rms_decay must lie in [0, 1), got {self.rms_decay}")
        if self.rms_eps <= 0:
            raise ValueError(f"TokenizerLossConfig.rms_eps must be > 0, got {self.rms_eps}")
        if self.lpips_net not in LPIPS_MIN_SIDE:
            raise ValueError(f"TokenizerLossConfig.lpips_net must be one of {sorted(LPIPS_MIN_SIDE)}, got "
                             f"{self.lpips_net!r}")


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------


def psnr(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Mean over images of per-image PSNR in dB (peak 1), reconstruction clamped to [0, 1]. Images `[..., C, H, W]`."""
    err = (reconstruction.detach().clamp(0.0, 1.0) - target).square().mean(dim=(-3, -2, -1))
    return (10.0 * torch.log10(1.0 / err.clamp_min(1e-10))).mean()


def latent_spread(latents: Tensor) -> Tensor:
    """Mean over latent coordinates of their standard deviation across all frames of the batch. Latents `[B, T, S, Dz]`.

    A collapse detector: near 0 the encoder gives every frame the same latents, so the decoder can only output the
    mean frame, whatever its PSNR says (on a static background with a small moving object, e.g. cartpole at 64x64,
    the mean frame alone scores about 27 dB). One frame in all gives 0. Measure it on unmasked latents (as
    `reconstruction_metrics` and the training loop do): MAE's random drop pattern alone spreads the latents of
    identical frames.
    """
    flat = rearrange(latents.detach(), "b t s z -> (b t) (s z)")
    return flat.std(dim=0, correction=0).mean()


def _images(frames: Tensor) -> Tensor:
    """`[..., C, H, W]` -> `[N, C, H, W]`."""
    return rearrange(frames, "... c h w -> (...) c h w")


# --------------------------------------------------------------------------------------------------------------
# Loss and train step
# --------------------------------------------------------------------------------------------------------------


def tokenizer_loss(
    params: TensorDictBase,
    frames: Tensor,
    generator: torch.Generator | None,
    *,
    template: Tokenizer,
    cfg: TokenizerLossConfig,
    loss_rms: TensorDictBase,
    lpips_fn: LPIPSFn | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Normalised MSE + LPIPS of the (MAE-masked when `cfg.mask`) reconstruction of `frames`.

    Returns `(loss, metrics)`; metrics hold the raw terms (`mse`, `lpips` when used), `psnr`, `mask_rate` and
    `loss_rms`, the updated running statistics to store in the train state.
    """
    if cfg.lpips_weight > 0 and lpips_fn is None:
        raise ValueError(
            f"TokenizerLossConfig.lpips_weight={cfg.lpips_weight} needs an lpips_fn "
            "(d4func.lpips_loss.make_lpips); set lpips_weight=0 to train on MSE alone"
        )
    recon, _, drop = apply(template, params, frames, mode="autoencode", generator=generator, mask=cfg.mask)
    terms = {"mse": (recon - frames).square().mean()}
    if cfg.lpips_weight > 0:
        terms["lpips"] = lpips_fn(_images(recon), _images(frames)).mean()
    new_rms = update_loss_rms(loss_rms, terms, cfg.rms_decay)
    normed = normalize_losses(terms, new_rms, cfg.rms_decay, cfg.rms_eps)
    weights = {"mse": cfg.mse_weight, "lpips": cfg.lpips_weight}
    loss = sum(weights[name] * value for name, value in normed.items())
    metrics: dict[str, Any] = {name: value.detach() for name, value in terms.items()}
    metrics["psnr"] = psnr(recon, frames)
    metrics["mask_rate"] = drop.float().mean() if drop is not None else frames.new_zeros(())
    metrics["loss_rms"] = new_rms
    return loss, metrics


def new_tokenizer_train_state(params: TensorDictBase, with_ema: bool = True) -> TensorDict:
    """Train state (params, AdamW moments, EMA, step) plus the running loss statistics `loss_rms`."""
    state = new_train_state(params, with_ema=with_ema)
    leaf = next(iter(params.values(include_nested=True, leaves_only=True)))
    state["loss_rms"] = init_loss_rms(LOSS_TERMS, device=leaf.device)
    return state


def tokenizer_train_step(
    state: TensorDictBase,
    frames: Tensor,
    generator: torch.Generator | None,
    *,
    template: Tokenizer,
    cfg: TokenizerLossConfig,
    optim: AdamWConfig,
    ema_decay: float | None = None,
    lpips_fn: LPIPSFn | None = None,
    grad_fn: Callable[..., Any] = grad_and_value,
) -> tuple[TensorDict, dict[str, Tensor]]:
    """One AdamW step on the tokenizer loss: `state, metrics = tokenizer_train_step(state, frames, gen, ...)`.

    `grad_fn(loss_fn, has_aux=True)(params, *args) -> (grads, (loss, metrics))`: `functional.grad_and_value`, or
    `distributed.data_parallel_grad_and_value` for a data-parallel step on this rank's shard of `frames`. The stored
    running statistics are updated from the terms as `grad_fn` reports them (rank means under data parallelism),
    so every replica keeps the same `loss_rms`; the normaliser inside this step's loss uses the rank's own terms
    (on the first step each rank's normalised term is exactly 1, as in one process).
    """
    if "loss_rms" not in state.keys():
        raise KeyError("train state has no 'loss_rms'; build it with new_tokenizer_train_state")
    loss_fn = partial(tokenizer_loss, template=template, cfg=cfg, loss_rms=state["loss_rms"], lpips_fn=lpips_fn)
    grads, (loss, metrics) = grad_fn(loss_fn, has_aux=True)(state["params"], frames, generator)
    return checked_update_with_loss_rms(state, grads, {"loss": loss, **metrics},
                                        {name: name for name in LOSS_TERMS if name in metrics}, cfg.rms_decay,
                                        optim, ema_decay)


@torch.no_grad()
def reconstruction_metrics(
    template: Tokenizer, params: TensorDictBase, frames: Tensor, lpips_fn: LPIPSFn | None = None
) -> tuple[dict[str, Tensor], Tensor]:
    """Unmasked (inference) reconstruction of `frames`: metrics `mse`, `psnr`, `latent_spread` (and `lpips`) and the
    reconstruction."""
    recon, latents, _ = apply(template, params, frames, mode="autoencode")
    metrics = {
        "mse": (recon - frames).square().mean(),
        "psnr": psnr(recon, frames),
        "latent_spread": latent_spread(latents),
    }
    if lpips_fn is not None:
        metrics["lpips"] = lpips_fn(_images(recon.clamp(0, 1)), _images(frames)).mean()
    return metrics, recon
