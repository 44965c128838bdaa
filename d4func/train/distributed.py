"""Data-parallel training through `torch.distributed` on the functional core (launch with `torchrun`).

Each rank holds the whole train state (params, AdamW moments, EMA) and computes gradients on its shard of the
batch; the gradient TensorDicts are averaged across ranks with `all_reduce`, so every rank applies the same update
and the replicas stay bitwise identical (`check_in_sync` verifies it). With equal shards, a loss that is a mean
over the batch and the same random draws per example, the averaged gradient is the full-batch gradient: one
data-parallel step is the single-process step on the concatenated batch (tests/test_distributed.py checks this with
2 gloo processes; "Train steps" below says what changes when each rank draws from its own generator).

Why not DDP or FSDP2: both wrap a stateful `nn.Module` and hook the `.grad` accumulation of its parameters. Here a
model is a weightless template, its parameters are a TensorDict passed in by `functional.apply`, gradients come
back from `grad_and_value` as another TensorDict and the optimizer is a pure function: there is no module with
parameters to wrap, and averaging the gradient tree is all DDP would do for us. What DDP adds on top, overlapping
the all-reduce with the backward pass bucket by bucket, is given up here (the reduce starts after the backward);
at the model sizes of this project the all-reduce is a small share of a step. FSDP2 (`fully_shard`) could later
shard params and optimizer moments as DTensors stored in the same TensorDict when a model outgrows one GPU.

Collectives: the gradient leaves (hundreds of small tensors) are packed into flat buckets of at most `bucket_mb`
(25 MB, DDP's default) per dtype and each bucket is reduced with one `all_reduce` call: a call costs a fixed latency
(rendezvous, kernel launch; tens of microseconds on NCCL, more on gloo), so one call per leaf is latency-bound
while one call per bucket is bandwidth-bound, at the price of one copy of the gradients into the buckets. gloo has
no AVG reduction, so buckets are summed and divided by the world size on every backend (identical on all ranks).

Train steps: every step function (`tokenizer_train_step`, `dynamics_train_step`, `agent_finetune_step`,
`imagination_step`) takes a keyword-only `grad_fn`, by default `functional.grad_and_value`, with the contract

    grad_fn(loss_fn, has_aux=True)(params, *args, **kwargs) -> (grads, (loss, metrics))

Passing `grad_fn=data_parallel_grad_and_value` (or `functools.partial(data_parallel_grad_and_value,
bucket_mb=...)`) makes any of them data-parallel: the gradients are averaged over ranks before the AdamW update,
which is then identical on every rank, and the loss and the scalar metrics the step reports are rank means. Under
`torchrun --nproc_per_node=N`, a loop does

    info = init_distributed()
    state = new_train_state(broadcast_tree(init(template_module, seed)), with_ema=False)
    generator = rank_generator(seed, info.rank)
    for step in ...:
        shard = <this rank's batch of size B / N, from its own replay stream>
        state, metrics = dynamics_train_step(state, *shard, generator, model=..., opt=...,
                                             grad_fn=data_parallel_grad_and_value)
        if info.is_main: log(metrics)            # already the mean over ranks

With equal shards and a loss that is a mean over the batch, the averaged gradient is the mean of the shards'
gradients; it equals the full-batch gradient when each example's random draws (signal levels, noise, masks) are
the same, but those are drawn from each rank's generator, so the draws differ from a one-process run on the whole
batch (tests/test_distributed.py checks both the real steps against the mean of per-shard gradients and the full
batch equivalence on a loss that takes its draws as inputs). Terms normalised per shard (the tokenizer's running
RMS, the agent losses' means over valid steps, ratio metrics such as `flow_mse`) are averaged per rank, not per
example.

A step that finds a NaN must stop every rank: call `check_finite` on metrics *after* `reduce_metrics` (as
`data_parallel_grad_and_value` returns them), so all ranks see the same values and raise together instead of the
healthy ranks hanging in the next collective.

Checkpoints: only rank 0 writes, with every rank's RNG states; every rank restores its own on resume:

    rng = gather_rng_states(generators)            # a collective: every rank calls it
    if info.is_main:
        save_checkpoint(run_dir, step, payload, rng=rng)
    dist.barrier()
    ...
    ckpt = restore(run_dir, generators)            # every rank (run_dir on a filesystem all nodes see)

Data: each rank draws its batches from its own stream, `rank_generator(seed, rank)` (and
`make_replay(..., seed=rank_seed(seed, rank, "replay"))`), so the shards differ.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tensordict import TensorDictBase
from torch import Tensor

from d4func.functional import grad_and_value
from d4func.train.checkpoint import AnyGenerator, capture_rng_state

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "broadcast_tree",
    "check_in_sync",
    "data_parallel_grad_and_value",
    "gather_rng_states",
    "init_distributed",
    "rank_generator",
    "rank_seed",
    "reduce_metrics",
    "shutdown_distributed",
]

DEFAULT_BUCKET_MB = 25.0


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: `rank` of `world_size`, `local_rank` on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(backend: str | None = None, device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group `torchrun` describes (env vars RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables (a plain `python script.py`) this is a single process: rank 0 of 1, no process group.
    `backend` defaults to "nccl" on CUDA and "gloo" otherwise; on CUDA each process takes GPU `LOCAL_RANK`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                               "use --nproc_per_node <= the GPU count")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu" if device is None else device)
    if world_size == 1:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=dev)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev)


def shutdown_distributed() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Rank-aware seeding
# ----------------------------------------------------------------------------------------------------------------


def rank_seed(seed: int, rank: int, stream: str = "data", bits: int = 63) -> int:
    """A `bits`-bit seed for RNG stream `stream` of `rank`, well mixed (numpy SeedSequence), so the ranks' streams
    (and the streams of one rank) do not overlap the way `seed + rank` streams of related seeds might. Env seeds
    need `bits=32`: dm_control seeds numpy's RandomState, which takes seeds below 2**32 only."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in [1, 64], got {bits}")
    sequence = np.random.SeedSequence(entropy=seed, spawn_key=(rank, zlib.crc32(stream.encode())))
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(64 - bits))


