"""Real vs imagined frames for the same actions: open-loop predictions of the world model, and GIFs of them."""

from __future__ import annotations

import functools
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from einops import rearrange
from tensordict import TensorDictBase
from torch import Tensor

from d4func.dynamics import Dynamics, actions_into_frames
from d4func.functional import apply
from d4func.sampler import generate
from d4func.tokenizer import Tokenizer, decode, encode


@torch.no_grad()
def predict_latents(
    tokenizer: Tokenizer,
    tokenizer_params: TensorDictBase,
    dynamics: Dynamics,
    dynamics_params: TensorDictBase,
    context_frames: Tensor,
    actions: Tensor,
    horizon: int,
    steps: int | None = None,
    seed: int = 0,
    tasks: Tensor | None = None,
    window: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Encode `context_frames` `[B, T0, ...]` and roll the dynamics `horizon` frames forward under `actions` (TorchRL
    convention, `[B, T0 + horizon, ...]`: action t is taken after frame t) with K = `steps`. `window`: generate
    each frame beside at most `window - 1` earlier ones (`sampler.generate`), as imagination and acting do.

    Returns the context's latents `[B, T0, S, Dz]` and the generated ones `[B, horizon, S, Dz]`."""
    latents = encode(tokenizer, tokenizer_params, context_frames)
    shifted, mask = actions_into_frames(actions)
    fn = functools.partial(apply, dynamics, dynamics_params, tasks=tasks)
    generated = generate(fn, latents, shifted, horizon, torch.Generator().manual_seed(seed), dynamics.cfg,
                         steps=steps, action_mask=mask, window=window)
    return latents, generated


def decode_after_context(tokenizer: Tokenizer, tokenizer_params: TensorDictBase, context_latents: Tensor,
                         generated: Tensor, window: int | None = None) -> Tensor:
    """Frames `[B, horizon, ...]` in [0, 1] of `generated` latents. The decoder is causal in time: decode context and
    prediction together, keep the prediction. `window`: decode each frame beside at most `window - 1` earlier ones
    (no longer time span than the training rows); frames within the first `window` decode as without (to
    rounding)."""
    latents = torch.cat([context_latents, generated], dim=1)
    start, total = context_latents.shape[1], latents.shape[1]
    if window is None or total <= window:
        decoded = decode(tokenizer, tokenizer_params, latents)[:, start:]
    else:
        decoded = torch.stack([decode(tokenizer, tokenizer_params, latents[:, max(0, t - window + 1):t + 1])[:, -1]
                               for t in range(start, total)], dim=1)
    return decoded.clamp(0.0, 1.0)


@torch.no_grad()
def predict_frames(
    tokenizer: Tokenizer,
    tokenizer_params: TensorDictBase,
    dynamics: Dynamics,
    dynamics_params: TensorDictBase,
    context_frames: Tensor,
    actions: Tensor,
    horizon: int,
    steps: int | None = None,
    seed: int = 0,
    tasks: Tensor | None = None,
    window: int | None = None,
) -> Tensor:
    """`predict_latents`, decoded (both with `window`): predicted frames `[B, horizon, ...]` in [0, 1]."""
    latents, generated = predict_latents(tokenizer, tokenizer_params, dynamics, dynamics_params, context_frames,
                                         actions, horizon, steps, seed, tasks, window)
    return decode_after_context(tokenizer, tokenizer_params, latents, generated, window)


def write_comparison_gif(path: str | Path, real: Tensor, imagined: Tensor, fps: int = 8) -> Path:
    """A GIF with real frames (top row) over imagined frames (bottom row), one column per batch entry.

    real, imagined: `[B, T, C, H, W]` (or `[B, T, K, C, H, W]` for K cameras, shown side by side) in [0, 1]."""
    if real.shape != imagined.shape:
        raise ValueError(f"real {tuple(real.shape)} and imagined {tuple(imagined.shape)} frames differ in shape")
    if real.ndim == 6:
        real = rearrange(real, "b t k c h w -> b t c h (k w)")
        imagined = rearrange(imagined, "b t k c h w -> b t c h (k w)")
    grid = torch.stack([real, imagined], dim=0)  # [2, B, T, C, H, W]
    frames = rearrange(grid, "row b t c h w -> t (row h) (b w) c")
    pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(path, list(np.ascontiguousarray(pixels)), duration=1.0 / fps, loop=0)
    return path
