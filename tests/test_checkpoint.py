"""Checkpoints: bitwise round trips, every RNG restored, atomic writes, pruning, fallback, and exact resume."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from d4func.config import TransformerConfig
from d4func.dynamics import DynamicsConfig
from d4func.train import checkpoint as C

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8,
          torch.bool]


def _bits(x: torch.Tensor) -> torch.Tensor:
    """A view that compares bitwise (NaN payloads and -0.0 included)."""
    if x.dtype == torch.bool:
        return x.view(torch.uint8)
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def _assert_bitwise(a: TensorDict, b: TensorDict) -> None:
    assert a.batch_size == b.batch_size
    keys_a = sorted(a.keys(include_nested=True, leaves_only=True), key=str)
    keys_b = sorted(b.keys(include_nested=True, leaves_only=True), key=str)
    assert keys_a == keys_b
    for key in keys_a:
        x, y = a.get(key), b.get(key)
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert torch.equal(_bits(x), _bits(y)), key


def _random_leaf(draw, batch: list[int]) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = batch + draw(st.lists(st.integers(0, 4), max_size=2))
    raw = torch.randint(0, 256, (int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size(),),
                        generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))), dtype=torch.uint8)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)  # arbitrary bit patterns: NaNs, infs, subnormals, -0.0


@st.composite
def trees(draw, batch: tuple[int, ...] = (), depth: int = 0) -> TensorDict:
    """Random nested TensorDicts; a nested one's batch size extends its parent's."""
    entries = {}
    for i in range(draw(st.integers(1, 3))):
        if depth < 2 and draw(st.booleans()):
            sub_batch = batch + tuple(draw(st.lists(st.integers(1, 3), max_size=1)))
            entries[f"sub{i}"] = draw(trees(sub_batch, depth + 1))
        else:
            entries[f"leaf{i}"] = _random_leaf(draw, list(batch))
    return TensorDict(entries, batch_size=list(batch))


@settings(max_examples=15, deadline=None)
@given(tree=st.lists(st.integers(1, 3), max_size=1).flatmap(lambda b: trees(tuple(b))))
def test_tensordicts_round_trip_bitwise(tmp_path_factory, tree) -> None:
    run_dir = tmp_path_factory.mktemp("rt")
    path = C.save_checkpoint(run_dir, 5, {"tree": tree, "nested": {"list": [tree, 3]}})
    loaded = C.load_checkpoint(path)
    assert loaded.step == 5
    _assert_bitwise(loaded.payload["tree"], tree)
    _assert_bitwise(loaded.payload["nested"]["list"][0], tree)
    assert loaded.payload["nested"]["list"][1] == 3


def test_payload_primitives_config_and_batch_sizes(tmp_path) -> None:
    cfg = DynamicsConfig(transformer=TransformerConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, time_every=2),
                         latent_tokens=8, action_dim=3)
    state = TensorDict({"params": {"w": torch.randn(4, 3)}, "loss_rms": torch.ones(2),
                        "step": torch.tensor(7)}, [])
    batched = TensorDict({"x": torch.randn(2, 3, 5), "inner": TensorDict({"y": torch.zeros(2, 3)}, [2, 3])}, [2])
    payload = {"states": {"dyn": state}, "batched": batched, "config": C.config_to_dict(cfg),
               "counters": {"env_steps": 1234, "updates": 7}, "tuple": (1, 2.5, None, "x", True)}
    loaded = C.load_checkpoint(C.save_checkpoint(tmp_path, 7, payload)).payload
    _assert_bitwise(loaded["states"]["dyn"], state)
    assert loaded["batched"]["inner"].batch_size == torch.Size([2, 3])
    assert loaded["batched"].batch_size == torch.Size([2])
    assert C.config_from_dict(DynamicsConfig, loaded["config"]) == cfg
    assert loaded["counters"] == {"env_steps": 1234, "updates": 7}
    assert loaded["tuple"] == (1, 2.5, None, "x", True)


def test_unsupported_payload_is_rejected_naming_its_place(tmp_path) -> None:
    with pytest.raises(TypeError, match=r"payload\.a\.b"):
        C.save_checkpoint(tmp_path, 1, {"a": {"b": object()}})
    with pytest.raises(TypeError, match="config_to_dict"):
        C.save_checkpoint(tmp_path, 1, {"cfg": TransformerConfig()})
    with pytest.raises(ValueError, match="-3"):
        C.save_checkpoint(tmp_path, -3, {})
    with pytest.raises(ValueError, match="keep_last"):
        C.save_checkpoint(tmp_path, 1, {}, keep_last=0)
    assert C.list_checkpoints(tmp_path) == [] and os.listdir(tmp_path) == []  # nothing half-made


def test_every_rng_is_restored(tmp_path) -> None:
    gens = {"torch": torch.Generator().manual_seed(3), "numpy": np.random.default_rng(4),
            "python": random.Random(5)}
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    np.random.randn()  # leave numpy with a cached gaussian: part of its state

    def draw() -> list:
        return [torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), random.random(),
                torch.rand(3, generator=gens["torch"]).tolist(), gens["numpy"].random(3).tolist(),
                gens["python"].random()]

    path = C.save_checkpoint(tmp_path, 1, {}, generators=gens)
    expected = draw()
    draw()  # move every stream on
    C.restore_rng_state(C.load_checkpoint(path).rng[0], gens)
    assert draw() == expected
    with pytest.raises(KeyError, match="missing"):
        C.restore_rng_state(C.load_checkpoint(path).rng[0], {"missing": torch.Generator()})
    with pytest.raises(TypeError, match="numpy"):
        C.restore_rng_state(C.load_checkpoint(path).rng[0], {"numpy": torch.Generator()})


def test_keep_last_latest_and_overwrite(tmp_path) -> None:
    for step in (10, 20, 30, 40):
        C.save_checkpoint(tmp_path, step, {"x": torch.tensor(step)}, keep_last=2)
    assert [p.name for p in C.list_checkpoints(tmp_path)] == [C.checkpoint_name(30), C.checkpoint_name(40)]
    assert C.latest_checkpoint(tmp_path).name == C.checkpoint_name(40)
    C.save_checkpoint(tmp_path, 40, {"x": torch.tensor(-1)}, keep_last=2)  # same step: atomically replaced
    assert int(C.load_checkpoint(C.latest_checkpoint(tmp_path)).payload["x"]) == -1
    # A checkpoint just written survives pruning even when later-step files (an abandoned run) sort after it.
    C.save_checkpoint(tmp_path, 35, {"x": torch.tensor(35)}, keep_last=1)
    assert [p.name for p in C.list_checkpoints(tmp_path)] == [C.checkpoint_name(35)]
    C.save_checkpoint(tmp_path, 50, {}, keep_last=None)
    assert len(C.list_checkpoints(tmp_path)) == 2
    assert C.latest_checkpoint(tmp_path / "absent") is None


def test_temporary_and_foreign_files_are_never_picked_up(tmp_path) -> None:
    C.save_checkpoint(tmp_path, 1, {"x": torch.tensor(1)})
    dead_pid = 2**22 + 12345  # above pid_max's default: no such process
    stale = tmp_path / f".{C.checkpoint_name(2)}.tmp-{dead_pid}"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".{C.checkpoint_name(3)}.tmp-{os.getppid()}"  # a live writer's temp file
    live.write_bytes(b"being written")
    (tmp_path / "ckpt-2.pt.bak").write_bytes(b"x")
    # An earlier process with this one's PID (a restarted container's trainer) killed mid-write.
    same_pid = tmp_path / f".{C.checkpoint_name(3)}.tmp-{os.getpid()}"
    same_pid.write_bytes(b"half a checkpoint of a previous life")
    assert [p.name for p in C.list_checkpoints(tmp_path)] == [C.checkpoint_name(1)]
    C.save_checkpoint(tmp_path, 4, {})
    assert not stale.exists(), "a dead writer's temp file should be cleaned up"
    assert not same_pid.exists(), "a temp file with this process's PID is no write of this process's"
    assert live.exists(), "a live writer's temp file must not be touched"


def test_a_failed_write_leaves_no_trace(tmp_path, monkeypatch) -> None:
    C.save_checkpoint(tmp_path, 1, {"x": torch.tensor(1)})

    def fail(stage: str, tmp: Path) -> None:
        assert tmp.exists() and not tmp.name.startswith("ckpt")
        if stage == "written":
            raise OSError("disk full")

    monkeypatch.setattr(C, "_write_hook", fail)
    with pytest.raises(OSError, match="disk full"):
        C.save_checkpoint(tmp_path, 2, {"x": torch.tensor(2)})
    assert sorted(os.listdir(tmp_path)) == [C.checkpoint_name(1)]


def test_restore_falls_back_from_an_unreadable_checkpoint(tmp_path) -> None:
    assert C.restore(tmp_path) is None
    C.save_checkpoint(tmp_path, 1, {"x": torch.tensor(1)})
    (tmp_path / C.checkpoint_name(2)).write_bytes(b"garbage from a broken disk")
    with pytest.warns(UserWarning, match=C.checkpoint_name(2)):
        ckpt = C.restore(tmp_path)
    assert ckpt.step == 1
    (tmp_path / C.checkpoint_name(1)).write_bytes(b"also broken")
    with pytest.raises(ValueError, match="no readable checkpoint"), pytest.warns(UserWarning):
        C.restore(tmp_path)


def test_an_unreadable_checkpoint_is_moved_aside_and_no_longer_counts_for_keep_last(tmp_path) -> None:
    for step in (100, 200, 300):
        C.save_checkpoint(tmp_path, step, {"x": torch.tensor(step)}, keep_last=3)
    newest = tmp_path / C.checkpoint_name(300)
    newest.write_bytes(newest.read_bytes()[:100])  # damaged on disk
    with pytest.warns(UserWarning, match=rf"renamed to {C.checkpoint_name(300)}.unreadable"):
        assert C.restore(tmp_path).step == 200
    assert C.latest_checkpoint(tmp_path).name == C.checkpoint_name(200)  # what `d4func eval` and the replay read
    assert (tmp_path / (C.checkpoint_name(300) + C.UNREADABLE_SUFFIX)).exists()  # kept for a look
    C.save_checkpoint(tmp_path, 250, {"x": torch.tensor(250)}, keep_last=2)
    # The good checkpoint the run resumed from is one of the two kept, not pushed out by the damaged one.
    assert [p.name for p in C.list_checkpoints(tmp_path)] == [C.checkpoint_name(200), C.checkpoint_name(250)]


def test_readers_skip_a_damaged_checkpoint_without_moving_it(tmp_path) -> None:
    # `d4func eval` and `open_run_replay` read the checkpoint a resume would take, and change nothing on disk.
    for step in (1, 2):
        C.save_checkpoint(tmp_path, step, {"x": torch.tensor(step)})
    (tmp_path / C.checkpoint_name(2)).write_bytes(b"damaged")
    before = sorted(path.name for path in tmp_path.iterdir())
    with pytest.warns(UserWarning, match=f"skipping unreadable checkpoint: checkpoint .*{C.checkpoint_name(2)}"):
        assert C.newest_readable_checkpoint(tmp_path).step == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == before
    assert C.newest_readable_checkpoint(tmp_path / "absent") is None


def test_an_error_in_reading_is_raised_not_taken_for_a_damaged_checkpoint(tmp_path, monkeypatch) -> None:
    import errno

    C.save_checkpoint(tmp_path, 1, {"x": torch.tensor(1)})
    C.save_checkpoint(tmp_path, 2, {"x": torch.tensor(2)})

    def io_error(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "load", io_error)
    with pytest.raises(OSError, match="Input/output error"):
        C.restore(tmp_path)  # not a silent roll-back to step 1
    assert [p.name for p in C.list_checkpoints(tmp_path)] == [C.checkpoint_name(1), C.checkpoint_name(2)]


def test_cuda_rng_states_of_another_device_count_are_restored_where_both_have_them(monkeypatch) -> None:
    # A run moved to a machine with fewer GPUs resumes (with a warning), rather than refusing to start.
    state = C.capture_rng_state()
    state["cuda"] = [torch.full((16,), device, dtype=torch.uint8) for device in range(4)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.__setitem__(device, int(s[0])))
    with pytest.warns(UserWarning, match="CUDA RNG states for 4 devices, this process sees 2: restored for devices "
                                         "0-1 only"):
        C.restore_rng_state(state)
    assert restored == {0: 0, 1: 1}


def test_loading_never_runs_pickled_code(tmp_path) -> None:
    path = tmp_path / C.checkpoint_name(1)
    target = tmp_path / "pwned"
    torch.save({"format": C.CHECKPOINT_FORMAT, "step": 1, "payload": {"evil": _Evil(target)}, "rng": []}, path)
    with pytest.raises(ValueError, match="cannot be read"):
        C.load_checkpoint(path)
    assert not target.exists()
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a d4func-checkpoint"):
        C.load_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        C.load_checkpoint(tmp_path / "nope.pt")


class _Evil:
    """Unpickling it would create a file: the load must refuse before that."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_exact_resume_matches_uninterrupted_run(tmp_path, monkeypatch) -> None:
    """N steps, checkpoint, scrambled RNGs and fresh objects, M more steps == N + M uninterrupted: bitwise train
    state (params, AdamW moments, EMA, step) and loss history. Draws come from torch's, numpy's and python's
    global RNGs, explicit generators and the replay sampler, so each has to be restored."""
    from helpers.toy_training import run

    n, m = 4, 4
    reference, ref_history = run(tmp_path / "uninterrupted", n + m, every=0)
    run(tmp_path / "resumed", n, every=n)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    resumed, history = run(tmp_path / "resumed", n + m, every=n)
    _assert_bitwise(resumed, reference)
    assert torch.equal(history, ref_history)
    assert int(resumed["step"]) == n + m

    # The comparison can fail: resuming without the RNG states diverges.
    (tmp_path / "resumed" / C.checkpoint_name(n + m)).unlink()
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    monkeypatch.setattr(C, "restore_rng_state", lambda *args, **kwargs: None)
    _, diverged = run(tmp_path / "resumed", n + m, every=0)
    assert torch.equal(diverged[:n], ref_history[:n]) and not torch.equal(diverged[n:], ref_history[n:])


