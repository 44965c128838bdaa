"""Merging datasets (`d4func merge`): the merged dataset reads back as the sources' episodes in order, it trains
like any other, and sources that do not fit together are refused naming the bad value."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d4func.cli import main
from d4func.data.import_episodes import import_episodes
from d4func.data.merge_datasets import dataset_episodes, merge_datasets
from d4func.data.offline import load_offline, read_metadata


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
