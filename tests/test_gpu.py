"""The GPU path computes what the CPU path does: float32 on the device against CPU, bf16 with fused attention only
(flash / memory-efficient / cuDNN SDPA kernels, the math fallback forbidden), KV-cached generation, torch.compile,
and a short `d4func train` on the device with every precision flag on.

Skipped without CUDA (CI has none); `benchmarks/gpu_session.sh` runs them on a lent GPU. To check the tests
themselves on a machine without one, run the same code on CPU: `D4FUNC_TEST_DEVICE=cpu python -m pytest
tests/test_gpu.py` (there the device-vs-CPU comparisons are trivially equal, every other assertion still bites).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.benchmark_scripts import load_run_all

from d4func.config import TransformerConfig
from d4func.dynamics import Dynamics, DynamicsConfig
from d4func.functional import apply, init, template
from d4func.sampler import generate
from d4func.tokenizer import encode
from d4func.train.phases import build_models, gradient_step, init_states
from d4func.train.precision import wrap_step
from d4func.train.run_config import load_run_config
from d4func.train.run_logs import read_metrics

DEVICE = torch.device(os.environ.get("D4FUNC_TEST_DEVICE", "cuda"))
REPO = Path(__file__).parents[1]
HELPERS = Path(__file__).parent / "helpers"
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")

# No soft cap anywhere, so that every attention goes through SDPA (a capped logit needs the explicit path).
UNCAPPED = ["tokenizer.encoder.logit_cap=null", "tokenizer.decoder.logit_cap=null",
            "dynamics.transformer.logit_cap=null"]


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """TF32 matmuls (on by default for cuDNN) would loosen the float32 device-vs-CPU comparisons to ~1e-3."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _dynamics() -> tuple[Dynamics, DynamicsConfig]:
    # GQA (4 query heads over 2 K/V heads), head size 16 (flash needs a multiple of 8), no logit cap.
    tcfg = TransformerConfig(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, time_every=2, logit_cap=None)
    cfg = DynamicsConfig(transformer=tcfg, latent_tokens=8, latent_dim=8, pack=2, n_registers=2, action_dim=2,
                         k_max=8, sampling_steps=4)
    return template(Dynamics, cfg), cfg


def _debug_config(tmp_path: Path, *overrides: str):
    return load_run_config(str(REPO / "experiments/configs/debug.yaml"),
                           [f"run_dir={tmp_path}", f"device={DEVICE}", *UNCAPPED, *overrides])


def _replay_shaped_batch(cfg, seed: int) -> dict[str, torch.Tensor]:
    """The benchmarks' random replay-shaped batch (`run_all.random_replay_batch`), on the device."""
    batch = load_run_all().random_replay_batch(cfg, torch.Generator().manual_seed(seed))
    return {key: value.to(DEVICE) for key, value in batch.items()}


def test_float32_forwards_on_the_device_match_cpu(tmp_path) -> None:
    model, cfg = _dynamics()
    params = init(model, 0)
    gen = torch.Generator().manual_seed(0)
    z = torch.rand(2, 6, cfg.latent_tokens, cfg.latent_dim, generator=gen) * 2 - 1
    tau, d = torch.rand(2, 6, generator=gen), torch.full((2, 6), 0.25)
    actions = torch.rand(2, 6, 2, generator=gen) * 2 - 1
    on_cpu = apply(model, params, z, tau, d, actions)
    on_device = apply(model, params.to(DEVICE), *(x.to(DEVICE) for x in (z, tau, d, actions)))
    assert on_device[0].device.type == DEVICE.type
    for cpu_out, device_out in zip(on_cpu, on_device, strict=True):  # None where the model has no such output
        if cpu_out is not None:
            torch.testing.assert_close(device_out.cpu(), cpu_out, rtol=1e-4, atol=1e-4)

    run = _debug_config(tmp_path)
    models = build_models(run)
    tok_params = init_states(run, models)["tokenizer"]["params"]
    frames = _replay_shaped_batch(run, 1)["frames"]
    torch.testing.assert_close(encode(models.tokenizer, tok_params.to(DEVICE), frames).cpu(),
                               encode(models.tokenizer, tok_params, frames.cpu()), rtol=1e-4, atol=1e-4)


