"""Rolling the world model forward: K shortcut steps per new frame, with a KV cache across frames (paper Sec. 3.2).

Each new frame starts from noise at tau = 0 and takes K steps of size d = 1 / K along the velocity implied by the
network's x-prediction, v = (x_hat - z) / (1 - tau); the last step lands exactly on x_hat. The finished frame is
re-noised to the context signal level (tau_ctx, `DynamicsConfig.context_signal`) and becomes context, as in training
where past frames are never perfectly clean.

With the cache, the time layers' keys and values of committed frames are kept, so a step costs one pass over the
tokens of the frame being denoised. A finished frame is committed *during the first step of the next frame*: that
call processes [finished frame at tau_ctx, new noisy frame] together and the cache keeps only the finished frame's
entries. So K = 1 costs exactly one model call per frame. Without the cache (`use_cache=False`, for tests and the
benchmark) every call re-processes all committed frames; both draw the same noise in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from tensordict import TensorDict
from torch import Tensor

from d4func.dynamics import DynamicsConfig
from d4func.objectives import add_noise, euler_step, sample_noise
from d4func.transformer import drop_last_steps, empty_cache, keep_last_steps

# (z [B,T,S,Dz], tau [B,T], d [B,T], actions, action_mask, cache) -> (x_hat, agent_out, new_cache)
WorldModelFn = Callable[..., tuple[Tensor, Tensor | None, TensorDict | None]]


class Frames(NamedTuple):
    """Frames with their signal levels, step sizes and actions (each `[B, n, ...]`)."""

    latents: Tensor
    tau: Tensor
    d: Tensor
    actions: Tensor | None
    action_mask: Tensor | None

    @property
    def count(self) -> int:
        return self.latents.shape[1]

    def cat(self, other: Frames) -> Frames:
        def join(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            if (a is None) != (b is None):
                raise ValueError("Frames.cat: one side has actions (or an action mask) and the other has none; "
                                 "give both or neither, so no frame's action is silently dropped")
            return None if a is None else torch.cat([a, b], dim=1)

        return Frames(*(join(a, b) for a, b in zip(self, other, strict=True)))


def _frames(latents: Tensor, signal: float, step: float, actions: Tensor | None, mask: Tensor | None) -> Frames:
    batch, count = latents.shape[:2]
    tau = torch.full((batch, count), signal, device=latents.device)
    return Frames(latents, tau, torch.full_like(tau, step), actions, mask)


def denoise_frame(
    model_fn: WorldModelFn,
    pending: Frames,
    cache: TensorDict | None,
    action: Tensor | None,
    action_mask: Tensor | None,
    generator: torch.Generator | None,
    steps: int,
    noise_scale: float = 1.0,
) -> tuple[Tensor, Tensor | None, TensorDict | None]:
    """Sample one new frame `[B, S, Dz]` after the committed frames.

    `pending` are committed frames not yet in `cache` (all committed frames when `cache` is None). Returns the clean
    frame, the agent-token outputs of the last call at the new frame, and the cache with `pending` committed.
    """
    batch, _, tokens, dim = pending.latents.shape
    # the flow's source at tau = 0 (`pending` may hold no frames, hence new_empty for the shape)
    z = sample_noise(pending.latents.new_empty(batch, 1, tokens, dim), generator, noise_scale, torch.float32)
    step = 1.0 / steps
    agent = None
    for k in range(steps):
        tau = k * step
        current = Frames(z, torch.full((batch, 1), tau, device=z.device), torch.full((batch, 1), step, device=z.device),
                         action, action_mask)
        first = k == 0 or cache is None
        frames = pending.cat(current) if first and pending.count else current
        x_hat, agent_out, new_cache = model_fn(*frames, cache=cache)
        if cache is not None and k == 0 and pending.count:
            cache = drop_last_steps(new_cache, 1)  # keep the committed frames, not the noisy one
        x_last = x_hat[:, -1:]
        z = euler_step(z, x_last, tau, step)
        agent = None if agent_out is None else agent_out[:, -1]
    return z[:, 0], agent, cache


def generate(
    model_fn: WorldModelFn,
    context: Tensor,
    actions: Tensor | None,
    horizon: int,
    generator: torch.Generator | None,
    cfg: DynamicsConfig,
    *,
    steps: int | None = None,
    action_mask: Tensor | None = None,
    use_cache: bool = True,
    window: int | None = None,
) -> Tensor:
    """Roll forward `horizon` frames after `context` latents `[B, T0, S, Dz]`.

    `actions` `[B, T0 + horizon, ...]` holds the action leading into every frame (context and generated), or None
    for action-free video; `action_mask` `[B, T0 + horizon]` marks known actions. Returns latents
    `[B, horizon, S, Dz]`. Decode them with the tokenizer to get pixels. `steps` defaults to
    `cfg.sampling_steps` (K); context frames carry signal `cfg.context_signal` and step size d_min. `window`: the
    most frames the model attends to at once, a sliding window over the KV cache as the acting policy and
    `imagine` keep it (for horizons beyond the training rows' length); None attends to everything. Cached K/V of a
    kept frame were computed when it was committed, with whatever history it saw then (the usual approximation), so
    a window needs the cache.
    """
    if window is not None and window < 2:
        raise ValueError(f"window must be >= 2 frames (a history and the frame being generated), got {window}")
    if window is not None and not use_cache:
        raise ValueError("window needs use_cache=True: it slides over the KV cache")
    steps = cfg.sampling_steps if steps is None else steps
    cfg.check_sampling_steps(steps)
    context_signal, context_step = cfg.context_signal, cfg.d_min
    batch, context_len = context.shape[:2]
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if context_len < 1:
        raise ValueError(f"context must hold at least one frame to continue from, got shape {list(context.shape)}")
    if actions is not None and actions.shape[1] != context_len + horizon:
        raise ValueError(f"actions must cover context + horizon = {context_len + horizon} steps, "
                         f"got {actions.shape[1]}")
    if action_mask is not None and tuple(action_mask.shape) != (batch, context_len + horizon):
        raise ValueError(f"action_mask must be [B, context + horizon] = [{batch}, {context_len + horizon}], got "
                         f"{list(action_mask.shape)}")

    def span(x: Tensor | None, start: int, stop: int) -> Tensor | None:
        return None if x is None else x[:, start:stop]

    noise = sample_noise(context, generator, cfg.noise_scale, torch.float32)
    signal = torch.full((batch, context_len), context_signal, device=context.device)
    pending = _frames(add_noise(context, signal, noise), context_signal, context_step,
                      span(actions, 0, context_len), span(action_mask, 0, context_len))
    if window is not None and pending.count > window - 1:  # the noise was drawn for all of it: same draws
        pending = Frames(*(None if x is None else x[:, -(window - 1):] for x in pending))
    cache = empty_cache(batch, context.device) if use_cache else None
    generated = []
    for h in range(horizon):
        t = context_len + h
        if window is not None:
            cache = keep_last_steps(cache, window - 1 - pending.count)
        frame, _, cache = denoise_frame(model_fn, pending, cache, span(actions, t, t + 1),
                                        span(action_mask, t, t + 1), generator, steps, cfg.noise_scale)
        generated.append(frame)
        noise = sample_noise(frame[:, None], generator, cfg.noise_scale, torch.float32)
        renoised = add_noise(frame[:, None], signal[:, :1], noise)
        new = _frames(renoised, context_signal, context_step, span(actions, t, t + 1),
                      span(action_mask, t, t + 1))
        pending = new if use_cache else pending.cat(new)
    return torch.stack(generated, dim=1)
