"""Importing recorded episodes (`d4func import`): exact round trip, the two reward alignments, bad input, and an
offline run on imported data that has no env behind it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d4func.cli import main
from d4func.data.chunk_chains import chain_chunks
from d4func.data.import_episodes import episode_transitions, import_episodes, import_npz_episodes
from d4func.data.offline import load_offline, read_metadata
from d4func.train.compat import check_dataset_fits
from d4func.train.loop import train
from d4func.train.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "experiments/configs/debug.yaml")
MULTICAM = str(ROOT / "experiments/configs/dmc_multicam.yaml")


def _episode(rng: np.random.Generator, steps: int, *, cameras: int = 1, channels: int = 3, size: int = 4,
             discrete: bool = False, extra_frame: bool = False) -> dict[str, np.ndarray]:
    frames = steps + int(extra_frame)
    shape = (frames, size, size, channels) if cameras == 1 else (frames, cameras, size, size, channels)
    action = rng.integers(0, 5, size=steps) if discrete else rng.uniform(-1, 1, size=(steps, 2)).astype(np.float32)
    return {"pixels": rng.integers(0, 256, size=shape, dtype=np.uint8), "action": action,
            "reward": rng.normal(size=steps).astype(np.float32)}


def _stored_episodes(path: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Every stored transition, grouped by episode id and ordered by step."""
    rb = load_offline(path, 1, 1)
    data = rb.stored_transitions()
    out = {}
    for episode_id in data["collector", "traj_ids"].unique().tolist():
        rows = data[data["collector", "traj_ids"] == episode_id]
        rows = rows[rows["step_count"].reshape(-1).argsort()]
        out[episode_id] = rows
    return out


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 7), min_size=1, max_size=4), cameras=st.sampled_from([1, 2]),
       channels=st.sampled_from([1, 3]), discrete=st.booleans(), extra_frame=st.booleans(),
       seed=st.integers(0, 2**16))
def test_imported_episodes_are_stored_exactly(lengths, cameras, channels, discrete, extra_frame, seed):
    rng = np.random.default_rng(seed)
    episodes = [_episode(rng, n, cameras=cameras, channels=channels, discrete=discrete, extra_frame=extra_frame)
                for n in lengths]
    with tempfile.TemporaryDirectory() as tmp:
        meta = import_episodes(episodes, Path(tmp) / "data")
        stored = _stored_episodes(Path(tmp) / "data")
    assert meta["n_steps"] == sum(lengths) and meta["n_episodes_complete"] == len(lengths)
    assert meta["longest_episode"] == max(lengths)
    frame_shape = [channels, 4, 4] if cameras == 1 else [cameras, channels, 4, 4]
    assert meta["entries"]["pixels"]["shape"] == frame_shape
    assert sorted(stored) == list(range(len(lengths)))
    for i, episode in enumerate(episodes):
        rows, steps = stored[i], lengths[i]
        frames = torch.as_tensor(episode["pixels"][:steps])
        expected = frames.permute(0, 3, 1, 2) if cameras == 1 else frames.permute(0, 1, 4, 2, 3)
        assert torch.equal(rows["pixels"], expected.float() / 255)  # float32 k/255, as the envs give
        if extra_frame:  # the frame after each action, the last one's included
            after = torch.as_tensor(episode["pixels"][1:])
            after = after.permute(0, 3, 1, 2) if cameras == 1 else after.permute(0, 1, 4, 2, 3)
            assert torch.equal(rows["next", "pixels"], after.float() / 255)
        else:
            assert ("next", "pixels") not in rows.keys(include_nested=True)
        assert torch.equal(rows["action"], torch.as_tensor(episode["action"]).to(rows["action"].dtype))
        assert torch.equal(rows["next", "reward"].reshape(-1), torch.as_tensor(episode["reward"]))
        last = torch.arange(steps) == steps - 1
        assert torch.equal(rows["next", "done"].reshape(-1), last)
        assert torch.equal(rows["next", "truncated"].reshape(-1), last)  # no terminal flag given: cut off
        assert not rows["next", "terminated"].any()
        assert torch.equal(rows["is_init"].reshape(-1), torch.arange(steps) == 0)


