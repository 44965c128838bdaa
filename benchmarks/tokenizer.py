"""Tokenizer benchmark: reconstruction PSNR on held-out moving-shapes frames after a fixed training budget, side by
side with the same-size bottleneck baseline (downsample each frame to at most as many floats as its latents, then
upsample bicubically), plus encode+decode throughput.

    python benchmarks/tokenizer.py [--steps 2500] [--threads N] [--max-mask-prob 0.0] [--out ...json]

Setting: 64x64 RGB frames, 8x8 patches, 8 latent tokens of width 8, i.e. 64 floats per frame (192x compression), a
small tokenizer (d_model 64, 4 layers each side, time attention every 4th layer). The loss is MSE normalised by its
running RMS (LPIPS off: its ImageNet weights are not shipped). By default the benchmark trains *without* MAE masking:
it measures reconstruction after a few minutes of CPU, and the paper's masking (p ~ U(0, 0.9) per image, a
regulariser for the representation) slows early reconstruction a lot; `--max-mask-prob 0.9` trains as the paper.
Evaluation is always unmasked. Training clips are drawn fresh every step from one seed; held-out clips from another.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from d4func.config import TransformerConfig
from d4func.data.moving_shapes import MovingShapesConfig, moving_shapes_batch
from d4func.functional import count_params, init, template
from d4func.optim import AdamWConfig
from d4func.tokenizer import Tokenizer, TokenizerConfig, autoencode
from d4func.tokenizer_loss import (
    TokenizerLossConfig,
    new_tokenizer_train_state,
    psnr,
    reconstruction_metrics,
    tokenizer_train_step,
)

IMAGE_SIZE = 64
HELD_OUT_SEED = 2_000_003


def benchmark_config(max_mask_prob: float) -> TokenizerConfig:
    block = TransformerConfig(
        d_model=64, n_layers=4, n_heads=2, n_kv_heads=2, mlp_ratio=2.0, time_every=4, logit_cap=None
    )
    return TokenizerConfig(
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        channels=3,
        patch_size=8,
        n_latents=8,
        latent_dim=8,
        max_mask_prob=max_mask_prob,
        encoder=block,
        decoder=block,
    )


def same_floats_size(floats: int, channels: int, height: int, width: int) -> tuple[int, int]:
    """Largest (h, w) with the image's aspect ratio (rounded) such that h * w * channels <= floats."""
    pixels = floats // channels
    if pixels < 1:
        raise ValueError(f"{floats} floats cannot hold one pixel of {channels} channels")
    h = max(1, int(math.sqrt(pixels * height / width)))
    w = max(1, pixels // h)
    return h, min(w, width)


def bicubic_same_floats(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Downsample (antialiased bicubic) to `size`, upsample bicubically back, clamp to [0, 1]."""
    images = rearrange(frames, "b t c h w -> (b t) c h w")
    small = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    up = F.interpolate(small, size=images.shape[-2:], mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    return rearrange(up, "(b t) c h w -> b t c h w", b=frames.shape[0])


@torch.no_grad()
def frames_per_second(model: Tokenizer, params, frames: torch.Tensor, repeats: int = 5) -> float:
    autoencode(model, params, frames)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        autoencode(model, params, frames)
    elapsed = time.perf_counter() - start
    return repeats * frames.shape[0] * frames.shape[1] / elapsed


def run(steps: int, batch: int, seq_len: int, lr: float, held_out_clips: int, seed: int, max_mask_prob: float) -> dict:
    cfg = benchmark_config(max_mask_prob)
    shapes = MovingShapesConfig(image_size=IMAGE_SIZE)
    model = template(Tokenizer, cfg)
    state = new_tokenizer_train_state(init(model, seed), with_ema=False)
    loss_cfg = TokenizerLossConfig(lpips_weight=0.0, mask=max_mask_prob > 0)
    optim = AdamWConfig(lr=lr)
    held_out, _ = moving_shapes_batch(shapes, held_out_clips, seq_len, HELD_OUT_SEED)
    data_gen = torch.Generator().manual_seed(seed)
    mask_gen = torch.Generator().manual_seed(seed + 1)

    start = time.perf_counter()
    for step in range(1, steps + 1):
        frames, _ = moving_shapes_batch(shapes, batch, seq_len, data_gen)
        state, metrics = tokenizer_train_step(state, frames, mask_gen, template=model, cfg=loss_cfg, optim=optim)
        if step % max(1, steps // 10) == 0:
            held, _ = reconstruction_metrics(model, state["params"], held_out)
            print(
                f"  step {step:5d}  {time.perf_counter() - start:6.1f}s  train psnr "
                f"{float(metrics['psnr']):5.2f}  held-out psnr {float(held['psnr']):5.2f}",
                flush=True,
            )
    train_seconds = time.perf_counter() - start

    held, _ = reconstruction_metrics(model, state["params"], held_out)
    latent_floats = cfg.n_latents * cfg.latent_dim
    small = same_floats_size(latent_floats, cfg.channels, cfg.height, cfg.width)
    bicubic = bicubic_same_floats(held_out, small)
    mean_frame = held_out.mean(dim=(0, 1), keepdim=True).expand_as(held_out)
    return {
        "psnr_tokenizer": float(held["psnr"]),
        "psnr_bicubic_same_floats": float(psnr(bicubic, held_out)),
        "psnr_mean_frame": float(psnr(mean_frame, held_out)),
        "frames_per_s": frames_per_second(model, state["params"], held_out),
        "latent_floats_per_frame": latent_floats,
        "bicubic_floats_per_frame": small[0] * small[1] * cfg.channels,
        "bicubic_size": list(small),
        "compression_ratio": cfg.compression_ratio,
        "image_size": [cfg.channels, cfg.height, cfg.width],
        "params": count_params(state["params"]),
        "train_steps": steps,
        "train_frames_per_step": batch * seq_len,
        "train_seconds": train_seconds,
        "held_out_frames": held_out_clips * seq_len,
        "lr": lr,
        "mae_max_mask_prob": cfg.max_mask_prob,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2500, help="training steps (the fixed budget)")
    parser.add_argument("--batch", type=int, default=8, help="clips per step")
    parser.add_argument("--seq-len", type=int, default=2, help="frames per clip")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--held-out-clips", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-mask-prob", type=float, default=0.0, help="MAE: 0 off, 0.9 as in the paper")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/tokenizer.json")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(f"training the tokenizer for {args.steps} steps on {IMAGE_SIZE}x{IMAGE_SIZE} moving shapes ...")
    result = run(args.steps, args.batch, args.seq_len, args.lr, args.held_out_clips, args.seed, args.max_mask_prob)
    h, w = result["bicubic_size"]
    rows = [
        ("method", "floats/frame", "held-out PSNR (dB)"),
        ("causal tokenizer (tanh latents)", str(result["latent_floats_per_frame"]), f"{result['psnr_tokenizer']:.2f}"),
        (f"bicubic via {h}x{w}", str(result["bicubic_floats_per_frame"]), f"{result['psnr_bicubic_same_floats']:.2f}"),
        ("mean frame (chance)", "0", f"{result['psnr_mean_frame']:.2f}"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(
        f"encode+decode: {result['frames_per_s']:.0f} frames/s ({result['threads']} threads); "
        f"training {result['train_seconds']:.0f}s; compression {result['compression_ratio']:.0f}x"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
