"""Train the causal tokenizer (paper Section 3.1) on moving shapes or on DMControl frames recorded through TorchRL.

    python experiments/train_tokenizer.py --config experiments/configs/tokenizer_debug.yaml [key=value ...]

Overrides use dotted keys, e.g. `steps=200 model.patch_size=4 data.source=dmc loss.lpips_weight=0`. Each run writes
into `runs/tokenizer/<run_name>/` (ignored by git): the merged `config.yaml`, TorchRL CSV logs (`scalars/`), a PNG grid
`reconstructions.png` (rows alternate originals and reconstructions of held-out frames) and `checkpoint.pt`, the
train state TensorDict saved as a nested dict of tensors.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from einops import rearrange
from omegaconf import OmegaConf
from torch import Tensor
from tqdm import tqdm

from d4func.config import load_config
from d4func.data.moving_shapes import MovingShapesConfig, moving_shapes_batch
from d4func.functional import count_params, init, template
from d4func.lpips_loss import LPIPSWeightsMissing, find_backbone_weights, make_lpips
from d4func.optim import AdamWConfig
from d4func.tokenizer import Tokenizer, TokenizerConfig
from d4func.tokenizer_loss import (
    TokenizerLossConfig,
    new_tokenizer_train_state,
    reconstruction_metrics,
    tokenizer_train_step,
)

DATA_SOURCES = ("shapes", "dmc")


@dataclass(frozen=True)
class DataConfig:
    source: str = "shapes"  # "shapes" (procedural, no download) or "dmc" (frames recorded from a DMControl task)
    batch_size: int = 8  # clips per step
    seq_len: int = 4  # frames per clip
    shapes: MovingShapesConfig = field(default_factory=MovingShapesConfig)
    dmc_domain: str = "cartpole"
    dmc_task: str = "swingup"
    dmc_camera_ids: list[int] = field(default_factory=lambda: [0])
    dmc_action_repeat: int = 2
    dmc_episodes: int = 4  # recorded with random actions before training; the last one is held out for eval
    dmc_episode_steps: int = 100

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ValueError(f"DataConfig.source must be one of {DATA_SOURCES}, got {self.source!r}")
        for name in ("batch_size", "seq_len", "dmc_action_repeat", "dmc_episode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.source == "dmc" and self.dmc_episodes < 2:
            raise ValueError(f"DataConfig.dmc_episodes must be >= 2 (one is held out), got {self.dmc_episodes}")
        if self.source == "dmc" and self.dmc_episode_steps < self.seq_len:
            raise ValueError(
                f"DataConfig.dmc_episode_steps={self.dmc_episode_steps} is shorter than seq_len={self.seq_len}"
            )


@dataclass(frozen=True)
class TrainTokenizerConfig:
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    optim: AdamWConfig = field(default_factory=AdamWConfig)
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 1000
    seed: int = 0
    ema_decay: float | None = None  # None: no EMA params
    log_every: int = 50
    eval_clips: int = 8
    grid_frames: int = 8  # held-out frames shown in the PNG grid
    run_dir: str = "runs/tokenizer"
    run_name: str | None = None  # default: a timestamp
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None keeps torch's default

    def __post_init__(self) -> None:
        for name in ("steps", "log_every", "eval_clips", "grid_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainTokenizerConfig.{name} must be >= 1, got {getattr(self, name)}")
        model, data = self.model, self.data
        if data.source == "shapes":
            size = data.shapes.image_size
            if (model.height, model.width, model.channels) != (size, size, 3) or model.n_cameras != 1:
                raise ValueError(
                    f"moving shapes are 3x{size}x{size}, one camera; the model expects "
                    f"{model.channels}x{model.height}x{model.width} with n_cameras={model.n_cameras}: set "
                    f"data.shapes.image_size or model.height/width/channels/n_cameras to match"
                )
        else:
            if model.height != model.width or model.channels != 3:
                raise ValueError(
                    f"DMC renders square RGB frames; model is {model.channels}x{model.height}x{model.width}"
                )
            if model.n_cameras != len(data.dmc_camera_ids):
                raise ValueError(
                    f"model.n_cameras={model.n_cameras} must equal len(data.dmc_camera_ids)={len(data.dmc_camera_ids)}"
                )


# --------------------------------------------------------------------------------------------------------------
# Data (stateful edge)
# --------------------------------------------------------------------------------------------------------------

Sampler = Callable[[torch.Generator], Tensor]


def shapes_data(cfg: TrainTokenizerConfig) -> tuple[Sampler, Tensor]:
    """A sampler of fresh moving-shapes clips and a fixed held-out set (its own seed, never seen in training)."""
    data = cfg.data

    def sample(gen: torch.Generator) -> Tensor:
        return moving_shapes_batch(data.shapes, data.batch_size, data.seq_len, gen)[0]

    held_out = moving_shapes_batch(data.shapes, cfg.eval_clips, data.seq_len, cfg.seed + 1_000_003)[0]
    return sample, held_out


def record_dmc_episodes(cfg: TrainTokenizerConfig) -> Tensor:
    """Random-action episodes from a TorchRL DMControl env: pixels `[E, T, (n_cams,) C, H, W]` in [0, 1]."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    from d4func.envs.dmc import make_dmc_env  # lazy: rendering stack only when DMC is asked for

    data = cfg.data
    episodes = []
    for episode in range(data.dmc_episodes):
        env = make_dmc_env(
            data.dmc_domain,
            data.dmc_task,
            image_size=cfg.model.height,
            action_repeat=data.dmc_action_repeat,
            camera_ids=tuple(data.dmc_camera_ids),
            seed=cfg.seed + episode,
        )
        with torch.random.fork_rng(devices=[]):
            # TorchRL's random policy samples the action spec from the global RNG: seed it, then restore it.
            torch.manual_seed(cfg.seed + episode)
            rollout = env.rollout(data.dmc_episode_steps, break_when_any_done=False)
        env.close()
        episodes.append(rollout["pixels"].float())
    return torch.stack(episodes)