def test_sampled_sequences_stay_inside_one_imported_episode(tmp_path):
    rng = np.random.default_rng(0)
    episodes = [_episode(rng, n) for n in (5, 9, 3, 12)]
    import_episodes(episodes, tmp_path / "data")
    rb = load_offline(tmp_path / "data", 4, 16, seed=0)
    for _ in range(5):
        batch = rb.sample()
        ids = batch["collector", "traj_ids"]
        assert (ids == ids[:, :1]).all()
        steps = batch["step_count"].reshape(batch.shape)
        assert (steps.diff(dim=1) == 1).all()
        assert not (ids == 2).any()  # the 3-step episode is shorter than a sequence: never drawn
        for row in range(batch.shape[0]):
            episode, start = int(ids[row, 0]), int(steps[row, 0])
            expected = torch.as_tensor(episodes[episode]["reward"][start:start + 4])
            assert torch.equal(batch["next", "reward"][row].reshape(-1), expected)


def test_arrival_layout_shifts_rewards_and_terminal_onto_the_action_before():
    # DreamerV3's layout: reward[t] and is_terminal[t] came on arriving at frame t.
    pixels = np.arange(4, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3)
    episode = {"pixels": pixels, "action": np.array([[0.1], [0.2], [0.3], [0.0]], dtype=np.float32),
               "reward": np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32),
               "terminated": np.array([False, False, False, True])}
    out = episode_transitions(episode, 7, rewards_on="arrival")
    assert out.shape == (3,)
    assert out["pixels"][:, 0, 0, 0].tolist() == [0, 1, 2]
    assert out["next", "pixels"][:, 0, 0, 0].tolist() == [1, 2, 3]  # the frame each action led to
    assert out["action"].reshape(-1).tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert out["next", "reward"].reshape(-1).tolist() == [1.0, 2.0, 3.0]
    assert out["next", "terminated"].reshape(-1).tolist() == [False, False, True]
    assert not out["next", "truncated"].any()
    assert out["collector", "traj_ids"].tolist() == [7, 7, 7]
    # the same episode in TorchRL's layout keeps every step and its own rewards
    same = episode_transitions(episode, 7, rewards_on="action")
    assert same["next", "reward"].reshape(-1).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert same["next", "terminated"].reshape(-1).tolist() == [False, False, False, True]


def test_float_frames_channels_first_and_camera_lists():
    rng = np.random.default_rng(1)
    uint8 = rng.integers(0, 256, size=(3, 3, 5, 6), dtype=np.uint8)  # [T, C, H, W]
    out = episode_transitions({"pixels": uint8 / 255.0, "action": np.zeros(3), "reward": np.zeros(3)}, 0,
                              channels_last=False)
    assert out["pixels"].dtype == torch.uint8 and torch.equal(out["pixels"], torch.as_tensor(uint8))
    front, wrist = (rng.integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8) for _ in range(2))
    out = episode_transitions({"pixels": [front, wrist], "action": np.zeros((2, 1)), "reward": np.zeros(2)}, 0)
    assert out["pixels"].shape == (2, 2, 3, 5, 6)
    assert torch.equal(out["pixels"][:, 1], torch.as_tensor(wrist).permute(0, 3, 1, 2))


def _bad(**changes):
    episode = {"pixels": np.zeros((4, 8, 8, 3), dtype=np.uint8), "action": np.zeros((4, 2), dtype=np.float32),
               "reward": np.zeros(4, dtype=np.float32)}
    episode.update(changes)
    return {k: v for k, v in episode.items() if v is not None}


