"""Replay slices stay inside one episode; pixels round-trip bitwise; datasets reopen from disk unchanged."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torchrl.collectors import Collector

from d4func.data.offline import (
    UniformRandomPolicy,
    collect,
    load_offline,
    read_metadata,
    record_episodes,
)
from d4func.data.overwrite_journal import list_records
from d4func.data.replay import (
    END_FRAME_KEY,
    RETIRED_TRAJ_BASE,
    StaleReplayPositionWarning,
    make_replay,
    replay_layout,
    save_replay,
    with_episode_end_frames,
)
from d4func.envs.crafter_env import make_crafter_env
from d4func.envs.reach import make_reach_env
from d4func.train.checkpoint import replay_position, restore_replay_position

torch.set_num_threads(1)

TRAJ = ("collector", "traj_ids")


def _frames(uid: torch.Tensor, size: int) -> torch.Tensor:
    """k/255 frames derived from transition ids."""
    k = ((uid[:, None, None, None] * 7 + torch.arange(3 * size * size).reshape(1, 3, size, size)) % 256).to(torch.uint8)
    return k.div(255)


def _episode(traj_id: int, length: int, uid0: int, size: int = 4) -> TensorDict:
    """A synthetic episode: ids, step counts, a unique id per transition and k/255 pixels derived from it; the next
    frame of a step is the following step's frame (a final one after the last)."""
    uid = torch.arange(uid0, uid0 + length)
    frames = _frames(torch.arange(uid0, uid0 + length + 1), size)
    step = torch.arange(length)
    done = step == length - 1
    return TensorDict(
        {
            "pixels": frames[:-1],
            "uid": uid,
            "step_count": step.unsqueeze(-1),
            "is_init": (step == 0).unsqueeze(-1),
            TRAJ: torch.full((length,), traj_id),
            ("next", "pixels"): frames[1:].clone(),
            ("next", "done"): done.unsqueeze(-1),
            ("next", "truncated"): done.unsqueeze(-1),
        },
        [length],
    )


def _interleave(episodes: list[TensorDict], n_streams: int, chunk: int) -> list[TensorDict]:
    """Write order of ``n_streams`` envs stepping in lockstep, each emitting ``chunk`` steps per batch."""
    streams = [torch.cat(episodes[i::n_streams]) if episodes[i::n_streams] else None for i in range(n_streams)]
    streams = [s for s in streams if s is not None]
    out, pos = [], 0
    while any(pos < s.shape[0] for s in streams):
        for s in streams:
            if pos < s.shape[0]:
                out.append(s[pos : pos + chunk])
        pos += chunk
    return out


def _assert_slices_within_episodes(sample: TensorDict, reference: dict[int, TensorDict], seq_len: int) -> None:
    traj = sample[TRAJ]
    steps = sample["step_count"][..., 0]
    assert (traj == traj[:, :1]).all(), "a slice mixes episodes"
    assert (steps.diff(dim=1) == 1).all(), "a slice skips or repeats steps"
    for row in range(sample.shape[0]):
        ep = reference[int(traj[row, 0])]
        assert ep.shape[0] >= seq_len, "an episode shorter than seq_len was sampled"
        s0 = int(steps[row, 0])
        want = ep[s0 : s0 + seq_len]
        assert torch.equal(sample["uid"][row], want["uid"])
        assert torch.equal(sample["pixels"][row], want["pixels"])  # bitwise after uint8 storage
        assert torch.equal(sample["next", "pixels"][row], want["next", "pixels"])  # stored or rebuilt
        assert torch.equal(sample["is_init"][row], want["is_init"])  # stored flags untouched by the sampler


