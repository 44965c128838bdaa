"""Data parallel over torch.distributed (2 gloo ranks under torchrun): a loss that takes its random draws as inputs
matches the single-process step on the whole batch; the project's real train steps with
`grad_fn=data_parallel_grad_and_value` match the mean of per-shard gradients (each shard with its rank's generator)
and keep the replicas bitwise identical."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.states import assert_states_equal
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from d4func.dynamics import Dynamics
from d4func.functional import grad_and_value, template
from d4func.heads import AgentHeads
from d4func.tokenizer import Tokenizer
from d4func.tokenizer_loss import new_tokenizer_train_state, tokenizer_train_step
from d4func.train import distributed as D
from d4func.train.agent_step import agent_finetune_step, imagination_step, new_imagination_state
from d4func.train.dynamics_step import dynamics_loss, dynamics_train_step
from d4func.train.run_logs import read_metrics
from d4func.train.state import new_train_state

torch.set_num_threads(1)

HELPERS = Path(__file__).parent / "helpers"
REPO = HELPERS.parents[1]
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 ARGS` from the repository root, one thread per rank."""
    return subprocess.run([*TORCHRUN_2, *args], cwd=REPO, env=ONE_THREAD, capture_output=True, text=True,
                          timeout=timeout)


def _train_cli(*args: str) -> list[str]:
    """`d4func train ARGS` as torchrun's program."""
    return ["-m", "d4func.cli", "train", *args]


@pytest.fixture(scope="module")
def reach_data(tmp_path_factory) -> Path:
    """A 120-step Reach dataset (seconds to record), read by the command-line tests."""
    from d4func.cli import main

    data = tmp_path_factory.mktemp("reach") / "data"
    assert main(["collect", "--env", "reach", "--out", str(data), "--steps", "120", "--image-size", "16",
                 "--action-repeat", "1"]) == 0
    return data


def test_rank_seeds_are_deterministic_and_distinct() -> None:
    seeds = {D.rank_seed(7, rank, stream) for rank in range(8) for stream in ("data", "replay")}
    assert len(seeds) == 16
    assert D.rank_seed(7, 3) == D.rank_seed(7, 3)
    assert all(0 <= s < 2**63 for s in seeds)
    a, b = D.rank_generator(7, 0), D.rank_generator(7, 1)
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))
    with pytest.raises(ValueError, match="-1"):
        D.rank_seed(7, -1)


def test_every_rank_can_seed_a_dmcontrol_env() -> None:
    """dm_control takes seeds below 2**32 only: the loop's env seeds (per rank, and at a resume) stay there.
    63-bit rank seeds once stopped every online torchrun run on DMControl at start-up."""
    from d4func.envs import make_env
    from d4func.train.evaluation import ENV_SEED_BITS, eval_env_seed, resume_env_seed

    seeds = [D.rank_seed(seed, rank, "env", bits=ENV_SEED_BITS) for seed in (0, 2**31 - 1) for rank in range(64)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**32 for s in seeds)
    assert max(seeds) >= 2**31  # all 32 bits in use, not a truncation to fewer
    assert all(0 <= resume_env_seed(s, 10**12) < 2**32 and 0 <= eval_env_seed(s) < 2**32 for s in seeds)
    with pytest.raises(ValueError, match="bits must be in"):
        D.rank_seed(7, 0, bits=65)
    env = make_env("dmc:cartpole-swingup", seed=max(seeds), image_size=16)
    try:
        env.reset()
        env.set_seed(resume_env_seed(max(seeds), 10**12))
    finally:
        env.close()


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 300), st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
                   min_size=1, max_size=12),
    bucket_bytes=st.integers(8, 1200),
)
def test_buckets_partition_leaves_by_dtype_within_size(sizes, bucket_bytes) -> None:
    tensors = [torch.zeros(n, dtype=dtype) for n, dtype in sizes]
    buckets = D._buckets(tensors, bucket_bytes)
    assert sorted(i for bucket in buckets for i in bucket) == list(range(len(tensors)))
    for bucket in buckets:
        assert len({tensors[i].dtype for i in bucket}) == 1
        nbytes = sum(tensors[i].numel() * tensors[i].element_size() for i in bucket)
        assert nbytes <= bucket_bytes or len(bucket) == 1
        assert bucket == sorted(bucket)