@pytest.mark.parametrize(("episode", "options", "message"), [
    (_bad(action=np.full((4, 2), 1.5, dtype=np.float32)), {}, "max 1.5"),
    (_bad(action=np.array([[0.0, np.nan]] * 4, dtype=np.float32)), {}, "NaN"),
    (_bad(action=np.array([0, 1, -2, 0])), {}, "-2"),
    (_bad(reward=np.zeros(3, dtype=np.float32)), {}, "4 frames, 4 actions, 3 rewards"),
    (_bad(pixels=np.zeros((6, 8, 8, 3), dtype=np.uint8)), {}, "6 frames"),
    (_bad(pixels=np.full((4, 8, 8, 3), 2.0)), {}, "max 2"),
    (_bad(pixels=np.zeros((4, 8, 8, 3), dtype=np.int32)), {}, "int32"),
    (_bad(pixels=np.zeros((4, 8, 8), dtype=np.uint8)), {}, "[4, 8, 8]"),
    (_bad(pixels=np.zeros((4, 3, 8, 8), dtype=np.uint8)), {}, "channels_last=False"),
    (_bad(pixels=np.zeros((4, 4, 8, 8), dtype=np.uint8)), {}, "channels_last=False"),  # RGBA channels first
    (_bad(pixels=np.full((4, 8, 8, 3), np.nan)), {}, "min nan"),
    (_bad(reward=None), {}, "['reward']"),
    (_bad(terminated=np.array([False, True, False, True])), {}, "step 1"),
    (_bad(), {"rewards_on": "before"}, "'before'"),
    (_bad(pixels=np.zeros((1, 8, 8, 3), dtype=np.uint8), action=np.zeros((1, 2)), reward=np.zeros(1)),
     {"rewards_on": "arrival"}, "no transition"),
    (_bad(pixels=np.zeros((0, 8, 8, 3)), action=np.zeros((0, 2)), reward=np.zeros(0)), {}, "no frames"),
    (_bad(action=np.eye(2, dtype=np.float32)[[0, 1, 1, 0]]), {}, "one-hot"),
    (_bad(pixels=np.zeros((4, 8, 8, 3), dtype=np.uint8)), {"channels_last": False}, "channels_last=True"),
])
def test_bad_episodes_are_refused_naming_the_value(episode, options, message):
    with pytest.raises(ValueError, match="episode 3|rewards_on") as error:
        episode_transitions(episode, 3, **options)
    assert message in str(error.value)


def test_episodes_that_disagree_are_refused_naming_both(tmp_path):
    rng = np.random.default_rng(2)
    episodes = [_episode(rng, 3), _episode(rng, 3, discrete=True)]
    with pytest.raises(ValueError, match=r"episode 1 has frames \[3, 4, 4\], discrete actions, without .*, "
                       r"the first episode \(episode 0\) has frames \[3, 4, 4\], 2-dim continuous"):
        import_episodes(episodes, tmp_path / "mixed")
    # Named episodes (a file, a merged dataset's source) are named by it on both sides.
    named = [{**episodes[0], "name": "a.npz"}, {**episodes[1], "name": "b.npz"}]
    with pytest.raises(ValueError, match=r"episode 1 \(b.npz\) has .*the first episode \(episode 0 \(a.npz\)\)"):
        import_episodes(named, tmp_path / "named")
    with pytest.raises(ValueError, match="capacity=4"):
        import_episodes([_episode(rng, 3), _episode(rng, 3)], tmp_path / "small", capacity=4)
    import_episodes([_episode(rng, 3)], tmp_path / "once")
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        import_episodes([_episode(rng, 3)], tmp_path / "once")


def test_dataset_checks_use_the_imported_episode_lengths_and_actions(tmp_path):
    episode = _episode(np.random.default_rng(3), 5, size=32, discrete=True, extra_frame=True)
    episode["action"] = np.array([0, 1, 4, 2, 0])
    import_episodes([episode], tmp_path / "data")
    meta = read_metadata(tmp_path / "data")
    assert meta["largest_discrete_action"] == 4 and meta["entries"]["action"]["dtype"] == "int64"
    discrete = ["dynamics.n_actions=3", "dynamics.action_dim=0", "heads.n_actions=3", "heads.action_dim=0"]
    cfg = load_run_config(DEBUG, discrete)
    with pytest.raises(ValueError, match="longest episode has 5 steps, fewer than replay.seq_len=8"):
        check_dataset_fits(cfg, meta, "d")
    cfg = load_run_config(DEBUG, [*discrete, "replay.seq_len=5", "replay.context_len=2"])
    with pytest.raises(ValueError, match="discrete action 4, but dynamics.n_actions=3"):
        check_dataset_fits(cfg, meta, "d")


def test_without_final_frames_training_needs_final_frame_off(tmp_path):
    rng = np.random.default_rng(6)
    meta = import_episodes([_episode(rng, 12, size=32, extra_frame=False)], tmp_path / "data")
    assert "next.pixels" not in meta["entries"]
    overrides = ["dynamics.action_dim=2", "heads.action_dim=2"]
    with pytest.raises(ValueError, match="replay.final_frame=false"):
        check_dataset_fits(load_run_config(DEBUG, overrides), meta, "d")
    check_dataset_fits(load_run_config(DEBUG, [*overrides, "replay.final_frame=false"]), meta, "d")


