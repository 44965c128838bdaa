"""A small world model on the project's own data: a tokenizer and a dynamics model trained on action-driven shapes.

Used by `benchmarks/dynamics.py` (world-model quality figures) and `experiments/train_dynamics.py`. Phase 1 of the
paper in miniature: train the tokenizer on frames, freeze it, encode clips to latents, train the dynamics model
with shortcut forcing on the latents and the actions that drove the clips.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import torch
from tensordict import TensorDictBase
from torch import Tensor
from tqdm import tqdm

from d4func.config import TransformerConfig
from d4func.data.moving_shapes import MovingShapesConfig, moving_shapes_batch
from d4func.dynamics import Dynamics, DynamicsConfig, actions_into_frames
from d4func.functional import init, template
from d4func.optim import AdamWConfig
from d4func.tokenizer import Tokenizer, TokenizerConfig, decode, encode
from d4func.tokenizer_loss import TokenizerLossConfig, new_tokenizer_train_state, psnr, tokenizer_train_step
from d4func.train.dynamics_step import dynamics_train_step
from d4func.train.state import new_train_state
from d4func.train.video import predict_frames


def _shapes() -> MovingShapesConfig:
    return MovingShapesConfig(image_size=32, n_shapes=1, action_mode="continuous", control_speed=0.08)


def _tokenizer() -> TokenizerConfig:
    small = TransformerConfig(d_model=96, n_layers=4, n_heads=4, n_kv_heads=4, time_every=2)
    return TokenizerConfig(height=32, width=32, patch_size=4, n_latents=16, latent_dim=8, encoder=small,
                           decoder=small)


def _dynamics() -> DynamicsConfig:
    return DynamicsConfig(
        transformer=TransformerConfig(d_model=96, n_layers=4, n_heads=4, n_kv_heads=2, time_every=2),
        latent_tokens=16, latent_dim=8, pack=2, n_registers=2, action_dim=2, k_max=16, sampling_steps=4,
    )


@dataclass(frozen=True)
class ShapesWorldModelConfig:
    shapes: MovingShapesConfig = field(default_factory=_shapes)
    tokenizer: TokenizerConfig = field(default_factory=_tokenizer)
    dynamics: DynamicsConfig = field(default_factory=_dynamics)
    tokenizer_steps: int = 600
    dynamics_steps: int = 800
    batch: int = 16
    seq_len: int = 6
    tokenizer_lr: float = 1e-3
    dynamics_lr: float = 1e-3
    eval_clips: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tokenizer_steps", "dynamics_steps", "batch", "eval_clips"):
            if getattr(self, name) < 0:
                raise ValueError(f"ShapesWorldModelConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"ShapesWorldModelConfig.seq_len must be >= 2, got {self.seq_len}")
        if self.dynamics.latent_tokens != self.tokenizer.latent_tokens:
            raise ValueError(f"dynamics.latent_tokens={self.dynamics.latent_tokens} must equal the tokenizer's "
                             f"latent tokens {self.tokenizer.latent_tokens}")
        if self.dynamics.latent_dim != self.tokenizer.latent_dim:
            raise ValueError(f"dynamics.latent_dim={self.dynamics.latent_dim} must equal tokenizer.latent_dim="
                             f"{self.tokenizer.latent_dim}")

    @classmethod
    def quick(cls) -> ShapesWorldModelConfig:
        """A few steps of each phase: exercises the code path, measures nothing."""
        return cls(tokenizer_steps=5, dynamics_steps=5, batch=4, eval_clips=4)

    def describe(self) -> dict:
        return asdict(self)

    def with_steps(self, tokenizer_steps: int, dynamics_steps: int) -> ShapesWorldModelConfig:
        return replace(self, tokenizer_steps=tokenizer_steps, dynamics_steps=dynamics_steps)


class ShapesWorldModel(NamedTuple):
    tokenizer: Tokenizer
    tokenizer_params: TensorDictBase
    dynamics: Dynamics
    dynamics_params: TensorDictBase
    train_seconds: float
    history: dict[str, list[float]]


def _loop(steps: int, desc: str, progress: bool) -> range | tqdm:
    return tqdm(range(steps), desc=desc, leave=False) if progress else range(steps)


def pretrain_world_model(
    tokenizer_cfg: TokenizerConfig,
    dynamics_cfg: DynamicsConfig,
    sample_batch: Callable[[torch.Generator], tuple[Tensor, Tensor]],
    *,
    tokenizer_steps: int,
    dynamics_steps: int,
    tokenizer_lr: float = 1e-3,
    dynamics_lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
    log: Callable[[str, dict[str, float], int], None] | None = None,
) -> ShapesWorldModel:
    """Phase 1 on any video source: `sample_batch(generator)` returns frames `[B, T, C, H, W]` and the actions that
    drove them (TorchRL convention `[B, T, A]`). The tokenizer trains first, then the dynamics model on its frozen
    latents. `log(phase, metrics, step)` receives every step's scalar metrics when given."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"tokenizer_psnr": [], "dynamics_loss": []}

    tokenizer = template(Tokenizer, tokenizer_cfg)
    tok_state = new_tokenizer_train_state(init(tokenizer, seed), with_ema=False)
    tok_loss = TokenizerLossConfig(lpips_weight=0.0)
    tok_opt = AdamWConfig(lr=tokenizer_lr)
    for step in _loop(tokenizer_steps, "tokenizer", progress):
        frames, _ = sample_batch(gen)
        tok_state, metrics = tokenizer_train_step(tok_state, frames, gen, template=tokenizer, cfg=tok_loss,
                                                  optim=tok_opt)
        history["tokenizer_psnr"].append(float(metrics["psnr"]))
        if log is not None:
            log("tokenizer", {k: float(v) for k, v in metrics.items()}, step)
    tok_params = tok_state["params"]

    dynamics = template(Dynamics, dynamics_cfg)
    dyn_state = new_train_state(init(dynamics, seed + 1), with_ema=False)
    dyn_opt = AdamWConfig(lr=dynamics_lr)
    for step in _loop(dynamics_steps, "dynamics", progress):
        frames, actions = sample_batch(gen)
        with torch.no_grad():
            latents = encode(tokenizer, tok_params, frames)
        actions, mask = actions_into_frames(actions)
        dyn_state, metrics = dynamics_train_step(dyn_state, latents, actions, gen, model=dynamics, opt=dyn_opt,
                                                 action_mask=mask)
        history["dynamics_loss"].append(float(metrics["loss"]))
        if log is not None:
            log("dynamics", {k: float(v) for k, v in metrics.items()}, step)
    return ShapesWorldModel(tokenizer, tok_params, dynamics, dyn_state["params"], time.perf_counter() - start,
                            history)