def test_sync_replay_files_fsyncs_every_storage_file(tmp_path, monkeypatch) -> None:
    from d4func.data.replay import make_replay

    rb = make_replay(16, 2, 1, path=tmp_path / "replay", share_next_pixels=False)
    rb.extend(TensorDict({"pixels": torch.zeros(4, 3, 2, 2), "step_count": torch.arange(4)[:, None],
                          "collector": {"traj_ids": torch.zeros(4, dtype=torch.int64)}}, batch_size=[4]))
    fsynced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsynced.append(Path(os.readlink(f"/proc/self/fd/{fd}"))) or
                        real_fsync(fd))
    files = C.sync_replay_files(rb)
    storage = tmp_path / "replay" / "storage"
    assert storage / "pixels.memmap" in files and storage / "step_count.memmap" in files
    synced = [f.resolve() for f in fsynced]
    assert synced[: len(files)] == [f.resolve() for f in files]
    assert storage.resolve() in synced[len(files):]  # and the directory entries of the files
    assert C.sync_replay_files(make_replay(16, 2, 1)) == []  # in memory: nothing to sync


def test_the_file_is_fsynced_before_its_rename_and_the_directory_after(tmp_path, monkeypatch) -> None:
    """os.replace is atomic but not durable: without the file's fsync an OS crash can leave a renamed but empty
    checkpoint, without the directory's the rename itself can be lost."""
    final = tmp_path / C.checkpoint_name(3)
    fsynced = []  # (path of the fd, whether the final name existed at that moment)
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsynced.append((Path(os.readlink(f"/proc/self/fd/{fd}")),
                                                                 final.exists())) or real_fsync(fd))
    C.save_checkpoint(tmp_path, 3, {"x": torch.zeros(2)})
    temp_prefix = f".{C.checkpoint_name(3)}.tmp-"
    assert any(path.name.startswith(temp_prefix) and not renamed for path, renamed in fsynced), fsynced
    assert (tmp_path.resolve(), True) in fsynced, fsynced


