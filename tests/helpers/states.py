"""Bitwise comparison of train-state dicts `{phase: TensorDict}` (checkpoint payloads), and a run's newest
checkpoint payload, for the resume tests."""

from __future__ import annotations

import torch

from d4func.train import checkpoint


def assert_states_equal(a: dict, b: dict) -> None:
    """Same phases, and every leaf of every phase bitwise equal (the failing phase and key are named)."""
    assert set(a) == set(b)
    for name in a:
        for key in a[name].keys(include_nested=True, leaves_only=True):
            assert torch.equal(a[name].get(key), b[name].get(key)), (name, key)


def final_payload(run_dir) -> dict:
    """The payload of `run_dir`'s newest checkpoint."""
    return checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run_dir)).payload
