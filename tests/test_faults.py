"""Faults: NaN/inf stop training after saving the last good state; SIGKILL never costs a checkpoint; bad input
raises with a message naming the bad value."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.logs import csv_logs
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from d4func.config import TransformerConfig
from d4func.dynamics import Dynamics, DynamicsConfig
from d4func.functional import apply, grad_and_value, init, template
from d4func.optim import AdamWConfig
from d4func.train import checkpoint as C
from d4func.train.dynamics_step import dynamics_train_step
from d4func.train.faults import NonFiniteLossError, guarded_step
from d4func.train.state import apply_gradients, check_finite, checked_update, new_train_state

torch.set_num_threads(1)
TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

TINY = TransformerConfig(d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, time_every=2)
DYN = DynamicsConfig(transformer=TINY, latent_tokens=4, latent_dim=4, pack=2, n_registers=1, action_dim=2, k_max=4,
                     sampling_steps=2)


# ----------------------------------------------------------------------------------------------------------------
# NaN / inf: stop, naming the term and step, after saving the last good state
# ----------------------------------------------------------------------------------------------------------------


def _save_on_fault(run_dir: Path, generators: dict):
    def save(state, error):
        return C.save_checkpoint(run_dir, int(state["step"]), {"state": state}, generators=generators)

    return save


def test_nan_loss_saves_the_state_before_the_step_and_names_term_and_step(tmp_path) -> None:
    model = template(Dynamics, DYN)
    state = new_train_state(init(model, 0), with_ema=False)
    gen = torch.Generator().manual_seed(0)
    data = torch.Generator().manual_seed(1)
    opt = AdamWConfig(lr=1e-3)
    on_fault = _save_on_fault(tmp_path, {"loss": gen})
    for _ in range(3):
        latents = torch.rand(2, 3, 4, 4, generator=data) * 2 - 1
        state, _ = guarded_step(dynamics_train_step, state, latents, None, gen, model=model, opt=opt,
                                on_fault=on_fault, generators={"loss": gen})
    good = state
    gen_before = gen.get_state()
    bad = latents.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"loss.* at step 3.*saved to .*ckpt-000000000003\.pt") as info:
        guarded_step(dynamics_train_step, state, bad, None, gen, model=model, opt=opt, on_fault=on_fault,
                     generators={"loss": gen})
    assert "flow_mse" in str(info.value) or "bootstrap_mse" in str(info.value)
    saved = C.load_checkpoint(C.latest_checkpoint(tmp_path))
    assert saved.step == 3
    assert (saved.payload["state"] == good).all()
    # RNGs were rewound to before the faulting step: resuming from the checkpoint replays that very step.
    assert torch.equal(saved.rng[0]["generators"]["loss"]["state"], gen_before)


def test_inf_gradient_with_finite_loss_is_caught_as_grad_norm(tmp_path) -> None:
    params = TensorDict({"w": torch.tensor([0.0, 1.0])}, [])
    state = new_train_state(params, with_ema=False)

    def step(state, x):
        def loss_fn(p, x):
            return (p["w"] * x).abs().sqrt().sum()  # sqrt'(0) = inf: finite loss, infinite gradient

        grads, loss = grad_and_value(loss_fn)(state["params"], x)
        check_finite({"loss": loss}, state["step"])
        new_state, metrics = apply_gradients(state, grads, AdamWConfig(max_grad_norm=None))
        return new_state, {"loss": loss, **metrics}

    with pytest.raises(NonFiniteLossError, match=r"grad_norm at step 0; .*saved to sentinel"):
        guarded_step(step, state, torch.ones(2), on_fault=lambda s, e: "sentinel")
    with pytest.raises(NonFiniteLossError, match=r"^non-finite grad_norm at step 0$"):
        guarded_step(step, state, torch.ones(2))  # no handler: the plain error


# ----------------------------------------------------------------------------------------------------------------
# SIGKILL: during training and during a checkpoint write
# ----------------------------------------------------------------------------------------------------------------


def _launch(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(TESTS / "helpers" / "toy_training.py"), str(run_dir), "--steps", "12", "--every", "4",
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )


def _read_until(proc: subprocess.Popen, predicate, timeout: float = 120.0) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"training process ended early (rc={proc.poll()}); output: {lines}")
        lines.append(line.strip())
        if predicate(lines[-1]):
            return lines
    raise AssertionError(f"timed out; output so far: {lines}")


def _kill(proc: subprocess.Popen) -> list[str]:
    """SIGKILL; returns the lines it printed after the last one read."""
    proc.send_signal(signal.SIGKILL)
    rest = proc.stdout.read().splitlines()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return [line.strip() for line in rest]


def test_sigkill_during_training_loses_only_steps_since_the_last_checkpoint(tmp_path) -> None:
    from helpers.toy_training import run

    run_dir = tmp_path / "run"
    proc = _launch(run_dir, "--sleep", "0.15")
    lines = _read_until(proc, lambda line: line == "step 6")
    lines += _kill(proc)
    saved = [int(line.split()[1]) for line in lines if line.startswith("saved")]
    steps_done = max(int(line.split()[1]) for line in lines if line.startswith("step"))
    latest = C.load_checkpoint(C.latest_checkpoint(run_dir))
    assert saved and latest.step >= saved[-1]
    assert steps_done - latest.step <= 4, "lost more than the steps since the last checkpoint (every=4)"

    # Resume in a new process to the end: identical to a run that was never killed.
    proc = _launch(run_dir)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0 and out.split()[-1] == "done", out
    first = int(out.split()[1])
    assert first == latest.step + 1, f"resumed at step {first}, checkpoint was {latest.step}"
    final = torch.load(run_dir / "final.pt", weights_only=True)
    reference, history = run(tmp_path / "reference", 12, every=0)
    assert torch.equal(final["history"], history)
    got = TensorDict(final["state"], [])
    for key in reference.keys(include_nested=True, leaves_only=True):
        assert torch.equal(got.get(key), reference.get(key)), key


@pytest.mark.parametrize("stage", ["partial", "written"])
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, stage) -> None:
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, "--pause-step", "8", "--pause-stage", stage)
    lines = _read_until(proc, lambda line: line.startswith("paused"))
    tmp = Path(lines[-1].split()[2])
    assert _kill(proc) == []  # it was blocked in the write
    assert "saved 4" in lines and "saved 8" not in lines
    assert tmp.exists() and tmp.parent == run_dir
    if stage == "partial":
        with pytest.raises(Exception):  # noqa: B017 - truncated: not loadable under any name
            torch.load(tmp, weights_only=True)
    # The unfinished file is invisible; the previous checkpoint is intact and complete.
    assert [p.name for p in C.list_checkpoints(run_dir)] == [C.checkpoint_name(4)]
    ckpt = C.restore(run_dir, {"env": torch.Generator(), "loss": torch.Generator()})
    assert ckpt.step == 4 and int(ckpt.payload["states"]["dynamics"]["step"]) == 4
    # The next save (any process) sweeps the dead writer's temp file away.
    C.save_checkpoint(run_dir, 5, {})
    assert not tmp.exists()


# ----------------------------------------------------------------------------------------------------------------
# Bad input: each raises with a message that names the bad value
# ----------------------------------------------------------------------------------------------------------------


def _tokenizer():
    from d4func.tokenizer import Tokenizer, TokenizerConfig

    cfg = TokenizerConfig(height=8, width=8, channels=3, patch_size=4, n_latents=2, latent_dim=4, encoder=TINY,
                          decoder=TINY)
    model = template(Tokenizer, cfg)
    return cfg, model, init(model, 0)


@settings(max_examples=20, deadline=None)
@given(
    axis=st.integers(0, 2), delta=st.sampled_from([-2, -1, 1, 3]), drop_time=st.booleans(),
)
def test_tokenizer_rejects_wrong_frame_shapes(axis, delta, drop_time) -> None:
    cfg, model, params = _tokenizer()
    image = [cfg.channels, cfg.height, cfg.width]
    image[axis] = max(1, image[axis] + delta)
    shape = (2, *image) if drop_time else (2, 1, *image)
    if list(shape[-3:]) == [cfg.channels, cfg.height, cfg.width] and len(shape) == 5:
        return
    with pytest.raises(ValueError) as info:
        apply(model, params, torch.rand(shape), mode="encode")
    assert str(tuple(shape)) in str(info.value)


@settings(max_examples=6, deadline=None)
@given(dtype=st.sampled_from([torch.uint8, torch.int32, torch.int64, torch.bool]))
def test_tokenizer_rejects_non_float_frames(dtype) -> None:
    cfg, model, params = _tokenizer()
    frames = torch.zeros(1, 1, cfg.channels, cfg.height, cfg.width, dtype=dtype)
    with pytest.raises(TypeError) as info:
        apply(model, params, frames, mode="encode")
    assert str(dtype) in str(info.value)


@pytest.mark.parametrize("bad", [255.0, 1.5, -0.25, float("nan")])
def test_tokenizer_rejects_frames_outside_unit_range(bad) -> None:
    cfg, model, params = _tokenizer()
    frames = torch.rand(1, 1, cfg.channels, cfg.height, cfg.width, generator=torch.Generator().manual_seed(0))
    frames.view(-1)[37] = bad
    with pytest.raises(ValueError) as info:
        apply(model, params, frames, mode="encode")
    assert str(bad) in str(info.value) or f"{bad:g}" in str(info.value)


@settings(max_examples=15, deadline=None)
@given(n_actions=st.integers(2, 9), bad=st.one_of(st.integers(-5, -1), st.integers(0, 20)))
def test_dynamics_rejects_discrete_actions_outside_the_action_space(n_actions, bad) -> None:
    if 0 <= bad < n_actions:
        bad = n_actions + bad
    cfg = DynamicsConfig(transformer=TINY, latent_tokens=4, latent_dim=4, pack=2, n_actions=n_actions, k_max=4,
                         sampling_steps=2)
    model = template(Dynamics, cfg)
    actions = torch.zeros(1, 2, dtype=torch.long)
    actions[0, 1] = bad
    z = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError) as info:
        apply(model, init(model, 0), z, torch.ones(1, 2), torch.ones(1, 2), actions)
    assert str(bad) in str(info.value) and str(n_actions) in str(info.value)


@pytest.mark.parametrize("bad", [1.5, -2.0, float("nan")])
def test_dynamics_rejects_continuous_actions_outside_unit_box(bad) -> None:
    model = template(Dynamics, DYN)
    actions = torch.zeros(1, 2, DYN.action_dim)
    actions[0, 1, 0] = bad
    with pytest.raises(ValueError) as info:
        apply(model, init(model, 0), torch.zeros(1, 2, 4, 4), torch.ones(1, 2), torch.ones(1, 2), actions)
    assert str(bad) in str(info.value)


@settings(max_examples=25, deadline=None)
@given(size=st.integers(4, 96), patch=st.integers(2, 16))
def test_patch_size_must_tile_the_frame(size, patch) -> None:
    from d4func.tokenizer import TokenizerConfig

    if size % patch == 0:
        return
    with pytest.raises(ValueError) as info:
        TokenizerConfig(height=size, width=size, patch_size=patch, encoder=TINY, decoder=TINY)
    assert f"patch_size={patch}" in str(info.value) and f"height={size}" in str(info.value)


@settings(max_examples=25, deadline=None)
@given(kv=st.integers(1, 8), heads=st.integers(1, 16))
def test_kv_heads_must_divide_heads(kv, heads) -> None:
    if heads % kv == 0:
        return
    with pytest.raises(ValueError) as info:
        TransformerConfig(d_model=heads * 4, n_heads=heads, n_kv_heads=kv)
    assert f"n_kv_heads={kv}" in str(info.value) and f"n_heads={heads}" in str(info.value)


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 64), pack=st.integers(2, 8))
def test_pack_must_divide_latent_tokens(tokens, pack) -> None:
    if tokens % pack == 0:
        return
    with pytest.raises(ValueError) as info:
        DynamicsConfig(transformer=TINY, latent_tokens=tokens, pack=pack, action_dim=2)
    assert f"pack={pack}" in str(info.value) and f"latent_tokens={tokens}" in str(info.value)


@settings(max_examples=10, deadline=None)
@given(n_layers=st.integers(1, 8))
def test_a_transformer_without_a_space_layer_is_refused(n_layers) -> None:
    """time_every=1 makes every layer a time layer: no token would ever read another of its own frame."""
    with pytest.raises(ValueError) as info:
        TransformerConfig(d_model=16, n_layers=n_layers, n_heads=2, n_kv_heads=1, time_every=1)
    assert "time_every=1" in str(info.value)


@settings(max_examples=20, deadline=None)
@given(log_k_max=st.integers(1, 6), data=st.data())
def test_sampling_steps_training_never_reaches_are_refused(log_k_max, data) -> None:
    """With bootstrap_fraction=0.0 only the step 1/k_max trains, so any K < k_max would sample with an
    untrained step embedding and an untrained shortcut: refused in the config and in generate / imagine."""
    from d4func.imagination import world_model_fn
    from d4func.sampler import generate

    k_max = 2**log_k_max
    steps = 2 ** data.draw(st.integers(0, log_k_max - 1))
    sizes = dict(transformer=TINY, latent_tokens=4, latent_dim=4, pack=2, action_dim=2, k_max=k_max,
                 bootstrap_fraction=0.0)
    with pytest.raises(ValueError) as info:
        DynamicsConfig(**sizes, sampling_steps=steps)
    assert f"sampling_steps={steps}" in str(info.value) and "bootstrap_fraction=0.0" in str(info.value)
    cfg = DynamicsConfig(**sizes, sampling_steps=k_max)
    model = template(Dynamics, cfg)
    with pytest.raises(ValueError, match=f"steps={steps} "):
        generate(world_model_fn(model, init(model, 0)), torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 2), 1,
                 torch.Generator().manual_seed(0), cfg, steps=steps)


@settings(max_examples=5, deadline=None)
@given(name=st.text(alphabet="abcdefghij_-0123456789", min_size=1, max_size=12))
def test_missing_dataset_path_is_named(tmp_path_factory, name) -> None:
    from d4func.data.offline import load_offline

    path = tmp_path_factory.getbasetemp() / "no-such-dataset" / name
    with pytest.raises(FileNotFoundError) as info:
        load_offline(path, seq_len=4, batch_size=2)
    assert str(path) in str(info.value)


REACH = "experiments/configs/reach.yaml"
# The online loop on Reach, small and quick, with no evaluation or GIF: the `d4func train` kill/terminate tests.
REACH_ONLINE = ["loop.mode=online", "loop.offline_data=null", "loop.prefill_steps=10", "loop.collect_steps=5",
                "loop.train_ratio=0.4", "loop.agent_start=20", "loop.eval_every=100000", "loop.gif_every=100000",
                "loop.log_every=1", "env.eval_episodes=0", "replay.batch_size=2"]


def _endless_cli_training(run_dir: Path, settings: list[str], stderr) -> subprocess.Popen:
    """`d4func train` on Reach online with `settings`, one thread, set to run until it is stopped."""
    return subprocess.Popen([sys.executable, "-m", "d4func.cli", "train", "--config", REACH, "--quiet",
                             f"run_dir={run_dir}", *settings, "loop.env_steps=100000"],
                            cwd=TESTS.parent, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True)


def _assert_resumes_as_uninterrupted(stopped: Path, whole: Path, settings: list[str], target: int) -> None:
    """Resume the stopped run to `target` env steps and train one uninterrupted run there: bitwise the same
    counters, states and metrics lines."""
    from helpers.states import assert_states_equal

    from d4func.train.loop import train
    from d4func.train.run_config import load_run_config

    for run_dir in (stopped, whole):
        train(load_run_config(REACH, [f"run_dir={run_dir}", *settings, f"loop.env_steps={target}"]), progress=False)
    resumed = C.load_checkpoint(C.latest_checkpoint(stopped)).payload
    uninterrupted = C.load_checkpoint(C.latest_checkpoint(whole)).payload
    assert resumed["counters"] == uninterrupted["counters"] and resumed["counters"]["env_steps"] == target
    assert_states_equal(uninterrupted["states"], resumed["states"])
    # Lines a stopped process logged after its last checkpoint are gone: the logs read as one run's.
    assert (stopped / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()


def test_sigkilled_online_loop_resumes_from_its_last_checkpoint_exactly(tmp_path):
    """`d4func train` itself (online on Reach: memmapped replay, TorchRL collector) killed with SIGKILL mid-run: its
    checkpoints all load, and resuming from the newest one ends bitwise where an uninterrupted run ends, although
    the killed process had written replay rows and log lines past that checkpoint, on a ring buffer small enough
    that those rows overwrote rows the checkpoint counts (put back from the replay's overwrite journal)."""
    from d4func.data.overwrite_journal import JOURNAL_DIR, list_records

    settings = [*REACH_ONLINE, "loop.checkpoint_every=10", "loop.keep_checkpoints=10", "replay.capacity=30"]
    killed = tmp_path / "killed"
    proc = _endless_cli_training(killed, settings, (tmp_path / "stderr.txt").open("w"))
    deadline = time.monotonic() + 240
    def past_newest_checkpoint() -> bool:
        """Three checkpoints, and training logged beyond the newest: the kill then throws real work away."""
        found = C.list_checkpoints(killed)
        if len(found) < 3 or not (killed / "metrics.jsonl").exists():
            return False
        newest = int(found[-1].stem.split("-")[1])
        lines = (killed / "metrics.jsonl").read_text().splitlines()
        return any(json.loads(line)["step"] > newest for line in lines if line.endswith("}"))

    while not past_newest_checkpoint() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-3000:]
    checkpoints = C.list_checkpoints(killed)
    assert len(checkpoints) >= 3
    for path in checkpoints:
        C.load_checkpoint(path)  # every checkpoint whole: the atomic write never leaves a torn file
    last = C.load_checkpoint(checkpoints[-1])
    # what the killed process overwrote after the checkpoint is journaled
    records = [first for first, _ in list_records(killed / "replay" / JOURNAL_DIR)]
    assert records and max(records) >= last.payload["replay"]["written"]
    whole = tmp_path / "whole"
    _assert_resumes_as_uninterrupted(killed, whole, settings, target=last.step + 10)
    assert csv_logs(killed) == csv_logs(whole) and "world_model/loss.csv" in csv_logs(whole)


