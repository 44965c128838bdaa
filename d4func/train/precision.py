"""GPU-path switches: bf16 autocast, fused attention through SDPA, optional `torch.compile` of step functions.

All three are off-by-default flags of `PrecisionConfig`, so the CPU path (and every test that does not ask for
them) runs plain float32 eager code.

* bf16 autocast: matmuls and attention run in bfloat16 inside `autocast(cfg, device)`; params, AdamW moments, EMA
  and gradients stay float32 (autocast casts on the fly; autograd returns float32 gradients for float32 leaves),
  so no loss scaling is needed (bf16 has float32's exponent range). Works on CPU too, which the tests use.
* Fused attention: `layers.attend` calls `F.scaled_dot_product_attention` whenever `TransformerConfig.logit_cap`
  is None; soft-capping needs the logits themselves and takes the explicit einsum path. On CUDA `sdpa_backends`
  sets SDPA's priority to flash attention where it applies (the time layers: causal, no explicit mask), then
  memory-efficient attention (the masked space layers: flash takes no arbitrary mask), then cuDNN.
  `fused_attention_only=True` forbids SDPA's math fallback on CUDA (it raises instead of silently running the slow
  kernel) and rejects a logit cap.
* `torch.compile`: `compile_step(fn, cfg)` compiles a step function when `cfg.compile` is set. Compiling imports
  inductor and triton; never do it in a process that renders with EGL (MuJoCo `MUJOCO_GL=egl`): keep rendering in
  the env / collector processes and compile only in the learner process. `grad_and_value` calls
  `torch.autograd.grad`, where dynamo breaks the graph: the forward loss is compiled (with its AOT backward) and
  the optimizer update is a second compiled graph; that is the expected shape, not a bug.
  The training loop compiles less: `compiled_grad_fn` compiles each phase's loss (forward and AOT backward, where
  the FLOPs are) and leaves the AdamW update, the NaN checks and imagination's no-grad rollout eager. Tracing a
  whole step mostly traces AdamW over every leaf of the params TensorDict: on the debug config the world-model
  step's first call took 131 s of dynamo tracing alone (backend "eager"), its loss 26 s, for the same speed after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from d4func.config import TransformerConfig

__all__ = [
    "PrecisionConfig",
    "autocast",
    "check_attention_config",
    "compile_step",
    "compiled_grad_fn",
    "load_compiler_before_rendering",
    "precision_context",
    "sdpa_backends",
    "wrap_step",
]

F = TypeVar("F", bound=Callable[..., Any])

_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class PrecisionConfig:
    bf16: bool = False  # autocast compute to bfloat16 (params and optimizer state stay float32)
    compile: bool = False  # torch.compile the step functions
    compile_mode: str = "default"
    fused_attention_only: bool = False  # CUDA: forbid SDPA's math fallback; requires logit_cap=None

    def __post_init__(self) -> None:
        if self.compile_mode not in _COMPILE_MODES:
            raise ValueError(f"PrecisionConfig.compile_mode must be one of {_COMPILE_MODES}, got "
                             f"{self.compile_mode!r}")


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def autocast(cfg: PrecisionConfig, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `cfg.bf16`, else a no-op context."""
    if not cfg.bf16:
        return contextlib.nullcontext()
    device_type = _device_type(device)
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"bf16 autocast is supported on cpu and cuda, got device {device!r}")
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def sdpa_backends(cfg: PrecisionConfig, device: torch.device | str) -> contextlib.AbstractContextManager:
    """On CUDA: SDPA kernels in the order flash, memory-efficient, cuDNN (then math, unless
    `cfg.fused_attention_only`, where an input that would fall back to the math kernel raises). Since torch 2.11
    SDPA tries cuDNN attention first on Hopper GPUs, whose bf16 backward has had NaN bugs reported there; flash and
    memory-efficient are the kernels this project documents. Elsewhere a no-op."""
    if _device_type(device) != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    if not cfg.fused_attention_only:
        order.append(SDPBackend.MATH)
    return sdpa_kernel(order, set_priority=True)


@contextlib.contextmanager
def precision_context(cfg: PrecisionConfig, device: torch.device | str) -> Iterator[None]:
    """`autocast` and `sdpa_backends` together: wrap the forward + backward of a step in it."""
    with autocast(cfg, device), sdpa_backends(cfg, device):
        yield


def check_attention_config(transformer: TransformerConfig, cfg: PrecisionConfig, name: str = "transformer") -> None:
    """`fused_attention_only` needs `logit_cap=None`: soft-capped logits cannot go through SDPA."""
    if cfg.fused_attention_only and transformer.logit_cap is not None:
        raise ValueError(f"PrecisionConfig.fused_attention_only needs {name}.logit_cap=None (soft-capping computes "
                         f"logits explicitly), got logit_cap={transformer.logit_cap}")


def load_compiler_before_rendering(cfg: PrecisionConfig) -> None:
    """With `cfg.compile`, import triton and inductor now, before any env sets up EGL in this process: importing
    triton after dm_control's EGL setup has crashed here, importing it first works (measured with a DMControl
    rollout, a compiled call, and another rollout in one process). A no-op without `cfg.compile`."""
    if not cfg.compile:
        return
    import torch._inductor  # noqa: F401

    try:
        import triton  # noqa: F401
    except ImportError:  # CPU-only installs compile through C++ and never load triton
        pass


def compile_step(fn: F, cfg: PrecisionConfig, **compile_kwargs: Any) -> F:
    """`torch.compile(fn)` when `cfg.compile`, else `fn` itself. Not in EGL-rendering processes (module doc)."""
    if not cfg.compile:
        return fn
    return torch.compile(fn, mode=cfg.compile_mode, **compile_kwargs)


def compiled_grad_fn(grad_fn: Callable[..., Any], cfg: PrecisionConfig, **compile_kwargs: Any) -> Callable[..., Any]:
    """A train step's `grad_fn` (`functional.grad_and_value` or its data-parallel version) whose loss functions run
    `torch.compile`d when `cfg.compile`, else `grad_fn` itself (module doc: why the loss, not the step).

    `torch.compile` is applied to each call's `loss_fn` afresh (a step may build it as a closure or a partial); the
    compiled code is cached on the function's code, so later steps reuse it unless a guard fails."""
    if not cfg.compile:
        return grad_fn

    def with_compiled_loss(loss_fn: Callable[..., Any], has_aux: bool = False) -> Callable[..., Any]:
        return grad_fn(torch.compile(loss_fn, mode=cfg.compile_mode, **compile_kwargs), has_aux=has_aux)

    return with_compiled_loss


def wrap_step(step_fn: F, cfg: PrecisionConfig, device: torch.device | str) -> F:
    """`step_fn` run inside `precision_context(cfg, device)` and compiled when `cfg.compile`: the one call a
    training loop makes to honour all three flags. With every flag off it is `step_fn` itself."""
    if not (cfg.bf16 or cfg.fused_attention_only or cfg.compile):
        return step_fn

    def step(*args: Any, **kwargs: Any) -> Any:
        with precision_context(cfg, device):
            return step_fn(*args, **kwargs)

    return compile_step(step, cfg)  # type: ignore[return-value]
