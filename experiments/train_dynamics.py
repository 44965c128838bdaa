"""Train a world model (tokenizer, then dynamics with shortcut forcing) and show real vs generated video.

Sources:
* `shapes` — action-driven moving shapes (the project's own data, no download);
* `dmc` — DMControl episodes recorded through TorchRL with a random policy (`d4func collect`'s recorder), or an
  existing dataset directory (`dataset=...`).

Logs every loss term per step through TorchRL's CSV logger (`RUN_DIR/logs`), reports next-frame PSNR at K = 1, 2, 4
against copying the last frame, and writes `RUN_DIR/real_vs_generated.gif`: held-out clips, real frames on top,
frames generated open loop from a short context under the same actions below.

    python experiments/train_dynamics.py --config experiments/configs/dynamics_shapes.yaml [key=value ...]
    python experiments/train_dynamics.py --config experiments/configs/dynamics_dmc.yaml
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchrl.record.loggers import CSVLogger

from d4func.config import load_config
from d4func.data.moving_shapes import moving_shapes_batch
from d4func.tokenizer_loss import psnr
from d4func.train.shapes_world_model import (
    ShapesWorldModel,
    ShapesWorldModelConfig,
    evaluate_next_frame,
    pretrain_world_model,
    train_shapes_world_model,
)
from d4func.train.video import predict_frames, write_comparison_gif


@dataclass(frozen=True)
class TrainDynamicsConfig:
    source: str = "shapes"  # "shapes" | "dmc"
    run_dir: str = "runs/dynamics"
    world_model: ShapesWorldModelConfig = field(default_factory=ShapesWorldModelConfig)
    env: str = "dmc:cartpole-swingup"  # dmc source: env to record
    dataset: str | None = None  # dmc source: an existing `d4func collect` dataset instead of recording
    record_steps: int = 3000  # dmc source: random-policy env steps to record
    action_repeat: int = 4
    context: int = 3  # frames of context for the GIF and the quality figures
    threads: int = 2

    def __post_init__(self) -> None:
        if self.source not in ("shapes", "dmc"):
            raise ValueError(f"TrainDynamicsConfig.source must be 'shapes' or 'dmc', got {self.source!r}")
        if not 1 <= self.context < self.world_model.seq_len:
            raise ValueError(f"TrainDynamicsConfig.context={self.context} must lie in [1, seq_len="
                             f"{self.world_model.seq_len})")


def dmc_world_model(cfg: TrainDynamicsConfig, logger_fn, progress: bool) -> tuple[ShapesWorldModel, object]:
    from d4func.data.offline import collect, load_offline

    wm = cfg.world_model
    dataset = cfg.dataset
    if dataset is None:
        dataset = str(Path(tempfile.mkdtemp(prefix="d4func_dmc_")))
        collect(cfg.env, dataset, cfg.record_steps, seed=wm.seed, image_size=wm.tokenizer.height,
                action_repeat=cfg.action_repeat)
    replay = load_offline(dataset, wm.seq_len, wm.batch, seed=wm.seed)

    def sample(_: torch.Generator):
        rows = replay.sample()
        return rows.get("pixels"), rows.get("action")

    model = pretrain_world_model(wm.tokenizer, wm.dynamics, sample, tokenizer_steps=wm.tokenizer_steps,
                                 dynamics_steps=wm.dynamics_steps, tokenizer_lr=wm.tokenizer_lr,
                                 dynamics_lr=wm.dynamics_lr, seed=wm.seed, progress=progress, log=logger_fn)
    return model, sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    cfg = load_config(TrainDynamicsConfig, args.config, args.overrides)
    torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = CSVLogger(exp_name="logs", log_dir=str(run_dir))

    def log(phase: str, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            logger.log_scalar(f"{phase}/{name}", value, step=step)

    wm = cfg.world_model
    if cfg.source == "shapes":
        model = train_shapes_world_model(wm, progress=not args.quiet, log=log)
        quality = evaluate_next_frame(model, wm)
        frames, actions = moving_shapes_batch(wm.shapes, 4, wm.seq_len, torch.Generator().manual_seed(99_999))
    else:
        model, sample = dmc_world_model(cfg, log, progress=not args.quiet)
        frames, actions = sample(torch.Generator())
        frames, actions = frames[:8], actions[:8]
        quality = {}
        for steps in (1, 2, 4):
            predicted = predict_frames(model.tokenizer, model.tokenizer_params, model.dynamics, model.dynamics_params,
                                       frames[:, :-1], actions, 1, steps)
            quality[f"psnr_k{steps}"] = float(psnr(predicted, frames[:, -1:]))
        quality["psnr_copy_last"] = float(psnr(frames[:, -2:-1], frames[:, -1:]))
        frames, actions = frames[:4], actions[:4]
    horizon = wm.seq_len - cfg.context
    generated = predict_frames(model.tokenizer, model.tokenizer_params, model.dynamics, model.dynamics_params,
                               frames[:, : cfg.context], actions, horizon)
    gif = write_comparison_gif(run_dir / "real_vs_generated.gif", frames[:, cfg.context :], generated)
    result = {"source": cfg.source, "train_seconds": model.train_seconds, **quality, "gif": str(gif),
              "final_dynamics_loss": model.history["dynamics_loss"][-1] if model.history["dynamics_loss"] else None}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