def test_sigterm_saves_the_online_loop_and_stops_with_exit_code_143_and_the_resume_is_exact(tmp_path):
    """`d4func train` given SIGTERM (a scheduler's preemption) mid-run, with no periodic checkpoint due: it saves
    the state it reached, says so in one line and exits with 143, and the same command resumes it to end bitwise
    where an uninterrupted run ends: nothing since the start is lost."""
    from d4func.cli import EXIT_TERMINATED

    settings = [*REACH_ONLINE, "loop.checkpoint_every=100000"]
    stopped = tmp_path / "stopped"
    proc = _endless_cli_training(stopped, settings, subprocess.PIPE)
    try:  # the run trains for good unless stopped: whatever fails here, it must not outlive the test
        deadline = time.monotonic() + 240

        def logged_past(step: int) -> bool:
            path = stopped / "metrics.jsonl"
            lines = path.read_text().splitlines() if path.exists() else []
            return any(json.loads(line)["step"] > step for line in lines if line.endswith("}"))

        while not logged_past(30) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert C.list_checkpoints(stopped) == []  # nothing saved yet: what survives is the SIGTERM's save
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == EXIT_TERMINATED == 143, stderr[-3000:]
    assert "terminated by SIGTERM; the run's state is saved" in stderr.splitlines()[-1]
    saved = C.load_checkpoint(C.latest_checkpoint(stopped))
    assert saved.step > 30 and saved.payload["counters"]["env_steps"] == saved.step
    _assert_resumes_as_uninterrupted(stopped, tmp_path / "whole", settings, target=saved.step + 10)