def test_bucketed_round_trip_restores_every_leaf() -> None:
    tree = TensorDict({"a": torch.randn(3, 5), "b": {"c": torch.randn(7).double(), "d": torch.randn(2, 2)},
                       "e": torch.randn(40)}, [])
    seen = []
    out = D._bucketed(tree, bucket_mb=64 / 2**20, collective=lambda flat: seen.append(flat.numel()))
    assert (out == tree).all()
    assert len(seen) >= 3  # small buckets: several collective calls, split by dtype and size
    # Not distributed: the collectives are the identity.
    assert D.all_reduce_mean(tree) is tree and D.broadcast_tree(tree) is tree
    assert D.reduce_metrics({"loss": torch.tensor(1.5)}) == {"loss": torch.tensor(1.5)}


def test_two_gloo_ranks_match_single_process_full_batch(tmp_path) -> None:
    """torchrun, 2 CPU processes: broadcast initial params, average shard gradients, stay bitwise in sync, and
    end where the single-process run on the concatenated batches ends (float64, 2 AdamW steps)."""
    sys.path.insert(0, str(HELPERS.parent))
    from helpers.dp_step import N_STEPS, initial_params, single_process_steps

    out = tmp_path / "dp.pt"
    result = _torchrun(str(HELPERS / "dp_step.py"), str(out), timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    got = torch.load(out, weights_only=False)
    assert got["world"] == 2 and got["n_rng"] == 2
    assert got["drift_caught"], "check_in_sync missed a 1e-12 drift on rank 1"
    assert got["disagreement"] == "data-parallel ranks disagree on whether to resume (rank 0: True, rank 1: False)"
    assert got["data_states_differ"], "rank generators of rank 0 and 1 coincide"

    reference, history = single_process_steps()
    state = TensorDict(got["state"], [])
    assert int(state["step"]) == N_STEPS
    for key in reference.keys(include_nested=True, leaves_only=True):
        torch.testing.assert_close(state.get(key), reference.get(key), rtol=1e-10, atol=1e-12, msg=str(key))
    for ours, ref in zip(got["history"], history, strict=True):
        torch.testing.assert_close(ours["loss"], ref["loss"], rtol=1e-12, atol=0)
        torch.testing.assert_close(ours["mse"], ref["mse"], rtol=1e-12, atol=0)
        torch.testing.assert_close(ours["value"], ref["loss"], rtol=1e-12, atol=0)
    # The steps really moved the params (a no-op update would also "match").
    initial = initial_params()
    moved = max((state["params"].get(k) - initial.get(k)).abs().max().item()
                for k in initial.keys(include_nested=True, leaves_only=True))
    assert moved > 1e-3


def _real_steps_helper():
    sys.path.insert(0, str(HELPERS.parent))
    from helpers import dp_real_steps

    return dp_real_steps


def _failure_report(result: subprocess.CompletedProcess) -> str:
    """The ranks' own tracebacks (torchrun prefixes them with [rankN]), else the end of the output."""
    output = result.stdout + result.stderr
    ranks = "\n".join(line for line in output.splitlines() if line.startswith("[rank"))
    return (ranks or output)[-6000:]


def _leaves(tree: TensorDict) -> dict:
    return {key: tree.get(key) for key in tree.keys(include_nested=True, leaves_only=True)}


def test_real_train_steps_on_two_gloo_ranks_average_shard_gradients(tmp_path) -> None:
    """torchrun, 2 CPU processes, the project's real steps with `grad_fn=data_parallel_grad_and_value`: after 2
    steps the whole train state (params, AdamW moments, EMA, the tokenizer's running loss statistics) and the
    reported metrics equal a one-process reference that averages the two shards' gradients, each computed with
    that rank's generator (float64). The helper itself checks that both ranks hold bitwise the same state and
    metrics after every step, for the imagination step too."""
    H = _real_steps_helper()

    out = tmp_path / "dp_real.pt"
    result = _torchrun(str(HELPERS / "dp_real_steps.py"), str(out), timeout=240)
    assert result.returncode == 0, _failure_report(result)
    got = torch.load(out, weights_only=False)

    references = {"dynamics": (H.reference_dynamics, H.dynamics_params),
                  "tokenizer": (H.reference_tokenizer, H.tokenizer_params),
                  "finetune": (H.reference_finetune, H.agent_params)}
    for name, (reference_fn, initial_fn) in references.items():
        reference, history = reference_fn()
        state = TensorDict(got[name]["state"], [])
        assert int(state["step"]) == H.N_STEPS, name
        ours, ref = _leaves(state), _leaves(reference)
        assert set(ours) == set(ref), name
        for key, value in ref.items():
            torch.testing.assert_close(ours[key], value, rtol=1e-10, atol=1e-12, msg=f"{name} {key}")
        assert len(got[name]["history"]) == len(history) == H.N_STEPS
        for step, (metrics, expected) in enumerate(zip(got[name]["history"], history, strict=True)):
            for metric, value in expected.items():
                torch.testing.assert_close(metrics[metric], value, rtol=1e-12, atol=0, msg=f"{name} {metric} {step}")
        # The steps moved the params (a no-op update would also "match").
        initial = _leaves(initial_fn())
        moved = max((ours[("params", *key)] - value).abs().max().item() for key, value in initial.items())
        assert moved > 1e-3, name
    assert got["tokenizer"]["state"]["loss_rms"]["mse"]["count"] == H.N_STEPS
    assert got["imagination"]["steps"] == H.N_STEPS
    assert all(torch.isfinite(v) for v in got["imagination"]["value_loss"])


def test_shard_gradients_differ_so_the_reference_is_not_trivial() -> None:
    """The two shards (different data, different generators) give different gradients, so matching the mean of the
    shard gradients is a real check: each shard alone ends elsewhere."""
    H = _real_steps_helper()

    params = H.dynamics_params()
    latents, actions = H.dynamics_batches()[0]
    losses, grads = [], []
    for rank in range(H.WORLD):
        g, (loss, _) = grad_and_value(dynamics_loss, has_aux=True)(
            params, H.shard(latents, rank), H.shard(actions, rank), D.rank_generator(H.SEED, rank),
            model=template(Dynamics, H.DYN))
        losses.append(loss)
        grads.append(g)
    assert abs(losses[0] - losses[1]) > 1e-3
    diff = max((a - b).abs().max().item() for a, b in zip(_leaves(grads[0]).values(), _leaves(grads[1]).values(),
                                                       strict=True))
    assert diff > 1e-3


def test_steps_route_gradients_through_grad_fn() -> None:
    """Each of the four train steps computes its gradients with the `grad_fn` it is given (called once, with
    has_aux=True), and the default or a pass-through `grad_fn` gives bitwise the same step. A `grad_fn` that
    scales the gradients changes the step, so the argument is really used."""
    H = _real_steps_helper()

    dyn, tok = template(Dynamics, H.DYN), template(Tokenizer, H.TOK)
    agent_dyn, heads = template(Dynamics, H.AGENT_DYN), template(AgentHeads, H.AGENT_HEADS)
    latents, actions = H.dynamics_batches()[0]
    agent_batch = H.agent_batches()[0]
    context = {"latents": agent_batch["latents"].float(), "actions": agent_batch["actions"].float()}
    steps = {
        "dynamics": lambda gen, **kw: dynamics_train_step(
            new_train_state(H.dynamics_params()), latents, actions, gen, model=dyn, opt=H.OPT, ema_decay=H.EMA, **kw),
        "tokenizer": lambda gen, **kw: tokenizer_train_step(
            new_tokenizer_train_state(H.tokenizer_params()), H.tokenizer_batches()[0], gen, template=tok,
            cfg=H.TOK_LOSS, optim=H.OPT, ema_decay=H.EMA, **kw),
        "finetune": lambda gen, **kw: agent_finetune_step(
            new_train_state(H.agent_params()), agent_batch, gen, model=agent_dyn, heads=heads, opt=H.OPT,
            ema_decay=H.EMA, **kw),
        "imagination": lambda gen, **kw: imagination_step(
            new_imagination_state(H.agent_params().float()), context, gen, model=agent_dyn, heads=heads, opt=H.OPT,
            cfg=H.IMAGINE, **kw),
    }

    def spy(scale: float, calls: list):
        def grad_fn(loss_fn, has_aux=False):
            calls.append(has_aux)
            inner = grad_and_value(loss_fn, has_aux=has_aux)

            def wrapped(params, *args, **kwargs):
                grads, out = inner(params, *args, **kwargs)
                return (grads * scale if scale != 1.0 else grads), out

            return wrapped

        return grad_fn

    for name, step in steps.items():
        default_state, default_metrics = step(torch.Generator().manual_seed(3))
        calls: list = []
        state, metrics = step(torch.Generator().manual_seed(3), grad_fn=spy(1.0, calls))
        assert calls == [True], name
        assert set(metrics) == set(default_metrics), name
        for key, value in _leaves(default_state).items():
            assert torch.equal(_leaves(state)[key], value), (name, key)
        for metric, value in default_metrics.items():
            assert torch.equal(metrics[metric], value), (name, metric)
        # AdamW is invariant to a constant gradient scale only up to eps; 1e-6 puts the update in eps's regime.
        scaled, _ = step(torch.Generator().manual_seed(3), grad_fn=spy(1e-6, []))
        reference = _leaves(default_state["params"])
        assert any(not torch.equal(value, reference[key]) for key, value in _leaves(scaled["params"]).items()), name


# ~25 s: CI's time budget keeps the default suite to the one-step gradient equality tests above (`-m slow` runs it).
@pytest.mark.slow
def test_d4func_train_offline_under_torchrun_writes_once_and_resumes(tmp_path, reach_data):
    """The command line under torchrun: 2 gloo ranks train offline on Reach data, rank 0 alone writes (one
    metrics file, checkpoints holding both ranks' RNG states), the ranks end bitwise in sync (the loop checks),
    a resume under torchrun continues, and a single-process resume of a 2-rank run is refused by name. A
    time-based checkpoint at every step (rank 0's clock, broadcast) adds the odd steps' saves."""
    from d4func.train import checkpoint

    run = tmp_path / "run"
    args = ["--config", "experiments/configs/reach.yaml", "--quiet", f"run_dir={run}",
            f"loop.offline_data={reach_data}", "loop.agent_start=2", "loop.checkpoint_every=2", "loop.log_every=1",
            "loop.eval_every=1000", "env.eval_episodes=0", "loop.gif_every=1000", "loop.keep_checkpoints=10",
            "loop.checkpoint_every_minutes=1e-9"]

    def torchrun(steps: int) -> subprocess.CompletedProcess:
        return _torchrun(*_train_cli(*args, f"loop.offline_steps={steps}"))

    first = torchrun(4)
    assert first.returncode == 0, _failure_report(first)
    assert first.stdout.count('"grad_steps"') == 1  # one summary printed, rank 0's
    rows = read_metrics(run)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]  # logged once per step, not once per rank
    assert [path.name for path in checkpoint.list_checkpoints(run)] == [
        checkpoint.checkpoint_name(step) for step in (1, 2, 3, 4)]
    latest = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run))
    assert latest.step == 4 and len(latest.rng) == 2
    train_rng = [latest.rng[rank]["generators"]["train"]["state"] for rank in (0, 1)]
    assert not torch.equal(*train_rng)  # each rank draws its own noise

    second = torchrun(6)
    assert second.returncode == 0, _failure_report(second)
    assert json.loads((run / "summary.json").read_text())["grad_steps"] == 6
    resumed = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run)).payload
    replay_rngs = [part["replay"]["rng"] for part in resumed["ranks"]]
    assert not torch.equal(*replay_rngs)  # after the resume each rank still samples its own batches

    single = subprocess.run([sys.executable, "-m", "d4func.cli", "train", *args, "loop.offline_steps=8"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 2 and "RNG states of 2 ranks" in single.stderr


# ~15 s on 2 cores; slow, as the resume tests (the default suite keeps to its 10 minutes).
@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_with_the_last_good_state_saved(tmp_path, reach_data):
    """A NaN in rank 1's world-model loss alone: metrics are averaged before the finiteness check, so both ranks
    stop at the same step with the loss term named (exit 3, nobody left in a collective), and rank 0 saves the
    states from before the failing step with both ranks' RNG states."""
    from d4func.train import checkpoint

    run = tmp_path / "run"
    result = subprocess.run(
        [*TORCHRUN_2, str(HELPERS / "dp_nan.py"), "train", "--config", "experiments/configs/reach.yaml", "--quiet",
         f"run_dir={run}", f"loop.offline_data={reach_data}", "loop.offline_steps=20", "loop.agent_start=1000",
         "loop.checkpoint_every=1000", "loop.eval_every=1000", "env.eval_episodes=0", "loop.gif_every=1000"],
        cwd=REPO, env={**ONE_THREAD, "NAN_STEP": "3"}, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, _failure_report(result)
    stops = [line for line in result.stderr.splitlines() if "non-finite reward_ce at step 3" in line]
    assert len(stops) == 2 and all("world_model phase" in line for line in stops), _failure_report(result)
    saved = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run))
    assert saved.step == 3 and len(saved.rng) == 2
    assert saved.payload["counters"]["grad_steps"] == 3
    assert int(saved.payload["states"]["world_model"]["step"]) == 3  # before the failing update


# ~35 s on 2 cores; slow, as the offline torchrun resume test above.
@pytest.mark.slow
def test_online_training_under_torchrun_resumes_exactly(tmp_path):
    """`d4func train` online under torchrun (2 gloo ranks on Reach): each rank collects from its own env into its
    own replay, checkpoints hold every rank's own part, and 30 steps + resume to 40 equal 40 straight (bitwise,
    states and every rank's counters, replay position and collector state)."""
    from d4func.train import checkpoint

    common = ["--config", "experiments/configs/reach.yaml", "--quiet", "loop.mode=online", "loop.offline_data=null",
              "loop.prefill_steps=10", "loop.collect_steps=5", "loop.train_ratio=0.4", "loop.agent_start=20",
              "loop.eval_every=1000", "loop.gif_every=1000", "loop.checkpoint_every=1000", "loop.log_every=1",
              "env.eval_episodes=1", "env.eval_max_steps=5", "replay.batch_size=2", "loop.eval_bc=false"]

    def torchrun(run_dir, steps: int) -> None:
        result = _torchrun(*_train_cli(*common, f"run_dir={run_dir}", f"loop.env_steps={steps}"))
        assert result.returncode == 0, _failure_report(result)

    torchrun(tmp_path / "whole", 40)
    torchrun(tmp_path / "split", 30)
    torchrun(tmp_path / "split", 40)
    assert (tmp_path / "whole" / "replay").is_dir() and (tmp_path / "whole" / "replay-rank1").is_dir()
    whole = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path / "whole")).payload
    split = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path / "split")).payload
    assert len(whole["ranks"]) == 2 and whole["counters"]["env_steps"] == 40 and whole["counters"]["grad_steps"] == 14
    # the ranks played different episodes: their collectors' current observations differ
    first, second = (part["online"]["carrier"]["pixels"] for part in whole["ranks"])
    assert not torch.equal(first, second)
    assert_states_equal(whole["states"], split["states"])
    for mine, theirs in zip(whole["ranks"], split["ranks"], strict=True):
        assert mine["counters"] == theirs["counters"]
        assert mine["replay"]["rng"] is not None and torch.equal(mine["replay"]["rng"], theirs["replay"]["rng"])
        assert torch.equal(mine["online"]["carrier"]["pixels"], theirs["online"]["carrier"]["pixels"])



