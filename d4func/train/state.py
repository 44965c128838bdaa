"""Applying gradients to the train state: AdamW on params, EMA, step counter — one pure function."""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase

from d4func.functional import ema_update, make_train_state
from d4func.loss_rms import update_loss_rms
from d4func.optim import AdamWConfig, adamw_init, adamw_update


def new_train_state(params: TensorDictBase, with_ema: bool = True) -> TensorDict:
    """Train state for `params` with zero AdamW moments, EMA = params and step 0."""
    return make_train_state(params, adamw_init(params), with_ema=with_ema)


def apply_gradients(
    state: TensorDictBase,
    grads: TensorDictBase,
    cfg: AdamWConfig,
    ema_decay: float | None = None,
) -> tuple[TensorDict, dict[str, torch.Tensor]]:
    """Returns the next train state (params, AdamW moments, EMA, step + 1) and `grad_norm`; `state` is unchanged.

    Any extra entries of `state` (e.g. running loss statistics) are carried over untouched.
    """
    if "ema" in state.keys() and ema_decay is None:
        # A kept EMA that is never updated would stay at its initial weights and still be checkpointed and read.
        raise ValueError("the train state keeps an 'ema' entry but ema_decay is None: pass ema_decay to update it, "
                         "or build the state without one (with_ema=False)")
    if "ema" not in state.keys() and ema_decay is not None:
        raise ValueError(f"ema_decay={ema_decay} was given but the train state keeps no 'ema' entry to update "
                         "(build it with with_ema=True)")
    params, opt, metrics = adamw_update(state["params"], grads, state["opt"], state["step"], cfg)
    new_state = state.copy()  # shallow: untouched entries are shared, updated ones replaced
    new_state["params"] = params
    new_state["opt"] = opt
    new_state["step"] = state["step"] + 1
    if "ema" in state.keys():  # with ema_decay given (checked above)
        new_state["ema"] = ema_update(state["ema"], params, ema_decay)
    return new_state, metrics


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss term or the gradient norm is NaN or inf; names the terms and the step."""


def check_finite(metrics: dict[str, torch.Tensor], step: int | torch.Tensor) -> None:
    """Stop training on a NaN / inf metric, naming every bad term and the step (call before applying grads)."""
    bad = [name for name, value in metrics.items() if not bool(torch.isfinite(torch.as_tensor(value)).all())]
    if bad:
        raise NonFiniteLossError(f"non-finite {', '.join(bad)} at step {int(step)}")


def checked_update(
    state: TensorDictBase,
    grads: TensorDictBase,
    metrics: dict[str, torch.Tensor],
    cfg: AdamWConfig,
    ema_decay: float | None = None,
) -> tuple[TensorDict, dict[str, torch.Tensor]]:
    """The end of every train step: stop on a non-finite loss term (the state is still the last good one), apply
    the gradients, stop on a non-finite gradient norm; returns the new state and all metrics."""
    step = state["step"]  # the update being attempted: both checks name the same step
    check_finite(metrics, step)
    state, opt_metrics = apply_gradients(state, grads, cfg, ema_decay)
    check_finite(opt_metrics, step)
    return state, {**metrics, **opt_metrics}


def checked_update_with_loss_rms(
    state: TensorDictBase,
    grads: TensorDictBase,
    metrics: dict[str, torch.Tensor],
    term_metrics: dict[str, str],
    rms_decay: float,
    cfg: AdamWConfig,
    ema_decay: float | None = None,
) -> tuple[TensorDict, dict[str, torch.Tensor]]:
    """`checked_update` for a loss normalised by running RMS statistics (`d4func.loss_rms`) kept in
    `state["loss_rms"]`. The loss put this rank's updated statistics in `metrics["loss_rms"]`; they are dropped and
    recomputed from the terms as `grad_fn` reported them (`term_metrics`: statistics entry -> metric name; rank
    means under data parallelism), so that every replica keeps the same statistics."""
    metrics = {name: value for name, value in metrics.items() if name != "loss_rms"}
    new_rms = update_loss_rms(state["loss_rms"], {term: metrics[name] for term, name in term_metrics.items()},
                              rms_decay)
    new_state, metrics = checked_update(state, grads, metrics, cfg, ema_decay)
    new_state["loss_rms"] = new_rms
    return new_state, metrics