@settings(max_examples=12, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=8),
    seq_len=st.integers(1, 8),
    n_streams=st.integers(1, 3),
    chunk=st.integers(1, 10),
    capacity_frac=st.floats(0.3, 1.5),
    seed=st.integers(0, 1000),
    share=st.booleans(),
)
def test_slices_never_cross_episodes(lengths, seq_len, n_streams, chunk, capacity_frac, seed, share):
    total = sum(lengths)
    capacity = max(seq_len + 1, int(total * capacity_frac))
    episodes, uid0 = [], 0
    for i, n in enumerate(lengths):
        episodes.append(_episode(i, n, uid0))
        uid0 += n
    reference = dict(enumerate(episodes))
    rb = make_replay(capacity, seq_len, 4, seed=seed, share_next_pixels=share)
    writes = _interleave(episodes, n_streams, chunk)
    for w in writes:
        rb.extend(w)
    # What survives the ring buffer: stored entries (with share, each ended episode's final frame is one more).
    stored = [with_episode_end_frames(w).exclude("episode_end_frame") if share else w for w in writes]
    live = torch.cat(stored)[-capacity:]
    # a window of slice_len consecutive stored steps of one episode must be there for sampling to be possible
    key = live[TRAJ] * 10_000 + live["step_count"][:, 0]
    present = set(key.tolist())
    possible = any(
        all((t * 10_000 + s + j) in present for j in range(rb.slice_len))
        for t, s in zip(live[TRAJ].tolist(), live["step_count"][:, 0].tolist(), strict=True)
    )
    if not possible:
        with pytest.raises(RuntimeError):
            rb.sample()
        return
    for _ in range(3):
        sample = rb.sample()
        assert sample.shape == (4, seq_len)
        _assert_slices_within_episodes(sample, reference, seq_len)
        assert set((sample[TRAJ] * 10_000 + sample["step_count"][..., 0]).reshape(-1).tolist()) <= present


def test_multi_env_batch_is_flattened_and_sampled_per_episode():
    # a [n_envs, T] collector batch: rows are different episodes of the same length
    a, b = _episode(0, 12, 0), _episode(1, 12, 100)
    rb = make_replay(100, 6, 8, seed=0)
    rb.extend(torch.stack([a[:6], b[:6]]))
    rb.extend(torch.stack([a[6:], b[6:]]))
    s = rb.sample()
    assert s.shape == (8, 6)
    _assert_slices_within_episodes(s, {0: a, 1: b}, 6)
    # both halves of each episode are stitched: windows that straddle the two writes appear
    assert (s["step_count"][:, 0, 0] % 6 != 0).any()


@pytest.mark.parametrize("share", [True, False])
def test_pixel_storage_is_uint8_and_input_untouched(share):
    ep = _episode(0, 10, 0)
    before = ep.clone()
    rb = make_replay(20, 5, 2, seed=0, share_next_pixels=share)
    rb.extend(ep)
    stored = rb.storage._storage
    assert stored["pixels"].dtype == torch.uint8
    if share:  # each frame once: 10 transitions and the episode's final frame
        assert ("next", "pixels") not in stored.keys(True) and len(rb) == 11
        assert stored[END_FRAME_KEY][:11].tolist() == [False] * 10 + [True]
    else:
        assert stored["next", "pixels"].dtype == torch.uint8 and len(rb) == 10
    assert (ep == before).all() and set(ep.keys(True)) == set(before.keys(True))  # the caller's batch is unchanged
    back = rb.stored_transitions()
    assert back["pixels"].dtype == torch.float32
    assert torch.equal(back["pixels"], ep["pixels"]) and torch.equal(back["next", "pixels"], ep["next", "pixels"])


def test_shared_next_frames_sample_as_stored_ones_and_halve_the_frames():
    episodes = [_episode(i, n, 100 * i) for i, n in enumerate((9, 5, 12))]
    shared = make_replay(64, 4, 32, seed=3)
    per_transition = make_replay(64, 4, 32, seed=3, share_next_pixels=False)
    for ep in episodes:
        shared.extend(ep)
        per_transition.extend(ep)
    # 26 transitions + 3 final frames stored once, against 26 frames and 26 next frames
    assert len(shared) == 29 and len(per_transition) == 26
    assert shared.transition_count() == per_transition.transition_count() == 26
    reference = dict(enumerate(episodes))
    for rb in (shared, per_transition):
        rows = rb.sample()
        assert rows.shape == (32, 4) and END_FRAME_KEY not in rows.keys()
        _assert_slices_within_episodes(rows, reference, 4)
    # both layouts draw the same rows: an episode of n transitions has n - T + 1 of them either way
    assert torch.equal(shared.sample()["uid"], per_transition.sample()["uid"])


def test_a_next_frame_that_is_not_the_following_frame_is_refused():
    ep = _episode(0, 6, 0)
    ep["next", "pixels"][2] = ep["pixels"][0]
    with pytest.raises(ValueError, match="episode 0: the next frame of step 2 differs"):
        make_replay(20, 2, 1).extend(ep)
    with pytest.raises(ValueError, match="no \\('next', 'pixels'\\)"):
        make_replay(20, 2, 1).extend(ep.exclude(("next", "pixels")))
    make_replay(20, 2, 1, share_next_pixels=False).extend(ep)  # stored as given


