"""Bitwise comparison of train-state dicts `{phase: TensorDict}` (checkpoint payloads), for the resume tests."""

from __future__ import annotations

import torch


def assert_states_equal(a: dict, b: dict) -> None:
    """Same phases, and every leaf of every phase bitwise equal (the failing phase and key are named)."""
    assert set(a) == set(b)
    for name in a:
        for key in a[name].keys(include_nested=True, leaves_only=True):
            assert torch.equal(a[name].get(key), b[name].get(key)), (name, key)
