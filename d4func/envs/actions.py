"""Discrete env actions: the class index an action tensor holds, checked (Design Sec. 4: discrete actions are ints)."""

from __future__ import annotations

import math
import numbers

import torch


def categorical_action(action: int | torch.Tensor, n_actions: int, env_name: str) -> int:
    """The class index in ``[0, n_actions)`` held by ``action``: an int, or a one-element tensor (0-d or ``[1]``) of
    integer dtype or of an integral float value. Raises ``ValueError`` naming the value for anything else.

    ``int()`` alone would truncate 1.7 to 1 and silently step with an action the policy never chose.
    """
    if isinstance(action, torch.Tensor):
        if action.numel() != 1:
            raise ValueError(
                f"{env_name} action must be one class index in [0, {n_actions}), got a tensor of shape "
                f"{tuple(action.shape)}: {action.tolist()}"
            )
        if action.dtype == torch.bool or action.is_complex():
            raise ValueError(f"{env_name} action must be an integer class index, got {action.dtype} value {action}")
        value = action.item()
    else:
        value = action
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{env_name} action must be an integer class index, got {value!r}")
    if not isinstance(value, numbers.Integral):
        value = float(value)
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"{env_name} action must be an integer class index, got non-integer {value!r}")
    index = int(value)
    if not 0 <= index < n_actions:
        raise ValueError(f"{env_name} action must be in [0, {n_actions}), got {index}")
    return index