def _kill_if_running(job: subprocess.Popen, workers: list[int]) -> None:
    """End a torchrun job a test left running, with its workers (found before the kill, which orphans them)."""
    import signal

    if job.poll() is None:
        stray = workers or _children(job.pid)
        job.kill()
        for pid in stray:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        job.wait(timeout=30)


def _children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow  # ~20 s: a two-rank torchrun job, stopped and waited for
def test_ctrl_c_on_one_rank_ends_the_whole_torchrun_job(tmp_path, reach_data):
    """SIGINT to one data-parallel worker: no collective may wait for it. The job must end within a minute (it
    used to hang in the exit save, and then in the final sync check), keeping its periodic checkpoints."""
    import signal
    import time

    from d4func.train import checkpoint

    run = tmp_path / "run"
    job = subprocess.Popen(
        [*TORCHRUN_2, *_train_cli(
            "--config", "experiments/configs/reach.yaml", "--quiet", f"run_dir={run}",
            f"loop.offline_data={reach_data}", "loop.agent_start=2", "loop.checkpoint_every=5", "loop.log_every=1",
            "loop.eval_every=100000", "env.eval_episodes=0", "loop.gif_every=100000", "loop.offline_steps=100000")],
        cwd=REPO, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:  # the job trains for good unless stopped: whatever fails here, it must not outlive the test
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and job.poll() is None and not checkpoint.list_checkpoints(run):
            time.sleep(0.2)
        workers = _children(job.pid)
        assert len(workers) == 2 and checkpoint.list_checkpoints(run), job.stderr.read()[-3000:] if job.poll() else ""
        os.kill(max(workers), signal.SIGINT)
        try:
            job.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the torchrun job still ran 60 s after one rank got Ctrl-C")
    finally:
        _kill_if_running(job, workers)
    assert job.returncode != 0
    checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run))  # the periodic checkpoints stay whole


