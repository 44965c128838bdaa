"""Shortcut forcing (paper Section 3.2, Eq. 7): pure functions of tensors, randomness from an explicit generator.

Conventions: tau is the *signal level*, z_tau = (1 - tau) * noise + tau * z_1, so tau = 0 is pure noise and tau = 1
the clean latents z_1. Step sizes d are powers of two from 1 down to d_min = 1 / k_max, and tau lies on the grid
of its own d: tau in {0, d, 2d, ..., 1 - d}. Every frame of a sequence draws its own (d, tau) (diffusion forcing),
so one sequence mixes nearly clean and very noisy frames.

The network predicts clean latents (x-prediction); its velocity is implied: v = (x_hat - z_tau) / (1 - tau).

* Flow term, frames with d = d_min:        w(tau) * ||x_hat - z_1||^2
* Bootstrap term, frames with d > d_min:   w(tau) * (1 - tau)^2 * ||v_hat - sg((b' + b'') / 2)||^2
  where b', b'' are the velocities of two consecutive half steps of size d / 2 taken by the same network
  (without gradient). Because v_hat - v_target = (x_hat - x_target) / (1 - tau) with
  x_target = z_tau + (1 - tau) * v_target, the bootstrap term equals w(tau) * ||x_hat - x_target||^2: both terms
  are computed in x-space, which is also what the (1 - tau)^2 factor of the paper is for.
* Ramp weight w(tau) = 0.9 tau + 0.1 puts more weight on the frames that carry more signal.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]  # (z_tau [B,T,S,Dz], tau [B,T], d [B,T]) -> x_hat


def _per_frame(x: Tensor) -> Tensor:
    """Broadcast a per-frame `[B, T]` quantity over latents `[B, T, S, Dz]`."""
    return rearrange(x, "... -> ... 1 1")


def sample_step_sizes(shape: tuple[int, ...], k_max: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None, bootstrap_fraction: float | None = None) -> Tensor:
    """Step sizes d, powers of two in [1 / k_max, 1], one per element of `shape`.

    `bootstrap_fraction=None`: d = 1 / k with k uniform over {1, 2, 4, ..., k_max} (the paper's Section 3.2 text).
    Otherwise d = d_min with probability 1 - bootstrap_fraction and uniform over the larger sizes with probability
    bootstrap_fraction, as in shortcut models (Frans et al. 2024 train 3/4 of a batch on flow targets): the bootstrap
    targets come from the model itself and carry no information until the flow term has taught it something, so a
    mostly-bootstrap batch learns slowly (measured: on action-driven shapes a uniform-k model had not beaten
    copying the last frame after 900 steps, a flow-heavy one did within 300).
    """
    if k_max < 1 or k_max & (k_max - 1):
        raise ValueError(f"k_max must be a power of two >= 1, got {k_max}")
    n_sizes = int(math.log2(k_max)) + 1
    if bootstrap_fraction is None or n_sizes == 1:
        exponent = torch.randint(0, n_sizes, shape, generator=generator, device=device)
    else:
        if not 0.0 <= bootstrap_fraction <= 1.0:
            raise ValueError(f"bootstrap_fraction must lie in [0, 1], got {bootstrap_fraction}")
        coarse = torch.randint(0, n_sizes - 1, shape, generator=generator, device=device)
        is_bootstrap = torch.rand(shape, generator=generator, device=device) < bootstrap_fraction
        exponent = torch.where(is_bootstrap, coarse, torch.full_like(coarse, n_sizes - 1))
    return 1.0 / (2.0 ** exponent.float())


def sample_signal_levels(d: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """tau uniform on the grid of each d: {0, d, ..., 1 - d}."""
    n_levels = torch.round(1.0 / d)
    index = torch.floor(torch.rand(d.shape, generator=generator, device=d.device) * n_levels)
    return index * d


def clean_context_levels(
    d: Tensor,
    tau: Tensor,
    fraction: float,
    context_signal: float,
    d_min: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Give a `fraction` of the sequences a nearly clean history: in each chosen row `[T]` of `d`, `tau` `[B, T]`,
    every frame before a split c uniform on {1, ..., T - 1} gets (tau_ctx, d_min), the level at which the sampler
    keeps its context (paper Sec. 3.2); frames from c on keep their own draws.

    Why: with independent per-frame levels (diffusion forcing) a frame's history is almost never as clean as at
    inference. With k_max = 16, a frame lies at or above tau_ctx = 0.875 with probability 2/16 under flow draws, so
    4 such context frames in a row come up about once in 4,000 sequences: a small model on a small budget then learns
    to predict from noisy history and reads the clean context of generation poorly. Returns the new (d, tau); with
    `fraction` 0 (the paper's recipe) the inputs unchanged, and no random numbers drawn.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"clean-context fraction must lie in [0, 1], got {fraction}")
    batch, steps = d.shape
    if fraction == 0.0 or steps < 2:
        return d, tau
    chosen = torch.rand(batch, generator=generator, device=d.device) < fraction
    split = torch.randint(1, steps, (batch,), generator=generator, device=d.device)
    return history_at_context_level(d, tau, split, context_signal, d_min, rows=chosen)


def history_at_context_level(
    d: Tensor, tau: Tensor, split: Tensor, context_signal: float, d_min: float, rows: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(d, tau) `[B, T]` with every frame before its row's `split` `[B]` at (tau_ctx, d_min), in the rows marked by
    the bool `rows` `[B]` (all rows when None); the other frames keep their levels."""
    in_context = torch.arange(d.shape[1], device=d.device)[None, :] < split[:, None]
    if rows is not None:
        in_context = in_context & rows[:, None]
    d = torch.where(in_context, torch.full_like(d, d_min), d)
    return d, torch.where(in_context, torch.full_like(tau, context_signal), tau)


FORCING_MODES = ("diffusion", "teacher")
LOSS_WEIGHTS = ("ramp", "uniform")


def teacher_forcing_levels(
    d: Tensor, tau: Tensor, context_signal: float, d_min: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One target frame per sequence, read through a history as the sampler keeps it (not in the paper).

    In each row `[T]` of `d`, `tau` `[B, T]`, a split c uniform on {1, ..., T - 1} (0 when T = 1): frames before c
    get (tau_ctx, d_min), frame c keeps its own (d, tau) draw, and only frame c counts in the loss (the returned
    bool mask `[B, T]`). Frames after c stay in the forward pass (the agent heads read them) but their noisy
    histories teach nothing the sampler uses. Why: under diffusion forcing most frames predict from a history noisier
    than tau_ctx, and a small model on a small budget then learns to blur its history. Measured with a fresh world
    model on Reach's frozen latents, next-latent MSE after 2,000 updates: 0.33 under diffusion forcing (the history's
    mean scores 0.31), 0.28 with one target per row, 0.11 with uniform weights as well (`frame_weight`;
    docs/results.md, Sec. 1). Returns the new (d, tau, counted).
    """
    batch, steps = d.shape
    if steps < 2:
        return d, tau, torch.ones_like(d, dtype=torch.bool)
    split = torch.randint(1, steps, (batch,), generator=generator, device=d.device)
    d, tau = history_at_context_level(d, tau, split, context_signal, d_min)
    return d, tau, torch.arange(steps, device=d.device)[None, :] == split[:, None]


def sample_training_frames(
    shape: tuple[int, int],
    k_max: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    bootstrap_fraction: float | None = None,
    clean_context_fraction: float = 0.0,
    context_signal: float = 1.0,
    forcing: str = "diffusion",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-frame (d, tau) `[B, T]` and which frames the dynamics loss counts (None: all of them).

    `forcing="diffusion"` (the paper's): `sample_training_levels`, every frame counted. `forcing="teacher"`:
    the same draws, then `teacher_forcing_levels` (one target per row behind a clean history)."""
    if forcing not in FORCING_MODES:
        raise ValueError(f"forcing must be one of {FORCING_MODES}, got {forcing!r}")
    if forcing == "teacher" and clean_context_fraction > 0.0:
        raise ValueError(f"clean_context_fraction={clean_context_fraction} applies to forcing='diffusion' only: "
                         "forcing='teacher' gives every row a clean history already")
    d, tau = sample_training_levels(shape, k_max, generator, device, bootstrap_fraction, clean_context_fraction,
                                    context_signal)
    if forcing == "diffusion":
        return d, tau, None
    return teacher_forcing_levels(d, tau, context_signal, 1.0 / k_max, generator)


def check_self_forcing_has_targets(share: float, counted: Tensor | None, forcing: str) -> None:
    """Self-forcing replaces frames before each row's one counted target, which only teacher forcing draws
    (`counted` None: diffusion forcing). The losses' explicit `self_forcing` argument bypasses DynamicsConfig's
    check of the same rule, so they call this."""
    if share > 0.0 and counted is None:
        raise ValueError(f"self_forcing={share} needs forcing='teacher' (one target frame per row behind a "
                         f"history), got forcing={forcing!r}")


def self_forced_latents(
    denoise_target: Denoiser,
    z_clean: Tensor,
    z_tau: Tensor,
    tau: Tensor,
    d: Tensor,
    counted: Tensor,
    fraction: float,
    steps: int,
    generator: torch.Generator | None = None,
    noise_scale: float = 1.0,
    frames: int = 1,
) -> Tensor:
    """Self-forcing (not in the paper): `z_clean` `[B, T, S, Dz]` with, in a `fraction` of the rows, the `frames`
    frames before the counted target (`counted` `[B, T]`, one frame per row: `teacher_forcing_levels`) replaced by
    the model's own rollout of them.

    Each sample is drawn as the sampler draws a new frame (`sampler.denoise_frame`): from noise at tau = 0, `steps`
    Euler steps of size 1 / `steps` under `denoise_target`, reading the row's history as `z_tau`, `tau` and `d` hold
    it (at tau_ctx under teacher forcing), the earlier replaced frames as the model's own samples at their level:
    an open-loop rollout of `frames` steps from the real frames before it. Rows whose target has fewer than
    `frames + 1` frames before it keep their frames (a rollout starts from at least one real frame). No gradient
    flows through the samples. Why: a teacher-forced model reads only real frames in training but its own in
    imagination, and on Reach it knows each step from real frames yet loses the action from the second or third
    step of its own rollout (docs/results.md, Sec. 2). Draws the row choice, then each frame's noise in rollout
    order, from `generator`, so that `frames=1` draws as it always did."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"self-forcing fraction must lie in [0, 1], got {fraction}")
    if steps < 1:
        raise ValueError(f"self-forcing steps must be >= 1, got {steps}")
    if frames < 1:
        raise ValueError(f"self-forcing frames must be >= 1, got {frames}")
    if counted.shape != z_clean.shape[:2]:
        raise ValueError(f"counted must be [B, T] = {list(z_clean.shape[:2])}, got {list(counted.shape)}")
    batch, length = counted.shape
    position = torch.arange(length, device=counted.device)
    # One counted frame per row (teacher forcing's target); no data-dependent branch, so that compiled losses trace
    # it in one graph.
    target = (counted.long() * position).sum(dim=1)
    chosen = (torch.rand(batch, generator=generator, device=counted.device) < fraction) & (target >= frames + 1)
    step = 1.0 / steps
    samples = z_clean.detach()
    rolled = torch.zeros(batch, length, 1, 1, dtype=torch.bool, device=counted.device)  # frames replaced so far
    with torch.no_grad():
        for back in range(frames, 0, -1):
            replaced = (position[None, :] == (target - back)[:, None]) & chosen[:, None]  # [B, T]
            at = replaced[:, :, None, None]
            rolled = rolled | at
            z = sample_noise(z_clean, generator, noise_scale)
            for k in range(steps):
                level = k * step
                x_hat = denoise_target(torch.where(at, z, z_tau), torch.where(replaced, level, tau),
                                       torch.where(replaced, step, d))
                z = euler_step(z, x_hat, level, step)
            # Later frames read this one as the history holds it: the same noise at the same level around the sample
            # (z_tau = tau z + (1 - tau) noise, so swapping z moves z_tau by tau times the change).
            z_tau = torch.where(at, z_tau + tau[:, :, None, None] * (z - samples), z_tau)
            samples = torch.where(at, z, samples)
    # Outside no_grad, so that the real frames keep whatever graph `z_clean` carries.
    return torch.where(rolled, samples, z_clean)


def frame_weight(tau: Tensor, loss_weight: str = "ramp") -> Tensor:
    """Per-frame loss weight: the paper's ramp (`ramp_weight`) or 1 for every level (`"uniform"`, not in the paper:
    with one target per row, the ramp's 0.1 at tau = 0 slows learning the pure-noise prediction that the sampler's
    first step makes; see `teacher_forcing_levels`)."""
    if loss_weight not in LOSS_WEIGHTS:
        raise ValueError(f"loss_weight must be one of {LOSS_WEIGHTS}, got {loss_weight!r}")
    return ramp_weight(tau) if loss_weight == "ramp" else torch.ones_like(tau)


def counted_mean(per_frame: Tensor, counted: Tensor | None) -> Tensor:
    """Mean of a per-frame `[B, T]` quantity over the frames the loss counts (all when `counted` is None)."""
    if counted is None:
        return per_frame.mean()
    return (per_frame * counted).sum() / counted.sum().clamp(min=1)


def sample_training_levels(
    shape: tuple[int, int],
    k_max: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    bootstrap_fraction: float | None = None,
    clean_context_fraction: float = 0.0,
    context_signal: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-frame (d, tau) `[B, T]` for one training batch: step sizes (`sample_step_sizes`), signal levels on their
    grids (`sample_signal_levels`), then clean histories for a share of the rows (`clean_context_levels`)."""
    d = sample_step_sizes(shape, k_max, generator, device, bootstrap_fraction)
    tau = sample_signal_levels(d, generator)
    return clean_context_levels(d, tau, clean_context_fraction, context_signal, 1.0 / k_max, generator)


