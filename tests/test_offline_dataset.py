"""Offline datasets on disk: what dataset.json records and what load_offline / read_metadata check against it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchrl.data import Bounded

from d4func.data.import_episodes import import_episodes
from d4func.data.offline import META_FILE, UniformRandomPolicy, load_offline, read_metadata


def _dataset(path, lengths=(3, 4), final_frame=True):
    rng = np.random.default_rng(0)
    episodes = [{"pixels": rng.integers(0, 256, size=(n + int(final_frame), 4, 4, 3), dtype=np.uint8),
                 "action": rng.uniform(-1, 1, size=(n, 2)).astype(np.float32), "reward": np.zeros(n)}
                for n in lengths]
    return import_episodes(episodes, path)


def _edit(path, **changes):
    meta = json.loads((path / META_FILE).read_text())
    meta.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del meta[key]
    (path / META_FILE).write_text(json.dumps(meta))


def test_a_dataset_of_another_format_is_refused_naming_it(tmp_path):
    _dataset(tmp_path / "d")
    _edit(tmp_path / "d", format="someone-elses-v3")
    with pytest.raises(ValueError, match="'someone-elses-v3', expected 'd4func-replay-v1'"):
        read_metadata(tmp_path / "d")
    with pytest.raises(ValueError, match="someone-elses-v3"):
        load_offline(tmp_path / "d", 2, 1)


def test_a_dataset_whose_storage_does_not_hold_the_recorded_entries_is_refused(tmp_path):
    meta = _dataset(tmp_path / "d")
    assert meta["stored_entries"] == 9 and len(load_offline(tmp_path / "d", 2, 1)) == 9  # 7 steps, 2 end frames
    _edit(tmp_path / "d", stored_entries=10)
    with pytest.raises(RuntimeError, match="should hold 10 stored entries, found 9"):
        load_offline(tmp_path / "d", 2, 1)


def test_a_dataset_written_before_stored_entries_was_recorded_counts_one_entry_per_step(tmp_path):
    # Older datasets stored next frames per transition and recorded only n_steps: that is their entry count.
    _dataset(tmp_path / "d", final_frame=False)
    _edit(tmp_path / "d", stored_entries=None)
    assert len(load_offline(tmp_path / "d", 2, 1)) == 7
    _edit(tmp_path / "d", n_steps=8)
    with pytest.raises(RuntimeError, match="should hold 8 stored entries, found 7"):
        load_offline(tmp_path / "d", 2, 1)


def test_uniform_random_continuous_actions_cover_the_bounds_of_the_spec():
    spec = Bounded(low=torch.tensor([2.0, -3.0]), high=torch.tensor([3.0, -1.0]), shape=(2,))
    actions = UniformRandomPolicy(spec, seed=0)._sample(torch.Size([2000]))
    assert actions.shape == (2000, 2)
    assert (actions >= spec.space.low).all() and (actions <= spec.space.high).all()
    assert actions.min(0).values.tolist() == pytest.approx([2.0, -3.0], abs=0.01)
    assert actions.max(0).values.tolist() == pytest.approx([3.0, -1.0], abs=0.01)
