"""Running-RMS loss normalisation (paper Sec. 3.1: every loss term divided by a running estimate of its own root mean
square), as pure functions over a TensorDict of statistics.

For each term L_i the statistics hold an exponential moving average of L_i², debiased like Adam's moments, and the
number of updates. A loss sum_i w_i · L_i / sg(RMS_i) then gives every term the scale of its own typical size,
whatever its units, so that the weights w_i mean what they say. The statistics live in a train state (never hidden
module state) and are updated with the current batch before dividing, so the very first step sees each normalised
term equal to exactly 1. Used by the tokenizer (`d4func.tokenizer_loss`: MSE, LPIPS) and, with
`finetune.normalize`, by the world-model phase (`d4func.train.agent_step`: dynamics, behaviour cloning, reward).
"""

from __future__ import annotations

from functools import partial

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

__all__ = ["init_loss_rms", "loss_rms_value", "normalize_losses", "update_loss_rms"]


def init_loss_rms(names: tuple[str, ...], device: torch.device | str | None = None) -> TensorDict:
    """Empty running statistics for the terms `names`: per term the EMA of its square and the number of updates."""
    zeros = partial(torch.zeros, (), device=device)
    return TensorDict({name: {"mean_sq": zeros(), "count": zeros()} for name in names}, batch_size=[], device=device)


def update_loss_rms(loss_rms: TensorDictBase, values: dict[str, Tensor], decay: float) -> TensorDict:
    """New statistics after observing the scalar terms `values` (detached); terms not in `values` are kept."""
    new = loss_rms.clone(recurse=False)
    for name, value in values.items():
        if name not in loss_rms.keys():
            raise KeyError(f"no running RMS entry for loss term {name!r}; have {list(loss_rms.keys())}")
        value = value.detach().to(loss_rms[name, "mean_sq"].dtype)
        new[name] = {
            "mean_sq": torch.lerp(loss_rms[name, "mean_sq"], value.square(), 1.0 - decay),
            "count": loss_rms[name, "count"] + 1,
        }
    return new


def loss_rms_value(loss_rms: TensorDictBase, name: str, decay: float) -> Tensor:
    """Debiased running RMS of term `name`: sqrt(EMA(L²) / (1 - decay^count)); 0 before any update."""
    count = loss_rms[name, "count"]
    debias = 1.0 - torch.pow(torch.as_tensor(decay, dtype=count.dtype), count)
    return torch.sqrt(loss_rms[name, "mean_sq"] / debias.clamp_min(1e-12))


def normalize_losses(
    values: dict[str, Tensor], loss_rms: TensorDictBase, decay: float, eps: float
) -> dict[str, Tensor]:
    """Each term divided by its (stop-gradient) running RMS."""
    return {
        name: value / loss_rms_value(loss_rms, name, decay).detach().clamp_min(eps).to(value.dtype)
        for name, value in values.items()
    }
