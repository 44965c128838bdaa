"""Every d4func speed and memory figure side by side, in one run: one table on stdout, one JSON file.

    python benchmarks/run_all.py [--quick] [--threads 1] [--only functional,phases_debug] [--out FILE]

Sections (benchmarks/README.md explains each figure):
  functional          forward + backward of one transformer: functional `apply` vs a stateful nn.Module
  kv_cache            32 generated frames (K = 4) with vs without the time layers' KV cache
  bootstrap_targets   shortcut-forcing bootstrap targets: batch-folded vs `torch.func.vmap` vs a Python loop
  phases_CONFIG       gradient steps/s of the tokenizer, world-model and imagination steps, and of the loop's
                      whole `gradient_step`, at the debug and the default (dmc_cartpole) run configs
  acting_CONFIG       raw env steps/s (DMControl, rendered) vs acting-policy calls/s vs both in a TorchRL Collector
  online_CONFIG       env steps/s of the online loop `train_online` in its steady state (start-up excluded)
  replay              the memmapped replay with each frame stored once vs next frames stored per transition:
                      disk bytes per transition, write and sample rates; writes through a wrapping ring with
                      the overwrite journal on vs off
  gpu_paper_scale     CUDA only: tokens/s and model FLOP utilisation of a world-model train step, generated
                      frames/s, at a paper-like size (skipped without a GPU)
  gpu_compiled        CUDA only: that train step eager vs torch.compile'd (`precision.compile`), and the compile time
  cpu_compiled        the same comparison on the CPU (inductor's C++ code), at the size docs/results.md trains

Each section runs in a fresh subprocess, so one section's allocations and thread pools cannot colour another's and
each reports its process's peak RSS; inside a section the variants are timed interleaved (A, B, A, B, ...) so that
load from other processes hits them alike. `--quick` runs every section at tiny sizes in one subprocess (`cpu_compiled`
in one of its own: compiling loads triton, kept out of processes that render with EGL): a smoke test of the code
paths, not a result. Results: `benchmarks/results/run_all.json` (`run_all_quick.json` for
`--quick`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tensordict import TensorDict

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CONFIGS = {"debug": REPO / "experiments/configs/debug.yaml", "default": REPO / "experiments/configs/dmc_cartpole.yaml"}
SECTION_NAMES = ("functional", "kv_cache", "bootstrap_targets", "phases_debug", "phases_default", "acting_debug",
                 "acting_default", "online_debug", "online_default", "replay", "gpu_paper_scale", "gpu_compiled",
                 "cpu_compiled")
# Dense bf16 peak of the GPUs we know (vendor spec sheets, SXM parts); anything else needs --peak-tflops for MFU.
# Dense bf16 peaks by device name; the most specific name that the device's contains wins (an "H100 PCIe" is not
# an SXM H100).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H200": 989e12, "H100": 989e12,
                   "A100": 312e12}
SELF_FORCING_SHARE = 0.5  # the share of rows `phases_*` self-forces in its costed world-model step (results.md, §2)
NO_EPISODE_WORK = 10**9  # eval / GIF / checkpoint period longer than any benchmark run


def load_sibling(name: str) -> ModuleType:
    """A benchmark script next to this one as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"d4func_benchmarks_{name}", BENCH_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None, f"missing benchmarks/{name}.py"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---- budgets -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    functional: tuple[int, int, int, int]  # d_model, layers, batch, steps (functional_overhead.py's defaults)
    functional_repeats: int
    generation: tuple[str, int]  # benchmarks/dynamics.py model size and batch for speedup_kv_cache_32
    generation_repeats: int  # cached; uncached runs max(1, repeats // 3) times (as dynamics.py)
    target_repeats: int
    phase_repeats: int
    phase_overrides: dict[str, tuple[str, ...]]  # per config, on top of its YAML
    env_steps_per_call: int  # raw env rollout length and Collector batch, per timed call
    policy_calls_per_call: int
    acting_repeats: int
    online_steps: dict[str, tuple[int, int]]  # per config: (short, long) env-step budgets; rate from the difference
    online_overrides: dict[str, tuple[str, ...]]
    replay: tuple[int, int, int]  # transitions written, episode length, frame size (3 x size x size)
    replay_repeats: int


FULL = Budget(
    functional=(256, 4, 4, 8), functional_repeats=15,
    generation=("default", 4), generation_repeats=3, target_repeats=5, phase_repeats=5,
    phase_overrides={"debug": (), "default": ()},
    env_steps_per_call=50, policy_calls_per_call=50, acting_repeats=3,
    # Both budgets end after agent_start, so the difference is the steady state with every phase training.
    online_steps={"debug": (200, 400), "default": (200, 400)},
    online_overrides={"debug": (), "default": ("loop.prefill_steps=100", "loop.agent_start=100")},
    # cartpole at the main demo's action repeat 4: 250-step episodes of 64x64 frames
    replay=(5000, 250, 64), replay_repeats=3,
)
QUICK = Budget(
    functional=(32, 2, 2, 4), functional_repeats=2,
    generation=("debug", 1), generation_repeats=1, target_repeats=1, phase_repeats=1,
    phase_overrides={"debug": (), "default": ("replay.batch_size=2", "replay.seq_len=4", "replay.context_len=2",
                                              "imagination.horizon=2")},
    env_steps_per_call=10, policy_calls_per_call=5, acting_repeats=1,
    # A window of four collect rounds (~3 s on the debug config): one round (~0.8 s) is within the timing noise of
    # a loaded machine, and once measured the long run as no slower than the short one (a NaN rate).
    online_steps={"debug": (30, 150), "default": (30, 150)},
    online_overrides={name: ("loop.collect_steps=30", "loop.prefill_steps=30", "loop.agent_start=30",
                             "replay.seq_len=4", "replay.context_len=2", "imagination.horizon=2")
                      for name in CONFIGS},
    replay=(200, 50, 32), replay_repeats=1,
)


@dataclass(frozen=True)
class Context:
    budget: Budget
    threads: int
    peak_flops: float | None


# ---- measuring -----------------------------------------------------------------------------------------------------
def _proc_status_mib(key: str) -> float:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return int(match.group(1)) / 1024