def test_lossy_pixels_rejected_and_float_storage_option():
    ep = _episode(0, 6, 0)
    ep["pixels"] = ep["pixels"] + 1e-3
    ep["next", "pixels"] = ep["next", "pixels"] + 1e-3
    with pytest.raises(ValueError, match="multiples of 1/255"):
        make_replay(10, 2, 1).extend(ep)
    rb = make_replay(10, 2, 1, compress_pixels=False)
    rb.extend(ep)
    assert rb.storage._storage["pixels"].dtype == torch.float32
    assert torch.equal(rb[:6]["pixels"], ep["pixels"])
    exact = _episode(0, 6, 0)  # k/255 in float64 is exact at float64's precision: stored, and read back as k/255
    for key in ("pixels", ("next", "pixels")):
        exact[key] = exact[key].mul(255).round().double().div(255)
    rb = make_replay(10, 2, 1)
    rb.extend(exact)
    assert torch.equal(rb[:6]["pixels"], exact["pixels"].float())


def test_exclude_keys_drops_next_pixels():
    rb = make_replay(10, 2, 1, exclude_keys=[("next", "pixels")], share_next_pixels=False)
    rb.extend(_episode(0, 6, 0))
    assert ("next", "pixels") not in rb.storage._storage.keys(True)
    assert "pixels" in rb.storage._storage.keys()


def test_bad_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        make_replay(10, 0, 1)
    with pytest.raises(ValueError, match="cannot exceed capacity"):
        make_replay(4, 5, 1)
    with pytest.raises(ValueError, match="6 stored entries per row"):
        make_replay(5, 5, 1)  # the row's final frame is one more stored entry
    make_replay(5, 5, 1, share_next_pixels=False)


def test_reopen_from_disk_and_keep_writing(tmp_path):
    a, b = _episode(0, 9, 0), _episode(1, 7, 50)
    rb = make_replay(40, 3, 4, path=tmp_path / "rb", seed=0)
    rb.extend(a)
    save_replay(rb)
    again = make_replay(40, 3, 4, path=tmp_path / "rb", seed=0)
    assert again is not rb and len(again) == 10 and again.share_next_pixels
    back = again.stored_transitions()
    assert torch.equal(back["uid"], a["uid"]) and torch.equal(back["pixels"], a["pixels"])
    again.extend(b)  # the write cursor was restored: b lands after a
    assert len(again) == 18
    assert torch.equal(again.stored_transitions()["uid"], torch.cat([a["uid"], b["uid"]]))
    _assert_slices_within_episodes(again.sample(), {0: a, 1: b}, 3)
    with pytest.raises(ValueError, match="capacity"):
        make_replay(50, 3, 4, path=tmp_path / "rb")
    with pytest.raises(ValueError, match="stores next frames 'shared', got share_next_pixels=False"):
        make_replay(40, 3, 4, path=tmp_path / "rb", share_next_pixels=False)


def test_a_buffer_saved_before_the_layout_file_reopens_with_per_transition_next_frames(tmp_path):
    a = _episode(0, 9, 0)
    rb = make_replay(40, 3, 4, path=tmp_path / "rb", seed=0, share_next_pixels=False)
    rb.entries_written = None  # as written by d4func before entries were numbered ...
    rb.extend(a)
    save_replay(rb)
    (tmp_path / "rb" / "replay_layout.json").unlink()  # ... and before the layout was recorded
    assert replay_layout(tmp_path / "rb") == "per_transition"
    again = make_replay(40, 3, 4, path=tmp_path / "rb", seed=0)
    assert not again.share_next_pixels and len(again) == 9 and again.entries_written is None
    _assert_slices_within_episodes(again.sample(), {0: a}, 3)
    assert replay_layout(tmp_path / "new") is None


