"""Stopping on a non-finite loss or gradient, after saving the last good state.

Train steps are pure (`state, metrics = step(state, ...)` returns a new state and leaves the old one untouched), so
when a step finds a NaN or inf the state it was given is still the last good one. `guarded_step` runs a step,
checks its metrics, and on `NonFiniteLossError` hands that state to `on_fault` (typically a `save_checkpoint` call)
before re-raising with the loss term, the step and where the state went. The RNG states are rewound to their values
before the step first, so the saved checkpoint resumes exactly at the faulting step: re-running from it reproduces
the fault (for debugging) or, after changing what caused it, continues the same run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tensordict import TensorDictBase
from torch import Tensor

from d4func.train.checkpoint import AnyGenerator, capture_rng_state, restore_rng_state
from d4func.train.state import NonFiniteLossError, check_finite

__all__ = ["NonFiniteLossError", "guarded_step"]


def guarded_step(
    step_fn: Callable[..., tuple[TensorDictBase, dict[str, Any]]],
    state: TensorDictBase,
    *args: Any,
    on_fault: Callable[[TensorDictBase, NonFiniteLossError], Any] | None = None,
    generators: Mapping[str, AnyGenerator] | None = None,
    check_metrics: bool = True,
    **kwargs: Any,
) -> tuple[TensorDictBase, dict[str, Any]]:
    """`step_fn(state, *args, **kwargs)` -> `(new_state, metrics)`, stopping cleanly on a NaN / inf.

    A `NonFiniteLossError` raised by the step (e.g. `check_finite` inside `dynamics_train_step`) or found in its
    returned metrics (`check_metrics`) calls `on_fault(state, error)` with the state *before* the step,
    after rewinding every RNG (global ones and `generators`, the step's explicit generators) to its pre-step
    value; then it raises `NonFiniteLossError` naming the bad terms, the step and `on_fault`'s return value
    (e.g. the checkpoint path). In data-parallel runs check reduced metrics so every rank stops together.
    """
    snapshot = capture_rng_state(generators) if on_fault is not None else None
    try:
        new_state, metrics = step_fn(state, *args, **kwargs)
        if check_metrics:
            numeric = {name: value for name, value in metrics.items() if isinstance(value, (Tensor, int, float))}
            check_finite(numeric, state["step"])
    except NonFiniteLossError as error:
        if on_fault is None:
            raise
        restore_rng_state(snapshot, generators)
        saved = on_fault(state, error)
        raise NonFiniteLossError(
            f"{error}; training stopped, the last good state (step {int(state['step'])}, before this update) "
            f"was saved to {saved}"
        ) from error
    return new_state, metrics
