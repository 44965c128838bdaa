"""Test-session settings."""

import os
from pathlib import Path

import pytest
import torch
from helpers import e2e_runs

# The test models are tiny: one intra-op thread beats two, whose hand-offs cost more than these small ops (and
# oversubscribe a 2-core CI runner when hypothesis and the OS want the other core). Override with D4FUNC_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("D4FUNC_TEST_THREADS", "1")))

# Tests name configs and scripts relative to the repository root, as the README's commands do: run from there
# whatever directory pytest was started in (`python -m pytest /path/to/d4func/tests`).
os.chdir(Path(__file__).resolve().parent.parent)

E2E_TEST = "test_pipeline_policy_beats_random_on_reach_on_every_seed"


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: only a selected test starts its runs
def pytest_collection_modifyitems(config, items):
    """The end-to-end learning test goes last, and its training runs start now, beside the rest of the suite
    (tests/helpers/e2e_runs.py): alone, its two seeds side by side; in a larger selection one after the other on
    the core the single-threaded suite leaves idle."""
    chosen = [item for item in items if item.name == E2E_TEST]
    if not chosen or config.getoption("collectonly"):
        return
    items.remove(chosen[0])
    items.append(chosen[0])
    e2e_runs.start(side_by_side=len(items) == 1)


def pytest_unconfigure(config):
    e2e_runs.stop()