def ramp_weight(tau: Tensor) -> Tensor:
    """w(tau) = 0.9 tau + 0.1 (paper Eq. 8): noisier frames, whose targets are less predictable, weigh less."""
    return 0.9 * tau + 0.1


def sample_noise(like: Tensor, generator: torch.Generator | None, scale: float = 1.0,
                 dtype: torch.dtype | None = None) -> Tensor:
    """Gaussian noise shaped like `like` (in `like`'s dtype unless `dtype` is given) with standard deviation `scale`
    (`DynamicsConfig.noise_scale`): the flow's source at tau = 0 and what re-noises context frames."""
    noise = torch.randn(like.shape, generator=generator, device=like.device, dtype=dtype or like.dtype)
    return noise if scale == 1.0 else scale * noise


def add_noise(z_clean: Tensor, tau: Tensor, noise: Tensor) -> Tensor:
    """z_tau = (1 - tau) * noise + tau * z_clean with a per-frame tau `[B, T]`."""
    tau = _per_frame(tau)
    return (1.0 - tau) * noise + tau * z_clean


def euler_step(z: Tensor, x_hat: Tensor, level: float, step: float) -> Tensor:
    """One Euler step of the flow from signal level `level` to `level + step` under an x-prediction `x_hat`, at
    one level for every frame given: z + step * v with v = (x_hat - z) / (1 - level). The sampler's update
    (`sampler.denoise_frame`), shared with `self_forced_latents`, which draws as the sampler does."""
    return z + step * (x_hat - z) / (1.0 - level)