def test_a_shared_buffer_that_lost_its_layout_file_is_read_from_its_storage(tmp_path):
    a = _episode(0, 9, 0)
    rb = make_replay(40, 3, 4, path=tmp_path / "rb", seed=0)
    rb.extend(a)
    save_replay(rb)
    (tmp_path / "rb" / "replay_layout.json").unlink()
    assert replay_layout(tmp_path / "rb") == "shared"
    again = make_replay(40, 3, 4, path=tmp_path / "rb", seed=0)
    assert again.share_next_pixels and len(again) == 10 and again.entries_written == 10
    _assert_slices_within_episodes(again.sample(), {0: a}, 3)
    (tmp_path / "rb" / "replay_layout.json").write_text(json.dumps({"next_pixels": "per_transition"}))
    with pytest.raises(ValueError, match="says next frames are stored per transition, its storage says otherwise"):
        make_replay(40, 3, 4, path=tmp_path / "rb")
    with pytest.raises(ValueError, match="multiple of slice_len=4"):
        again.sample(6)


def test_a_recording_cut_short_ends_each_running_episode_and_counts_only_the_envs_ends(tmp_path):
    from d4func.data.offline import _end_recording

    meta = record_episodes(make_reach_env(seed=0), tmp_path / "one", n_steps=5, seed=0)  # 12-step episodes
    assert meta["n_episodes_complete"] == 0 and meta["n_steps"] == 5 and meta["stored_entries"] == 6
    back = load_offline(tmp_path / "one", 2, 1).stored_transitions()
    assert back.shape == (5,) and back["next", "truncated"].reshape(-1).tolist() == [False] * 4 + [True]
    # a batch of two envs, flattened env by env: every running episode's last step is marked, an ended one's kept
    batch = torch.cat([_episode(0, 4, 0), _episode(1, 3, 10)[:2], _episode(2, 5, 20)[:3]])
    batch["next", "terminated"] = batch["next", "truncated"].clone()
    batch["next", "truncated"][3] = False  # episode 0 ended in a terminal state: it stays terminated, not truncated
    ended = _end_recording(batch)["next"]
    assert ended["done"].reshape(-1).nonzero().reshape(-1).tolist() == [3, 5, 8]
    assert ended["truncated"].reshape(-1).nonzero().reshape(-1).tolist() == [5, 8]
    assert ended["terminated"].reshape(-1).nonzero().reshape(-1).tolist() == [3]
    assert not batch["next", "done"].reshape(-1)[[5, 8]].any()  # the input is not modified


def test_rewinding_a_sampled_buffer_samples_only_what_is_left():
    # The loop rewinds a live buffer (after a NaN; after frames written only for a GIF). The sampler's episode
    # index must forget the slots past the new end, or it draws them (or indexes out of bounds).
    a, b = _episode(0, 20, 0), _episode(1, 20, 100)
    rb = make_replay(100, 6, 8, seed=0)
    rb.extend(a)
    rb.sample()
    position = replay_position(rb)
    rb.extend(b)
    assert set(rb.sample()[TRAJ].unique().tolist()) == {0, 1}
    restore_replay_position(rb, position)
    assert len(rb) == 21  # a's 20 transitions and its final frame
    for _ in range(5):
        rows = rb.sample()
        assert rows["uid"].max() < 20
        _assert_slices_within_episodes(rows, {0: a}, 6)
    rb.extend(b)  # writing again after the rewind lands b where it was
    assert torch.equal(rb.stored_transitions()["uid"], torch.cat([a["uid"], b["uid"]]))


def test_reopening_a_buffer_whose_position_is_kept_elsewhere_warns(tmp_path):
    rb = make_replay(40, 3, 4, path=tmp_path / "rb", seed=0)
    rb.extend(_episode(0, 9, 0))
    save_replay(rb, position_kept_in="the checkpoints of RUN")
    rb.extend(_episode(1, 7, 50))  # recorded by its owner, not on disk
    with pytest.warns(StaleReplayPositionWarning, match="kept in the checkpoints of RUN"):
        assert len(make_replay(40, 3, 4, path=tmp_path / "rb")) == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleReplayPositionWarning)  # a plain save leaves no note: reopening is silent
        plain = make_replay(40, 3, 4, path=tmp_path / "plain", seed=0)
        plain.extend(_episode(0, 9, 0))
        save_replay(plain)
        assert len(make_replay(40, 3, 4, path=tmp_path / "plain")) == 10
        save_replay(rb)  # saved again by its holder, without a note: the position on disk is current
        assert len(make_replay(40, 3, 4, path=tmp_path / "rb")) == 18


# --------------------------------------------------------------------------------------------------------------
# Offline datasets