def dmc_data(cfg: TrainTokenizerConfig) -> tuple[Sampler, Tensor]:
    episodes = record_dmc_episodes(cfg)
    train, held_out = episodes[:-1], episodes[-1:]
    seq_len = cfg.data.seq_len

    def clips(source: Tensor, gen: torch.Generator, count: int) -> Tensor:
        episode = torch.randint(source.shape[0], (count,), generator=gen)
        start = torch.randint(source.shape[1] - seq_len + 1, (count,), generator=gen)
        return torch.stack([source[e, s : s + seq_len] for e, s in zip(episode.tolist(), start.tolist(), strict=True)])

    def sample(gen: torch.Generator) -> Tensor:
        return clips(train, gen, cfg.data.batch_size)

    return sample, clips(held_out, torch.Generator().manual_seed(cfg.seed + 1), cfg.eval_clips)


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------


def save_grid(originals: Tensor, reconstructions: Tensor, path: Path, n_frames: int) -> None:
    """PNG with rows alternating originals and their reconstructions (cameras side by side)."""
    from torchvision.utils import save_image

    def flat(frames: Tensor) -> Tensor:
        if frames.ndim == 6:  # several cameras: tile them horizontally
            frames = rearrange(frames, "b t k c h w -> b t c h (k w)")
        return rearrange(frames, "b t c h w -> (b t) c h w")[:n_frames]

    top, bottom = flat(originals), flat(reconstructions.clamp(0.0, 1.0))
    rows = []
    per_row = min(8, top.shape[0])
    for start in range(0, top.shape[0], per_row):
        rows += [top[start : start + per_row], bottom[start : start + per_row]]
    grid = torch.cat([r for r in rows if r.shape[0] == per_row])
    save_image(grid, str(path), nrow=per_row, padding=2, pad_value=1.0)


