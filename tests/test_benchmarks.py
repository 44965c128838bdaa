"""The benchmark suite: `benchmarks/run_all.py --quick` runs every section in a subprocess and writes every figure;
the memory meter sees a known allocation; the GPU-only paper-scale path runs on the CPU at a tiny size."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.benchmark_scripts import RUN_ALL, load_run_all

REPO = Path(__file__).resolve().parents[1]

PHASES = {"tokenizer_steps_per_s", "world_model_steps_per_s", "imagination_steps_per_s", "all_phases_steps_per_s",
          "tokenizer_autoencode_frames_per_s", "world_model_teacher_steps_per_s",
          "world_model_self_forcing_steps_per_s", "self_forcing_cost"}
ACTING = {"raw_env_steps_per_s", "policy_calls_per_s", "collector_steps_per_s"}
ONLINE = {"online_env_steps_per_s", "window_env_steps", "window_grad_steps"}
EXPECTED = {
    "functional": {"ratio_functional_over_stateful", "ratio_functorch_grad_over_stateful", "median_ms_functional",
                   "median_ms_stateful", "median_ms_functorch_grad"},
    "kv_cache": {"speedup_kv_cache_32", "gen_seconds_cached_32", "gen_seconds_uncached_32",
                 "cached_vs_uncached_max_abs_diff", "debug_speedup_kv_cache_32", "gen_frames_per_s"},
    "bootstrap_targets": {"speedup_vmap_targets", "speedup_folded_over_vmapped_targets", "targets_seconds_folded",
                          "targets_seconds_vmapped", "targets_seconds_looped",
                          "targets_folded_vs_vmapped_max_abs_diff"},
    "phases_debug": PHASES,
    "phases_default": PHASES,
    "acting_debug": ACTING,
    "acting_default": ACTING,
    "online_debug": ONLINE,
    "online_default": ONLINE,
    "replay": {f"{layout}_{figure}" for layout in ("shared", "per_transition")
               for figure in ("disk_bytes_per_transition", "write_transitions_per_s", "sample_rows_per_s")}
    | {"disk_ratio_shared_over_per_transition", "ring_write_transitions_per_s_journal_off",
       "ring_write_transitions_per_s_journal_on", "overwrite_journal_cost"},
    "gpu_paper_scale": {"tokens_per_s", "mfu", "gen_frames_per_s"},
    "gpu_compiled": {"eager_tokens_per_s", "compiled_tokens_per_s", "speedup_compiled_over_eager"},
    "cpu_compiled": {"eager_tokens_per_s", "compiled_tokens_per_s", "speedup_compiled_over_eager", "compile_seconds",
                     "first_loss_eager", "first_loss_compiled"},
}


# The *_default sections run the *_debug sections' code at the default config's sizes: the default suite runs the
# debug ones (~25 s less on 2 cores), the slow suite every section (cpu_compiled too: ~30 s of tracing).
DEBUG_SECTIONS = [name for name in EXPECTED if not name.endswith("_default") and name != "cpu_compiled"]


def test_run_all_quick_prints_one_table_and_writes_every_debug_figure(tmp_path):
    check_quick_run(tmp_path, DEBUG_SECTIONS)


@pytest.mark.slow
def test_run_all_quick_prints_one_table_and_writes_every_figure(tmp_path):
    check_quick_run(tmp_path, list(EXPECTED))


def check_quick_run(tmp_path: Path, names: list[str]) -> None:
    out = tmp_path / "run_all.json"
    only = [] if names == list(EXPECTED) else ["--only", ",".join(names)]
    # The quick run takes about a minute alone; the generous limit covers a machine loaded by other jobs
    # (a 300 s limit failed once here while background training runs shared the two cores).
    proc = subprocess.run([sys.executable, str(RUN_ALL), "--quick", *only, "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header_lines = [line for line in proc.stdout.splitlines() if line.startswith("section ")]
    assert len(header_lines) == 1, proc.stdout  # one table
    result = json.loads(out.read_text())
    assert result["meta"]["quick"] is True
    sections = result["sections"]
    assert list(sections) == names
    expected = {name: EXPECTED[name] for name in names}
    for name, keys in expected.items():
        assert "error" not in sections[name], sections[name].get("error")
        assert keys <= set(sections[name]["figures"]), (name, keys - set(sections[name]["figures"]))
        assert sections[name]["rows"], name
        assert any(line.startswith(name) for line in proc.stdout.splitlines()), name  # a row in the table
    for name, keys in expected.items():
        if name.startswith("gpu_") and not torch.cuda.is_available():
            assert sections[name]["skipped"] and all(sections[name]["figures"][k] is None for k in keys)
            continue
        for key in keys - {"cached_vs_uncached_max_abs_diff", "targets_folded_vs_vmapped_max_abs_diff"}:
            value = sections[name]["figures"][key]
            assert math.isfinite(value) and value > 0, (name, key, value)
    if "cpu_compiled" in sections:  # both arms trained the same step from the same draws
        losses = sections["cpu_compiled"]["figures"]
        assert losses["first_loss_compiled"] == pytest.approx(losses["first_loss_eager"], rel=1e-5)
    figures = {name: section["figures"] for name, section in sections.items()}
    # The compared variants compute the same thing: identical generations, identical bootstrap targets.
    assert figures["kv_cache"]["cached_vs_uncached_max_abs_diff"] < 1e-4
    assert figures["bootstrap_targets"]["targets_folded_vs_vmapped_max_abs_diff"] < 1e-5
    assert figures["replay"]["disk_ratio_shared_over_per_transition"] < 0.6  # each frame once, not twice
    assert figures["online_debug"]["window_env_steps"] == 120 and figures["online_debug"]["window_grad_steps"] >= 1
    assert figures["online_debug"]["short_env_construction_seconds"] > 0  # the envs were built, and timed
    if sys.platform == "linux":  # per-call peak memory on every timed CPU row
        rows = sections["phases_debug"]["rows"] + sections["acting_debug"]["rows"]
        timed = [row for row in rows if row["unit"] != "x"]  # a ratio of two timed rows has no memory of its own
        assert all(row["peak_mib"] is not None and row["peak_mib"] >= 0 for row in timed)


def test_a_section_past_its_timeout_is_recorded_as_failed_and_the_table_still_comes_out(tmp_path):
    out = tmp_path / "run_all.json"
    proc = subprocess.run([sys.executable, str(RUN_ALL), "--only", "bootstrap_targets", "--section-timeout", "0.5",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    error = json.loads(out.read_text())["sections"]["bootstrap_targets"]["error"]
    assert "--section-timeout 0.5 s" in error, error
    assert "bootstrap_targets  FAILED" in proc.stdout


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_sees_a_64_mib_allocation_and_not_an_earlier_one():
    run_all = load_run_all()
    big = torch.ones(16 * 2**20)  # 64 MiB resident before the calls: part of their baseline, not of their peak
    t = run_all.measure({"alloc": lambda: torch.ones(16 * 2**20).sum(), "nothing": lambda: big[0].item()}, 2)
    assert t["alloc"].peak_mib >= 60, t["alloc"].peak_mib
    assert t["nothing"].peak_mib < 16, t["nothing"].peak_mib
    assert len(t["alloc"].seconds) == 2 and t["alloc"].median > 0
    with pytest.raises(ValueError, match="at least 1 timed call"):
        run_all.measure({"alloc": lambda: None}, {"alloc": 0})


def test_paper_scale_path_runs_on_cpu_at_a_tiny_size():
    """The GPU section's function, on the CPU: only the CUDA-specific calls stay untested without a GPU."""
    run_all = load_run_all()
    spec = run_all.PaperScale(d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, latent_tokens=8, latent_dim=8,
                              n_registers=1, batch=1, frames=4, gen_batch=1, gen_frames=2, gen_context=2)
    f = run_all.paper_scale_figures("cpu", spec, repeats=1, bf16=True, peak_flops=1e12)
    tokens = 1 * 4 * spec.dynamics_config().layout().n_tokens
    assert f["tokens_per_step"] == tokens
    assert f["tokens_per_s"] == pytest.approx(tokens / f["train_step_seconds"])
    # forward + backward of a weight matrix costs at least 4 FLOPs per weight and token (2 forward, 2 for the weight
    # gradient; 6 with the input gradient), and the bootstrap targets' forward passes and attention come on top
    assert f["model_flops_per_step"] >= 4 * f["params"] * tokens
    assert f["mfu"] == pytest.approx(f["achieved_tflops"] * 1e12 / 1e12)
    assert f["gen_frames_per_s"] > 0