def velocity_from_x(x_hat: Tensor, z_tau: Tensor, tau: Tensor) -> Tensor:
    """The velocity implied by an x-prediction: v = (x_hat - z_tau) / (1 - tau)."""
    return (x_hat - z_tau) / (1.0 - _per_frame(tau))


def x_from_velocity(v: Tensor, z_tau: Tensor, tau: Tensor) -> Tensor:
    """The clean latents reached by following velocity v from z_tau to tau = 1."""
    return z_tau + (1.0 - _per_frame(tau)) * v


def bootstrap_velocity(denoise: Denoiser, z_tau: Tensor, tau: Tensor, d: Tensor, bootstrap: Tensor) -> Tensor:
    """sg((b' + b'') / 2): the mean velocity of two half steps of size d / 2, for the frames marked `bootstrap`.

    Other frames (the flow frames, d = d_min, which have no half step on the grid) keep their (z_tau, tau, d) in both
    calls, so they act as unchanged context; their returned velocity is that of a plain step and is not used. All
    bootstrap frames of a sequence step together: under diffusion forcing a frame's history may hold bootstrap frames,
    which take their own half steps too, so its first half step sees them with the step token d / 2 instead of the d
    the student saw, and its second sees them moved by half a step (a per-frame history would need one pass per
    target frame, or a [T, 2T] time mask over the student's frames and the stepped ones). The
    sampler's history does not move (it sits at tau_ctx); the paper leaves the joint form open, and
    `forcing="teacher"`, whose histories are flow frames, has no such difference. Computed without gradient (the
    target is stopped).
    """
    with torch.no_grad():
        half = torch.where(bootstrap, d / 2, d)
        b_first = velocity_from_x(denoise(z_tau, tau, half), z_tau, tau)
        z_mid = torch.where(_per_frame(bootstrap), z_tau + _per_frame(half) * b_first, z_tau)
        tau_mid = torch.where(bootstrap, tau + half, tau)
        b_second = velocity_from_x(denoise(z_mid, tau_mid, half), z_mid, tau_mid)
        return (b_first + b_second) / 2