def test_the_loops_small_files_are_fsynced_before_their_rename_too(tmp_path, monkeypatch) -> None:
    # config.json is read at every start: an empty one left by a machine crash would stop every resume.
    from d4func.durable_files import replace_text

    final = tmp_path / "config.json"
    fsynced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsynced.append((Path(os.readlink(f"/proc/self/fd/{fd}")),
                                                                 final.exists())) or real_fsync(fd))
    replace_text(final, "{}")
    assert final.read_text() == "{}" and not (tmp_path / "config.json.tmp").exists()
    assert fsynced == [(tmp_path.resolve() / "config.json.tmp", False), (tmp_path.resolve(), True)]


def test_restore_takes_this_ranks_rng_states_and_refuses_another_world_size(tmp_path, monkeypatch) -> None:
    torch.manual_seed(10)
    rank0 = C.capture_rng_state()
    torch.manual_seed(11)
    rank1 = C.capture_rng_state()
    expected = torch.rand(4)  # rank 1's next draws
    C.save_checkpoint(tmp_path, 2, {}, rng=[rank0, rank1])
    # A single process cannot take the streams of a two-rank run, but may start fresh ones on request.
    with pytest.raises(ValueError, match="RNG states of 2 ranks, this run has 1"):
        C.restore(tmp_path)
    torch.manual_seed(0)
    assert C.restore(tmp_path, restore_rng=False).step == 2
    assert not torch.equal(torch.rand(4), expected)
    monkeypatch.setattr(C, "_current_rank", lambda: (1, 2))
    C.restore(tmp_path)
    assert torch.equal(torch.rand(4), expected), "rank 1 must get rank 1's RNG states, not rank 0's"