COMPILED_VS_EAGER_ON_CPU = """
import json, sys
sys.path.insert(0, "benchmarks")
import run_all
spec = run_all.PaperScale(d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, latent_tokens=8, latent_dim=8,
                          n_registers=1, batch=1, frames=4, gen_batch=1, gen_frames=2, gen_context=2)
print(json.dumps(run_all.compiled_vs_eager_figures("cpu", spec, repeats=2, bf16=False, backend="aot_eager")))
"""


# ~30 s of tracing; in a subprocess, since compiling loads triton (kept out of processes that render with EGL).
@pytest.mark.slow
def test_compiled_vs_eager_path_runs_on_cpu_at_a_tiny_size():
    """The gpu_compiled section's function on the CPU with a cheap backend: both arms train the same step (equal
    first losses from the same draws), and every figure comes out."""
    proc = subprocess.run([sys.executable, "-c", COMPILED_VS_EAGER_ON_CPU], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    f = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f["first_loss_compiled"] == pytest.approx(f["first_loss_eager"], rel=1e-5)
    for key in ("eager_tokens_per_s", "compiled_tokens_per_s", "speedup_compiled_over_eager", "compile_seconds"):
        assert math.isfinite(f[key]) and f[key] > 0, (key, f[key])


def test_peak_flops_take_the_most_specific_device_name():
    run_all = load_run_all()
    assert run_all.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert run_all.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12  # not the SXM part's peak
    assert run_all.peak_bf16_flops("NVIDIA H200 NVL") == 835e12
    assert run_all.peak_bf16_flops("NVIDIA GeForce RTX 4090") is None
