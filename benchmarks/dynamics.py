"""Dynamics benchmark: generation speed with and without the KV cache, bootstrap-target forms, world-model quality.

Side by side in one run:
1. KV-cached vs uncached generation of 32 frames after a 4-frame context (K = 4), same weights and noise, at the
   default size with a batch of 4 rollouts (the 10x target) and at the debug size with one (frames/s);
2. shortcut-forcing bootstrap targets: batch-folded model calls (what the loss uses) vs `torch.func.vmap` over
   sequences vs a Python loop over sequences;
3. world-model quality: a tokenizer and a dynamics model trained a fixed budget on action-driven moving shapes
   (`d4func.train.shapes_world_model`), next-frame PSNR after decoding at K = 1, 2, 4 on held-out clips, against
   copying the last frame.

    python benchmarks/dynamics.py [--out benchmarks/results/dynamics.json] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from d4func.config import TransformerConfig
from d4func.dynamics import Dynamics, DynamicsConfig
from d4func.functional import apply, count_params, init, template
from d4func.objectives import add_noise, bootstrap_velocity, bootstrap_velocity_vmapped
from d4func.sampler import generate
from d4func.train.dynamics_step import denoiser
from d4func.train.shapes_world_model import ShapesWorldModelConfig, evaluate_next_frame, train_shapes_world_model


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dynamics_model(size: str) -> tuple[DynamicsConfig, Dynamics]:
    """"debug": d_model 128, 4 layers, 12 tokens per frame (1.0M params; RunConfig's built-in dynamics size, not
    debug.yaml's). "default": 4x wider latents and 2x the width and depth (38 tokens per frame, 7.6M params), where
    compute rather than per-call overhead sets the cost of a model call."""
    if size == "debug":
        transformer = TransformerConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, time_every=2)
        latent_tokens, latent_dim, registers = 16, 16, 2
    else:
        transformer = TransformerConfig(d_model=256, n_layers=8, n_heads=8, n_kv_heads=2, time_every=4)
        latent_tokens, latent_dim, registers = 64, 16, 4
    cfg = DynamicsConfig(transformer=transformer, latent_tokens=latent_tokens, latent_dim=latent_dim, pack=2,
                         n_registers=registers, action_dim=2, k_max=64, sampling_steps=4)
    return cfg, template(Dynamics, cfg)


def generation_fns(size: str, batch: int) -> tuple[dict[str, Callable[[], torch.Tensor]], int]:
    """{"cached": ..., "uncached": ...}: each generates 32 frames after a 4-frame context (K = 4) from the same
    weights, context, actions and noise seed, with and without the KV cache; and the model's parameter count."""
    cfg, model = dynamics_model(size)
    params = init(model, 0)
    fn = functools.partial(apply, model, params)
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(batch, 4, cfg.latent_tokens, cfg.latent_dim, generator=gen).tanh()
    actions = torch.rand(batch, 4 + 32, cfg.action_dim, generator=gen) * 2 - 1

    def run(use_cache: bool) -> torch.Tensor:
        with torch.no_grad():
            return generate(fn, context, actions, 32, torch.Generator().manual_seed(1), cfg, use_cache=use_cache)

    return {"cached": lambda: run(True), "uncached": lambda: run(False)}, count_params(params)


def generation_times(size: str, repeats: int, batch: int) -> dict[str, float]:
    """Seconds to generate 32 frames after a 4-frame context (K = 4), with and without the KV cache."""
    fns, n_params = generation_fns(size, batch)
    out = {"params": float(n_params)}
    out["cached"] = timed(fns["cached"], repeats)
    out["uncached"] = timed(fns["uncached"], max(1, repeats // 3))
    out["max_abs_diff"] = (fns["cached"]() - fns["uncached"]()).abs().max().item()
    return out


def bootstrap_target_fns(batch: int = 8, steps: int = 8) -> dict[str, Callable[[], torch.Tensor]]:
    """{"folded", "vmapped", "looped"}: the same shortcut-forcing bootstrap targets (debug-size model, d = 1/4 at
    tau = 1/2 on every frame) from batch-folded model calls, `torch.func.vmap` over sequences, a loop over them."""
    cfg, model = dynamics_model("debug")
    params = init(model, 0)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(batch, steps, cfg.latent_tokens, cfg.latent_dim, generator=gen).tanh()
    d = torch.full((batch, steps), 0.25)
    tau = torch.full((batch, steps), 0.5)
    boot = torch.ones(batch, steps, dtype=torch.bool)
    act = torch.rand(batch, steps, cfg.action_dim, generator=gen) * 2 - 1
    z_tau = add_noise(z, tau, torch.randn(z.shape, generator=gen))

    def folded() -> torch.Tensor:
        return bootstrap_velocity(denoiser(model, params, act), z_tau, tau, d, boot)

    def vmapped() -> torch.Tensor:
        return bootstrap_velocity_vmapped(lambda *a: apply(model, params, *a)[0], z_tau, tau, d, boot, act)

    def looped() -> torch.Tensor:
        return torch.cat([bootstrap_velocity(denoiser(model, params, act[i : i + 1]), z_tau[i : i + 1],
                                             tau[i : i + 1], d[i : i + 1], boot[i : i + 1]) for i in range(batch)])

    return {"folded": folded, "vmapped": vmapped, "looped": looped}


def speed_section(repeats: int, batch: int = 4) -> dict[str, float]:
    # A batch of rollouts, as imagination runs them; batch 1 on a CPU core is dominated by per-call overheads of
    # small matrix products (measured: 9.3x at batch 1, 14.6x at batch 4 for the default size).
    default = generation_times("default", repeats, batch)
    debug = generation_times("debug", repeats, 1)
    targets = bootstrap_target_fns()
    t_folded, t_vmapped, t_looped = (timed(targets[name], repeats) for name in ("folded", "vmapped", "looped"))
    target_diff = (targets["folded"]() - targets["vmapped"]()).abs().max().item()
    return {
        "gen_seconds_cached_32": default["cached"],
        "gen_seconds_uncached_32": default["uncached"],
        "speedup_kv_cache_32": default["uncached"] / default["cached"],
        "cached_vs_uncached_max_abs_diff": default["max_abs_diff"],
        "default_size_params": default["params"],
        "gen_batch_default_size": batch,
        "debug_gen_seconds_cached_32": debug["cached"],
        "debug_gen_seconds_uncached_32": debug["uncached"],
        "debug_speedup_kv_cache_32": debug["uncached"] / debug["cached"],
        "gen_frames_per_s": 32 / debug["cached"],
        "debug_size_params": debug["params"],
        "targets_seconds_folded": t_folded,
        "targets_seconds_vmapped": t_vmapped,
        "targets_seconds_looped": t_looped,
        "speedup_vmap_targets": t_looped / t_vmapped,
        "speedup_folded_over_vmapped_targets": t_vmapped / t_folded,
        "targets_folded_vs_vmapped_max_abs_diff": target_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/dynamics.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1 is fastest for these sizes)")
    parser.add_argument("--gen-batch", type=int, default=4, help="rollouts per generation call, default size")
    parser.add_argument("--quick", action="store_true", help="tiny training budget (smoke test, not a result)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    results = speed_section(args.repeats, args.gen_batch)
    wm_cfg = ShapesWorldModelConfig.quick() if args.quick else ShapesWorldModelConfig()
    world_model = train_shapes_world_model(wm_cfg, progress=True)
    quality = evaluate_next_frame(world_model, wm_cfg, steps_list=(1, 2, 4))
    results.update(quality)
    results.update({"train_seconds": world_model.train_seconds, "total_seconds": time.perf_counter() - start,
                    "quick": args.quick, "torch": torch.__version__, "machine": platform.machine(),
                    "threads": args.threads, "world_model_config": wm_cfg.describe()})

    print(f"\n{'figure':<44} {'value':>12}")
    rows = [
        ("default size: 32 frames, KV cache (s)", "gen_seconds_cached_32"),
        ("default size: 32 frames, no cache (s)", "gen_seconds_uncached_32"),
        ("speedup_kv_cache_32 (target >= 10)", "speedup_kv_cache_32"),
        ("debug size: 32 frames, KV cache (s)", "debug_gen_seconds_cached_32"),
        ("debug size: 32 frames, no cache (s)", "debug_gen_seconds_uncached_32"),
        ("debug size: KV cache speedup", "debug_speedup_kv_cache_32"),
        ("gen_frames_per_s (debug size, K=4, batch 1)", "gen_frames_per_s"),
        ("bootstrap targets, batch-folded (s)", "targets_seconds_folded"),
        ("bootstrap targets, vmap (s)", "targets_seconds_vmapped"),
        ("bootstrap targets, Python loop (s)", "targets_seconds_looped"),
        ("speedup_vmap_targets (loop / vmap)", "speedup_vmap_targets"),
        ("folded over vmap speedup", "speedup_folded_over_vmapped_targets"),
        ("next-frame PSNR, K=1 (dB)", "psnr_k1"),
        ("next-frame PSNR, K=2 (dB)", "psnr_k2"),
        ("next-frame PSNR, K=4 (dB)", "psnr_k4"),
        ("next-frame PSNR, copy last frame (dB)", "psnr_copy_last"),
        ("tokenizer reconstruction PSNR (dB)", "psnr_reconstruction"),
    ]
    for label, key in rows:
        print(f"{label:<44} {results[key]:>12.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
