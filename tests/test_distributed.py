"""Data parallel over torch.distributed: one step on 2 gloo ranks equals the single-process step on the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from d4func.train import distributed as D

torch.set_num_threads(1)

HELPERS = Path(__file__).parent / "helpers"


def test_rank_seeds_are_deterministic_and_distinct() -> None:
    seeds = {D.rank_seed(7, rank, stream) for rank in range(8) for stream in ("data", "replay")}
    assert len(seeds) == 16
    assert D.rank_seed(7, 3) == D.rank_seed(7, 3)
    assert all(0 <= s < 2**63 for s in seeds)
    a, b = D.rank_generator(7, 0), D.rank_generator(7, 1)
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))
    with pytest.raises(ValueError, match="-1"):
        D.rank_seed(7, -1)


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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(HELPERS / "dp_step.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    got = torch.load(out, weights_only=False)
    assert got["world"] == 2 and got["n_rng"] == 2
    assert got["drift_caught"], "check_in_sync missed a 1e-12 drift on rank 1"
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