def bootstrap_velocity_vmapped(
    denoise: Callable[..., Tensor], z_tau: Tensor, tau: Tensor, d: Tensor, bootstrap: Tensor, *conditioning: Tensor
) -> Tensor:
    """Same targets as `bootstrap_velocity`, written per sequence and batched with `torch.func.vmap`.

    `denoise(z, tau, d, *conditioning)` sees one sequence at a time as a batch of one (the conditioning — actions,
    their mask — is split along the batch with it). `benchmarks/dynamics.py` compares this with the batch-folded
    form above (one call over the whole batch), which is what the loss uses.
    """

    def one_sequence(z: Tensor, t: Tensor, step: Tensor, boot: Tensor, *cond: Tensor) -> Tensor:
        def single(zz: Tensor, tt: Tensor, dd: Tensor) -> Tensor:
            return denoise(zz[None], tt[None], dd[None], *(c[None] for c in cond))[0]

        return bootstrap_velocity(single, z, t, step, boot)

    return torch.func.vmap(one_sequence)(z_tau, tau, d, bootstrap, *conditioning)


def shortcut_targets(
    denoise: Denoiser, z_clean: Tensor, z_tau: Tensor, tau: Tensor, d: Tensor, d_min: float
) -> tuple[Tensor, Tensor]:
    """x-space regression targets and the flow mask: z_clean for flow frames (d = d_min), the bootstrapped
    x_target = z_tau + (1 - tau) * sg((b' + b'') / 2) for the others."""
    is_flow = d <= d_min * (1 + 1e-6)
    target = z_clean
    # Eager skips the two half-step passes when every frame is a flow frame; a compiled loss computes them anyway
    # (the same targets: `where` keeps z_clean), since reading the mask back to Python would break its graph.
    if torch.compiler.is_compiling() or not bool(is_flow.all()):
        v_target = bootstrap_velocity(denoise, z_tau, tau, d, ~is_flow)
        target = torch.where(_per_frame(is_flow), z_clean, x_from_velocity(v_target, z_tau, tau))
    return target, is_flow