def _reference_rollout(n_steps: int, frames_per_batch: int, seed: int) -> TensorDict:
    env = make_crafter_env(seed=seed)
    policy = UniformRandomPolicy(env.action_spec, seed=seed)
    total = -(-n_steps // frames_per_batch) * frames_per_batch
    collector = Collector(env, policy, frames_per_batch=frames_per_batch, total_frames=total)
    data = torch.cat([b.clone() for b in collector])[:n_steps]
    collector.shutdown()
    return data


def test_offline_round_trip_is_bitwise(tmp_path):
    n, fpb, seed = 50, 20, 4
    meta = record_episodes(make_crafter_env(seed=seed), tmp_path / "ds", n_steps=n, seed=seed, frames_per_batch=fpb)
    # one final frame per ended episode: here only the last, cut short by the recording (marked truncated)
    assert meta["n_steps"] == n and meta["stored_entries"] == n + 1 and meta["next_pixels"] == "shared"
    assert meta["entries"]["pixels"] == {"shape": [3, 64, 64], "dtype": "float32"}
    assert meta["entries"]["next.pixels"] == meta["entries"]["pixels"]
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text()) == meta
    ref = _reference_rollout(n, fpb, seed)  # same seeds -> the same transitions, regenerated in memory
    assert not ref["next", "done"].any()
    ref["next", "done"][-1] = ref["next", "truncated"][-1] = True

    def check(rb):
        assert len(rb) == n + 1
        back = rb.stored_transitions()
        assert set(back.keys(True, True)) == set(ref.keys(True, True))
        for key, value in ref.items(True, True):
            assert value.dtype == back[key].dtype, key
            assert torch.equal(value, back[key]), key
        s = rb.sample()
        assert s.shape == (2, 8)
        step = s["step_count"].reshape(-1)  # one episode: the step is the transition's index
        for key in ("pixels", ("next", "pixels"), "action", ("next", "reward")):
            assert torch.equal(s[key].reshape(16, *ref[key].shape[1:]), ref[key][step]), key

    first = load_offline(tmp_path / "ds", seq_len=8, batch_size=2, seed=0)
    check(first)
    del first
    check(load_offline(tmp_path / "ds", seq_len=8, batch_size=2, seed=1))  # a new buffer object, from disk


def test_offline_episode_mode_dmc(tmp_path):
    from d4func.envs.dmc import make_dmc_env

    # 0.1 s episodes = 10 control steps = 5 agent steps at action repeat 2
    env = make_dmc_env("cartpole", "swingup", image_size=16, seed=0, time_limit=0.1)
    meta = record_episodes(env, tmp_path / "ds", n_episodes=3, seed=0, frames_per_batch=4, max_steps=40)
    assert meta["n_episodes_complete"] == 3 and meta["n_steps"] == 15
    # Batches holding two episode ends or more: episodes are counted, not batches with an end.
    wide = record_episodes(env, tmp_path / "wide", n_episodes=3, seed=0, frames_per_batch=12, max_steps=40)
    assert wide["n_episodes_complete"] == 3 and wide["n_steps"] == 15
    rb = load_offline(tmp_path / "ds", seq_len=5, batch_size=6, seed=0)
    s = rb.sample()
    # seq_len = episode length: every row is one whole episode
    assert (s["step_count"][..., 0] == torch.arange(5)).all()
    assert s["is_init"][:, 0].all() and not s["is_init"][:, 1:].any()
    assert s["next", "done"][:, -1].all() and not s["next", "done"][:, :-1].any()
    assert s["action"].shape == (6, 5, 1) and s["action"].abs().max() <= 1


def test_collect_multicamera_and_errors(tmp_path):
    meta = collect("dmc:cartpole-swingup@0,1", tmp_path / "mc", steps=6, seed=1, image_size=16)
    assert meta["entries"]["pixels"]["shape"] == [2, 3, 16, 16]
    assert meta["env_config"]["camera_ids"] == [0, 1] and meta["policy"] == "uniform_random"
    rb = load_offline(tmp_path / "mc", seq_len=3, batch_size=2)
    assert rb.sample()["pixels"].shape == (2, 3, 2, 3, 16, 16)
    assert read_metadata(tmp_path / "mc")["n_steps"] == 6
    with pytest.raises(FileExistsError):
        collect("crafter", tmp_path / "mc", steps=6)
    with pytest.raises(ValueError, match="policy"):
        collect("crafter", tmp_path / "x", steps=6, policy="expert")
    with pytest.raises(FileNotFoundError, match="not a d4func dataset"):
        load_offline(tmp_path, seq_len=2, batch_size=1)
    with pytest.raises(ValueError, match="exactly one"):
        record_episodes(lambda: None, tmp_path / "y", n_steps=3, n_episodes=1)