def test_without_map_location_a_tensordict_keeps_its_saved_device(tmp_path) -> None:
    td = TensorDict({"w": torch.ones(2)}, [], device="cpu")
    path = C.save_checkpoint(tmp_path, 1, {"td": td})
    assert C.load_checkpoint(path, map_location=None).payload["td"].device == torch.device("cpu")
    assert C.load_checkpoint(path).payload["td"].device is None  # map_location placed the tensors already


def test_payloads_that_would_not_load_back_are_refused_when_saved(tmp_path) -> None:
    # A numpy scalar subclasses float but needs globals to unpickle: written, it would fail only at resume.
    with pytest.raises(TypeError, match=r"payload\.counters\.mean_return has unsupported type float64"):
        C.save_checkpoint(tmp_path, 1, {"counters": {"mean_return": np.float64(1.5)}})
    # A plain dict keyed like an encoded TensorDict would be rebuilt as one (or fail) on load.
    with pytest.raises(ValueError, match=r"'__tensordict__' at payload\.a is reserved"):
        C.save_checkpoint(tmp_path, 1, {"a": {"__tensordict__": {"batch_size": [], "entries": {}}}})
    with pytest.raises(ValueError, match="got True"):
        C.save_checkpoint(tmp_path, True, {})  # a bool is no step number
    with pytest.raises(ValueError, match="either generators"):
        C.save_checkpoint(tmp_path, 1, {}, generators={"g": torch.Generator()}, rng=[C.capture_rng_state()])
    assert os.listdir(tmp_path) == []