def test_camera_lists_import_for_the_multicamera_config(tmp_path):
    rng = np.random.default_rng(4)
    cfg = load_run_config(MULTICAM, [])
    size = cfg.tokenizer.height
    front, wrist = (rng.integers(0, 256, size=(21, size, size, 3), dtype=np.uint8) for _ in range(2))
    episode = {"pixels": [front, wrist], "action": rng.uniform(-1, 1, (20, cfg.dynamics.action_dim)),
               "reward": np.zeros(20)}
    meta = import_episodes([episode], tmp_path / "data")
    check_dataset_fits(cfg, meta, "multicam")  # [2, 3, H, W] is what the two-camera tokenizer takes


def test_import_command_then_offline_training_without_an_env(tmp_path, capsys):
    # DreamerV3-style episodes: "image" frames, rewards and terminal flags on arrival.
    rng = np.random.default_rng(5)
    (tmp_path / "episodes").mkdir()
    for i, steps in enumerate((14, 11, 16)):
        np.savez(tmp_path / "episodes" / f"ep{i:03d}.npz",
                 image=rng.integers(0, 256, size=(steps, 32, 32, 3), dtype=np.uint8),
                 action=rng.uniform(-1, 1, size=(steps, 1)).astype(np.float32),
                 reward=rng.normal(size=steps).astype(np.float32),
                 is_terminal=np.arange(steps) == steps - 1 if i == 0 else np.zeros(steps, dtype=bool))
    data = tmp_path / "data"
    code = main(["import", "--episodes", str(tmp_path / "episodes"), "--out", str(data), "--pixels", "image",
                 "--terminated", "is_terminal", "--rewards-on", "arrival", "--source", "teleoperator"])
    assert code == 0, capsys.readouterr().err
    meta = read_metadata(data)
    assert meta["n_steps"] == 13 + 10 + 15 and meta["policy"] == "teleoperator" and meta["env_config"] is None
    stored = _stored_episodes(data)
    assert stored[0]["next", "terminated"].reshape(-1)[-1] and not stored[1]["next", "terminated"].any()

    cfg = load_run_config(DEBUG, [f"run_dir={tmp_path / 'run'}", "loop.mode=offline", f"loop.offline_data={data}",
                                  "loop.offline_steps=3", "loop.agent_start=2", "loop.gif_every=3",
                                  "loop.checkpoint_every=3"])
    summary = train(cfg, progress=False)
    assert summary["grad_steps"] == 3 and summary["eval"] == {}  # no env to evaluate in: training only
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--episodes", "1"]) == 2
    assert "names no env to evaluate in" in capsys.readouterr().err

    assert main(["import", "--episodes", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["import", "--episodes", str(tmp_path / "episodes"), "--out", str(tmp_path / "y")]) == 2
    assert "no array 'pixels'" in capsys.readouterr().err


def test_integer_actions_of_shape_t_by_1_are_indices():
    out = episode_transitions({"pixels": np.zeros((3, 4, 4, 3), dtype=np.uint8), "action": np.array([[2], [0], [1]]),
                               "reward": np.zeros(3)}, 0)
    assert out["action"].tolist() == [2, 0, 1]


def _chunk(rng, steps, first_at, terminal_at=()):
    """A DreamerV3-style replay chunk: rewards and terminal flags on arrival, episode starts marked."""
    is_first = np.zeros(steps, dtype=bool)
    is_first[list(first_at)] = True
    is_terminal = np.zeros(steps, dtype=bool)
    is_terminal[list(terminal_at)] = True
    return {"image": rng.integers(0, 256, size=(steps, 32, 32, 3), dtype=np.uint8),
            "action": rng.uniform(-1, 1, size=(steps, 1)).astype(np.float32),
            "reward": np.arange(steps, dtype=np.float32), "is_first": is_first, "is_terminal": is_terminal}


def test_chunks_are_split_at_is_first_and_never_joined_across_files(tmp_path):
    rng = np.random.default_rng(7)
    (tmp_path / "chunks").mkdir()
    # chunk 0: an episode at 0..5 ending in a terminal state, a second one from 6 on; chunk 1 continues it (no
    # is_first at 0), then a third episode starts at 4.
    np.savez(tmp_path / "chunks" / "a.npz", **_chunk(rng, 10, [0, 6], terminal_at=[5]))
    np.savez(tmp_path / "chunks" / "b.npz", **_chunk(rng, 9, [4]))
    out = tmp_path / "data"
    assert main(["import", "--episodes", str(tmp_path / "chunks"), "--out", str(out), "--pixels", "image",
                 "--terminated", "is_terminal", "--rewards-on", "arrival"]) == 0
    stored = _stored_episodes(out)
    # frames per episode 6, 4, 4, 5 -> transitions 5, 3, 3, 4 (arrival drops each episode's last action)
    assert [stored[i].shape[0] for i in range(4)] == [5, 3, 3, 4]
    assert stored[0]["next", "reward"].reshape(-1).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert stored[0]["next", "terminated"].reshape(-1).tolist() == [False] * 4 + [True]
    assert stored[1]["next", "reward"].reshape(-1).tolist() == [7.0, 8.0, 9.0]  # rewards on arrival at 7, 8, 9
    assert not stored[1]["next", "terminated"].any() and stored[1]["next", "truncated"].reshape(-1)[-1]
    assert stored[2]["next", "reward"].reshape(-1).tolist() == [1.0, 2.0, 3.0]  # chunk b's head: its own episode


def test_a_failed_import_leaves_no_partial_dataset_and_names_the_file(tmp_path, capsys):
    rng = np.random.default_rng(8)
    (tmp_path / "episodes").mkdir()
    for i in range(3):
        episode = _episode(rng, 5, size=8, extra_frame=True)
        if i == 2:
            episode["action"][3, 0] = 3.0
        np.savez(tmp_path / "episodes" / f"ep{i}.npz", **episode)
    out = tmp_path / "data"
    assert main(["import", "--episodes", str(tmp_path / "episodes"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ep2.npz, steps 0..4" in err and "max 3" in err
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a directory the user made: only what the import wrote goes
    assert main(["import", "--episodes", str(tmp_path / "episodes"), "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "storage").mkdir()
    assert main(["import", "--episodes", str(tmp_path / "episodes"), "--out", str(out)]) == 2
    assert "no dataset.json (an interrupted import?)" in capsys.readouterr().err
    # a terminal-flag array named on the command line must be in every file
    assert main(["import", "--episodes", str(tmp_path / "episodes"), "--out", str(tmp_path / "x"),
                 "--terminated", "is_terminal"]) == 2
    assert "no array 'is_terminal'" in capsys.readouterr().err


def test_frames_must_match_the_named_env(tmp_path):
    from d4func.envs.registry import env_config

    rng = np.random.default_rng(9)
    with pytest.raises(ValueError, match=r"frames are \[8, 8\] pixels, but env_config says image_size=64"):
        import_episodes([_episode(rng, 3, size=8)], tmp_path / "a", env_config=env_config("dmc:cartpole-swingup"))
    with pytest.raises(ValueError, match="2 camera"):
        import_episodes([_episode(rng, 3, size=64)], tmp_path / "b",
                        env_config=env_config("dmc:cartpole-swingup@0,1"))
    import_episodes([_episode(rng, 3, size=64, cameras=2)], tmp_path / "c",
                    env_config=env_config("dmc:cartpole-swingup@0,1"))


def _write_stream_as_chunks(directory: Path, stream: dict[str, np.ndarray], cuts: list[int], tag: str,
                            start_time: int) -> list[str]:
    """Cut one recorded stream into DreamerV3-named chunks linked by successor uuids; returns the file names."""
    bounds = [0, *cuts, len(stream["reward"])]
    uuids = [f"{tag}{i:04d}" for i in range(len(bounds) - 1)] + ["0" * 8]  # all zeros: no successor
    names = []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        name = f"{start_time + i:014d}-{uuids[i]}-{uuids[i + 1]}-{end - start}.npz"
        np.savez(directory / name, **{key: value[start:end] for key, value in stream.items()})
        names.append(name)
    return names


def _stream(rng: np.random.Generator, episode_lengths: list[int], terminal_last: bool) -> dict[str, np.ndarray]:
    """A DreamerV3-style stream (arrival layout, one entry per step) of episodes of the given frame counts."""
    steps = sum(episode_lengths)
    chunk = _chunk(rng, steps, np.cumsum([0, *episode_lengths[:-1]]).tolist())
    chunk["image"] = chunk["image"][:, :4, :4]
    ends = np.cumsum(episode_lengths) - 1
    chunk["is_terminal"][:] = False
    chunk["is_terminal"][ends[:-1] if not terminal_last else ends] = True  # one still running, or all ended
    chunk["reward"] = rng.normal(size=steps).astype(np.float32)
    return chunk


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(episodes=st.lists(st.lists(st.integers(2, 9), min_size=1, max_size=3), min_size=1, max_size=2),
       cut_seed=st.integers(0, 2**16), terminal_last=st.booleans())
def test_joined_chunks_import_the_same_episodes_as_whole_files(episodes, cut_seed, terminal_last):
    """Invariant: cutting streams into chained chunks anywhere, and listing the files in any order, imports exactly
    the episodes of the uncut streams (each stream's episodes given as whole files)."""
    rng = np.random.default_rng(cut_seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "chunks").mkdir()
        (tmp / "whole").mkdir()
        whole = []
        for s, lengths in enumerate(episodes):
            stream = _stream(rng, lengths, terminal_last)
            steps = len(stream["reward"])
            cuts = sorted(rng.choice(np.arange(1, steps), size=min(3, steps - 1), replace=False).tolist())
            _write_stream_as_chunks(tmp / "chunks", stream, cuts, tag=f"s{s}", start_time=100 * s)
            for start, end in zip(np.cumsum([0, *lengths[:-1]]), np.cumsum(lengths), strict=True):
                whole.append(tmp / "whole" / f"{len(whole):03d}.npz")
                np.savez(whole[-1], **{key: value[start:end] for key, value in stream.items()})
        files = list((tmp / "chunks").glob("*.npz"))
        rng.shuffle(files)
        options = dict(keys={"pixels": "image", "terminated": "is_terminal"}, rewards_on="arrival")
        import_npz_episodes(files, tmp / "joined", join_chunks=True, **options)
        import_npz_episodes(whole, tmp / "reference", **options)
        joined, reference = _stored_episodes(tmp / "joined"), _stored_episodes(tmp / "reference")
        assert sorted(joined) == sorted(reference) == list(range(sum(len(lengths) for lengths in episodes)))
        for i in reference:
            for key in ("pixels", "action", ("next", "reward"), ("next", "terminated"), ("next", "truncated"),
                        ("next", "pixels")):
                assert torch.equal(joined[i][key], reference[i][key]), (i, key)
        assert read_metadata(tmp / "joined")["n_steps"] == read_metadata(tmp / "reference")["n_steps"]


def test_chunk_chains_refuse_bad_names_forks_cycles_and_wrong_lengths(tmp_path):
    rng = np.random.default_rng(11)
    stream = _stream(rng, [5, 4], terminal_last=True)

    def save(name: str, start: int = 0, end: int = 9) -> Path:
        np.savez(tmp_path / name, **{key: value[start:end] for key, value in stream.items()})
        return tmp_path / name

    with pytest.raises(ValueError, match="'.*episode.npz' is not named like a DreamerV3 chunk"):
        chain_chunks([save("episode.npz")])
    # the first episode (frames 0..4) runs on from chunk a (0..2) into chunk b (3..8)
    a, b, c = save("1-aa-bb-3.npz", 0, 3), save("2-bb-00-6.npz", 3, 9), save("3-cc-bb-3.npz", 0, 3)
    with pytest.raises(ValueError, match="both name .*2-bb-00-6.npz' as their successor"):
        chain_chunks([a, b, c])
    with pytest.raises(ValueError, match="share the uuid aa"):
        chain_chunks([a, save("5-aa-00-3.npz", 0, 3)])
    with pytest.raises(ValueError, match="form a cycle"):
        chain_chunks([save("6-xx-yy-3.npz", 0, 3), save("7-yy-xx-6.npz", 3, 9), b])
    assert [[chunk.path.name for chunk in s] for s in chain_chunks([b, a])] == [["1-aa-bb-3.npz", "2-bb-00-6.npz"]]
    with pytest.raises(ValueError, match="its name says 7 steps, 'reward' holds 4"):
        import_npz_episodes([save("8-pp-qq-7.npz", 0, 4)], tmp_path / "data", join_chunks=True,
                            keys={"pixels": "image"}, rewards_on="arrival")
    assert not (tmp_path / "data").exists()
    # the command line: an episode running over two chunks imports as one with --join-chunks, as two without
    (tmp_path / "replay").mkdir()
    for file in (a, b):
        file.rename(tmp_path / "replay" / file.name)
    flags = ["--pixels", "image", "--terminated", "is_terminal", "--rewards-on", "arrival"]
    assert main(["import", "--episodes", str(tmp_path / "replay"), "--out", str(tmp_path / "j"), *flags,
                 "--join-chunks"]) == 0
    assert main(["import", "--episodes", str(tmp_path / "replay"), "--out", str(tmp_path / "n"), *flags]) == 0
    assert read_metadata(tmp_path / "j")["n_episodes_complete"] == 2
    assert read_metadata(tmp_path / "n")["n_episodes_complete"] == 3


def test_chunk_pieces_without_a_transition_are_skipped_and_counted(tmp_path):
    # An episode that starts on a chunk's last step leaves a one-frame piece: no transition under arrival rewards.
    rng = np.random.default_rng(12)
    np.savez(tmp_path / "chunk.npz", **_chunk(rng, 6, [0, 5]))
    with pytest.warns(UserWarning, match=r"1 episode\(s\) hold no transition .*steps 5..5"):
        meta = import_npz_episodes([tmp_path / "chunk.npz"], tmp_path / "data", keys={"pixels": "image"},
                                   rewards_on="arrival")
    assert meta["n_episodes_complete"] == 1 and meta["n_steps"] == 4
    assert meta["imported"]["skipped_without_transition"] == 1
    np.savez(tmp_path / "last.npz", **_chunk(rng, 1, [0]))
    with pytest.raises(ValueError, match="no episodes to import .*: all 1 hold no transition"):
        import_npz_episodes([tmp_path / "last.npz"], tmp_path / "none", keys={"pixels": "image"},
                            rewards_on="arrival")


def test_files_that_are_not_npz_archives_are_named(tmp_path):
    (tmp_path / "text.npz").write_text("not an archive")
    with open(tmp_path / "array.npz", "wb") as f:
        np.save(f, np.zeros(3))  # one .npy array under an .npz name
    with pytest.raises(ValueError, match="text.npz cannot be read as .npz"):
        import_npz_episodes([tmp_path / "text.npz"], tmp_path / "a")
    with pytest.raises(ValueError, match="array.npz holds one array"):
        import_npz_episodes([tmp_path / "array.npz"], tmp_path / "b")


def test_a_single_episode_file_keeps_its_final_frame_and_a_file_split_at_is_first_may_not_hold_one(tmp_path):
    # One episode per file: frames may hold one more than the steps, the frame after the last action.
    rng = np.random.default_rng(13)
    episode = _episode(rng, 5, extra_frame=True)
    np.savez(tmp_path / "one.npz", **episode)
    import_npz_episodes([tmp_path / "one.npz"], tmp_path / "data")
    rows = _stored_episodes(tmp_path / "data")[0]
    final = torch.as_tensor(episode["pixels"][-1]).permute(2, 0, 1).float() / 255
    assert rows.shape[0] == 5 and torch.equal(rows["next", "pixels"][-1], final)
    # split at is_first, the same 6 frames for 5 steps are refused: the extra frame cannot end the first episode
    np.savez(tmp_path / "two.npz", **episode, is_first=np.array([1, 0, 0, 1, 0], dtype=bool))
    with pytest.raises(ValueError, match="two.npz holds 6 frames for 5 steps: a file of 2 episodes"):
        import_npz_episodes([tmp_path / "two.npz"], tmp_path / "split")


def test_chunk_streams_come_in_recording_order_whatever_order_the_files_are_listed():
    # Two workers' streams, one chunk each, and one of two chunks: streams start in the order their first chunks
    # were written (the time in the name), and a chunk whose predecessor is missing starts a stream of its own.
    names = ["20240101T000005-bb-cc-4.npz", "20240101T000001-aa-00-4.npz", "20240101T000009-cc-00-4.npz",
             "20240101T000003-dd-zz-4.npz"]
    for order in (names, names[::-1], sorted(names)):
        streams = chain_chunks([Path("/replay") / name for name in order])
        assert [[chunk.uuid for chunk in stream] for stream in streams] == [["aa"], ["dd"], ["bb", "cc"]]


@pytest.mark.parametrize(("name", "why"), [("1-aa-bb-x4.npz", "is not named like a DreamerV3 chunk"),
                                           ("1-aa-bb.npz", "is not named like a DreamerV3 chunk"),
                                           ("1-aa-aa-4.npz", "names itself as its successor")])
def test_chunk_names_that_cannot_chain_are_refused_naming_the_file(name, why):
    with pytest.raises(ValueError, match=rf"'[^']*{name}' {why}"):
        chain_chunks([Path("/replay") / name])


def _arrival(terminated):
    pixels = np.arange(5, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3)
    return {"pixels": pixels, "action": np.zeros((5, 1), dtype=np.float32),
            "reward": np.arange(5, dtype=np.float32), "terminated": np.array(terminated)}


def test_arrival_layout_ignores_the_terminal_flag_of_the_first_frame():
    # Under "arrival", terminated[0] came on arriving at frame 0, before any action of this episode: ignored.
    out = episode_transitions(_arrival([True, False, False, False, False]), 0, rewards_on="arrival")
    assert not out["next", "terminated"].any() and out["next", "truncated"].reshape(-1).tolist()[-1]
    out = episode_transitions(_arrival([True, False, False, False, True]), 0, rewards_on="arrival")
    assert out["next", "terminated"].reshape(-1).tolist() == [False, False, False, True]


@pytest.mark.parametrize(("rewards_on", "terminated", "message"), [
    ("action", [False, False, True, False, False], "set at step 2 before the episode's last step 4"),
    ("arrival", [False, False, True, False, False], "set at step 2 before the episode's last step 4"),
    ("arrival", [True, True, False, False, False], "set at step 1 before the episode's last step 4"),
])
def test_an_early_terminal_flag_is_named_by_its_step_and_the_last_step(rewards_on, terminated, message):
    episode = _arrival(terminated)
    if rewards_on == "action":
        episode["pixels"] = np.concatenate([episode["pixels"], episode["pixels"][-1:]])
    with pytest.raises(ValueError, match="episode 6 terminated") as error:
        episode_transitions(episode, 6, rewards_on=rewards_on)
    assert message in str(error.value)


def test_float_frames_are_rounded_to_the_nearest_multiple_of_1_255():
    k = np.arange(256)
    near = np.clip(np.stack([k - 0.4, k + 0.3, k + 0.0]) / 255, 0, 1)  # each row rounds to k
    pixels = np.broadcast_to(near[:, None, :, None], (3, 1, 256, 3))  # [T, H, W, C]
    for dtype in (np.float32, np.float64):
        out = episode_transitions({"pixels": pixels.astype(dtype), "action": np.zeros(3), "reward": np.zeros(3)}, 0)
        assert out["pixels"].dtype == torch.uint8
        assert (out["pixels"][:, 0, 0, :] == torch.arange(256, dtype=torch.uint8)).all()


def test_dataset_metadata_spans_every_imported_episode(tmp_path):
    # The largest discrete action and the shortest episode are over all episodes, not the first or the last one.
    rng = np.random.default_rng(4)
    episodes = [_episode(rng, n, discrete=True, extra_frame=True) for n in (5, 2, 3)]
    for episode, actions in zip(episodes, ([0, 4, 1, 0, 2], [1, 0], [3, 1, 0]), strict=True):
        episode["action"] = np.array(actions)
    meta = import_episodes(episodes, tmp_path / "mixed")
    assert meta["largest_discrete_action"] == 4
    assert meta["longest_episode"] == 5 and meta["imported"]["shortest_episode"] == 2
    for episode in episodes:
        episode["action"] = np.zeros(len(episode["reward"]), dtype=np.int64)
    zeros = import_episodes(episodes, tmp_path / "zeros")
    assert zeros["largest_discrete_action"] == 0  # discrete, only action 0 taken: not "no discrete action"
