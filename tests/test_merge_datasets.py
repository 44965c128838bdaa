"""Merging datasets (`d4func merge`): the merged dataset reads back as the sources' episodes in order, it trains
like any other, and sources that do not fit together are refused naming the bad value."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from d4func.cli import main
from d4func.data.import_episodes import episode_transitions, import_episodes
from d4func.data.merge_datasets import dataset_episodes, merge_datasets
from d4func.data.offline import DATASET_FORMAT, META_FILE, load_offline, read_metadata, storage_metadata
from d4func.data.replay import DEFAULT_TRAJ_KEY, NEXT_PIXELS, make_replay, save_replay


def _episode(rng: np.random.Generator, steps: int, discrete: bool, final_frame: bool, terminated: bool
             ) -> dict[str, np.ndarray | bool]:
    action = rng.integers(0, 5, size=steps) if discrete else rng.uniform(-1, 1, size=(steps, 2)).astype(np.float32)
    return {"pixels": rng.integers(0, 256, size=(steps + int(final_frame), 3, 4, 4), dtype=np.uint8),
            "action": action, "reward": rng.normal(size=steps).astype(np.float32), "terminated": terminated}


def _assert_same_episode(got: dict, want: dict) -> None:
    assert torch.equal(got["pixels"], torch.as_tensor(want["pixels"]))
    want_action = torch.as_tensor(want["action"])
    assert torch.equal(got["action"].reshape(want_action.shape).to(want_action.dtype), want_action)
    assert torch.equal(got["reward"], torch.as_tensor(want["reward"]))
    assert got["terminated"] == want["terminated"]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=3), min_size=2, max_size=3),
       discrete=st.booleans(), final_frame=st.booleans(), seed=st.integers(0, 2**16))
def test_a_merged_dataset_holds_the_sources_episodes_in_order(lengths, discrete, final_frame, seed):
    rng = np.random.default_rng(seed)
    sources = [[_episode(rng, n, discrete, final_frame, bool(rng.integers(2))) for n in per_source]
               for per_source in lengths]
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"source{i}" for i in range(len(sources))]
        for path, episodes in zip(paths, sources, strict=True):
            import_episodes(episodes, path, channels_last=False)
        meta = merge_datasets(paths, Path(tmp) / "merged")
        merged = list(dataset_episodes(Path(tmp) / "merged"))
        for path in paths:  # the sources are read, not changed
            assert read_metadata(path)["n_steps"] == sum(len(e["reward"]) for e in sources[paths.index(path)])
    flat = [episode for episodes in sources for episode in episodes]
    assert meta["n_steps"] == sum(map(sum, lengths)) and meta["n_episodes_complete"] == len(flat)
    assert len(merged) == len(flat)
    for got, want in zip(merged, flat, strict=True):
        _assert_same_episode(got, want)


@pytest.fixture(scope="module")
def reach_datasets(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Two recordings of Reach (different seeds) and one of Reach at another frame size."""
    root = tmp_path_factory.mktemp("merge")
    for name, seed, size in (("a", 0, 16), ("b", 1, 16), ("big", 2, 24)):
        assert main(["collect", "--env", "reach", "--out", str(root / name), "--steps", "60", "--seed", str(seed),
                     "--image-size", str(size), "--action-repeat", "1"]) == 0
    return root / "a", root / "b", root / "big"


