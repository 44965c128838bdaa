"""Dynamics model: the world model's transformer over interleaved per-timestep tokens (paper Section 3.2).

Tokens of one timestep, in order (a `TokenLayout`):

    action (1) | signal (1) | latents (S / pack) | registers (R) | agent (A, optional)

* action: the action that led *into* this frame (`actions[:, t]` is applied between frames t-1 and t), a linear
  embedding of a continuous vector or an embedding of a discrete index; a learned "no action" embedding stands in
  where there is none (action-free video, the first frame of an episode, and the first frame of every
  training row or context, whose incoming action lies before the row).
* signal: the signal level tau and step size d as one token, the concatenation of two discrete embeddings
  (tau on the grid of d_min = 1 / k_max, d as log2(1/d)).
* latents: the tokenizer's latents `[S, Dz]` packed into S / pack wider tokens of pack * Dz floats (the paper packs
  512 x 16 into 256 x 32), projected to the model width; the output head maps them back and unpacks, predicting
  clean latents (x-prediction).
* registers: learned tokens that give the space layers scratch room.
* agent: learned agent tokens plus a task embedding; they read every modality and nothing reads them
  (`world_model` space mode, paper Section 3.3). Their outputs feed the policy / reward / value heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from tensordict import TensorDict
from torch import Tensor, nn

from d4func.config import TransformerConfig
from d4func.functional import runs_value_checks
from d4func.layers import ZeroLinear
from d4func.objectives import FORCING_MODES, LOSS_WEIGHTS
from d4func.transformer import BlockCausalTransformer, TokenLayout


@dataclass(frozen=True)
class DynamicsConfig:
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    latent_tokens: int = 16  # S: tokenizer latents per frame (all cameras together)
    latent_dim: int = 16  # Dz
    pack: int = 2  # latents per dynamics token
    n_registers: int = 4
    n_agent_tokens: int = 0  # 0: pure world model; > 0 adds agent tokens (agent finetuning)
    n_tasks: int = 1
    action_dim: int = 0  # continuous action size; 0 when actions are discrete
    n_actions: int = 0  # discrete action count; 0 when actions are continuous
    k_max: int = 64  # finest step size d_min = 1 / k_max (power of two)
    sampling_steps: int = 4  # K at inference (paper: 4)
    # Share of frames trained with bootstrap targets (d > d_min); None samples k uniformly (see objectives.py).
    bootstrap_fraction: float | None = 0.25
    context_noise: float = 0.1  # tau_ctx: past frames are re-noised by this amount, i.e. to signal 1 - 0.1
    # Share of training sequences whose history (frames before a random split) sits at tau_ctx as in generation;
    # 0 is the paper's independent per-frame levels (see objectives.clean_context_levels). Measured on cartpole at
    # 0.5: no better next-frame prediction within 1.5k updates (docs/results.md, Sec. 2).
    clean_context_fraction: float = 0.0
    # Standard deviation of the noise the flow starts from (tau = 0) and that re-noises context frames. The paper
    # draws N(0, 1); latent diffusion scales noise (or latents) to the latents' own spread (Rombach et al. 2022's
    # scale factor). Small tanh latents (spread ~0.3 on cartpole at 64x64) drown at unit noise: tau_ctx's noise is
    # then as large as a frame's change (docs/results.md, Sec. 2). 1.0 is the paper's; for small latents, the
    # spread the loop logs as `tokenizer/latent_spread` is a starting point. Far below the spread (0.01), the slot
    # of a frame at tau = 0 holds almost nothing instead of noise the model must learn to look past: as plain
    # one-step regression (k_max=1) on reacher-easy's frozen latents, the first setting in which this dynamics
    # learned reacher's action. But every level tau > 0 then holds tau * z, the answer, so under shortcut forcing
    # only the frames at tau = 0 teach prediction (docs/results.md, Sec. 2, "noise in the target's slot").
    noise_scale: float = 1.0
    # Not in the paper: add the previous frame, as the model sees it, to the clean-latent prediction,
    # x_hat_t = f(...) + tau_{t-1} * z_{t-1}^{tau_{t-1}} (`previous_frame_skip`), so that carrying the last frame
    # forward is where the model starts instead of something it must learn through time attention. Small models
    # learn that slowly (docs/results.md, Sec. 2). A frame without a known previous frame (first of a sequence, or
    # after `transformer.reset_cache`) gets no skip.
    previous_frame_skip: bool = False
    # Not in the paper: "teacher" trains one target frame per sequence behind a history at tau_ctx, as the sampler
    # keeps it, instead of the paper's independent per-frame levels ("diffusion"); see
    # objectives.teacher_forcing_levels. On Reach a small dynamics learns its next frame several times faster.
    forcing: str = "diffusion"
    # Not in the paper, which gives the action to the transformer only as a token: also condition every block on the
    # action into the frame, FiLM scales and shifts of each norm's output from the action's embedding (adaLN as in
    # DiT, Peebles & Xie 2023; DIAMOND conditions its denoiser on actions this way), zero-initialised so that it
    # starts as the token-only model. The case for it: where an action's effect depends on the state (a torque turns
    # a reacher arm one way or the other depending on its angle), the effect averaged over states is about zero, and
    # FiLM multiplies the action into the features that hold the state. Measured on the pose-dependent probe
    # (experiments/dynamics_copy_probe.py --action-pose; docs/results.md, Sec. 2), it starts sooner but is not ahead
    # at 2,000 updates with the copy options, and on reacher-easy's latents it did worse; there, as plain regression
    # with a quiet target slot (`noise_scale=0.01`, `k_max=1`), it got ahead (one step 0.118 against 0.060 at 6,000
    # updates): an option to compare.
    action_film: bool = False
    # Not in the paper, whose space attention knows its tokens' places only through RoPE over their index (relative,
    # one-dimensional): add a learned position embedding to each latent token, as the tokenizer's decoder does to its
    # latents (`latent_pos`). A local-attention tokenizer's latents each describe one block of the frame with shared
    # weights, so two blocks showing the same thing give the same latents; where a block's next state depends on
    # where it is (an arm turning about a fixed joint), the token must learn its place from RoPE's offsets to the
    # action and signal tokens. Off by default; measured on reacher-easy's frozen latents (docs/results.md, Sec. 2).
    latent_positions: bool = False
    # Per-frame loss weight: the paper's ramp w(tau) = 0.9 tau + 0.1, or "uniform" (objectives.frame_weight).
    loss_weight: str = "ramp"
    # Not in the paper; forcing="teacher" only: the share of training rows whose last history frame is the model's
    # own sample of it (`sampling_steps` steps, no gradient) instead of the real frame, so that the model learns to
    # read its own frames back as imagination makes it (objectives.self_forced_latents). On Reach a teacher-forced
    # dynamics knows each step from real frames and loses the action from the third step of its own rollout
    # (docs/results.md, Sec. 2). Costs `sampling_steps` extra forward passes of the batch per update (1.7x the
    # step's time at dmc_cartpole's size: benchmarks/README.md, `self_forcing_cost`). Measured at 0.5: a fresh
    # model's rollout on frozen latents improves at every step from the second, but trained end to end from the
    # first update (random-action Reach, 3 seeds) the world model and the policy got worse: an option to compare.
    self_forcing: float = 0.0
    # World-model updates (the loop's gradient steps, counted from 0) trained without self-forcing before
    # `self_forcing` applies: early samples are noise, and a row whose last frame is noise teaches the model to look
    # past its last frame; started late, the model's samples already resemble its frames (`self_forcing_at`).
    # Measured on random-action Reach from 1,500 of 3,000 updates: the world model keeps its one-step knowledge
    # that self-forcing from the start loses, but its 8-step rollouts are no better (docs/results.md, Sec. 2).
    self_forcing_start: int = 0
    # How many history frames before the target a self-forced row replaces: an open-loop rollout of that many steps
    # from the real frames before them (`objectives.self_forced_latents`). Imagination's history holds more than one
    # of the model's own frames from its third step on; one replaced frame teaches reading back only one. Costs
    # `self_forcing_frames * sampling_steps` extra forward passes per update. Measured on Reach's frozen latents
    # (two seeds): 2 or 3 frames give worse 8-step rollouts than 1 (docs/results.md, Sec. 2).
    self_forcing_frames: int = 1

    def __post_init__(self) -> None:
        for name in ("latent_tokens", "latent_dim", "pack", "k_max", "sampling_steps", "n_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"DynamicsConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_registers", "n_agent_tokens", "action_dim", "n_actions"):
            if getattr(self, name) < 0:
                raise ValueError(f"DynamicsConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.latent_tokens % self.pack:
            raise ValueError(
                f"DynamicsConfig.pack={self.pack} must divide latent_tokens={self.latent_tokens}"
            )
        if (self.action_dim > 0) == (self.n_actions > 0):
            raise ValueError(
                "DynamicsConfig needs exactly one of action_dim (continuous) or n_actions (discrete) > 0, got "
                f"action_dim={self.action_dim}, n_actions={self.n_actions}"
            )
        if self.k_max & (self.k_max - 1):
            raise ValueError(f"DynamicsConfig.k_max must be a power of two, got {self.k_max}")
        self.check_sampling_steps(self.sampling_steps, "DynamicsConfig.sampling_steps")
        if self.bootstrap_fraction is not None and not 0.0 <= self.bootstrap_fraction <= 1.0:
            raise ValueError(f"DynamicsConfig.bootstrap_fraction must lie in [0, 1] or be None, got "
                             f"{self.bootstrap_fraction}")
        if not 0.0 <= self.clean_context_fraction <= 1.0:
            raise ValueError(f"DynamicsConfig.clean_context_fraction must lie in [0, 1], got "
                             f"{self.clean_context_fraction}")
        if not (math.isfinite(self.noise_scale) and self.noise_scale > 0.0):
            raise ValueError(f"DynamicsConfig.noise_scale must be a finite number > 0, got {self.noise_scale}")
        if not 0.0 <= self.context_noise < 1.0:
            raise ValueError(f"DynamicsConfig.context_noise must lie in [0, 1), got {self.context_noise}")
        if self.forcing not in FORCING_MODES:
            raise ValueError(f"DynamicsConfig.forcing must be one of {FORCING_MODES}, got {self.forcing!r}")
        if self.loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"DynamicsConfig.loss_weight must be one of {LOSS_WEIGHTS}, got {self.loss_weight!r}")
        if not 0.0 <= self.self_forcing <= 1.0:
            raise ValueError(f"DynamicsConfig.self_forcing must lie in [0, 1], got {self.self_forcing}")
        if self.self_forcing_frames < 1:
            raise ValueError(f"DynamicsConfig.self_forcing_frames must be >= 1, got {self.self_forcing_frames}")
        if self.self_forcing_start < 0:
            raise ValueError(f"DynamicsConfig.self_forcing_start must be >= 0, got {self.self_forcing_start}")
        if self.self_forcing > 0.0 and self.forcing != "teacher":
            raise ValueError(f"DynamicsConfig.self_forcing={self.self_forcing} needs forcing='teacher' (one target "
                             f"frame per row behind a history), got forcing={self.forcing!r}")
        if self.forcing == "teacher" and self.clean_context_fraction > 0.0:
            raise ValueError(f"DynamicsConfig.clean_context_fraction={self.clean_context_fraction} applies to "
                             "forcing='diffusion' only: forcing='teacher' gives every sequence a clean history")
        if self.context_signal <= 0.0:
            raise ValueError(f"DynamicsConfig.context_noise={self.context_noise} on the signal grid of k_max="
                             f"{self.k_max} leaves the context at signal {self.context_signal} (pure noise): use "
                             f"context_noise < {1 - 0.5 / self.k_max} (it rounds to the signal grid), a larger k_max, "
                             "or context_noise=0")
        if self.context_noise == 0.0 and self.clean_context_fraction == 0.0 and self.forcing == "diffusion":
            raise ValueError("DynamicsConfig.context_noise=0.0 puts the context at tau = 1, a level training samples "
                             "only in clean-history rows, but clean_context_fraction=0.0: set clean_context_fraction "
                             "> 0, forcing='teacher' or context_noise > 0")

    def check_sampling_steps(self, steps: int, name: str = "steps") -> None:
        """Raise unless `steps` denoising steps per frame are ones training reaches: a power of two in
        [1, k_max], and k_max itself when `bootstrap_fraction=0.0` (only the step 1/k_max is then ever trained)."""
        if not isinstance(steps, int) or steps < 1 or steps & (steps - 1) or steps > self.k_max:
            raise ValueError(f"{name} must be a power of two in [1, k_max={self.k_max}], got {steps!r}")
        if self.bootstrap_fraction == 0.0 and steps < self.k_max:
            raise ValueError(f"{name}={steps} samples with step size 1/{steps}, but bootstrap_fraction=0.0 trains "
                             f"only 1/k_max = 1/{self.k_max}: use {name}={self.k_max} or bootstrap_fraction > 0")

    def self_forcing_at(self, update: int) -> float:
        """The share of self-forced rows at world-model update `update` (counted from 0): `self_forcing` from
        `self_forcing_start` on, 0 before."""
        return self.self_forcing if update >= self.self_forcing_start else 0.0

    @property
    def d_min(self) -> float:
        return 1.0 / self.k_max

    @property
    def n_step_sizes(self) -> int:
        return int(math.log2(self.k_max)) + 1

    @property
    def context_signal(self) -> float:
        """Signal level of re-noised context frames, snapped to the tau grid of the signal embedding. A nonzero
        `context_noise` keeps at least one grid step (1 / k_max): rounded to 0 it would put the context at tau = 1,
        a level that training samples only in clean-history rows (`clean_context_fraction` > 0), so generation
        would read its context through an untrained signal embedding. (Before this floor, Reach's k_max = 4 with
        context_noise 0.1 did exactly that: docs/results.md, Sec. 1.)"""
        steps = round(self.context_noise * self.k_max)
        if self.context_noise > 0:
            steps = max(steps, 1)
        return 1.0 - steps / self.k_max

    @property
    def discrete(self) -> bool:
        return self.n_actions > 0

    def layout(self) -> TokenLayout:
        counts = {"action": 1, "signal": 1, "latents": self.latent_tokens // self.pack}
        if self.n_registers:
            counts["registers"] = self.n_registers
        if self.n_agent_tokens:
            counts["agent"] = self.n_agent_tokens
        return TokenLayout.of(**counts)


def actions_into_frames(actions: Tensor) -> tuple[Tensor, Tensor]:
    """TorchRL's convention (`actions[:, t]` taken after frame t) to the dynamics model's (`actions[:, t]` leads into
    frame t): shift right by one step; the first frame has no known action (mask False)."""
    shifted = torch.cat([torch.zeros_like(actions[:, :1]), actions[:, :-1]], dim=1)
    mask = torch.ones(actions.shape[:2], dtype=torch.bool, device=actions.device)
    mask[:, 0] = False
    return shifted, mask


class LearnedTokens(nn.Module):
    """A table of `count` learned vectors, initialised like token embeddings (normal, std 0.02)."""

    def __init__(self, count: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(count, dim))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def forward(self) -> Tensor:
        return self.weight


class Dynamics(nn.Module):
    """`forward(z_noisy, tau, d, actions, cache=None, tasks=None) -> (z_clean_pred, agent_out, new_cache)`.

    z_noisy `[B, T, S, Dz]`; tau, d `[B, T]` on the grid (see `objectives.py`); actions `[B, T, A]` float or `[B, T]`
    long, or None for action-free video; `action_mask` `[B, T]` bool marks steps whose action is known (False uses
    the "no action" embedding). Returns predicted clean latents `[B, T, S, Dz]`, agent-token outputs `[B, T, A, D]`
    (None without agent tokens) and the updated KV cache (None when no cache was given).
    """

    def __init__(self, cfg: DynamicsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.transformer.d_model
        if cfg.discrete:
            self.action_embed = nn.Embedding(cfg.n_actions, width)
        else:
            self.action_embed = nn.Linear(cfg.action_dim, width)
        self.no_action = LearnedTokens(1, width)
        half = width // 2
        self.tau_embed = nn.Embedding(cfg.k_max + 1, half)
        self.step_embed = nn.Embedding(cfg.n_step_sizes, width - half)
        self.latent_in = nn.Linear(cfg.pack * cfg.latent_dim, width)
        self.latent_out = nn.Linear(width, cfg.pack * cfg.latent_dim)
        self.registers = LearnedTokens(cfg.n_registers, width) if cfg.n_registers else None
        if cfg.n_agent_tokens:
            self.agent_tokens = LearnedTokens(cfg.n_agent_tokens, width)
            self.task_embed = nn.Embedding(cfg.n_tasks, width)
        self.transformer = BlockCausalTransformer(cfg.transformer)
        if cfg.action_film:
            # Per layer: scale and shift of the attention input, then of the MLP input (Block).
            self.action_film = ZeroLinear(width, cfg.transformer.n_layers * 4 * width)
        # Registered last, so that the other parameters draw the same initial values with or without it.
        self.latent_positions = LearnedTokens(cfg.latent_tokens // cfg.pack, width) if cfg.latent_positions else None

    def signal_indices(self, tau: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        tau_index = torch.round(tau * self.cfg.k_max).long()
        step_index = torch.round(torch.log2(1.0 / d)).long()
        if not runs_value_checks(tau_index):
            return tau_index, step_index
        if tau_index.min() < 0 or tau_index.max() > self.cfg.k_max:
            raise ValueError(f"tau must lie in [0, 1], got range [{tau.min().item()}, {tau.max().item()}]")
        if step_index.min() < 0 or step_index.max() >= self.cfg.n_step_sizes:
            raise ValueError(f"d must be a power of two in [1/{self.cfg.k_max}, 1], got range "
                             f"[{d.min().item()}, {d.max().item()}]")
        return tau_index, step_index

    def embed_actions(self, actions: Tensor | None, action_mask: Tensor | None, batch: int, steps: int) -> Tensor:
        none = repeat(self.no_action(), "one d -> b t one d", b=batch, t=steps)
        if actions is None:
            return none
        if self.cfg.discrete:
            if actions.dtype not in (torch.int32, torch.int64) or actions.shape != (batch, steps):
                raise ValueError(f"discrete actions must be integer [B, T] = [{batch}, {steps}], got "
                                 f"{actions.dtype} {tuple(actions.shape)}")
            if runs_value_checks(actions) and (actions.min() < 0 or actions.max() >= self.cfg.n_actions):
                raise ValueError(f"discrete actions must lie in [0, {self.cfg.n_actions}), got range "
                                 f"[{actions.min().item()}, {actions.max().item()}]")
        elif actions.shape != (batch, steps, self.cfg.action_dim):
            raise ValueError(f"continuous actions must be [B, T, A] = [{batch}, {steps}, {self.cfg.action_dim}], "
                             f"got {tuple(actions.shape)}")
        elif runs_value_checks(actions):
            known = actions if action_mask is None else actions[action_mask]
            if known.numel() and not bool(((known >= -1.0) & (known <= 1.0)).all()):
                bad = known[~((known >= -1.0) & (known <= 1.0))]
                raise ValueError(f"continuous actions must lie in [-1, 1] (NaN is not allowed), got e.g. "
                                 f"{bad.flatten()[0].item()}")
        embedded = rearrange(self.action_embed(actions), "b t d -> b t 1 d")
        if action_mask is None:
            return embedded
        return torch.where(rearrange(action_mask, "b t -> b t 1 1"), embedded, none)

    def forward(
        self,
        z_noisy: Tensor,
        tau: Tensor,
        d: Tensor,
        actions: Tensor | None = None,
        action_mask: Tensor | None = None,
        cache: TensorDict | None = None,
        tasks: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, TensorDict | None]:
        cfg = self.cfg
        if z_noisy.ndim != 4 or z_noisy.shape[-2:] != (cfg.latent_tokens, cfg.latent_dim):
            raise ValueError(f"latents must be [B, T, S={cfg.latent_tokens}, Dz={cfg.latent_dim}], got "
                             f"{tuple(z_noisy.shape)}")
        batch, steps = z_noisy.shape[:2]
        for name, level in (("tau", tau), ("d", d)):
            if tuple(level.shape) != (batch, steps):
                raise ValueError(f"{name} must be [B, T] = [{batch}, {steps}] like z_noisy, got {list(level.shape)}")
        tau_index, step_index = self.signal_indices(tau, d)
        signal = torch.cat([self.tau_embed(tau_index), self.step_embed(step_index)], dim=-1)
        action_tokens = self.embed_actions(actions, action_mask, batch, steps)
        film = None
        if cfg.action_film:
            film = rearrange(self.action_film(F.silu(action_tokens[:, :, 0])), "b t (l k d) -> l k b t d",
                             l=cfg.transformer.n_layers, k=4)
        latent_tokens = self.latent_in(rearrange(z_noisy, "b t (s p) z -> b t s (p z)", p=cfg.pack))
        if self.latent_positions is not None:
            latent_tokens = latent_tokens + self.latent_positions()
        parts = [action_tokens, rearrange(signal, "b t d -> b t 1 d"), latent_tokens]
        if self.registers is not None:
            parts.append(repeat(self.registers(), "r d -> b t r d", b=batch, t=steps))
        if cfg.n_agent_tokens:
            task_ids = torch.zeros(batch, dtype=torch.long, device=z_noisy.device) if tasks is None else tasks
            agent = self.agent_tokens()[None, None] + rearrange(self.task_embed(task_ids), "b d -> b 1 1 d")
            parts.append(agent.expand(batch, steps, -1, -1))
        tokens = torch.cat(parts, dim=2)
        layout = cfg.layout()
        out, new_cache = self.transformer(tokens, layout.space_mask("world_model", tokens.device), cache, film)
        z_pred = rearrange(self.latent_out(out[:, :, layout.slice("latents")]), "b t s (p z) -> b t (s p) z",
                           p=cfg.pack)
        if cfg.previous_frame_skip:
            skip, new_cache = previous_frame_skip(z_noisy, tau, cache, new_cache)
            z_pred = z_pred + skip
        agent_out = out[:, :, layout.slice("agent")] if cfg.n_agent_tokens else None
        return z_pred, agent_out, new_cache


def previous_frame_skip(z_noisy: Tensor, tau: Tensor, cache: TensorDict | None,
                        new_cache: TensorDict | None) -> tuple[Tensor, TensorDict | None]:
    """`DynamicsConfig.previous_frame_skip`: for every frame, tau_{t-1} * z_{t-1}^{tau_{t-1}}, the previous frame's
    input scaled by its signal level (0 for a frame with no previous one), and the cache with this call's frames'
    contributions appended under `"previous_frame_skip"` (`[B, 1, T, S * Dz]`: the time axis second to last, so
    `transformer.keep_last_steps` / `drop_last_steps` slice it with the keys and values)."""
    tokens = z_noisy.shape[2]
    contribution = z_noisy * rearrange(tau, "b t -> b t 1 1").to(z_noisy.dtype)
    earlier = torch.zeros_like(contribution[:, :1])
    if cache is not None and "previous_frame_skip" in cache.keys() and cache["valid"].shape[1]:
        last = rearrange(cache["previous_frame_skip"][:, 0, -1], "b (s z) -> b 1 s z", s=tokens)
        known = rearrange(cache["valid"][:, -1], "b -> b 1 1 1")  # False after an episode reset
        earlier = torch.where(known, last, earlier)
    skip = torch.cat([earlier, contribution[:, :-1]], dim=1)
    if new_cache is not None:
        flat = rearrange(contribution, "b t s z -> b 1 t (s z)")
        if "previous_frame_skip" in cache.keys():
            flat = torch.cat([cache["previous_frame_skip"], flat], dim=2)
        elif cache["valid"].shape[1]:
            raise ValueError("the cache holds frames from a model without previous_frame_skip: start from an "
                             "empty cache")
        new_cache["previous_frame_skip"] = flat
    return skip, new_cache
