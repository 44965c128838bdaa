"""The run config: one typed, frozen tree for the whole online / offline loop (YAML + `key.sub=value` overrides).

Load with `load_run_config(path, overrides)`: an unknown key or a value of the wrong type stops with OmegaConf's
message naming the key; a bad value stops with the `__post_init__` message naming the field. Sizes shared between
models (latent tokens, widths, action spaces) are checked against each other here and against the environment's
specs when the loop starts.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from d4func.config import TransformerConfig, load_config
from d4func.dynamics import DynamicsConfig
from d4func.heads import HeadsConfig
from d4func.imagination import ImaginationConfig
from d4func.optim import AdamWConfig
from d4func.tokenizer import TokenizerConfig
from d4func.tokenizer_loss import LPIPS_MIN_SIDE, TokenizerLossConfig
from d4func.train.agent_step import FinetuneConfig
from d4func.train.precision import PrecisionConfig, check_attention_config

MODES = ("online", "offline")
LOGGERS = ("csv", "tensorboard")


@dataclass(frozen=True)
class EnvConfig:
    name: str = "dmc:cartpole-swingup"  # "dmc:DOMAIN-TASK", "dmc:DOMAIN-TASK@0,1" (cameras), "crafter"
    image_size: int = 64
    action_repeat: int = 2
    eval_episodes: int = 2
    eval_max_steps: int = 10_000  # cap on the env steps of one evaluation episode
    max_episode_steps: int | None = None  # shorter episodes (env steps); None keeps the task's own length

    def __post_init__(self) -> None:
        for name in ("image_size", "action_repeat", "eval_max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"EnvConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ValueError(f"EnvConfig.max_episode_steps must be >= 1 or None, got {self.max_episode_steps}")
        if self.eval_episodes < 0:
            raise ValueError(f"EnvConfig.eval_episodes must be >= 0, got {self.eval_episodes}")


@dataclass(frozen=True)
class ReplayConfig:
    capacity: int = 100_000  # stored entries: the transitions, plus one final frame per ended episode
    seq_len: int = 16  # T: transitions in a training row (frames: `row_frames`)
    batch_size: int = 16
    context_len: int = 4  # T0: replay frames that start an imagined rollout
    # Train on the frame after a row's last transition too (its `("next", "pixels")`), so a row of T
    # transitions has T + 1 frames: without it the reward of an episode's last transition (a terminal success or
    # failure) has no frame to be predicted at and is never learned. The extra frame has no action to clone.
    final_frame: bool = True

    @property
    def row_frames(self) -> int:
        """Frames in a training row (`seq_len`, plus the final frame): the longest window the world model learns,
        and the one the acting policy and imagined rollouts keep."""
        return self.seq_len + int(self.final_frame)

    def __post_init__(self) -> None:
        for name in ("capacity", "seq_len", "batch_size", "context_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"ReplayConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.context_len >= self.seq_len:
            # The world model's GIFs and quality checks predict a row's frames after its context.
            raise ValueError(f"ReplayConfig.context_len={self.context_len} must be < seq_len={self.seq_len}: a "
                             "row needs frames after the context to compare the world model's predictions with")


@dataclass(frozen=True)
class OptimConfig:
    tokenizer: AdamWConfig = field(default_factory=lambda: AdamWConfig(lr=1e-3))
    world_model: AdamWConfig = field(default_factory=lambda: AdamWConfig(lr=3e-4))
    agent: AdamWConfig = field(default_factory=lambda: AdamWConfig(lr=3e-4))
    ema_decay: float = 0.99

    def __post_init__(self) -> None:
        # Refused here, not at the first gradient step after the prefill (where the EMA update named no key).
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"OptimConfig.ema_decay must lie in [0, 1], got {self.ema_decay}")


@dataclass(frozen=True)
class LoopConfig:
    mode: str = "online"
    env_steps: int = 20_000  # online: total env steps (after action repeat)
    prefill_steps: int = 1_000  # random-policy env steps before training starts
    collect_steps: int = 100  # env steps per collection round (per round: collect, then train); a run collects
    # whole rounds, so an env_steps that is not a multiple of it ends up to collect_steps - 1 steps later
    train_ratio: float = 0.25  # gradient steps per env step (each gradient step updates every phase)
    tokenizer_every: int = 1  # tokenizer update every Nth gradient step
    agent_start: int = 2_000  # env steps before imagination training starts (the world model needs a head start)
    offline_data: str | None = None  # offline: a dataset recorded by `d4func collect`
    offline_steps: int = 1_000  # offline: gradient steps
    eval_every: int = 5_000  # env steps (online) or gradient steps (offline) between evaluations
    eval_bc: bool = False  # also evaluate the behaviour-cloning policy head alone (the "BC alone" baseline)
    eval_greedy: bool = True  # evaluate the policy's mode; False samples (Crafter: a greedy policy tends to idle)
    checkpoint_every: int = 5_000
    # Also save once this many minutes have passed since the last save (0: off), at the next round boundary (online)
    # or gradient step (offline): a slow run keeps its losses to a preemption bounded in time, as DreamerV3 does.
    checkpoint_every_minutes: float = 0.0
    keep_checkpoints: int = 3
    log_every: int = 100
    gif_every: int = 10_000
    logger: str = "csv"
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"LoopConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.logger not in LOGGERS:
            raise ValueError(f"LoopConfig.logger must be one of {LOGGERS}, got {self.logger!r}")
        for name in ("env_steps", "prefill_steps", "agent_start", "offline_steps", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"LoopConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("collect_steps", "tokenizer_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                     "log_every", "gif_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoopConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.train_ratio < 0:
            raise ValueError(f"LoopConfig.train_ratio must be >= 0, got {self.train_ratio}")
        if not (math.isfinite(self.checkpoint_every_minutes) and self.checkpoint_every_minutes >= 0):
            raise ValueError("LoopConfig.checkpoint_every_minutes must be a finite number >= 0 (0: off), got "
                             f"{self.checkpoint_every_minutes}")
        if self.mode == "offline" and not self.offline_data:
            raise ValueError("LoopConfig.offline_data must name a dataset directory in offline mode, got None")


def _tokenizer() -> TokenizerConfig:
    small = TransformerConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, time_every=2)
    return TokenizerConfig(height=64, width=64, patch_size=8, n_latents=16, latent_dim=16, encoder=small,
                           decoder=small)


def _dynamics() -> DynamicsConfig:
    return DynamicsConfig(
        transformer=TransformerConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, time_every=2),
        latent_tokens=16, latent_dim=16, pack=2, n_registers=2, n_agent_tokens=1, action_dim=1, k_max=16,
    )


@dataclass(frozen=True)
class RunConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    env: EnvConfig = field(default_factory=EnvConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    tokenizer: TokenizerConfig = field(default_factory=_tokenizer)
    tokenizer_loss: TokenizerLossConfig = field(default_factory=lambda: TokenizerLossConfig(lpips_weight=0.0))
    dynamics: DynamicsConfig = field(default_factory=_dynamics)
    heads: HeadsConfig = field(default_factory=lambda: HeadsConfig(d_model=128, hidden=128, action_dim=1))
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    imagination: ImaginationConfig = field(default_factory=ImaginationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    device: str = "cpu"  # the learner's device ("cpu", "cuda", "cuda:1"); envs and the acting policy stay on CPU
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)  # bf16, fused attention, torch.compile

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**31:  # env seeds derive from it and must stay below 2**32 (dm_control)
            raise ValueError(f"RunConfig.seed must be in [0, 2**31), got {self.seed}")
        try:
            torch.device(self.device)
        except RuntimeError as error:
            raise ValueError(f"RunConfig.device must name a torch device, got {self.device!r}") from error
        check_attention_config(self.tokenizer.encoder, self.precision, "tokenizer.encoder")
        check_attention_config(self.tokenizer.decoder, self.precision, "tokenizer.decoder")
        check_attention_config(self.dynamics.transformer, self.precision, "dynamics.transformer")
        tok, dyn, heads = self.tokenizer, self.dynamics, self.heads
        checks = [
            ("dynamics.latent_tokens", dyn.latent_tokens, "tokenizer n_cameras * n_latents", tok.latent_tokens),
            ("dynamics.latent_dim", dyn.latent_dim, "tokenizer.latent_dim", tok.latent_dim),
            ("heads.d_model", heads.d_model, "dynamics.transformer.d_model", dyn.transformer.d_model),
            ("heads.n_agent_tokens", heads.n_agent_tokens, "dynamics.n_agent_tokens", dyn.n_agent_tokens),
            ("heads.action_dim", heads.action_dim, "dynamics.action_dim", dyn.action_dim),
            ("heads.n_actions", heads.n_actions, "dynamics.n_actions", dyn.n_actions),
            ("tokenizer.height", tok.height, "env.image_size", self.env.image_size),
            ("tokenizer.width", tok.width, "env.image_size", self.env.image_size),
        ]
        for name, value, other_name, other in checks:
            if value != other:
                raise ValueError(f"RunConfig: {name}={value} must equal {other_name}={other}")
        loss = self.tokenizer_loss
        if loss.lpips_weight > 0:  # refused here rather than at the first tokenizer step
            if tok.channels != 3:
                raise ValueError(f"RunConfig: tokenizer_loss.lpips_weight={loss.lpips_weight} needs RGB frames, but "
                                 f"tokenizer.channels={tok.channels}; set tokenizer_loss.lpips_weight=0")
            side = LPIPS_MIN_SIDE[loss.lpips_net]
            if min(tok.height, tok.width) < side:
                raise ValueError(f"RunConfig: tokenizer_loss.lpips_net={loss.lpips_net!r} needs frames of side >= "
                                 f"{side}, got {tok.height}x{tok.width}; set tokenizer_loss.lpips_weight=0 or use "
                                 "another lpips_net")
        if dyn.n_agent_tokens < 1:
            raise ValueError("RunConfig: dynamics.n_agent_tokens must be >= 1 (the agent reads agent tokens), got "
                             f"{dyn.n_agent_tokens}")
        if self.imagination.horizon + 1 > self.replay.seq_len * 4:
            raise ValueError(f"RunConfig: imagination.horizon={self.imagination.horizon} is far beyond the "
                             f"training context replay.seq_len={self.replay.seq_len}")
        if dyn.self_forcing > 0 and dyn.self_forcing_frames + 1 >= self.replay.row_frames:
            # Teacher forcing's target lies in frames 1 .. row_frames - 1; a rollout needs one real frame before it.
            raise ValueError(f"RunConfig: dynamics.self_forcing_frames={dyn.self_forcing_frames} leaves no training "
                             f"row to self-force: rows of replay.row_frames={self.replay.row_frames} frames hold at "
                             f"most {self.replay.row_frames - 2} frames between the first and the target")
        im = self.imagination
        if im.center_advantages and im.policy_coef > 0 and self.replay.batch_size < 2:
            # One rollout per replay row, centred on the batch mean at each step: a batch of one centres every
            # advantage to 0, so PMPO has no sign to follow and the policy only moves towards its prior.
            raise ValueError("RunConfig: imagination.center_advantages=true needs replay.batch_size >= 2 (rollouts "
                             f"per step, per rank under torchrun), got {self.replay.batch_size}: every centred "
                             "advantage would be 0")


def resolve_device(name: str) -> torch.device:
    """The learner's device; asking for CUDA on a machine without it stops with the device named."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"RunConfig.device={name!r} but CUDA is not available here; use device=cpu")
    return device


def load_run_config(yaml_path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The run config from a YAML file and `key.sub=value` overrides (unknown keys and bad values raise)."""
    return load_config(RunConfig, yaml_path, overrides)


# Keys whose default changed what a run does, with the value that runs saved before the key existed had: a saved
# config without one is read with that value, so resuming or evaluating an older run keeps its behaviour.
LEGACY_VALUES: dict[tuple[str, ...], object] = {("replay", "final_frame"): False}


def saved_run_config(data: Mapping[str, Any]) -> RunConfig:
    """A run's saved config (`config.json`, a checkpoint's `config`) as a `RunConfig`: keys added since it was
    saved take their defaults, except `LEGACY_VALUES`, which take the behaviour the run had."""
    from d4func.train.checkpoint import config_from_dict

    data = copy.deepcopy(dict(data))
    for (*sections, key), value in LEGACY_VALUES.items():
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node.setdefault(key, value)
    return config_from_dict(RunConfig, data)