def rank_generator(seed: int, rank: int, stream: str = "data", device: torch.device | str = "cpu") -> torch.Generator:
    """`torch.Generator` on `device` seeded with `rank_seed(seed, rank, stream)`."""
    return torch.Generator(device=device).manual_seed(rank_seed(seed, rank, stream))


# ----------------------------------------------------------------------------------------------------------------
# Collectives on TensorDicts
# ----------------------------------------------------------------------------------------------------------------


def _buckets(tensors: list[Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of `tensors` grouped into buckets of one dtype and device, each at most `bucket_bytes` (a single
    larger tensor gets a bucket of its own)."""
    groups: dict[tuple[torch.dtype, torch.device], list[list[int]]] = {}
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for index, tensor in enumerate(tensors):
        key = (tensor.dtype, tensor.device)
        nbytes = tensor.numel() * tensor.element_size()
        if key not in groups or sizes[key] + nbytes > bucket_bytes:
            groups.setdefault(key, []).append([])
            sizes[key] = 0
        groups[key][-1].append(index)
        sizes[key] += nbytes
    return [bucket for buckets in groups.values() for bucket in buckets]


def _bucketed(tree: TensorDictBase, bucket_mb: float, collective: Callable[[Tensor], None]) -> TensorDictBase:
    """Apply an in-place `collective` to every leaf of `tree` through flat buckets; returns a new tree."""
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
    keys = list(tree.keys(include_nested=True, leaves_only=True))
    tensors = [tree.get(key) for key in keys]
    results: list[Tensor | None] = [None] * len(tensors)
    for bucket in _buckets(tensors, int(bucket_mb * 2**20)):
        flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
        collective(flat)
        for i, piece in zip(bucket, torch.split(flat, [tensors[i].numel() for i in bucket]), strict=True):
            results[i] = piece.view(tensors[i].shape)
    out = tree.empty(recurse=True)
    for key, value in zip(keys, results, strict=True):
        out.set(key, value)
    return out


def all_reduce_mean(tree: TensorDictBase, bucket_mb: float = DEFAULT_BUCKET_MB) -> TensorDictBase:
    """Mean of `tree` (e.g. gradients) over all ranks, leaf by leaf; `tree` itself is untouched. Identity when
    not running distributed."""
    if not _active():
        return tree
    world = dist.get_world_size()

    def reduce(flat: Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)

    return _bucketed(tree, bucket_mb, reduce)


def broadcast_tree(tree: TensorDictBase, src: int = 0, bucket_mb: float = DEFAULT_BUCKET_MB) -> TensorDictBase:
    """Rank `src`'s `tree` on every rank (initial params: replicas must start identical even if an init was not
    deterministic or a rank was seeded differently). Identity when not running distributed."""
    if not _active():
        return tree
    return _bucketed(tree, bucket_mb, lambda flat: dist.broadcast(flat, src=src))


# Metrics that are maxima over the batch: their rank reduction is the maximum too, not the mean.
MAX_METRICS = frozenset({"adv_absmax"})


def reduce_metrics(metrics: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Mean of scalar metrics over ranks in one collective (so all ranks log and check the same numbers); the
    maximum for `MAX_METRICS`, in a second collective when there are any (every rank has the same names)."""
    if not _active() or not metrics:
        return dict(metrics)
    names = list(metrics)
    values = [torch.as_tensor(metrics[name]) for name in names]
    for name, value in zip(names, values, strict=True):
        if value.ndim != 0:
            raise ValueError(f"reduce_metrics takes scalar metrics; {name!r} has shape {tuple(value.shape)}")
    # One device for the collective: a metric computed on the CPU (a constant, say) beside CUDA ones would make
    # torch.stack fail, and NCCL takes CUDA tensors only.
    device = next((value.device for value in values if value.device.type != "cpu"), torch.device("cpu"))
    stacked = torch.stack([value.to(device, torch.float64) for value in values])
    # By the metric's own name: data_parallel_grad_and_value passes aux metrics as "aux.<name>".
    maxima = [i for i, name in enumerate(names) if name.removeprefix("aux.") in MAX_METRICS]
    if maxima:
        largest = stacked[maxima]  # a copy (advanced indexing)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    stacked /= dist.get_world_size()
    if maxima:
        stacked[maxima] = largest
    return {name: stacked[i].to(value.dtype if value.is_floating_point() else torch.float32)
            for i, (name, value) in enumerate(zip(names, values, strict=True))}


def data_parallel_grad_and_value(
    loss_fn: Callable[..., Any], has_aux: bool = False, bucket_mb: float = DEFAULT_BUCKET_MB
) -> Callable[..., tuple[TensorDictBase, Any]]:
    """`grad_and_value` whose gradients are averaged over ranks, and whose loss (and the scalar tensor metrics of
    aux, when aux is a dict) are averaged too: each rank passes its own shard and gets the rank means back.

    Same contract as `functional.grad_and_value`, so it is the `grad_fn` of every train step (module docstring).
    Entries of a dict aux that are not scalar tensors (e.g. the tokenizer's running `loss_rms` TensorDict) come
    back as this rank computed them; any other aux is returned unreduced. Single process: exactly
    `grad_and_value(loss_fn, has_aux)`. `functools.partial(data_parallel_grad_and_value, bucket_mb=...)` sets the
    bucket size.
    """
    inner = grad_and_value(loss_fn, has_aux=has_aux)

    def wrapped(params: TensorDictBase, *args: Any, **kwargs: Any) -> tuple[TensorDictBase, Any]:
        grads, out = inner(params, *args, **kwargs)
        if not _active():
            return grads, out
        grads = all_reduce_mean(grads, bucket_mb)
        if not has_aux:
            return grads, reduce_metrics({"loss": out})["loss"]
        value, aux = out
        scalars = {}
        if isinstance(aux, dict):
            scalars = {name: v for name, v in aux.items() if isinstance(v, Tensor) and v.ndim == 0}
        reduced = reduce_metrics({"__loss__": value, **{f"aux.{name}": v for name, v in scalars.items()}})
        value = reduced["__loss__"]
        if scalars:
            aux = {name: reduced[f"aux.{name}"] if name in scalars else v for name, v in aux.items()}
        return grads, (value, aux)

    return wrapped


def check_in_sync(tree: TensorDictBase, what: str = "params") -> None:
    """Raise if `tree` differs between ranks (bitwise: every rank must apply the same update to the same values).

    Compares every leaf's bytes through one all-gather of per-leaf checksums; meant for tests and periodic checks.
    """
    if not _active():
        return
    keys = list(tree.keys(include_nested=True, leaves_only=True))
    sums = []
    for key in keys:
        leaf = tree.get(key).detach().contiguous().reshape(-1)
        as_int = leaf.view(torch.uint8).to(torch.int64) if leaf.element_size() == 1 else leaf.view(
            {2: torch.int16, 4: torch.int32, 8: torch.int64}[leaf.element_size()]).to(torch.int64)
        positions = torch.arange(1, as_int.numel() + 1, device=as_int.device, dtype=torch.int64)
        sums.append(torch.stack([as_int.sum(), (as_int * positions).sum()]))
    local = torch.stack(sums) if sums else torch.zeros(0, 2, dtype=torch.int64)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    for rank, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            bad = [".".join(key) if isinstance(key, tuple) else key
                   for key, row in zip(keys, (other != gathered[0]).any(dim=1), strict=True) if row]
            raise RuntimeError(f"{what} differ between rank 0 and rank {rank} at {bad[:5]}"
                               f"{' ...' if len(bad) > 5 else ''}")


def check_ranks_agree(value: Any, what: str) -> None:
    """Raise on every rank, naming each rank's value, if `value` (a picklable decision) differs between ranks.

    For decisions each rank takes from its own files, such as whether to resume: ranks that disagree would train
    from different states, or wait forever in a collective only some of them enter."""
    if not _active():
        return
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    if any(other != gathered[0] for other in gathered):
        values = ", ".join(f"rank {rank}: {other!r}" for rank, other in enumerate(gathered))
        raise RuntimeError(f"data-parallel ranks disagree on {what} ({values})")


def gather_rng_states(generators: Mapping[str, AnyGenerator] | None = None) -> list[dict[str, Any]] | None:
    """Every rank's `capture_rng_state(generators)`, as a list indexed by rank on rank 0 (None on the others), for
    `save_checkpoint(..., rng=...)`. A single process gets a list of one."""
    state = capture_rng_state(generators)
    if not _active():
        return [state]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(state, gathered, dst=0)
    return gathered
