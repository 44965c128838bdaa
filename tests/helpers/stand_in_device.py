"""A stand-in accelerator for machines without one: tensors that claim to live on another device (`meta`) while
their values are computed on the CPU, so that code meant for a GPU can be checked for device placement here.

CUDA cannot start without a driver (not even under `FakeTensorMode`, whose tensors have no values, so that the
`float(...)` reads of metrics and the input checks cannot run). A `StandIn` tensor wraps a real CPU tensor and
reports `device == meta`; every op on it goes through `_dispatch`, which enforces what a GPU would:

- an op's tensor inputs share one device, except CPU scalars (0-dim), which CUDA kernels accept beside device
  tensors, and the ops that move data between devices (`.to`, `copy_`);
- a random draw lands on its generator's device. A CUDA generator cannot be made here either, so the generator
  that stands for the learner's (`torch.Generator(device=cuda)` in `Trainer`) is a CPU generator seeded with
  `DEVICE_GENERATOR_SEED`; it may draw onto the stand-in device or onto the CPU (the `device=generator.device`
  pattern, moved afterwards), and any other CPU generator only onto the CPU.

Factory calls (`torch.zeros(..., device=meta)`) and `.to("meta")` need the `stand_in_device()` context, which
also lets `torch.autocast(device_type="meta", enabled=False)` (the attention's float32 islands) mean the CPU's.
Values are bit-for-bit the CPU's (the same kernels run on the same data), except where a composite op picks its
kernel by device: `scaled_dot_product_attention` runs its math decomposition here, the CPU's flash kernel there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

STAND_IN = torch.device("meta")
CPU = torch.device("cpu")
DEVICE_GENERATOR_SEED = 0xD4F0C0DE
_CROSS_DEVICE_OPS = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


class DevicePlacementError(RuntimeError):
    """What a GPU would raise: tensors on two devices in one op, or a draw away from its generator's device."""


class StandIn(torch.Tensor):
    """A CPU tensor (`backing`) that reports the stand-in device."""

    backing: torch.Tensor

    @staticmethod
    def __new__(cls, backing: torch.Tensor) -> StandIn:
        return torch.Tensor._make_wrapper_subclass(
            cls, backing.shape, strides=backing.stride(), storage_offset=backing.storage_offset(),
            dtype=backing.dtype, device=STAND_IN, requires_grad=backing.requires_grad)

    def __init__(self, backing: torch.Tensor) -> None:
        self.backing = backing

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})

    def __repr__(self) -> str:
        return f"StandIn({self.backing!r})"


def _device(tensor: torch.Tensor) -> torch.device:
    return STAND_IN if isinstance(tensor, StandIn) else tensor.device


def _draw_devices(generator: torch.Generator) -> set[torch.device]:
    if generator.initial_seed() == DEVICE_GENERATOR_SEED:
        return {STAND_IN, CPU}
    return {generator.device}


def _dispatch(func, args: tuple, kwargs: dict[str, Any]):
    leaves, _ = tree_flatten((args, kwargs))
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    devices = {_device(t) for t in tensors if isinstance(t, StandIn) or t.dim() > 0}
    if len(devices) > 1 and func not in _CROSS_DEVICE_OPS:
        shapes = [(tuple(t.shape), str(_device(t))) for t in tensors]
        raise DevicePlacementError(f"{func} got tensors on {sorted(map(str, devices))}: {shapes}")
    if kwargs.get("device") is not None:
        out_device = torch.device(kwargs["device"])
    else:  # the inputs' one device; CPU when all are CPU scalars or there are none
        out_device = devices.pop() if devices else CPU
    generator = kwargs.get("generator")
    if generator is not None and out_device not in _draw_devices(generator):
        raise DevicePlacementError(f"{func} draws onto {out_device} with a generator on {generator.device}")
    real_args, real_kwargs = tree_map(lambda x: x.backing if isinstance(x, StandIn) else x, (args, kwargs))
    if out_device == STAND_IN and "device" in real_kwargs:
        real_kwargs["device"] = CPU
    out = func(*real_args, **real_kwargs)
    if func is torch.ops.aten.copy_.default and isinstance(args[0], StandIn):
        return args[0]  # in place: the wrapper itself, whose backing was written
    if out_device == STAND_IN:
        return tree_map(lambda x: StandIn(x) if isinstance(x, torch.Tensor) else x, out)
    return out


class _FactoryMode(TorchDispatchMode):
    """Routes ops without a StandIn input (factories, `.to("meta")` of a CPU tensor) through `_dispatch`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


@contextlib.contextmanager
def stand_in_device() -> Iterator[torch.device]:
    """Inside: `device="meta"` means the stand-in accelerator. Yields that device."""
    autocast = torch.autocast

    def cpu_autocast(device_type: str, *args, **kwargs):
        return autocast("cpu" if device_type == STAND_IN.type else device_type, *args, **kwargs)

    torch.autocast = cpu_autocast
    try:
        with _FactoryMode():
            yield STAND_IN
    finally:
        torch.autocast = autocast


def device_generator() -> torch.Generator:
    """The generator that stands for one on the device (see the module docstring)."""
    return torch.Generator().manual_seed(DEVICE_GENERATOR_SEED)


def on_cpu(tree):
    """The CPU values behind a tree of (possibly) StandIn tensors, to compare with a CPU run."""
    return tree_map(lambda x: x.backing if isinstance(x, StandIn) else x, tree)