class PeakMemory:
    """Peak memory of one call above what was in use when it started, in MiB (None where it cannot be measured).

    CUDA: the caching allocator's statistics (`reset_peak_memory_stats`, `max_memory_allocated`).
    CPU (Linux): the kernel's resident-set high-water mark `VmHWM`, reset to the current RSS by writing "5" to
    /proc/self/clear_refs (Linux >= 4.0). Freed heap is first handed back to the OS with glibc's `malloc_trim`, so
    memory an earlier call freed but kept resident cannot hide this call's allocations. `tracemalloc` would not see
    torch's allocations, and `ru_maxrss` never decreases, so it can only give a whole process's peak.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.base = 0.0
        self.available = True
        self._trim: Callable[[int], int] | None = None
        if self.device.type == "cpu":
            try:
                Path("/proc/self/clear_refs").write_text("5")
                _proc_status_mib("VmHWM")
            except (OSError, RuntimeError):
                self.available = False
            try:
                self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                self._trim = None

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated above the allocation at call start"
        if self.available:
            return "VmHWM reset via /proc/self/clear_refs, above VmRSS at call start (after malloc_trim)"
        return "unavailable (no /proc/self/clear_refs)"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        elif self.available:
            if self._trim is not None:
                self._trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _proc_status_mib("VmRSS")

    def stop(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        if not self.available:
            return None
        return max(0.0, _proc_status_mib("VmHWM") - self.base)


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    output: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def measure(
    fns: dict[str, Callable[[], Any]],
    repeats: int | dict[str, int],
    device: torch.device | str = "cpu",
    no_warmup: Collection[str] = (),
) -> dict[str, Timing]:
    """Time `fns` side by side: one untimed warm-up call each (except `no_warmup`), then rounds in which every fn
    with repeats left runs once, in order. Each fn's latest output is kept.

    Peak memory is taken on each fn's first call only: the warm-up, or for a `no_warmup` fn its first timed call.
    First calls allocate lazily initialised buffers too, so they hold the peak. Later calls run unmetered: the CPU
    meter hands freed heap back to the OS first (`malloc_trim`), and a timed call after it would pay for faulting
    that memory back in (a third more time on the functional section's functorch variant, measured)."""
    counts = repeats if isinstance(repeats, dict) else dict.fromkeys(fns, repeats)
    if set(counts) != set(fns) or min(counts.values()) < 1:
        raise ValueError(f"repeats must give every fn ({sorted(fns)}) at least 1 timed call, got {counts}")
    meter = PeakMemory(device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda *_: None)
    results = {name: Timing() for name in fns}

    def call(name: str, timed: bool, metered: bool) -> None:
        record = results[name]
        record.output = None  # the previous output must not count as this call's baseline
        if metered:
            meter.start()
        start = time.perf_counter()
        record.output = fns[name]()
        sync(device)
        elapsed = time.perf_counter() - start
        if metered:
            record.peak_mib = meter.stop()
        if timed:
            record.seconds.append(elapsed)

    for name in fns:
        if name not in no_warmup:
            call(name, timed=False, metered=True)
    for round_index in range(max(counts.values())):
        for name in fns:
            if round_index < counts[name]:
                call(name, timed=True, metered=round_index == 0 and name in no_warmup)
    return results


@dataclass
class Row:
    what: str
    value: float | None
    unit: str
    peak_mib: float | None = None
    note: str = ""


def section(rows: list[Row], figures: dict[str, Any], setting: dict[str, Any]) -> dict[str, Any]:
    return {"rows": [dataclasses.asdict(row) for row in rows], "figures": figures, "setting": setting}


# ---- sections ------------------------------------------------------------------------------------------------------
def functional_section(ctx: Context) -> dict[str, Any]:
    bench = load_sibling("functional_overhead")
    cases, info = bench.forward_backward_cases(*ctx.budget.functional)
    names = bench.CASE_NAMES
    t = measure(cases, ctx.budget.functional_repeats)
    ms = [t[name].median * 1e3 for name in names]
    figures = {
        "ratio_functional_over_stateful": ms[0] / ms[1],
        "ratio_functorch_grad_over_stateful": ms[2] / ms[1],
        "median_ms_functional": ms[0], "median_ms_stateful": ms[1], "median_ms_functorch_grad": ms[2],
    }
    rows = [Row(f"fwd+bwd, {name}", value, "ms", t[name].peak_mib) for name, value in zip(names, ms, strict=True)]
    rows += [Row("ratio functional / stateful", figures["ratio_functional_over_stateful"], "x", note="target <= 1.03"),
             Row("ratio torch.func.grad_and_value / stateful", figures["ratio_functorch_grad_over_stateful"], "x")]
    return section(rows, figures, {**info, "repeats": ctx.budget.functional_repeats})


def kv_cache_section(ctx: Context) -> dict[str, Any]:
    bench = load_sibling("dynamics")
    figures: dict[str, Any] = {}
    rows: list[Row] = []
    size, batch = ctx.budget.generation
    repeats = ctx.budget.generation_repeats
    measured: dict[tuple[str, int], tuple[dict[str, Timing], int]] = {}
    for prefix, (gen_size, gen_batch) in (("", (size, batch)), ("debug_", ("debug", 1))):
        new = (gen_size, gen_batch) not in measured  # --quick measures the debug size once for both
        if new:
            fns, n_params = bench.generation_fns(gen_size, gen_batch)
            # The uncached run skips its warm-up: the cached warm-up already ran the same model and kernels, and at
            # the default size one uncached call takes minutes on a CPU core.
            timings = measure(fns, {"cached": repeats, "uncached": max(1, repeats // 3)}, no_warmup=("uncached",))
            measured[gen_size, gen_batch] = timings, n_params
        t, n_params = measured[gen_size, gen_batch]
        cached, uncached = t["cached"].median, t["uncached"].median
        figures.update({f"{prefix}gen_seconds_cached_32": cached, f"{prefix}gen_seconds_uncached_32": uncached,
                        f"{prefix}speedup_kv_cache_32": uncached / cached, f"{prefix}size_params": n_params})
        label = f"{gen_size} size ({n_params / 1e6:.1f}M params), batch {gen_batch}"
        if new:
            rows += [Row(f"32 frames, KV cache, {label}", cached, "s", t["cached"].peak_mib),
                     Row(f"32 frames, no cache, {label}", uncached, "s", t["uncached"].peak_mib),
                     Row(f"KV-cache speedup, {label}", uncached / cached, "x",
                         note="target >= 10" if gen_size == "default" else "")]
        if not prefix:
            diff = (t["cached"].output - t["uncached"].output).abs().max().item()
            figures.update({"cached_vs_uncached_max_abs_diff": diff, "gen_size": gen_size, "gen_batch": gen_batch})
        else:
            figures["gen_frames_per_s"] = 32 / cached
            rows.append(Row("generated frames/s, debug size, batch 1, K=4", 32 / cached, "frames/s"))
    return section(rows, figures, {"frames": 32, "context": 4, "sampling_steps": 4, "repeats": repeats})


def bootstrap_targets_section(ctx: Context) -> dict[str, Any]:
    bench = load_sibling("dynamics")
    fns = bench.bootstrap_target_fns()
    t = measure(fns, ctx.budget.target_repeats)
    folded, vmapped, looped = (t[name].median for name in ("folded", "vmapped", "looped"))
    figures = {
        "targets_seconds_folded": folded, "targets_seconds_vmapped": vmapped, "targets_seconds_looped": looped,
        "speedup_vmap_targets": looped / vmapped, "speedup_folded_over_vmapped_targets": vmapped / folded,
        "targets_folded_vs_vmapped_max_abs_diff": (t["folded"].output - t["vmapped"].output).abs().max().item(),
    }
    labels = {"folded": "batch-folded model calls (the loss's)", "vmapped": "torch.func.vmap over sequences",
              "looped": "Python loop over sequences"}
    rows = [Row(f"targets, {labels[name]}", t[name].median * 1e3, "ms", t[name].peak_mib) for name in labels]
    rows += [Row("speedup vmap over loop", looped / vmapped, "x"),
             Row("speedup folded over vmap", vmapped / folded, "x")]
    return section(rows, figures, {"batch": 8, "steps": 8, "model": "dynamics.py debug size",
                                   "repeats": ctx.budget.target_repeats})


def load_config(name: str, overrides: Collection[str] = ()):
    from d4func.train.run_config import load_run_config

    return load_run_config(str(CONFIGS[name]), list(overrides))


def random_replay_batch(cfg, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A replay-shaped batch [B, T] as `phases.replay_batch` returns it: frames in [0, 1], actions in the action
    space, rewards, and no episode end inside the rows; with `replay.final_frame`, T = seq_len + 1 frames, the
    last taking no action."""
    b, t = cfg.replay.batch_size, cfg.replay.row_frames
    tok = cfg.tokenizer
    cameras = (tok.n_cameras,) if tok.n_cameras > 1 else ()
    frames = torch.rand(b, t, *cameras, tok.channels, tok.height, tok.width, generator=generator)
    if cfg.dynamics.n_actions:
        actions = torch.randint(0, cfg.dynamics.n_actions, (b, t), generator=generator)
    else:
        actions = torch.rand(b, t, cfg.dynamics.action_dim, generator=generator) * 2 - 1
    batch = {"frames": frames, "actions": actions, "rewards": torch.randn(b, t, generator=generator),
             "is_last": torch.zeros(b, t, dtype=torch.bool)}
    if cfg.replay.final_frame:
        batch["action_valid"] = (torch.arange(t) < t - 1).expand(b, t).clone()  # the appended frame acts not
    return batch


def phases_section(config: str, ctx: Context) -> dict[str, Any]:
    from d4func.functional import count_params
    from d4func.tokenizer import encode
    from d4func.tokenizer_loss import tokenizer_train_step
    from d4func.train.agent_step import agent_finetune_step, imagination_step, new_imagination_state
    from d4func.train.phases import build_models, gradient_step, init_states, refresh_agent_frozen, world_model_batch

    overrides = ctx.budget.phase_overrides[config]
    cfg = load_config(config, overrides)
    models = build_models(cfg)
    states = init_states(cfg, models)
    generator = torch.Generator().manual_seed(0)
    batch = random_replay_batch(cfg, generator)
    with torch.no_grad():
        latents = encode(models.tokenizer, states["tokenizer"]["params"], batch["frames"])
    context = cfg.replay.context_len
    wm_batch = world_model_batch(latents, batch)
    im_batch = {"latents": latents[:, :context], "actions": batch["actions"][:, :context]}
    states["agent"] = new_imagination_state(states["world_model"]["params"])
    loop_states = dict(states)
    grad_step = [0]

    # Each step feeds its new state to the next call, as the loop does (states evolve; shapes do not).
    def tokenizer_step() -> None:
        states["tokenizer"], _ = tokenizer_train_step(states["tokenizer"], batch["frames"], generator,
                                                      template=models.tokenizer, cfg=cfg.tokenizer_loss,
                                                      optim=cfg.optim.tokenizer, ema_decay=cfg.optim.ema_decay)

    def world_model_step() -> None:
        states["world_model"], _ = agent_finetune_step(states["world_model"], wm_batch, generator,
                                                       model=models.dynamics, heads=models.heads,
                                                       opt=cfg.optim.world_model, cfg=cfg.finetune,
                                                       ema_decay=cfg.optim.ema_decay)

    # What `dynamics.self_forcing` costs: it needs teacher forcing, so both sides of this pair train a teacher-forced
    # world model of the same size (parameters do not depend on the forcing), from the same starting params, one
    # without and one with half the rows' last history frame first rolled out by the model's own sampler.
    teacher_cfg = load_config(config, [*overrides, "dynamics.forcing=teacher", "dynamics.clean_context_fraction=0.0",
                                       f"dynamics.self_forcing={SELF_FORCING_SHARE}"])
    teacher_models = build_models(teacher_cfg)
    teacher_states = {share: states["world_model"].clone() for share in (0.0, SELF_FORCING_SHARE)}

    def teacher_world_model_step(share: float) -> None:
        teacher_states[share], _ = agent_finetune_step(teacher_states[share], wm_batch, generator,
                                                       model=teacher_models.dynamics, heads=teacher_models.heads,
                                                       opt=cfg.optim.world_model, cfg=cfg.finetune,
                                                       ema_decay=cfg.optim.ema_decay, self_forcing=share)

    def imagination() -> None:
        agent = refresh_agent_frozen(states["agent"], states["world_model"])
        states["agent"], _ = imagination_step(agent, im_batch, generator, model=models.dynamics,
                                              heads=models.heads, opt=cfg.optim.agent, cfg=cfg.imagination,
                                              window=cfg.replay.row_frames)

    def whole_step() -> None:
        nonlocal loop_states
        loop_states, _ = gradient_step(cfg, models, loop_states, batch, generator, grad_step[0], agent_active=True)
        grad_step[0] += 1

    fns = {"tokenizer": tokenizer_step, "world_model": world_model_step,
           "world_model_teacher": lambda: teacher_world_model_step(0.0),
           "world_model_self_forcing": lambda: teacher_world_model_step(SELF_FORCING_SHARE), "imagination": imagination,
           "all_phases": whole_step}
    t = measure(fns, ctx.budget.phase_repeats)
    autoencode = measure({"autoencode": lambda: load_sibling("tokenizer").frames_per_second(
        models.tokenizer, states["tokenizer"]["params"], batch["frames"])}, 1, no_warmup=("autoencode",))["autoencode"]
    labels = {
        "tokenizer": "tokenizer step (tokenizer_train_step)",
        "world_model": "world-model step (agent_finetune_step)",
        "world_model_teacher": "world-model step, dynamics.forcing=teacher",
        "world_model_self_forcing": f"world-model step, forcing=teacher self_forcing={SELF_FORCING_SHARE}",
        "imagination": f"imagination step (imagination_step, H={cfg.imagination.horizon})",
        "all_phases": "loop gradient_step (all 3 + encode)",
    }
    figures = {f"{name}_steps_per_s": 1 / t[name].median for name in fns}
    figures["tokenizer_autoencode_frames_per_s"] = autoencode.output
    figures["self_forcing_cost"] = t["world_model_self_forcing"].median / t["world_model_teacher"].median
    b, tt = cfg.replay.batch_size, cfg.replay.row_frames
    rows = [Row(label, 1 / t[name].median, "steps/s", t[name].peak_mib) for name, label in labels.items()]
    rows.append(Row("tokenizer encode+decode, no grad", autoencode.output, "frames/s", autoencode.peak_mib))
    rows.append(Row("self-forcing cost, teacher-forced wm step, with / without", figures["self_forcing_cost"], "x"))
    params = {"tokenizer": count_params(states["tokenizer"]["params"]),
              "world_model": count_params(states["world_model"]["params"]),
              "agent_trained": count_params(states["agent"]["params"])}
    rows[0].note = (f"B={b} T={tt} {cfg.tokenizer.height}px; params tok {params['tokenizer'] / 1e6:.2f}M, "
                    f"wm {params['world_model'] / 1e6:.2f}M")
    return section(rows, figures, {"config": str(CONFIGS[config].relative_to(REPO)), "overrides": list(overrides),
                                   "batch": b, "seq_len": cfg.replay.seq_len, "row_frames": tt, "params": params,
                                   "repeats": ctx.budget.phase_repeats})


def acting_section(config: str, ctx: Context) -> dict[str, Any]:
    from torchrl.collectors import Collector

    from d4func.envs.registry import make_env
    from d4func.train.acting import WorldModelPolicy, agent_params_from_states
    from d4func.train.phases import build_models, init_states

    cfg = load_config(config)
    n_steps, n_calls = ctx.budget.env_steps_per_call, ctx.budget.policy_calls_per_call

    def env():
        return make_env(cfg.env.name, seed=cfg.seed, image_size=cfg.env.image_size,
                        action_repeat=cfg.env.action_repeat)

    raw_env, collector_env = env(), env()
    models = build_models(cfg)
    states = init_states(cfg, models)

    def policy() -> WorldModelPolicy:  # random weights: the cost of acting does not depend on their values
        module = WorldModelPolicy(models.tokenizer, models.dynamics, models.heads, raw_env.action_spec,
                                  context=cfg.replay.row_frames, seed=cfg.seed)
        module.update_params(states["tokenizer"]["params"], agent_params_from_states(states["world_model"], None))
        return module

    acting = policy()
    observations = raw_env.rollout(n_calls, break_when_any_done=False)
    inputs = [TensorDict({"pixels": observations[i]["pixels"], "is_init": observations[i]["is_init"]}, [])
              for i in range(n_calls)]
    collector = Collector(collector_env, policy(), frames_per_batch=n_steps, total_frames=-1)
    batches = iter(collector)

    def act() -> None:
        for td in inputs:
            acting(td.clone())

    fns = {"raw_env": lambda: raw_env.rollout(n_steps, break_when_any_done=False), "policy": act,
           "collector": lambda: next(batches)}
    try:
        t = measure(fns, ctx.budget.acting_repeats)
    finally:
        collector.shutdown()
    raw, pol, both = n_steps / t["raw_env"].median, n_calls / t["policy"].median, n_steps / t["collector"].median
    figures = {"raw_env_steps_per_s": raw, "policy_calls_per_s": pol, "collector_steps_per_s": both,
               "serial_prediction_steps_per_s": 1 / (1 / raw + 1 / pol)}
    px = cfg.env.image_size
    rows = [
        Row(f"raw env step ({cfg.env.name}, {px}x{px}, repeat {cfg.env.action_repeat})", raw, "steps/s",
            t["raw_env"].peak_mib, "random actions, TorchRL transforms"),
        Row("acting policy call (encode + commit + policy)", pol, "calls/s", t["policy"].peak_mib, "1 env"),
        Row("Collector: env + acting policy", both, "steps/s", t["collector"].peak_mib,
            f"1/(1/env+1/policy) = {figures['serial_prediction_steps_per_s']:.1f}"),
    ]
    return section(rows, figures, {"config": str(CONFIGS[config].relative_to(REPO)), "env": cfg.env.name,
                                   "steps_per_call": n_steps, "policy_calls_per_call": n_calls,
                                   "repeats": ctx.budget.acting_repeats})


@contextlib.contextmanager
def timed_env_construction() -> Iterator[list[float]]:
    """Within the block, every `d4func.envs.registry.make_env` call (the loop imports it when it runs) appends its
    seconds to the yielded list."""
    from d4func.envs import registry

    make_env, seconds = registry.make_env, []

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return make_env(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    registry.make_env = timed
    try:
        yield seconds
    finally:
        registry.make_env = make_env


def online_section(config: str, ctx: Context) -> dict[str, Any]:
    from d4func.envs.registry import make_env
    from d4func.train.loop import train_online

    short, long = ctx.budget.online_steps[config]
    overrides = [f"loop.threads={ctx.threads}", "env.eval_episodes=0", f"loop.eval_every={NO_EPISODE_WORK}",
                 f"loop.gif_every={NO_EPISODE_WORK}", f"loop.checkpoint_every={NO_EPISODE_WORK}",
                 "replay.capacity=2000", *ctx.budget.online_overrides[config]]
    cfg = load_config(config, overrides)
    make_env(cfg.env.name, image_size=cfg.env.image_size).reset()  # one-off EGL set-up outside both runs

    def run(env_steps: int) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="d4func_bench_") as run_dir:
            run_cfg = load_config(config, [*overrides, f"run_dir={run_dir}", f"loop.env_steps={env_steps}"])
            with timed_env_construction() as construction:
                summary = train_online(run_cfg, progress=False)
            return {**summary, "env_construction_seconds": sum(construction)}

    # Two runs that differ only in their env-step budget: start-up and the end-of-run work (final checkpoint,
    # evaluation, GIF) cost the same in both, so the difference is the steady-state loop. An untimed short run
    # first takes the process's one-off costs (lazy imports and initialisation, first allocations), which would
    # otherwise all land on the timed short run and inflate the difference's rate (by ~20% on the debug config).
    # Building the envs does not cost the same in both: a DMControl env's EGL rendering contexts took 0.6 s in one
    # run and 2.5 s in the next here, as much as the quick budget's whole window, so each run's time is counted
    # without it. One timed call each (repeats 1): a run's time and its construction time are then the same call's.
    t = measure({"short": lambda: run(short), "long": lambda: run(long)}, 1, no_warmup=("long",))
    loop_seconds = {name: t[name].median - t[name].output["env_construction_seconds"] for name in ("short", "long")}
    window = long - short
    grad_steps = t["long"].output["grad_steps"] - t["short"].output["grad_steps"]
    seconds = loop_seconds["long"] - loop_seconds["short"]
    rate = window / seconds if seconds > 0 else float("nan")
    figures = {"online_env_steps_per_s": rate, "window_env_steps": window, "window_grad_steps": grad_steps,
               "window_seconds": seconds, "short_run_seconds": t["short"].median,
               "long_run_seconds": t["long"].median,
               "short_env_construction_seconds": t["short"].output["env_construction_seconds"],
               "long_env_construction_seconds": t["long"].output["env_construction_seconds"]}
    rows = [Row(f"online loop, steady state (train_ratio {cfg.loop.train_ratio})", rate, "env steps/s",
                t["long"].peak_mib, f"{window} env steps + {grad_steps} grad steps in {seconds:.1f} s (envs' "
                f"construction not counted)"),
            Row("online loop, whole short run incl. start-up", short / t["short"].median, "env steps/s",
                t["short"].peak_mib, f"{short} env steps ({cfg.loop.prefill_steps} random prefill) in "
                f"{t['short'].median:.1f} s")]
    return section(rows, figures, {"config": str(CONFIGS[config].relative_to(REPO)), "overrides": overrides,
                                   "short_env_steps": short, "long_env_steps": long})


@dataclass(frozen=True)
class PaperScale:
    """A world model shaped like the paper's (Sec. 3.2, 3.4: N_z = 256 packed latent tokens of width 32, GQA, time
    attention every 4th layer, registers) at ~0.5B params (the paper's dynamics model: 1.6B), sized to train with
    room to spare in one 80 GB+ GPU. Fused attention needs logit_cap=None."""

    d_model: int = 1536
    n_layers: int = 16
    n_heads: int = 12
    n_kv_heads: int = 4
    latent_tokens: int = 512
    latent_dim: int = 16
    pack: int = 2
    n_registers: int = 4
    batch: int = 2
    frames: int = 32
    gen_batch: int = 8
    gen_frames: int = 32
    gen_context: int = 4

    def dynamics_config(self):
        from d4func.config import TransformerConfig
        from d4func.dynamics import DynamicsConfig

        transformer = TransformerConfig(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                                        n_kv_heads=self.n_kv_heads, time_every=4, logit_cap=None)
        return DynamicsConfig(transformer=transformer, latent_tokens=self.latent_tokens, latent_dim=self.latent_dim,
                              pack=self.pack, n_registers=self.n_registers, action_dim=2, k_max=64,
                              sampling_steps=4)


@dataclass
class PaperScaleSetup:
    """A fresh paper-scale world model on a device with one batch of random latents and actions: what the GPU
    sections train and generate from."""

    model: Any
    cfg: Any
    state: Any
    latents: torch.Tensor
    actions: torch.Tensor
    generator: torch.Generator


def paper_scale_setup(device: torch.device | str, spec: PaperScale) -> PaperScaleSetup:
    from d4func.dynamics import Dynamics
    from d4func.functional import init, template
    from d4func.train.state import new_train_state

    device = torch.device(device)
    cfg = spec.dynamics_config()
    model = template(Dynamics, cfg)
    state = new_train_state(init(model, 0, device=device), with_ema=False).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    latents = torch.rand(spec.batch, spec.frames, cfg.latent_tokens, cfg.latent_dim, device=device,
                         generator=generator) * 2 - 1
    actions = torch.rand(spec.batch, spec.frames, cfg.action_dim, device=device, generator=generator) * 2 - 1
    return PaperScaleSetup(model, cfg, state, latents, actions, generator)


def paper_scale_figures(device: torch.device | str, spec: PaperScale = PaperScale(), repeats: int = 5,  # noqa: B008
                        bf16: bool = True, peak_flops: float | None = None) -> dict[str, Any]:
    """World-model (shortcut forcing) train steps and KV-cached generation at `spec`'s size on `device`: tokens/s,
    model FLOPs per step (counted by torch's FlopCounterMode: matmuls and attention, masks not discounted, the
    bootstrap targets' extra forward passes included), MFU = FLOP/s / `peak_flops`, generated frames/s (K = 4)."""
    from torch.utils.flop_counter import FlopCounterMode

    from d4func.functional import apply, count_params
    from d4func.optim import AdamWConfig
    from d4func.sampler import generate
    from d4func.train.dynamics_step import dynamics_loss, dynamics_train_step
    from d4func.train.precision import PrecisionConfig, precision_context

    device = torch.device(device)
    setup = paper_scale_setup(device, spec)
    model, cfg, state, latents, actions, generator = (setup.model, setup.cfg, setup.state, setup.latents,
                                                      setup.actions, setup.generator)
    gen_context = latents[:1, : spec.gen_context].expand(spec.gen_batch, -1, -1, -1)
    gen_actions = torch.rand(spec.gen_batch, spec.gen_context + spec.gen_frames, cfg.action_dim, device=device,
                             generator=generator) * 2 - 1
    precision = PrecisionConfig(bf16=bf16)

    def train_step() -> None:
        nonlocal state
        with precision_context(precision, device):
            state, _ = dynamics_train_step(state, latents, actions, generator, model=model, opt=AdamWConfig())

    def generate_frames() -> torch.Tensor:
        def model_fn(*args: Any, **kwargs: Any) -> Any:  # reads the latest params
            return apply(model, state["params"], *args, **kwargs)

        with torch.no_grad(), precision_context(precision, device):
            return generate(model_fn, gen_context, gen_actions, spec.gen_frames, generator, cfg)

    # FLOPs of the step's forward + backward, counted on `loss.backward()`: FlopCounterMode's module hooks do not
    # support the `torch.autograd.grad` call inside `dynamics_train_step` (the AdamW update is elementwise, which
    # the counter ignores anyway). Averaged over a few draws: a draw without a bootstrap frame skips the targets'
    # two extra forward passes, which at small sizes happens often enough to skew a single count.
    leaves = state["params"].apply(lambda p: p.detach().requires_grad_())
    draws = 4
    with FlopCounterMode(display=False) as counter, precision_context(precision, device):
        for _ in range(draws):
            dynamics_loss(leaves, latents, actions, generator, model=model)[0].backward()
    flops = counter.get_total_flops() / draws
    del leaves
    t = measure({"train": train_step, "generate": generate_frames}, repeats, device)
    tokens = spec.batch * spec.frames * cfg.layout().n_tokens
    achieved = flops / t["train"].median
    return {
        "params": count_params(state["params"]),
        "tokens_per_step": tokens,
        "train_step_seconds": t["train"].median,
        "tokens_per_s": tokens / t["train"].median,
        "model_flops_per_step": flops,
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": None if peak_flops is None else peak_flops / 1e12,
        "mfu": None if peak_flops is None else achieved / peak_flops,
        "gen_seconds": t["generate"].median,
        "gen_frames_per_s": spec.gen_batch * spec.gen_frames / t["generate"].median,
        "train_peak_mib": t["train"].peak_mib,
        "gen_peak_mib": t["generate"].peak_mib,
        "bf16": bf16,
        "spec": dataclasses.asdict(spec),
    }


def compiled_vs_eager_figures(device: torch.device | str, spec: PaperScale = PaperScale(),  # noqa: B008
                              repeats: int = 5, bf16: bool = True, compile_mode: str = "default",
                              **compile_kwargs: Any) -> dict[str, Any]:
    """The world-model train step at `spec`'s size, eager vs compiled as the loop's `precision.compile` compiles it
    (the loss and its backward, `compiled_grad_fn`), timed interleaved from the same start state: tokens/s of each,
    the first compiled call's seconds (tracing and code generation), and both first steps' losses (the same draws:
    equal up to kernel rounding). `compile_kwargs` go to `torch.compile` (tests pass a cheap backend)."""
    from d4func.functional import grad_and_value
    from d4func.optim import AdamWConfig
    from d4func.train.dynamics_step import dynamics_train_step
    from d4func.train.precision import PrecisionConfig, compiled_grad_fn, precision_context

    device = torch.device(device)
    setup = paper_scale_setup(device, spec)
    precision = PrecisionConfig(bf16=bf16)
    grad_fns = {"eager": grad_and_value,
                "compiled": compiled_grad_fn(grad_and_value, PrecisionConfig(compile=True, compile_mode=compile_mode),
                                             **compile_kwargs)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)

    def step(name: str, state: Any, generator: torch.Generator) -> tuple[Any, dict[str, torch.Tensor]]:
        with precision_context(precision, device):
            return dynamics_train_step(state, setup.latents, setup.actions, generator, model=setup.model,
                                       opt=AdamWConfig(), grad_fn=grad_fns[name])

    states, losses, first_seconds = {}, {}, {}
    for name in grad_fns:
        sync(device)
        start = time.perf_counter()
        states[name], metrics = step(name, setup.state, torch.Generator(device=device).manual_seed(1))
        sync(device)
        first_seconds[name] = time.perf_counter() - start
        losses[name] = float(metrics["loss"])

    def timed(name: str) -> Callable[[], None]:
        def call() -> None:
            states[name], _ = step(name, states[name], setup.generator)
        return call

    t = measure({name: timed(name) for name in grad_fns}, repeats, device)
    tokens = spec.batch * spec.frames * setup.cfg.layout().n_tokens
    return {
        "tokens_per_step": tokens,
        "eager_tokens_per_s": tokens / t["eager"].median,
        "compiled_tokens_per_s": tokens / t["compiled"].median,
        "speedup_compiled_over_eager": t["eager"].median / t["compiled"].median,
        "compile_seconds": first_seconds["compiled"],
        "eager_first_step_seconds": first_seconds["eager"],
        "first_loss_eager": losses["eager"],
        "first_loss_compiled": losses["compiled"],
        "eager_peak_mib": t["eager"].peak_mib,
        "compiled_peak_mib": t["compiled"].peak_mib,
        "bf16": bf16,
        "compile_mode": compile_mode,
        "spec": dataclasses.asdict(spec),
    }


# gpu_compiled: the paper-like width, tokens and batch at 4 layers. Tracing is per layer (the layers are unrolled),
# 136 s of it for 16 layers on a CPU here against 51 s for 4, and the speedup per layer is what the figure is about.
COMPILE_SCALE = dataclasses.replace(PaperScale(), n_layers=4)
# `--quick` on a GPU: the GPU sections' code paths at a size that compiles and runs in seconds.
QUICK_PAPER_SCALE = PaperScale(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, batch=1, frames=8, gen_batch=2,
                               gen_frames=4)


def peak_bf16_flops(device_name: str) -> float | None:
    """`PEAK_BF16_FLOPS` of the longest name that `device_name` contains; None for a device not listed."""
    matches = [key for key in PEAK_BF16_FLOPS if key in device_name]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def gpu_section(ctx: Context) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return gpu_skipped("gpu_paper_scale")
    name = torch.cuda.get_device_name(0)
    peak = ctx.peak_flops
    if peak is None:
        peak = peak_bf16_flops(name)
    spec = PaperScale() if ctx.budget is FULL else QUICK_PAPER_SCALE
    f = paper_scale_figures("cuda", spec, repeats=5 if ctx.budget is FULL else 1, peak_flops=peak)
    size = f"{f['params'] / 1e6:.0f}M params, bf16"
    rows = [Row(f"world-model train step tokens/s ({size})", f["tokens_per_s"], "tokens/s", f["train_peak_mib"],
                f"B={spec.batch} T={spec.frames}, {f['tokens_per_step']} tokens/step"),
            Row("model FLOP utilisation (MFU)", f["mfu"], "fraction", None,
                f"{f['achieved_tflops']:.0f} TFLOP/s of {f['peak_tflops'] or '?'} ({name})"),
            Row(f"generated frames/s (K=4, KV cache, batch {spec.gen_batch})", f["gen_frames_per_s"], "frames/s",
                f["gen_peak_mib"])]
    return section(rows, f, {"device": name, "untested_before_first_gpu_run": True})


def replay_section(ctx: Context) -> dict[str, Any]:
    from d4func.data.replay import make_replay

    n, episode_len, size = ctx.budget.replay
    cfg = load_config("default")
    batch, seq_len = cfg.replay.batch_size, cfg.replay.seq_len
    generator = torch.Generator().manual_seed(0)
    steps = torch.arange(n)
    frames = torch.randint(0, 256, (n + n // episode_len + 1, 3, size, size), generator=generator,
                           dtype=torch.uint8).div(255)
    # Frame i + episode: each episode has one frame more than its transitions (the one after its last).
    episode, step = steps // episode_len, steps % episode_len
    done = (step == episode_len - 1) | (steps == n - 1)
    data = TensorDict({"pixels": frames[steps + episode], ("next", "pixels"): frames[steps + episode + 1],
                       "action": torch.rand(n, 1, generator=generator), ("next", "reward"): torch.rand(n, 1),
                       ("next", "done"): done[:, None], ("next", "truncated"): done[:, None],
                       "is_init": (step == 0)[:, None], "step_count": step[:, None],
                       ("collector", "traj_ids"): episode}, [n])
    layouts = {"shared": True, "per_transition": False}
    tmp = Path(tempfile.mkdtemp(prefix="d4func_replay_bench_"))
    counter = iter(range(10**6))

    def write(share: bool):
        rb = make_replay(2 * n, seq_len, batch, path=tmp / f"rb{next(counter)}", share_next_pixels=share)
        for start in range(0, n, 100):  # collector-sized batches
            rb.extend(data[start:start + 100])
        disk = sum(f.stat().st_blocks * 512 for f in (rb.path / "storage").rglob("*") if f.is_file())
        return rb, disk

    written = measure({name: (lambda share=share: write(share)) for name, share in layouts.items()},
                      ctx.budget.replay_repeats)
    buffers = {name: written[name].output[0] for name in layouts}
    sampled = measure({name: buffers[name].sample for name in layouts}, 5 * ctx.budget.replay_repeats)

    def write_through_a_ring(journal: bool):
        """The same writes into a ring of half their size: the second half overwrites stored entries, which the
        overwrite journal (the training loop keeps it on) saves first."""
        rb = make_replay(n // 2, seq_len, batch, path=tmp / f"rb{next(counter)}", share_next_pixels=True)
        if journal:
            rb.keep_overwritten_entries()
        for start in range(0, n, 100):
            rb.extend(data[start:start + 100])

    ring = measure({"journal_off": lambda: write_through_a_ring(False),
                    "journal_on": lambda: write_through_a_ring(True)}, ctx.budget.replay_repeats)
    figures: dict[str, Any] = {}
    rows = []
    for name in layouts:
        disk = written[name].output[1]
        figures.update({f"{name}_disk_bytes_per_transition": disk / n,
                        f"{name}_write_transitions_per_s": n / written[name].median,
                        f"{name}_sample_rows_per_s": batch / sampled[name].median})
        rows += [Row(f"disk per transition, next frames {name}", disk / n / 1024, "KiB"),
                 Row(f"write, next frames {name}", n / written[name].median, "steps/s", written[name].peak_mib),
                 Row(f"sample [{batch}, {seq_len}] rows, next frames {name}", batch / sampled[name].median, "rows/s",
                     sampled[name].peak_mib)]
    figures["disk_ratio_shared_over_per_transition"] = (figures["shared_disk_bytes_per_transition"]
                                                        / figures["per_transition_disk_bytes_per_transition"])
    rows.append(Row("disk, shared / per transition", figures["disk_ratio_shared_over_per_transition"], "x"))
    for name in ("journal_off", "journal_on"):
        figures[f"ring_write_transitions_per_s_{name}"] = n / ring[name].median
        rows.append(Row(f"write through a ring of {n // 2}, overwrite {name.replace('_', ' ')}",
                        n / ring[name].median, "steps/s", ring[name].peak_mib))
    figures["overwrite_journal_cost"] = ring["journal_on"].median / ring["journal_off"].median
    rows.append(Row("overwrite journal, write time on / off", figures["overwrite_journal_cost"], "x"))
    shutil.rmtree(tmp, ignore_errors=True)
    return section(rows, figures, {"transitions": n, "episode_len": episode_len, "frame": [3, size, size],
                                   "batch": batch, "seq_len": seq_len, "repeats": ctx.budget.replay_repeats})


# Each GPU section's headline figures: key, row label, unit.
GPU_FIGURES = {
    "gpu_paper_scale": (("tokens_per_s", "world-model train step tokens/s (paper-like size)", "tokens/s"),
                        ("mfu", "model FLOP utilisation (MFU)", "fraction"),
                        ("gen_frames_per_s", "generated frames/s (paper-like size)", "frames/s")),
    "gpu_compiled": (("eager_tokens_per_s", "world-model train step, eager", "tokens/s"),
                     ("compiled_tokens_per_s", "world-model train step, torch.compile", "tokens/s"),
                     ("speedup_compiled_over_eager", "speedup torch.compile over eager", "x")),
}


def gpu_skipped(name: str) -> dict[str, Any]:
    """Section `name` (one of GPU_FIGURES) without a CUDA device: its figures are None, and a row says why."""
    note = "skipped: no CUDA device"
    rows = [Row(label, None, unit, note=note) for _, label, unit in GPU_FIGURES[name]]
    return {**section(rows, {key: None for key, _, _ in GPU_FIGURES[name]}, {}), "skipped": note}


def compiled_vs_eager_rows(f: dict[str, Any], spec: PaperScale, dtype: str, device_note: str = "") -> list[Row]:
    """The rows of `compiled_vs_eager_figures`' result `f` (`device_note` ends each label, e.g. " (CPU)")."""
    size = f"B={spec.batch} T={spec.frames}, d={spec.d_model} x {spec.n_layers} layers, {dtype}"
    return [Row(f"world-model train step, eager{device_note}", f["eager_tokens_per_s"], "tokens/s",
                f["eager_peak_mib"], size),
            Row(f"world-model train step, torch.compile{device_note}", f["compiled_tokens_per_s"], "tokens/s",
                f["compiled_peak_mib"], f"first call (compiling) {f['compile_seconds']:.0f} s"),
            Row(f"speedup torch.compile over eager{device_note}", f["speedup_compiled_over_eager"], "x", None,
                f"first-step losses {f['first_loss_eager']:.4f} / {f['first_loss_compiled']:.4f}")]


def gpu_compiled_section(ctx: Context) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return gpu_skipped("gpu_compiled")
    name = torch.cuda.get_device_name(0)
    spec = COMPILE_SCALE if ctx.budget is FULL else QUICK_PAPER_SCALE
    f = compiled_vs_eager_figures("cuda", spec, repeats=5 if ctx.budget is FULL else 1)
    return section(compiled_vs_eager_rows(f, spec, "bf16"), f, {"device": name, "untested_before_first_gpu_run": True})


# cpu_compiled: the world models docs/results.md trains on this CPU (width 64, 4 layers, 16 latents of 8 packed in
# pairs, one register; batch 16 rows of 8 frames: results_reacher32.yaml's dynamics), float32. --quick: the code
# path at a tiny size through the "aot_eager" backend (tracing without inductor's C++ build).
CPU_COMPILE_SCALE = PaperScale(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, latent_tokens=16, latent_dim=8, pack=2,
                               n_registers=1, batch=16, frames=8)
QUICK_CPU_COMPILE_SCALE = PaperScale(d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, latent_tokens=8, latent_dim=8,
                                     pack=2, n_registers=1, batch=1, frames=4)
COMPILING_SECTIONS = ("cpu_compiled",)


def cpu_compiled_section(ctx: Context) -> dict[str, Any]:
    full = ctx.budget is FULL
    spec = CPU_COMPILE_SCALE if full else QUICK_CPU_COMPILE_SCALE
    f = compiled_vs_eager_figures("cpu", spec, repeats=9 if full else 1, bf16=False,
                                  **({} if full else {"backend": "aot_eager"}))
    return section(compiled_vs_eager_rows(f, spec, "float32", " (CPU)"), f,
                   {"device": "cpu", "backend": "inductor" if full else "aot_eager"})


SECTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "functional": functional_section,
    "kv_cache": kv_cache_section,
    "bootstrap_targets": bootstrap_targets_section,
    "phases_debug": lambda ctx: phases_section("debug", ctx),
    "phases_default": lambda ctx: phases_section("default", ctx),
    "acting_debug": lambda ctx: acting_section("debug", ctx),
    "acting_default": lambda ctx: acting_section("default", ctx),
    "online_debug": lambda ctx: online_section("debug", ctx),
    "online_default": lambda ctx: online_section("default", ctx),
    "replay": replay_section,
    "gpu_paper_scale": gpu_section,
    "gpu_compiled": gpu_compiled_section,
    "cpu_compiled": cpu_compiled_section,
}
assert tuple(SECTIONS) == SECTION_NAMES


# ---- orchestration -------------------------------------------------------------------------------------------------
def run_worker(names: list[str], ctx: Context, out_file: Path) -> int:
    """Run `names` in this process; results go to `out_file` after every section (a timeout keeps the rest)."""
    torch.set_num_threads(ctx.threads)
    results: dict[str, Any] = {}
    for name in names:
        start = time.perf_counter()
        try:
            results[name] = SECTIONS[name](ctx)
        except Exception:  # one broken section must not hide the others' figures
            results[name] = {"error": traceback.format_exc(), "rows": []}
        results[name]["seconds"] = time.perf_counter() - start
        results[name]["process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out_file.write_text(json.dumps(results, default=float))
    return 0


def format_value(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def table(results: dict[str, Any], header: str, shared_process: bool = False) -> str:
    """The printed table. `shared_process` (`--quick`): all sections ran in one process, so its peak RSS row is a
    running maximum over the sections so far, not the section's own."""
    lines = [header, f"{'section':<18} {'measurement':<62} {'value':>10} {'unit':<11} {'peak MiB':>9}  note"]
    lines.append("-" * len(lines[1]) + "-" * 30)
    for name, result in results.items():
        if "error" in result:
            lines.append(f"{name:<18} {'FAILED: ' + result['error'].strip().splitlines()[-1]}")
            continue
        for row in result["rows"]:
            peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
            lines.append(f"{name:<18} {row['what'][:62]:<62} {format_value(row['value']):>10} {row['unit']:<11} "
                         f"{peak:>9}  {row['note']}")
        if "process_peak_rss_mib" in result:
            what = ("(shared process: peak RSS so far / wall time)" if shared_process else
                    "(section subprocess: peak RSS / wall time)")
            lines.append(f"{name:<18} {what:<62} "
                         f"{result['process_peak_rss_mib']:>10.0f} {'MiB':<11} {'':>9}  {result['seconds']:.1f} s")
    return "\n".join(lines)


def orchestrate(args: argparse.Namespace) -> int:
    names = [name.strip() for name in args.only.split(",")] if args.only else list(SECTION_NAMES)
    unknown = sorted(set(names) - set(SECTION_NAMES))
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {', '.join(SECTION_NAMES)}")
    started, load_before = time.perf_counter(), os.getloadavg()
    results: dict[str, Any] = {}
    for name in GPU_FIGURES:
        if name in names and not torch.cuda.is_available():
            names.remove(name)
            results[name] = gpu_skipped(name)
    # --quick: one subprocess for everything (one interpreter start-up instead of one per section), except the
    # compiling section: triton, which compiling loads, once segfaulted beside dm_control's EGL renderer.
    if args.quick:
        groups = [[name for name in names if name not in COMPILING_SECTIONS],
                  [name for name in names if name in COMPILING_SECTIONS]]
    else:
        groups = [[name] for name in names]
    flags = ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    if args.peak_tflops is not None:
        flags += ["--peak-tflops", str(args.peak_tflops)]
    with tempfile.TemporaryDirectory(prefix="d4func_run_all_") as tmp:
        for group in groups:
            if not group:
                continue
            out_file = Path(tmp) / "worker.json"
            out_file.unlink(missing_ok=True)
            group_start = time.perf_counter()
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(group), "--worker-out",
                       str(out_file), *flags]
            try:
                proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=args.section_timeout)
                ended = f"worker exited with {proc.returncode}"
                output = proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as timeout:  # the sections it finished are in out_file; the rest fail
                ended = f"worker stopped after --section-timeout {args.section_timeout:g} s"
                output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
                                 for part in (timeout.stdout, timeout.stderr))
            found = json.loads(out_file.read_text()) if out_file.exists() else {}
            for name in group:
                if name not in found:
                    tail = "\n".join(output.strip().splitlines()[-20:])
                    found[name] = {"error": f"{ended}:\n{tail}", "rows": []}
            results.update({name: found[name] for name in group})
            print(f"[run_all] {', '.join(group)}: {time.perf_counter() - group_start:.1f} s", file=sys.stderr,
                  flush=True)
    results = {name: results[name] for name in SECTION_NAMES if name in results}
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    meta = {
        "quick": args.quick, "threads": args.threads, "wall_seconds": wall, "cpus": os.cpu_count(),
        "load_average_1min_before_after": [load_before[0], load_after[0]], "torch": torch.__version__,
        "machine": platform.machine(), "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # Every section measures host memory, except the gpu_* sections, which measure the GPU's.
        "memory_method": PeakMemory("cpu").method,
        "gpu_memory_method": PeakMemory("cuda").method if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    header = (f"d4func benchmarks{' (--quick: smoke run, not results)' if args.quick else ''}: torch "
              f"{torch.__version__}, {args.threads} intra-op thread(s), {os.cpu_count()} CPUs, load average "
              f"{load_before[0]:.1f} -> {load_after[0]:.1f}, {wall:.0f} s; peak MiB = peak above the memory in use "
              "when the measured call started")
    print(table(results, header, shared_process=args.quick), flush=True)
    out = Path(args.out) if args.out else BENCH_DIR / "results" / ("run_all_quick.json" if args.quick else
                                                                   "run_all.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "sections": results}, indent=2, default=float) + "\n")
    print(f"wrote {out}")
    return 1 if any("error" in result for result in results.values()) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one subprocess: a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every section")
    parser.add_argument("--only", default="", help=f"comma-separated sections out of {', '.join(SECTION_NAMES)}")
    parser.add_argument("--out", default="", help="JSON path (default benchmarks/results/run_all[_quick].json)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="GPU dense bf16 peak for MFU when the device is not in the built-in table")
    parser.add_argument("--section-timeout", type=float, default=900, help="seconds per section subprocess")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.worker:
        ctx = Context(QUICK if args.quick else FULL, args.threads,
                      None if args.peak_tflops is None else args.peak_tflops * 1e12)
        return run_worker(args.worker.split(","), ctx, Path(args.worker_out))
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