def test_rank_payload_merges_the_ranks_own_part_over_the_shared_one() -> None:
    payload = {"config": {"seed": 0}, "counters": {"env_steps": -1},
               "ranks": [{"counters": {"env_steps": 10}}, {"counters": {"env_steps": 11}}]}
    assert C.rank_payload(payload, 1) == {"config": {"seed": 0}, "counters": {"env_steps": 11}}
    assert C.rank_payload(payload, 0)["counters"] == {"env_steps": 10}
    for rank in (2, -1):
        with pytest.raises(ValueError, match=f"rank={rank} is not one of the 2 ranks"):
            C.rank_payload(payload, rank)
    single = {"counters": {"env_steps": 5}}
    assert C.rank_payload(single, 0) == single


def test_a_reader_lists_again_when_a_live_run_pruned_every_checkpoint_it_listed(tmp_path, monkeypatch) -> None:
    # loop.keep_checkpoints=1: the run's next save removes the only checkpoint a reader (d4func status / eval) had
    # listed, before the reader loads it. The reader must find the new one, not fail with an empty reason.
    C.save_checkpoint(tmp_path, 1, {"x": torch.tensor(1)}, keep_last=1)
    real_load = C.load_checkpoint
    saved = []

    def load_after_the_next_save(path, **kwargs):
        if not saved:
            saved.append(True)
            C.save_checkpoint(tmp_path, 2, {"x": torch.tensor(2)}, keep_last=1)  # prunes step 1
        return real_load(path, **kwargs)

    monkeypatch.setattr(C, "load_checkpoint", load_after_the_next_save)
    assert C.newest_readable_checkpoint(tmp_path).step == 2