def _short_cartpole(seed: int):
    from d4func.envs.dmc import make_dmc_env

    return make_dmc_env("cartpole", "swingup", image_size=16, seed=seed, time_limit=0.2)


@pytest.mark.slow
def test_multisync_collector_into_replay():
    """Two worker processes: ids are unique across workers and slices stay within one worker's episode."""
    import functools

    from torchrl.collectors import MultiSyncCollector

    collector = MultiSyncCollector(
        [functools.partial(_short_cartpole, 0), functools.partial(_short_cartpole, 1)],
        None,
        frames_per_batch=16,
        total_frames=64,
    )
    rb = make_replay(1000, 4, 16, seed=0)
    seen = []
    for batch in collector:
        seen.append(batch.reshape(-1).clone())
        rb.extend(batch)
    collector.shutdown()
    allt = torch.cat(seen)
    episodes = {int(t): allt[allt[TRAJ] == t] for t in allt[TRAJ].unique()}
    for ep in episodes.values():  # each id is one worker's episode: steps 0, 1, ... in order
        assert torch.equal(ep["step_count"][:, 0], torch.arange(ep.shape[0]))
    s = rb.sample()
    traj, steps = s[TRAJ], s["step_count"][..., 0]
    assert (traj == traj[:, :1]).all() and (steps.diff(dim=1) == 1).all()
    for row in range(s.shape[0]):
        ep = episodes[int(traj[row, 0])]
        assert torch.equal(s["pixels"][row], ep["pixels"][int(steps[row, 0]) : int(steps[row, 0]) + 4])


@pytest.mark.parametrize("share", [True, False])
def test_a_resumed_wrapped_buffer_never_samples_what_a_killed_run_wrote_after_its_checkpoint(share):
    # A run checkpoints (position), writes on and is killed; the resumed run restores the position and writes again
    # under the same episode ids. Once the ring has wrapped, the killed run's entries past the cursor are still
    # stored: they must not be joined to the resumed run's episodes (duplicate steps, or rows mixing the two).
    rb = make_replay(30, 3, 64, seed=0, share_next_pixels=share)
    kept = {i: _episode(i, 9, 100 * i) for i in range(4)}  # 36 transitions: the ring has wrapped
    for ep in kept.values():
        rb.extend(ep)
    position = replay_position(rb)
    for i in (4, 5):  # the killed run's episodes after the checkpoint
        rb.extend(_episode(i, 5, 10_000 + 100 * i))
    restore_replay_position(rb, position)
    rb.sample()  # an episode index built before retiring must not survive it
    # 36 transitions (and 4 end frames) before the checkpoint; the killed run's 10 (and 2) after it
    assert rb.entries_written == position["written"] == (40 if share else 36)
    assert rb.retire_unrecorded_writes() == (12 if share else 10)
    resumed = _episode(4, 7, 20_000)  # the resumed run's episode 4: fewer entries than the killed run wrote
    rb.extend(resumed)
    live = rb.storage._storage[: len(rb)]
    assert ((live["uid"] >= 10_000) & (live["uid"] < 20_000)).any()  # some of the killed run's entries remain
    reference = {**kept, 4: resumed}
    for _ in range(20):
        rows = rb.sample()
        assert (rows["uid"] < 10_000).logical_or(rows["uid"] >= 20_000).all(), "a killed run's entry was sampled"
        _assert_slices_within_episodes(rows, reference, 3)
    kept_steps = rb.stored_transitions()  # the retired entries are no episode's steps
    assert ((kept_steps["uid"] < 10_000) | (kept_steps["uid"] >= 20_000)).all()
    for row in range(kept_steps.shape[0]):
        episode, step = reference[int(kept_steps[TRAJ][row])], int(kept_steps["step_count"][row])
        assert torch.equal(kept_steps["next", "pixels"][row], episode["next", "pixels"][step])


def test_stored_transitions_of_a_buffer_whose_entries_are_all_retired_is_empty():
    rb = make_replay(8, 2, 1)
    rb.extend(_episode(0, 3, 0))
    position = replay_position(rb)
    rb.extend(_episode(1, 7, 100))  # a killed run wraps the ring, overwriting every entry the checkpoint knew
    restore_replay_position(rb, position)
    assert len(rb) == 4 and rb.retire_unrecorded_writes(1) == 4
    empty = rb.stored_transitions()
    assert empty.shape == (0,) and empty["next", "pixels"].shape == (0, 3, 4, 4)


