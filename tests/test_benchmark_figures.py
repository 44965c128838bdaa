"""The figures `benchmarks/run_all.py` reports, derived from known timings: each section's ratios, rates and
speedups divide the right medians in the right order, and each timed variant runs what its name says.

`measure` is replaced by `FakeMeasure`, which hands out chosen median seconds (and, where a section reads them,
outputs), so the arithmetic from timings to figures is checked exactly; the quick run in tests/test_benchmarks.py
covers the real timing path. No assertion here depends on how fast anything runs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.benchmark_scripts import load_run_all

run_all = load_run_all()
QUICK_CTX = run_all.Context(run_all.QUICK, threads=1, peak_flops=None)
FULL_CTX = run_all.Context(run_all.FULL, threads=1, peak_flops=None)


class FakeMeasure:
    """Stands in for `run_all.measure`. `rounds[i]` answers the section's i-th `measure` call: name -> median
    seconds, or name -> (seconds, output) to hand out an output without running the fn. The i-th call's n-th name
    peaks at 100 i + 10 (n + 1) MiB, so a row that shows another variant's or another call's peak is visible."""

    def __init__(self, *rounds: dict) -> None:
        self.rounds = list(rounds)
        self.calls: list[dict] = []

    def __call__(self, fns, repeats, device="cpu", no_warmup=()):
        answers = self.rounds[len(self.calls)]
        self.calls.append({"names": list(fns), "repeats": repeats, "no_warmup": tuple(no_warmup)})
        assert set(answers) == set(fns), (sorted(answers), sorted(fns))
        out = {}
        for index, (name, fn) in enumerate(fns.items()):
            answer = answers[name]
            seconds, output = answer if isinstance(answer, tuple) else (answer, fn())
            peak = 100.0 * (len(self.calls) - 1) + 10.0 * (index + 1)
            out[name] = run_all.Timing(seconds=[seconds], peak_mib=peak, output=output)
        return out


# ---- measure -------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_measure_takes_a_no_warmup_fns_peak_on_its_first_timed_call():
    # A lazily initialised 64 MiB buffer: only the first call allocates it, so only that call shows the peak.
    kept: list[torch.Tensor] = []

    def lazy() -> float:
        if not kept:
            kept.append(torch.ones(16 * 2**20))
        return kept[0][0].item()

    t = run_all.measure({"lazy": lazy}, 3, no_warmup=("lazy",))
    assert len(t["lazy"].seconds) == 3  # no untimed warm-up call
    assert t["lazy"].peak_mib >= 60, t["lazy"].peak_mib


# ---- functional ----------------------------------------------------------------------------------------------------
def test_functional_ratios_divide_by_the_stateful_median(monkeypatch):
    names = run_all.load_sibling("functional_overhead").CASE_NAMES  # functional, stateful, functorch grad
    fake = FakeMeasure({names[0]: (0.002, None), names[1]: (0.004, None), names[2]: (0.010, None)})
    monkeypatch.setattr(run_all, "measure", fake)
    f = run_all.functional_section(QUICK_CTX)["figures"]
    assert f["ratio_functional_over_stateful"] == pytest.approx(0.5)
    assert f["ratio_functorch_grad_over_stateful"] == pytest.approx(2.5)
    assert (f["median_ms_functional"], f["median_ms_stateful"], f["median_ms_functorch_grad"]) == pytest.approx(
        (2.0, 4.0, 10.0))


def test_the_stateful_case_runs_the_module_and_the_functional_cases_run_apply(monkeypatch):
    bench = run_all.load_sibling("functional_overhead")
    cases, _ = bench.forward_backward_cases(d_model=32, layers=2, batch=1, steps=2)
    calls = []
    real_apply = bench.apply
    monkeypatch.setattr(bench, "apply", lambda *a, **k: calls.append(1) or real_apply(*a, **k))
    counts = {}
    for name, fn in cases.items():
        calls.clear()
        fn()
        counts[name] = len(calls)
    functional, stateful, functorch = bench.CASE_NAMES
    assert counts[stateful] == 0 and counts[functional] > 0 and counts[functorch] > 0, counts


# ---- kv_cache, bootstrap_targets -----------------------------------------------------------------------------------
def test_kv_cache_speedup_is_uncached_over_cached_and_frames_per_s_from_the_debug_cached_run(monkeypatch):
    outputs = {"cached": torch.zeros(2, 3), "uncached": torch.full((2, 3), 0.25)}
    bench = SimpleNamespace(generation_fns=lambda size, batch: (
        {name: (lambda value=value: value) for name, value in outputs.items()}, 1000 if size == "default" else 10))
    monkeypatch.setattr(run_all, "load_sibling", lambda name: bench)
    # The full budget measures the default size (batch 4) first, then the debug size (batch 1).
    fake = FakeMeasure({"cached": 0.5, "uncached": 4.0}, {"cached": 0.1, "uncached": 0.3})
    monkeypatch.setattr(run_all, "measure", fake)
    result = run_all.kv_cache_section(FULL_CTX)
    f = result["figures"]
    assert f["speedup_kv_cache_32"] == pytest.approx(8.0)
    assert (f["gen_seconds_cached_32"], f["gen_seconds_uncached_32"]) == (0.5, 4.0)
    assert f["debug_speedup_kv_cache_32"] == pytest.approx(3.0)
    assert f["gen_frames_per_s"] == pytest.approx(32 / 0.1)
    assert f["cached_vs_uncached_max_abs_diff"] == pytest.approx(0.25)
    assert (f["size_params"], f["debug_size_params"], f["gen_size"]) == (1000, 10, "default")
    peaks = [(row["what"].split(",")[1], row["peak_mib"]) for row in result["rows"] if row["unit"] == "s"]
    assert peaks == [(" KV cache", 10.0), (" no cache", 20.0), (" KV cache", 110.0), (" no cache", 120.0)]
    # The uncached run (minutes at the default size) is timed fewer times and without a warm-up of its own.
    assert fake.calls[0]["repeats"] == {"cached": 3, "uncached": 1} and fake.calls[0]["no_warmup"] == ("uncached",)


def test_generation_fns_generate_with_and_without_the_kv_cache(monkeypatch):
    bench = run_all.load_sibling("dynamics")
    used = []
    monkeypatch.setattr(bench, "generate", lambda *args, use_cache, **kwargs: used.append(use_cache))
    fns, _ = bench.generation_fns("debug", 1)
    fns["cached"]()
    fns["uncached"]()
    assert used == [True, False]


def test_bootstrap_target_speedups_and_the_folded_vs_vmapped_difference(monkeypatch):
    outputs = {"folded": torch.zeros(3), "vmapped": torch.tensor([0.0, 0.5, 0.0]), "looped": torch.ones(3)}
    bench = SimpleNamespace(bootstrap_target_fns=lambda: {name: (lambda v=v: v) for name, v in outputs.items()})
    monkeypatch.setattr(run_all, "load_sibling", lambda name: bench)
    monkeypatch.setattr(run_all, "measure", FakeMeasure({"folded": 0.1, "vmapped": 0.3, "looped": 1.2}))
    f = run_all.bootstrap_targets_section(QUICK_CTX)["figures"]
    assert f["speedup_vmap_targets"] == pytest.approx(4.0)
    assert f["speedup_folded_over_vmapped_targets"] == pytest.approx(3.0)
    assert f["targets_folded_vs_vmapped_max_abs_diff"] == pytest.approx(0.5)


def test_bootstrap_target_fns_use_vmap_only_in_the_vmapped_variant_and_agree(monkeypatch):
    bench = run_all.load_sibling("dynamics")
    vmapped_calls = []
    real = bench.bootstrap_velocity_vmapped
    monkeypatch.setattr(bench, "bootstrap_velocity_vmapped", lambda *a: vmapped_calls.append(1) or real(*a))
    fns = bench.bootstrap_target_fns(batch=2, steps=3)
    outputs = {}
    for name in ("folded", "looped", "vmapped"):
        vmapped_calls.clear()
        outputs[name] = fns[name]()
        assert len(vmapped_calls) == (name == "vmapped"), name
    torch.testing.assert_close(outputs["vmapped"], outputs["folded"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs["looped"], outputs["folded"], atol=1e-5, rtol=1e-4)


# ---- phases, acting, online, replay --------------------------------------------------------------------------------
def test_phase_rates_are_one_over_each_phases_own_median(monkeypatch):
    fake = FakeMeasure({"tokenizer": (0.5, None), "world_model": (0.25, None), "world_model_teacher": (0.5, None),
                        "world_model_self_forcing": (0.8, None), "imagination": (0.2, None),
                        "all_phases": (2.0, None)}, {"autoencode": (1.0, 123.0)})
    monkeypatch.setattr(run_all, "measure", fake)
    result = run_all.phases_section("debug", QUICK_CTX)
    f = result["figures"]
    assert (f["tokenizer_steps_per_s"], f["world_model_steps_per_s"], f["world_model_teacher_steps_per_s"],
            f["world_model_self_forcing_steps_per_s"], f["imagination_steps_per_s"],
            f["all_phases_steps_per_s"]) == pytest.approx((2.0, 4.0, 2.0, 1.25, 5.0, 0.5))
    assert f["tokenizer_autoencode_frames_per_s"] == 123.0
    # Self-forcing's cost: against the teacher-forced step it needs, not the paper's diffusion-forced one.
    assert f["self_forcing_cost"] == pytest.approx(1.6)
    # Each row carries its own phase's peak memory (FakeMeasure: 10, 20, ... MiB in order; autoencode 110); the
    # cost, a ratio of two rows, has none.
    assert [row["peak_mib"] for row in result["rows"]] == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 110.0, None]


def test_acting_rates_count_env_steps_and_policy_calls_separately(monkeypatch):
    fake = FakeMeasure({"raw_env": (0.5, None), "policy": (0.25, None), "collector": (1.0, None)})
    monkeypatch.setattr(run_all, "measure", fake)
    result = run_all.acting_section("debug", QUICK_CTX)
    f = result["figures"]
    assert [row["peak_mib"] for row in result["rows"]] == [10.0, 20.0, 30.0]  # env, policy, collector
    steps, calls = run_all.QUICK.env_steps_per_call, run_all.QUICK.policy_calls_per_call
    assert steps != calls  # else a swapped count would go unseen
    assert f["raw_env_steps_per_s"] == pytest.approx(steps / 0.5)
    assert f["policy_calls_per_s"] == pytest.approx(calls / 0.25)
    assert f["collector_steps_per_s"] == pytest.approx(steps / 1.0)
    # Env and policy one after the other, each at its own rate.
    assert f["serial_prediction_steps_per_s"] == pytest.approx(1 / (0.5 / steps + 0.25 / calls))


@pytest.mark.parametrize("ctx", [QUICK_CTX, FULL_CTX], ids=["quick", "full"])
def test_online_rate_comes_from_the_difference_of_the_two_runs(monkeypatch, ctx):
    # Building the envs took 0.75 s of the short run and 0.25 s of the long one: not part of the loop's window.
    fake = FakeMeasure({"short": (2.0, {"grad_steps": 3, "env_construction_seconds": 0.75}),
                        "long": (5.0, {"grad_steps": 10, "env_construction_seconds": 0.25})})
    monkeypatch.setattr(run_all, "measure", fake)
    result = run_all.online_section("debug", ctx)
    f = result["figures"]
    assert [row["peak_mib"] for row in result["rows"]] == [20.0, 10.0]  # steady state: the long run's
    short, long = ctx.budget.online_steps["debug"]
    assert f["window_env_steps"] == long - short and f["window_grad_steps"] == 7
    assert f["window_seconds"] == pytest.approx(3.5)  # (5.0 - 0.25) - (2.0 - 0.75)
    assert f["online_env_steps_per_s"] == pytest.approx((long - short) / 3.5)
    assert (f["short_run_seconds"], f["long_run_seconds"]) == (2.0, 5.0)
    assert (f["short_env_construction_seconds"], f["long_env_construction_seconds"]) == (0.75, 0.25)
    # Both budgets warm the process up on an untimed short run: timed cold, the short run's one-off costs once
    # outweighed the quick budget's window and left the rate NaN.
    assert fake.calls[0]["no_warmup"] == ("long",)


def test_timed_env_construction_counts_every_make_env_call_and_puts_it_back():
    from d4func.envs import registry

    original = registry.make_env
    with run_all.timed_env_construction() as seconds:
        assert registry.make_env is not original
        for _ in range(2):
            registry.make_env("reach").close()
    assert registry.make_env is original and len(seconds) == 2 and all(s > 0 for s in seconds)
    with pytest.raises(RuntimeError), run_all.timed_env_construction():
        raise RuntimeError("a run that fails")
    assert registry.make_env is original


def test_replay_figures_divide_writes_and_samples_by_their_own_medians(monkeypatch):
    fake = FakeMeasure({"shared": 2.0, "per_transition": 4.0}, {"shared": 0.01, "per_transition": 0.02},
                       {"journal_off": 1.0, "journal_on": 1.5})
    monkeypatch.setattr(run_all, "measure", fake)
    result = run_all.replay_section(QUICK_CTX)
    f = result["figures"]
    peaks = {row["what"]: row["peak_mib"] for row in result["rows"]}
    assert [peaks[f"write, next frames {name}"] for name in ("shared", "per_transition")] == [10.0, 20.0]
    assert [peak for what, peak in peaks.items() if what.startswith("sample")] == [110.0, 120.0]
    n = run_all.QUICK.replay[0]
    batch = run_all.load_config("default").replay.batch_size
    assert f["shared_write_transitions_per_s"] == pytest.approx(n / 2.0)
    assert f["per_transition_write_transitions_per_s"] == pytest.approx(n / 4.0)
    assert f["shared_sample_rows_per_s"] == pytest.approx(batch / 0.01)
    assert f["per_transition_sample_rows_per_s"] == pytest.approx(batch / 0.02)
    # Each frame once on disk against twice: well under the per-transition layout's bytes.
    assert f["disk_ratio_shared_over_per_transition"] == pytest.approx(
        f["shared_disk_bytes_per_transition"] / f["per_transition_disk_bytes_per_transition"])
    assert f["disk_ratio_shared_over_per_transition"] < 0.6
    # The overwrite journal's cost: on over off, and each rate from its own median.
    assert f["ring_write_transitions_per_s_journal_off"] == pytest.approx(n / 1.0)
    assert f["ring_write_transitions_per_s_journal_on"] == pytest.approx(n / 1.5)
    assert f["overwrite_journal_cost"] == pytest.approx(1.5)
    assert [peaks[f"write through a ring of {n // 2}, overwrite journal {state}"] for state in ("off", "on")] == [
        210.0, 220.0]


def test_compiled_speedup_is_eager_over_compiled(monkeypatch):
    import d4func.train.precision as precision

    # No tracing here: "compiled" runs the eager grad_fn; the figure arithmetic is what is checked.
    monkeypatch.setattr(precision, "compiled_grad_fn", lambda grad_fn, cfg, **kwargs: grad_fn)
    monkeypatch.setattr(run_all, "measure", FakeMeasure({"eager": (0.3, None), "compiled": (0.1, None)}))
    spec = run_all.PaperScale(d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, latent_tokens=8, latent_dim=8,
                              n_registers=1, batch=1, frames=4, gen_batch=1, gen_frames=2, gen_context=2)
    f = run_all.compiled_vs_eager_figures("cpu", spec, repeats=1, bf16=False)
    tokens = spec.batch * spec.frames * spec.dynamics_config().layout().n_tokens
    assert f["speedup_compiled_over_eager"] == pytest.approx(3.0)
    assert f["eager_tokens_per_s"] == pytest.approx(tokens / 0.3)
    assert f["compiled_tokens_per_s"] == pytest.approx(tokens / 0.1)
    assert f["first_loss_compiled"] == f["first_loss_eager"]  # same start state, same draws, same function


# ---- orchestration -------------------------------------------------------------------------------------------------
def test_worker_runs_its_sections_at_the_requested_threads_and_records_a_failure(monkeypatch, tmp_path):
    seen = []

    def fine(ctx):
        seen.append(torch.get_num_threads())
        return run_all.section([run_all.Row("x", 1.0, "s")], {"x": 1.0}, {})

    def broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(run_all, "SECTIONS", {"fine": fine, "broken": broken})
    threads = torch.get_num_threads()
    try:
        run_all.run_worker(["broken", "fine"], run_all.Context(run_all.QUICK, 2, None), tmp_path / "w.json")
    finally:
        torch.set_num_threads(threads)
    assert seen == [2]
    written = json.loads((tmp_path / "w.json").read_text())
    assert "boom" in written["broken"]["error"] and written["fine"]["figures"] == {"x": 1.0}


def test_peak_tflops_and_threads_reach_the_worker_and_its_context(monkeypatch, tmp_path):
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        out = Path(command[command.index("--worker-out") + 1])
        result = run_all.section([run_all.Row("x", 1.0, "s")], {"x": 1.0}, {})
        out.write_text(json.dumps({"replay": {**result, "seconds": 0.1, "process_peak_rss_mib": 1.0}}))
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(run_all.subprocess, "run", fake_run)
    out = tmp_path / "all.json"
    assert run_all.main(["--only", "replay", "--threads", "3", "--peak-tflops", "500", "--out", str(out)]) == 0
    command = commands[0]
    assert command[command.index("--threads") + 1] == "3"
    assert float(command[command.index("--peak-tflops") + 1]) == 500.0
    assert json.loads(out.read_text())["sections"]["replay"]["figures"] == {"x": 1.0}
    # The worker reads the flag in TFLOP/s and keeps FLOP/s.
    contexts = []
    monkeypatch.setattr(run_all, "run_worker", lambda names, ctx, out_file: contexts.append((names, ctx)) or 0)
    run_all.main(["--worker", "replay", "--worker-out", str(tmp_path / "w.json"), "--threads", "3",
                  "--peak-tflops", "500", "--quick"])
    names, ctx = contexts[0]
    assert names == ["replay"] and ctx.threads == 3 and ctx.peak_flops == pytest.approx(500e12)
    assert ctx.budget is run_all.QUICK