@pytest.mark.slow  # ~30 s: a two-rank torchrun job, terminated, then resumed for two steps
def test_sigterm_on_one_rank_stops_every_rank_at_one_step_and_saves_it(tmp_path, reach_data):
    """A scheduler's SIGTERM reaching one data-parallel worker: every rank stops at the same step boundary, they
    save that step together (not only the last periodic checkpoint), each exits with 143, and the job resumes."""
    import signal
    import time

    from d4func.train import checkpoint

    run = tmp_path / "run"
    args = ["--config", "experiments/configs/reach.yaml", "--quiet", f"run_dir={run}",
            f"loop.offline_data={reach_data}", "loop.agent_start=2", "loop.checkpoint_every=100000", "loop.log_every=1",
            "loop.eval_every=100000", "env.eval_episodes=0", "loop.gif_every=100000"]
    job = subprocess.Popen([*TORCHRUN_2, *_train_cli(*args, "loop.offline_steps=100000")], cwd=REPO,
                           env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:  # the job trains for good unless stopped: whatever fails here, it must not outlive the test
        deadline = time.monotonic() + 180

        def steps_logged() -> int:
            return len(read_metrics(run)) if (run / "metrics.jsonl").exists() else 0

        while time.monotonic() < deadline and job.poll() is None and steps_logged() < 3:
            time.sleep(0.2)
        workers = _children(job.pid)
        assert len(workers) == 2 and not checkpoint.list_checkpoints(run), (
            job.stderr.read()[-3000:] if job.poll() is not None else "")
        os.kill(max(workers), signal.SIGTERM)
        try:
            _, stderr = job.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the torchrun job still ran 120 s after one rank got SIGTERM")
    finally:
        _kill_if_running(job, workers)
    assert job.returncode != 0
    assert stderr.count("terminated by SIGTERM; the run's state is saved") == 2, stderr[-3000:]  # both ranks
    saved = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run))
    assert saved.step >= 3 and len(saved.rng) == 2
    assert [part["counters"]["grad_steps"] for part in saved.payload["ranks"]] == [saved.step] * 2
    assert [row["step"] for row in read_metrics(run)] == list(range(1, saved.step + 1))  # nothing lost, no repeat
    resumed = _torchrun(*_train_cli(*args, f"loop.offline_steps={saved.step + 2}"))
    assert resumed.returncode == 0, _failure_report(resumed)
    assert json.loads((run / "summary.json").read_text())["grad_steps"] == saved.step + 2