def test_episodes_that_do_not_fit_stop_the_recording_and_leave_no_dataset(tmp_path):
    # Reach episodes last 12 steps: 2 need 24 transitions. With max_steps a multiple of the batch, or a batch that
    # cuts the second episode off, the recording used to return 1 complete episode without a word.
    for frames_per_batch in (20, 8):
        with pytest.raises(RuntimeError, match=r"2 episodes do not fit in max_steps=20 .*1 complete after 20 steps"):
            record_episodes(make_reach_env(seed=0), tmp_path / "ds", n_episodes=2, max_steps=20,
                            frames_per_batch=frames_per_batch)
        assert not (tmp_path / "ds").exists()
    meta = record_episodes(make_reach_env(seed=0), tmp_path / "ds", n_episodes=2, max_steps=24, frames_per_batch=20)
    assert meta["n_episodes_complete"] == 2 and meta["n_steps"] == 24
    assert load_offline(tmp_path / "ds", 2, 1).stored_transitions().shape[0] == 24


def test_stored_transitions_leave_out_the_last_step_of_a_running_episode_that_ends_on_the_longest_step():
    # Episode 0 still runs at step 4, the largest step stored: its next frame is not stored yet. It must not be
    # paired with the first frame of the next episode (ids ranked 0, 1), whatever the (episode, step) numbering.
    running = _episode(0, 5, 0)
    running["next", "done"][:] = False
    running["next", "truncated"][:] = False
    rb = make_replay(16, 1, 1)
    rb.extend(running)
    rb.extend(_episode(1, 3, 100))
    out = rb.stored_transitions()
    assert sorted(out["uid"].tolist()) == [0, 1, 2, 3, 100, 101, 102]
    assert rb.transition_count() == 8  # stored, the running episode's last step included


def test_a_row_reaching_an_episode_end_frame_before_its_last_entry_is_refused():
    # Episode 0 ended at step 0 (its end frame is step 1), then steps of the same id were written on from step 2:
    # the only row of 2 transitions spans [step 0, end frame, step 2], the end frame as its last transition.
    rb = make_replay(8, 2, 1)
    rb.extend(_episode(0, 1, 0))
    later = _episode(0, 3, 50)[2:]
    later["next", "done"][:] = False
    rb.extend(later)
    with pytest.raises(RuntimeError, match="episode-end frame before its last entry"):
        rb.sample()


def test_a_gap_in_an_episodes_steps_within_one_batch_is_not_a_next_frame_mismatch():
    # Steps 0, 1 and then 3, 4 of one episode in one batch: step 1's next frame is not step 3's frame, and that is
    # no error (only a step's successor must hold its next frame); a real successor that differs still raises.
    ep = _episode(0, 5, 0)
    gap = torch.cat([ep[:2], ep[3:]])
    entries = with_episode_end_frames(gap)
    assert entries["uid"].tolist()[:4] == [0, 1, 3, 4] and entries.shape[0] == 5
    bad = ep.clone()
    bad["next", "pixels"][3] = 0.0
    with pytest.raises(ValueError, match="episode 0: the next frame of step 3 differs"):
        with_episode_end_frames(bad)


def test_retiring_by_episode_id_retires_that_episode_and_later_ones():
    rb = make_replay(32, 2, 1)
    for i in range(3):
        rb.extend(_episode(i, 4, 100 * i))
    rb.entries_written = None  # a storage without the write numbering: only the episode id tells
    assert rb.retire_unrecorded_writes(1) == 10  # episodes 1 and 2: 4 steps and an end frame each
    traj = rb.storage._storage.get(TRAJ)[: len(rb)]
    assert (traj[:5] == 0).all() and (traj[5:] >= RETIRED_TRAJ_BASE).all()
    assert rb.stored_transitions()["uid"].tolist() == [0, 1, 2, 3]


def _storage_snapshot(rb) -> TensorDict:
    return rb.storage._storage[: len(rb)].clone()