def train_shapes_world_model(
    cfg: ShapesWorldModelConfig,
    progress: bool = False,
    log: Callable[[str, dict[str, float], int], None] | None = None,
) -> ShapesWorldModel:
    """Phase 1 in miniature on action-driven moving shapes."""
    if cfg.dynamics.action_dim != cfg.shapes.action_dim:
        raise ValueError(f"dynamics.action_dim={cfg.dynamics.action_dim} must equal the shapes' action size "
                         f"{cfg.shapes.action_dim}")

    def sample(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        return moving_shapes_batch(cfg.shapes, cfg.batch, cfg.seq_len, gen)

    return pretrain_world_model(cfg.tokenizer, cfg.dynamics, sample, tokenizer_steps=cfg.tokenizer_steps,
                                dynamics_steps=cfg.dynamics_steps, tokenizer_lr=cfg.tokenizer_lr,
                                dynamics_lr=cfg.dynamics_lr, seed=cfg.seed, progress=progress, log=log)


@torch.no_grad()
def evaluate_next_frame(
    world_model: ShapesWorldModel, cfg: ShapesWorldModelConfig, steps_list: tuple[int, ...] = (1, 2, 4)
) -> dict[str, float]:
    """Next-frame PSNR on held-out clips (a seed the training never drew) for each K, against copying the last
    context frame, plus the tokenizer's own reconstruction PSNR of the target frames."""
    held_out = torch.Generator().manual_seed(10_000 + cfg.seed)
    frames, actions = moving_shapes_batch(cfg.shapes, cfg.eval_clips, cfg.seq_len, held_out)
    context, target = frames[:, :-1], frames[:, -1:]
    results = {}
    for steps in steps_list:
        predicted = predict_frames(world_model.tokenizer, world_model.tokenizer_params, world_model.dynamics,
                                   world_model.dynamics_params, context, actions, 1, steps)
        results[f"psnr_k{steps}"] = float(psnr(predicted, target))
    results["psnr_copy_last"] = float(psnr(context[:, -1:], target))
    recon = decode(world_model.tokenizer, world_model.tokenizer_params,
                   encode(world_model.tokenizer, world_model.tokenizer_params, frames))
    results["psnr_reconstruction"] = float(psnr(recon[:, -1:].clamp(0, 1), target))
    return results