def test_bf16_fused_attention_gradient_step_tracks_float32(tmp_path) -> None:
    """All three phases (tokenizer, world model, imagination) in one loop `gradient_step` under bf16 autocast with
    SDPA's math fallback forbidden: every attention then runs a fused kernel or raises. Losses stay within a few
    percent of the float32 step's, and params stay float32."""
    exact = _debug_config(tmp_path)
    fast = _debug_config(tmp_path, "precision.bf16=true", "precision.fused_attention_only=true")
    models = build_models(exact)
    batch = _replay_shaped_batch(exact, 2)
    results = {}
    for name, cfg in (("float32", exact), ("bf16", fast)):
        states = {key: state.to(DEVICE) for key, state in init_states(cfg, models).items()}
        step = wrap_step(gradient_step, cfg.precision, DEVICE)
        gen = torch.Generator(device=DEVICE).manual_seed(3)
        for i in range(2):  # the second step runs the imagination phase on a trained world model too
            states, metrics = step(cfg, models, states, batch, gen, i, agent_active=True)
        results[name] = (states, metrics)
    states, metrics = results["bf16"]
    reference = results["float32"][1]
    for key in ("tokenizer/loss", "world_model/loss", "agent/loss"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), (key, metrics.get(key))
    for key in ("tokenizer/loss", "world_model/loss"):
        assert metrics[key] == pytest.approx(reference[key], rel=0.05, abs=1e-3), key
    for phase in ("tokenizer", "world_model", "agent"):
        leaves = states[phase]["params"].values(include_nested=True, leaves_only=True)
        assert all(leaf.dtype == torch.float32 and leaf.device.type == DEVICE.type for leaf in leaves), phase


def test_kv_cached_generation_matches_uncached_on_the_device() -> None:
    model, cfg = _dynamics()
    params = init(model, 0).to(DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    context = torch.rand(2, 3, cfg.latent_tokens, cfg.latent_dim, device=DEVICE, generator=gen) * 2 - 1
    actions = torch.rand(2, 3 + 8, 2, device=DEVICE, generator=gen) * 2 - 1

    def model_fn(*args, **kwargs):
        return apply(model, params, *args, **kwargs)

    with torch.no_grad():
        frames = {cached: generate(model_fn, context, actions, 8, torch.Generator(device=DEVICE).manual_seed(5), cfg,
                                   use_cache=cached) for cached in (True, False)}
    assert frames[True].shape == (2, 8, cfg.latent_tokens, cfg.latent_dim)
    torch.testing.assert_close(frames[True], frames[False], rtol=1e-4, atol=1e-4)


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`command` with a time limit that fits the caller's (`D4FUNC_GPU_TEST_TIMEOUT` seconds, default 600); a run
    that outlasts it fails this test with the end of its output, so pytest still reaches its summary."""
    limit = float(os.environ.get("D4FUNC_GPU_TEST_TIMEOUT", "600"))
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=limit, **kwargs)
    except subprocess.TimeoutExpired as error:
        tail = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                       for x in (error.stdout, error.stderr))[-4000:]
        pytest.fail(f"{command[1:4]} ran past {limit:g} s (D4FUNC_GPU_TEST_TIMEOUT); its output ended:\n{tail}")


def test_compiled_dynamics_loss_matches_eager_on_the_device() -> None:
    """The world-model loss and gradient compiled as `precision.compile=true` compiles them. In a subprocess:
    compiling loads triton, which must not share a process with EGL rendering (precision.py)."""
    result = _run([sys.executable, str(HELPERS / "compile_check.py"), "dynamics_loss", str(DEVICE)],
                  env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-4000:]


def test_d4func_train_on_the_device_with_every_precision_flag(tmp_path) -> None:
    """The online loop on Reach (no renderer needed) with the learner on the device: bf16, fused attention only and
    torch.compile. Acting and GIFs run on CPU copies of the params; evaluation and the checkpoint must come out."""
    overrides = [f"run_dir={tmp_path}", f"device={DEVICE}", "loop.mode=online", "loop.env_steps=120",
                 "loop.prefill_steps=48", "loop.collect_steps=24", "loop.train_ratio=0.25", "loop.agent_start=72",
                 "loop.eval_every=120", "loop.checkpoint_every=120", "loop.gif_every=120", "env.eval_episodes=2",
                 *UNCAPPED, "precision.bf16=true", "precision.fused_attention_only=true",
                 "precision.compile=true"]
    result = _run([sys.executable, "-m", "d4func.cli", "train", "--config",
                   str(REPO / "experiments/configs/reach.yaml"), *overrides], cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["env_steps"] == 120 and summary["grad_steps"] > 0, summary
    rows = read_metrics(tmp_path)
    losses = [row[key] for row in rows for key in ("tokenizer/loss", "world_model/loss", "agent/loss") if key in row]
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-000000000120.pt"]