def shortcut_forcing_loss(
    denoise: Denoiser,
    denoise_target: Denoiser,
    z_clean: Tensor,
    k_max: int,
    generator: torch.Generator | None = None,
    bootstrap_fraction: float | None = None,
    clean_context_fraction: float = 0.0,
    context_signal: float = 1.0,
    noise_scale: float = 1.0,
    forcing: str = "diffusion",
    loss_weight: str = "ramp",
    self_forcing: float = 0.0,
    sampling_steps: int = 1,
    self_forcing_frames: int = 1,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Shortcut forcing loss on clean latents `[B, T, S, Dz]`.

    `denoise` is the network with gradient; `denoise_target` the same network for the (stopped) half steps — pass
    the same callable, or one over detached or EMA params. (d, tau) and the frames that count come from
    `sample_training_frames`; `loss_weight` picks `frame_weight`. `self_forcing` > 0 (teacher forcing only) replaces
    the last `self_forcing_frames` history frames of that share of the rows by `denoise_target`'s own rollout of
    them, `sampling_steps` steps a frame (`self_forced_latents`). Returns `(loss, metrics, x_hat)`.
    """
    batch, steps = z_clean.shape[:2]
    d, tau, counted = sample_training_frames((batch, steps), k_max, generator, z_clean.device, bootstrap_fraction,
                                             clean_context_fraction, context_signal, forcing)
    noise = sample_noise(z_clean, generator, noise_scale)
    z_tau = add_noise(z_clean, tau, noise)
    check_self_forcing_has_targets(self_forcing, counted, forcing)
    if self_forcing > 0.0:
        z_clean = self_forced_latents(denoise_target, z_clean, z_tau, tau, d, counted, self_forcing, sampling_steps,
                                      generator, noise_scale, self_forcing_frames)
        z_tau = add_noise(z_clean, tau, noise)
    x_hat = denoise(z_tau, tau, d)
    target, is_flow = shortcut_targets(denoise_target, z_clean, z_tau, tau, d, 1.0 / k_max)
    per_frame = (x_hat - target).square().mean(dim=(-2, -1))
    loss = counted_mean(frame_weight(tau, loss_weight) * per_frame, counted)
    counted_frames = torch.ones_like(is_flow) if counted is None else counted
    is_flow, is_boot = is_flow & counted_frames, ~is_flow & counted_frames
    flow_frames, boot_frames = is_flow.sum().clamp(min=1), is_boot.sum().clamp(min=1)
    metrics = {
        "loss": loss.detach(),
        "flow_mse": (per_frame * is_flow).sum().detach() / flow_frames,
        "bootstrap_mse": (per_frame * is_boot).sum().detach() / boot_frames,
        "flow_fraction": is_flow.sum() / (is_flow.sum() + is_boot.sum()).clamp(min=1),
        "clean_mse": counted_mean((x_hat - z_clean).square().mean(dim=(-2, -1)), counted).detach(),
    }
    return loss, metrics, x_hat