def test_rank_seed_refuses_bit_widths_outside_1_to_64_and_fills_the_width_it_is_given() -> None:
    with pytest.raises(ValueError, match="bits must be in \\[1, 64\\], got 0"):
        D.rank_seed(7, 0, bits=0)  # a shift by 64 would return the whole 64-bit state, not 0 bits
    assert {D.rank_seed(7, rank, bits=1) for rank in range(32)} == {0, 1}
    assert max(D.rank_seed(7, rank, bits=64) for rank in range(8)) >= 2**63


@pytest.fixture
def two_fake_ranks(monkeypatch) -> SimpleNamespace:
    """An in-process stand-in for 2 ranks. all_reduce: the second rank holds each value plus 1 (a sum over ranks is
    2x + 1, the mean x + 0.5, the max x + 1). all_gather: the second rank sends `peer` (by default what this rank
    sends); `sent` records what this rank sent."""
    ranks = SimpleNamespace(peer=None, sent=[])

    def all_reduce(tensor, op=D.dist.ReduceOp.SUM):
        if op == D.dist.ReduceOp.SUM:
            tensor.mul_(2).add_(1)
        elif op == D.dist.ReduceOp.MAX:
            tensor.add_(1)
        else:
            raise AssertionError(f"unexpected reduction {op}")

    def all_gather(out, tensor):
        ranks.sent.append(tensor.clone())
        out[0].copy_(tensor)
        out[1].copy_(tensor if ranks.peer is None else ranks.peer)

    monkeypatch.setattr(D, "_active", lambda: True)
    monkeypatch.setattr(D.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(D.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(D.dist, "all_gather", all_gather)
    return ranks


def test_data_parallel_grad_without_aux_returns_the_rank_mean_of_gradients_and_loss(two_fake_ranks) -> None:
    # The train steps all pass has_aux=True; a plain loss (the grad_and_value contract) must be reduced too.
    params = TensorDict({"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}, [])

    def loss_fn(p):
        return (p["w"] ** 2).sum()

    grads, loss = D.data_parallel_grad_and_value(loss_fn)(params)
    torch.testing.assert_close(grads["w"], torch.tensor([2.5, 4.5], dtype=torch.float64))
    assert float(loss) == 5.5
    reduced = D.reduce_metrics({"loss": torch.tensor(2.0), "adv_absmax": torch.tensor(3.0)})
    assert (float(reduced["loss"]), float(reduced["adv_absmax"])) == (2.5, 4.0)


def test_check_in_sync_catches_replicas_that_hold_the_same_values_in_other_places(two_fake_ranks) -> None:
    # Two swapped entries keep every leaf's sum: only the position-weighted checksum tells the replicas apart.
    ours = TensorDict({"a": torch.arange(4.0), "b": {"c": torch.tensor([1.0, 2.0, 3.0])}}, [])
    theirs = ours.clone()
    theirs["b", "c"] = torch.tensor([2.0, 1.0, 3.0])
    D.check_in_sync(theirs)  # both fake ranks hold `theirs`: in sync, and its checksums are recorded
    two_fake_ranks.peer = two_fake_ranks.sent[-1]
    D.check_in_sync(theirs.clone())
    with pytest.raises(RuntimeError, match=r"params differ between rank 0 and rank 1 at \['b.c'\]"):
        D.check_in_sync(ours)


def test_a_max_metric_in_a_steps_aux_is_the_maximum_over_ranks(two_fake_ranks) -> None:
    # The train steps' metrics reach reduce_metrics through data_parallel_grad_and_value's aux (renamed "aux.x"):
    # adv_absmax must still take the maximum (the fake second rank holds x + 1), the rest the mean.
    params = TensorDict({"w": torch.tensor([1.0], dtype=torch.float64)}, [])

    def loss_fn(p):
        return (p["w"] ** 2).sum(), {"adv_absmax": torch.tensor(3.0), "loss_term": torch.tensor(2.0)}

    _, (loss, aux) = D.data_parallel_grad_and_value(loss_fn, has_aux=True)(params)
    assert (float(aux["adv_absmax"]), float(aux["loss_term"])) == (4.0, 2.5)


def test_ranks_that_would_resume_different_checkpoints_stop_naming_both_steps(tmp_path, reach_data, monkeypatch):
    """Each rank restores the newest checkpoint it can read: on nodes that do not share run_dir, or after one rank
    fell back past a damaged file, they could resume different steps, with counters and RNGs from different points
    of the run. The resume is refused, naming each rank's step (the second rank is faked in-process: it agrees
    that there is a checkpoint, but found the one before)."""
    from d4func.train.loop import train
    from d4func.train.run_config import load_run_config

    args = [f"run_dir={tmp_path / 'run'}", "loop.mode=offline", f"loop.offline_data={reach_data}",
            "loop.agent_start=100", "loop.eval_every=100", "loop.gif_every=100", "loop.checkpoint_every=2",
            "env.eval_episodes=0"]
    train(load_run_config("experiments/configs/reach.yaml", [*args, "loop.offline_steps=2"]), progress=False)

    def all_gather_object(out, value):
        out[0] = value
        out[1] = value - 1 if isinstance(value, int) and not isinstance(value, bool) else value

    monkeypatch.setattr(D, "_active", lambda: True)
    monkeypatch.setattr(D.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(D.dist, "all_gather_object", all_gather_object)
    with pytest.raises(RuntimeError, match=r"disagree on which checkpoint of .*run to resume \(rank 0: 2, rank 1: 1\)"):
        train(load_run_config("experiments/configs/reach.yaml", [*args, "loop.offline_steps=4"]), progress=False)