def build_lpips(cfg: TrainTokenizerConfig) -> Callable[[Tensor, Tensor], Tensor] | None:
    """LPIPS for the loss (required when its weight > 0) or, when the weights happen to be on disk, for metrics."""
    loss = cfg.loss
    if loss.lpips_weight > 0:
        return make_lpips(loss.lpips_net, loss.lpips_backbone_path, device=cfg.device)
    if min(cfg.model.height, cfg.model.width) >= 32 and find_backbone_weights(loss.lpips_net) is not None:
        return make_lpips(loss.lpips_net, device=cfg.device)
    return None


def train(cfg: TrainTokenizerConfig, raw_config: object | None = None) -> dict[str, float]:
    """Runs the training described by `cfg`; returns the final held-out metrics."""
    from torchrl.record.loggers.csv import CSVLogger

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    lpips_fn = build_lpips(cfg)
    sample, held_out = shapes_data(cfg) if cfg.data.source == "shapes" else dmc_data(cfg)
    held_out = held_out.to(device)

    run_name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(raw_config if raw_config is not None else OmegaConf.structured(cfg), run_dir / "config.yaml")
    logger = CSVLogger(exp_name=run_name, log_dir=str(cfg.run_dir))

    model = template(Tokenizer, cfg.model)
    state = new_tokenizer_train_state(init(model, cfg.seed, device=device), with_ema=cfg.ema_decay is not None)
    print(
        f"tokenizer: {count_params(state['params']):,} params, compression {cfg.model.compression_ratio:.1f}x, "
        f"LPIPS {'on' if lpips_fn is not None else 'off'} (weight {cfg.loss.lpips_weight}), run {run_dir}"
    )
    data_gen = torch.Generator().manual_seed(cfg.seed)
    mask_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)

    def evaluate(step: int) -> tuple[dict[str, float], Tensor]:
        params = state["ema"] if cfg.ema_decay is not None else state["params"]
        metrics, recon = reconstruction_metrics(model, params, held_out, lpips_fn)
        values = {f"eval_{name}": float(value) for name, value in metrics.items()}
        for name, value in values.items():
            logger.log_scalar(name, value, step=step)
        return values, recon

    progress = tqdm(range(1, cfg.steps + 1), desc="tokenizer", dynamic_ncols=True)
    for step in progress:
        frames = sample(data_gen).to(device)
        state, metrics = tokenizer_train_step(
            state,
            frames,
            mask_gen,
            template=model,
            cfg=cfg.loss,
            optim=cfg.optim,
            ema_decay=cfg.ema_decay,
            lpips_fn=lpips_fn,
        )
        if step % cfg.log_every == 0 or step == cfg.steps:  # always at the last step: `final` below
            for name, value in metrics.items():
                logger.log_scalar(f"train_{name}", float(value), step=step)
            final, recon = evaluate(step)
            progress.set_postfix(
                mse=f"{float(metrics['mse']):.4f}",
                psnr=f"{float(metrics['psnr']):.2f}",
                eval_psnr=f"{final['eval_psnr']:.2f}",
            )

    save_grid(held_out.cpu(), recon.cpu(), run_dir / "reconstructions.png", cfg.grid_frames)
    torch.save(state.cpu().to_dict(), run_dir / "checkpoint.pt")
    print("final held-out " + ", ".join(f"{name}={value:.4f}" for name, value in final.items()))
    print(f"wrote {run_dir / 'reconstructions.png'} and {run_dir / 'checkpoint.pt'}")
    return final


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (see experiments/configs/tokenizer_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. steps=100")
    args = parser.parse_args(argv)
    cfg = load_config(TrainTokenizerConfig, args.config, args.overrides)
    try:
        return train(cfg, raw_config=OmegaConf.create(asdict(cfg)))
    except LPIPSWeightsMissing as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