def test_online_run_stopped_before_its_first_checkpoint_starts_over_with_a_fresh_replay(tmp_path):
    """A run killed before its first checkpoint left replay rows that no checkpoint accounts for: rerunning it
    starts from scratch, replay included (reusing those rows would clash episode ids), and ends where a run in a
    new directory ends."""
    from helpers.states import assert_states_equal

    from d4func.train.loop import train
    from d4func.train.run_config import load_run_config

    common = [*REACH_ONLINE, "loop.checkpoint_every=100000", "loop.env_steps=30"]
    stopped, fresh = tmp_path / "stopped", tmp_path / "fresh"
    train(load_run_config(REACH, [f"run_dir={stopped}", *common, "loop.env_steps=25"]), progress=False)
    for path in C.list_checkpoints(stopped):
        path.unlink()  # as if killed before any checkpoint was written
    assert (stopped / "replay" / "storage").exists()
    with (pytest.warns(UserWarning, match=r"holds no checkpoint: the run starts over and its replay .* is removed"),
          pytest.warns(UserWarning, match=r"drops the \d+ lines its metrics.jsonl held")):
        train(load_run_config(REACH, [f"run_dir={stopped}", *common]), progress=False)
    train(load_run_config(REACH, [f"run_dir={fresh}", *common]), progress=False)
    rerun = C.load_checkpoint(C.latest_checkpoint(stopped)).payload
    reference = C.load_checkpoint(C.latest_checkpoint(fresh)).payload
    assert rerun["counters"] == reference["counters"] and rerun["counters"]["env_steps"] == 30
    # 30 transitions, plus the final frames of the two 12-step episodes that ended
    assert rerun["replay"]["len"] == reference["replay"]["len"] == 32
    assert_states_equal(reference["states"], rerun["states"])
    assert (stopped / "metrics.jsonl").read_text() == (fresh / "metrics.jsonl").read_text()
    assert csv_logs(stopped) == csv_logs(fresh)


