"""The functional core: parameters are data (DESIGN principle 1).

A model is an `nn.Module` *template* — normally built on the `meta` device with `template(...)`, so it holds no
weights at all — and its parameters live in a `TensorDict` keyed by module path. `init` makes the parameters from
a seed, `apply` calls the template with them through `torch.func.functional_call`. Gradients come from
`grad_and_value` below: the signature of `torch.func.grad_and_value`, computed by autograd on the params
TensorDict's leaves, which measured 1.04-1.13x faster than the functorch transform here (docs/ARCHITECTURE.md).

The train state is one TensorDict: `params`, optimizer moments `opt`, `ema` params and the `step` counter.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)


def template(module_cls: Callable[..., M], *args: Any, **kwargs: Any) -> M:
    """Build a module on the `meta` device: its structure without any weights that could be read by mistake."""
    with torch.device("meta"):
        return module_cls(*args, **kwargs)


def init(
    template_module: nn.Module, seed: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> TensorDict:
    """Fresh parameters for `template_module`, a function of `seed` alone.

    The global RNG is forked, seeded, used by each submodule's `reset_parameters` and restored, so the result does
    not depend on (and does not disturb) the global RNG state. Every module that owns parameters must define
    `reset_parameters`; otherwise its weights would be left uninitialised and this raises.
    """
    device = torch.device(device)
    module = copy.deepcopy(template_module).to_empty(device=device)
    # Fork and seed only the generator the draws come from: torch.manual_seed would also reseed every CUDA
    # generator, which fork_rng(devices=[]) would not restore.
    cuda_index = None
    if device.type == "cuda":
        cuda_index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[] if cuda_index is None else [cuda_index]):
        torch.random.default_generator.manual_seed(seed)
        if cuda_index is not None:
            with torch.cuda.device(cuda_index):
                torch.cuda.manual_seed(seed)
        for name, sub in module.named_modules():
            if not any(True for _ in sub.parameters(recurse=False)):
                continue
            reset = getattr(sub, "reset_parameters", None)
            if reset is None:
                raise TypeError(
                    f"module {name or type(sub).__name__!r} ({type(sub).__name__}) owns parameters but has no "
                    "reset_parameters(); init() cannot initialise it"
                )
            reset()
    if next(module.buffers(), None) is not None:
        names = [name for name, _ in module.named_buffers()]
        raise TypeError(f"templates must not hold buffers (compute them in forward instead); found {names}")
    params = TensorDict.from_module(module).detach()
    if dtype is not None:
        params = params.to(dtype)
    return params


def apply(template_module: nn.Module, params: TensorDictBase, *args: Any, **kwargs: Any) -> Any:
    """Call `template_module(*args, **kwargs)` with `params` as its weights (pure: nothing is written back)."""
    flat = dict(params.flatten_keys(".").items())
    return torch.func.functional_call(template_module, flat, args, kwargs, strict=True)


def grad_and_value(
    loss_fn: Callable[..., Any], has_aux: bool = False
) -> Callable[..., tuple[TensorDictBase, Any]]:
    """`grad_and_value(loss_fn)(params, *args)` -> `(grads, value)`, or `(grads, (value, aux))` with `has_aux`.

    Same contract as `torch.func.grad_and_value` with the gradient taken w.r.t. the first argument, a params
    TensorDict; computed with `torch.autograd.grad` on fresh leaves, so `params` itself is never modified. Leaves
    that the loss does not use get zero gradients. The value and aux come back detached.
    """

    def wrapped(params: TensorDictBase, *args: Any, **kwargs: Any) -> tuple[TensorDictBase, Any]:
        leaves = params.apply(lambda leaf: leaf.detach().requires_grad_(True))
        with torch.enable_grad():
            out = loss_fn(leaves, *args, **kwargs)
        loss, aux = out if has_aux else (out, None)
        if not (isinstance(loss, Tensor) and loss.ndim == 0):
            raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                             f"of shape {getattr(loss, 'shape', None)}")
        keys = list(leaves.keys(include_nested=True, leaves_only=True))
        tensors = [leaves.get(key) for key in keys]
        grads_list = torch.autograd.grad(loss, tensors, allow_unused=True)
        grads = leaves.empty(recurse=True)
        for key, tensor, grad in zip(keys, tensors, grads_list, strict=True):
            grads.set(key, torch.zeros_like(tensor) if grad is None else grad)
        aux = _detach_tree(aux)
        return grads, ((loss.detach(), aux) if has_aux else loss.detach())

    return wrapped


def _detach_tree(tree: Any) -> Any:
    if isinstance(tree, (Tensor, TensorDictBase)):
        return tree.detach()
    if isinstance(tree, dict):
        return {key: _detach_tree(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_detach_tree(value) for value in tree)
    return tree


def runs_value_checks(x: Tensor) -> bool:
    """Whether a data-dependent input check (a value range, NaN) should run on `x`: only in eager calls. Under
    `vmap` it would be data-dependent control flow, and under `torch.compile` a graph break plus a device sync on
    every call. Shape and dtype checks need no values and always run."""
    return not (torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(x))


def count_params(params: TensorDictBase) -> int:
    """Number of scalar parameters in the tree."""
    return sum(leaf.numel() for leaf in params.values(include_nested=True, leaves_only=True))


def ema_update(ema: TensorDictBase, params: TensorDictBase, decay: float) -> TensorDictBase:
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf; returns a new tree."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    return ema.apply(lambda e, p: torch.lerp(e, p.detach(), 1.0 - decay), params)


def zeros_like_tree(tree: TensorDictBase) -> TensorDictBase:
    return tree.apply(torch.zeros_like)


def make_train_state(params: TensorDictBase, optimizer_state: TensorDictBase, with_ema: bool = True) -> TensorDict:
    """The train-state convention: one TensorDict with `params`, `opt`, `ema` (optional) and `step`.

    `step` lives beside the params: a state made mid-run on a GPU (the agent's, at `agent_start`) is then laid out
    as one restored from a checkpoint (`state.to(device)`)."""
    first_leaf = next(iter(params.values(include_nested=True, leaves_only=True)), None)
    step = torch.zeros((), dtype=torch.long, device=None if first_leaf is None else first_leaf.device)
    state = TensorDict({"params": params, "opt": optimizer_state, "step": step})
    if with_ema:
        state["ema"] = params.clone()
    return state


def tree_norm(tree: TensorDictBase) -> Tensor:
    """Global L2 norm over all leaves."""
    leaves = list(tree.values(include_nested=True, leaves_only=True))
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(leaf.float()) for leaf in leaves]))