@settings(max_examples=25, deadline=None)
@given(
    capacity=st.integers(12, 40),
    before=st.lists(st.integers(1, 9), min_size=1, max_size=8),
    after=st.lists(st.integers(1, 9), min_size=1, max_size=8),
    checkpoints=st.integers(0, 2),
)
def test_the_overwrite_journal_puts_back_the_ring_a_killed_run_wrapped_past_its_checkpoint(
    tmp_path_factory, capacity, before, after, checkpoints
):
    # Episodes of any lengths before a checkpoint and after it (the killed run's), whether or not either wrapped the
    # ring, with earlier checkpoints pruning the journal: after the undo the storage is bitwise what the checkpoint
    # saw, nothing is left to retire, and the journal holds nothing of the killed run.
    rb = make_replay(capacity, 2, 4, path=tmp_path_factory.mktemp("rb"), seed=0)
    rb.keep_overwritten_entries()
    episodes = iter(range(100))
    for i, length in enumerate(before):
        if i == len(before) - 1 - checkpoints:  # an earlier checkpoint: the records before it go
            rb.forget_overwrites_before(rb.entries_written)
        rb.extend(_episode(next(episodes), length, 1000 * i))
    rb.forget_overwrites_before(rb.entries_written)  # the checkpoint
    position, seen = replay_position(rb), _storage_snapshot(rb)
    for length in after:  # the killed run's writes
        rb.extend(_episode(next(episodes), length, 50_000))
    restore_replay_position(rb, position)
    rb.undo_unrecorded_overwrites()
    assert (_storage_snapshot(rb) == seen).all()
    assert rb.retire_unrecorded_writes() == 0
    assert list_records(rb.journal_dir) == []


def test_a_resume_killed_while_it_drops_the_undone_records_undoes_again_to_the_same_ring(tmp_path, monkeypatch):
    # Three writes past the checkpoint, each over entries the checkpoint counts. The undo restores the ring, then the
    # process dies after deleting one record: the next resume applies what is left and must land on the same ring.
    rb = make_replay(12, 2, 4, path=tmp_path / "rb", seed=0)
    rb.keep_overwritten_entries()
    rb.extend(_episode(0, 10, 0))
    save_replay(rb, position_kept_in="a test")
    position, seen = replay_position(rb), _storage_snapshot(rb)
    for i in (1, 2, 3):
        rb.extend(_episode(i, 5, 100 * i))
    assert [first for first, _ in list_records(rb.journal_dir)] == [11, 17, 23]
    real_unlink = Path.unlink

    class Killed(BaseException):
        pass

    def unlink_then_die(path, *args, **kwargs):
        if path.suffix == ".pt" and len(list_records(path.parent)) == 2:
            raise Killed
        return real_unlink(path, *args, **kwargs)

    restore_replay_position(rb, position)
    monkeypatch.setattr(Path, "unlink", unlink_then_die)
    with pytest.raises(Killed):
        rb.undo_unrecorded_overwrites()
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert [first for first, _ in list_records(rb.journal_dir)] == [11, 17]  # the newest went first
    torn = rb.journal_dir / ".w000000000029.pt.tmp-4242"  # and a record write a kill cut short
    torn.write_bytes(b"half a record")
    with pytest.warns(StaleReplayPositionWarning):
        again = make_replay(12, 2, 4, path=tmp_path / "rb", seed=0)
    again.keep_overwritten_entries()
    restore_replay_position(again, position)
    again.undo_unrecorded_overwrites()
    assert (_storage_snapshot(again) == seen).all()
    assert again.retire_unrecorded_writes() == 0 and list_records(again.journal_dir) == []
    assert not torn.exists()


def test_an_unreadable_journal_record_leaves_its_slots_to_be_retired(tmp_path):
    rb = make_replay(12, 2, 4, path=tmp_path / "rb", seed=0)
    rb.keep_overwritten_entries()
    rb.extend(_episode(0, 10, 0))  # 11 entries, the end frame included
    position = replay_position(rb)
    rb.extend(_episode(1, 5, 500))  # 6 entries: wraps over 5 of episode 0's
    ((first, record),) = list_records(rb.journal_dir)
    assert first == position["written"] == 11
    record.write_bytes(b"damaged")
    restore_replay_position(rb, position)
    with pytest.warns(UserWarning, match="cannot be read"):
        assert rb.undo_unrecorded_overwrites() == 0
    assert rb.retire_unrecorded_writes() == 5  # the overwritten slots 0-4 (slot 11 lies past the length)
    with pytest.raises(ValueError, match="needs a path-backed replay"):
        make_replay(12, 2, 4).keep_overwritten_entries()