def test_guarded_step_checks_python_number_metrics_and_skips_other_values() -> None:
    state = new_train_state(TensorDict({"w": torch.zeros(2)}, []))

    def step(state):
        return state, {"loss": float("nan"), "phase": "world_model"}  # a float metric, and a label

    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss at step 0$"):
        guarded_step(step, state)


def test_checked_update_stops_on_a_non_finite_gradient_naming_the_step_attempted() -> None:
    """A finite loss with an infinite gradient must stop before the update is used, naming the step that was
    being attempted (not the one the update would have produced); the state passed in stays untouched."""
    state = new_train_state(TensorDict({"w": torch.ones(2)}, []), with_ema=False)
    bad_grads = TensorDict({"w": torch.tensor([1.0, float("inf")])}, [])
    with pytest.raises(NonFiniteLossError, match=r"^non-finite grad_norm at step 0$"):
        checked_update(state, bad_grads, {"loss": torch.tensor(1.0)}, AdamWConfig())
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss at step 0$"):
        checked_update(state, bad_grads, {"loss": torch.tensor(float("nan"))}, AdamWConfig())
    grads = TensorDict({"w": torch.ones(2)}, [])
    new_state, metrics = checked_update(state, grads, {"loss": torch.tensor(1.0)}, AdamWConfig(lr=0.1))
    assert set(metrics) == {"loss", "grad_norm", "lr"} and int(new_state["step"]) == 1
    assert int(state["step"]) == 0 and torch.equal(state["params"]["w"], torch.ones(2))  # pure
    assert not torch.equal(new_state["params"]["w"], torch.ones(2))