def test_merge_on_the_command_line_trains_offline(reach_datasets, tmp_path, capsys):
    a, b, _ = reach_datasets
    out = tmp_path / "merged"
    assert main(["merge", str(a), str(b), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    meta_a, meta_b = read_metadata(a), read_metadata(b)
    assert printed["n_steps"] == meta_a["n_steps"] + meta_b["n_steps"] == 120
    assert printed["env_config"] == meta_a["env_config"]  # the first source's, seed included
    assert printed["policy"] == "merged: uniform_random"
    merged = list(dataset_episodes(out))
    originals = [*dataset_episodes(a), *dataset_episodes(b)]
    assert len(merged) == len(originals)
    for got, want in zip(merged, originals, strict=True):
        _assert_same_episode(got, want)
    # Rows sampled from it are within-episode slices of the usual layout.
    sample = load_offline(out, seq_len=4, batch_size=8, seed=0).sample()
    assert sample.shape == (8, 4) and sample.get(("next", "pixels")).shape == (8, 4, 3, 16, 16)

    from d4func.train.loop import train
    from d4func.train.run_config import load_run_config

    summary = train(load_run_config("experiments/configs/reach.yaml", [
        f"run_dir={tmp_path / 'run'}", "loop.mode=offline", f"loop.offline_data={out}", "loop.offline_steps=2",
        "loop.agent_start=100", "loop.eval_every=100", "loop.gif_every=100", "loop.checkpoint_every=100",
        "env.eval_episodes=0"]), progress=False)
    assert summary["grad_steps"] == 2


def test_datasets_that_do_not_fit_together_are_refused(reach_datasets, tmp_path, capsys):
    a, b, big = reach_datasets
    with pytest.raises(ValueError, match="'image_size': 24"):
        merge_datasets([a, big], tmp_path / "m1")
    with pytest.raises(ValueError, match="named twice"):
        merge_datasets([a, Path(str(a) + "/")], tmp_path / "m2")
    with pytest.raises(ValueError, match="at least two"):
        merge_datasets([a], tmp_path / "m3")
    with pytest.raises(FileNotFoundError, match="missing_dataset"):
        merge_datasets([a, tmp_path / "missing_dataset"], tmp_path / "m4")
    assert not any((tmp_path / name).exists() for name in ("m1", "m2", "m3", "m4"))  # nothing half-written
    assert main(["merge", str(a), str(b), "--out", str(a)]) == 2
    assert "already holds a dataset" in capsys.readouterr().err


def _replay_dataset(path: Path, episodes: list[dict], *, share: bool, capacity: int, last_running: bool = False,
                    retire_last: int = 0, extra: bool = False) -> None:
    """A dataset written as a run writes its replay: a ring buffer of `capacity` entries (older entries overwritten
    once it wraps), frames stored once (`share`) or with each transition's next frame, the newest episode still
    running (`last_running`), and the last `retire_last` entries retired as a resumed run retires the writes its
    checkpoint does not account for. `extra` adds an env-specific entry (as Crafter's achievements)."""
    rb = make_replay(capacity, 1, 1, path=path, share_next_pixels=share)
    for i, episode in enumerate(episodes):
        transitions = episode_transitions(episode, i, channels_last=False)
        if last_running and i == len(episodes) - 1:
            for key in ("done", "terminated", "truncated"):
                transitions["next", key][:] = False
        if extra:
            transitions["next", "achievements"] = torch.zeros(transitions.shape[0], 3, dtype=torch.bool)
        rb.extend(transitions)
    if retire_last:
        rb.entries_written -= retire_last
        rb.retire_unrecorded_writes()
    save_replay(rb)
    meta = {"format": DATASET_FORMAT, "capacity": capacity, "n_steps": rb.transition_count(), "env_config": None,
            "policy": "hand-written", **storage_metadata(rb)}
    (path / META_FILE).write_text(json.dumps(meta))


def _as_uint8(frames: torch.Tensor) -> torch.Tensor:
    return frames if frames.dtype == torch.uint8 else (frames * 255).round().to(torch.uint8)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 5), min_size=1, max_size=4), share=st.booleans(), last_running=st.booleans(),
       short=st.integers(0, 6), retire_last=st.integers(0, 3), seed=st.integers(0, 2**16))
@example(lengths=[3, 5, 5], share=True, last_running=False, short=4, retire_last=0, seed=0)  # episode 2 wraps
@example(lengths=[2, 3], share=False, last_running=False, short=0, retire_last=0, seed=1)  # next frames per step
@example(lengths=[2, 3], share=True, last_running=True, short=0, retire_last=0, seed=2)  # newest still running
@example(lengths=[2, 3, 2], share=True, last_running=False, short=0, retire_last=3, seed=3)  # retired writes
def test_episodes_read_from_a_run_replay_are_its_stored_transitions(lengths, share, last_running, short,
                                                                       retire_last, seed):
    # `dataset_episodes` (what `merge` reads) against the replay's own view of its transitions
    # (`SequenceReplayBuffer.stored_transitions`), over storages a run leaves behind: wrapped, with a running episode,
    # with retired entries, in either frame layout. Episode by episode, frame t and action t are transition t's,
    # frame t + 1 its next frame, and the end flag its last one's.
    rng = np.random.default_rng(seed)
    episodes = [_episode(rng, n, discrete=bool(seed % 2), final_frame=True, terminated=bool(rng.integers(2)))
                for n in lengths]
    entries = sum(lengths) + (len(lengths) - int(last_running) if share else 0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "replay"
        _replay_dataset(path, episodes, share=share, capacity=max(2, entries - short), last_running=last_running,
                        retire_last=retire_last)
        got = list(dataset_episodes(path))
        rows = load_offline(path, seq_len=1, batch_size=1).stored_transitions()
    traj = rows.get(DEFAULT_TRAJ_KEY).reshape(-1)
    read = {int(episode["name"].rsplit(" ", 1)[1]): episode for episode in got}
    assert len(read) == len(got)  # each episode once
    assert {i for i, episode in read.items() if len(episode["reward"])} == set(traj.tolist())
    for i, episode in read.items():
        steps = rows[traj == i]
        steps = steps[steps.get("step_count").reshape(-1).argsort()]
        assert len(episode["reward"]) == steps.shape[0] and episode["pixels"].shape[0] == steps.shape[0] + 1
        if not steps.shape[0]:
            continue
        assert torch.equal(episode["pixels"][:-1], _as_uint8(steps.get("pixels")))
        assert torch.equal(episode["pixels"][1:], _as_uint8(steps.get(NEXT_PIXELS)))
        assert torch.equal(episode["action"], steps.get("action").reshape(episode["action"].shape))
        assert torch.equal(episode["reward"], steps.get(("next", "reward")).reshape(-1))
        assert episode["terminated"] == bool(steps.get(("next", "terminated"))[-1])


def test_entries_the_merge_does_not_carry_are_named_in_a_warning(tmp_path):
    rng = np.random.default_rng(0)
    for name, extra in (("plain", False), ("crafter_like", True)):
        _replay_dataset(tmp_path / name, [_episode(rng, 3, True, True, False)], share=True, capacity=8, extra=extra)
    with pytest.warns(UserWarning, match=r"crafter_like holds entries the merged dataset does not carry: "
                                         r"\['next.achievements'\]"):
        meta = merge_datasets([tmp_path / "plain", tmp_path / "crafter_like"], tmp_path / "merged")
    assert meta["n_steps"] == 6
