"""Runtime state of an env mid-episode, for exact resume of online training.

TorchRL's collectors restart a trajectory on resume ("runtime environment state is not generally serializable").
An env whose base class defines ``get_resume_state() -> dict`` and ``set_resume_state(dict)`` opts in: the online
loop saves that state with the collector's current step in every checkpoint and puts both back on resume, so the
resumed run continues the same episode with the same random draws (bitwise equal to an uninterrupted run).
Reach, DMControl (`d4func.envs.dmc.ResumableDMControlWrapper`) and Crafter (`d4func.envs.crafter_state`) have
them; an env without them resumes with a fresh episode.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchrl.envs import EnvBase

__all__ = ["get_env_state", "numpy_random_state", "set_env_state", "set_numpy_random_state", "supports_resume_state"]


def _base(env: EnvBase) -> EnvBase:
    while hasattr(env, "base_env"):  # TransformedEnv chains; the transforms hold no runtime state here
        env = env.base_env
    return env


def supports_resume_state(env: EnvBase) -> bool:
    base = _base(env)
    return hasattr(base, "get_resume_state") and hasattr(base, "set_resume_state")


def get_env_state(env: EnvBase) -> dict[str, Any] | None:
    """The base env's runtime state, or None when the env does not support it."""
    return _base(env).get_resume_state() if supports_resume_state(env) else None


def set_env_state(env: EnvBase, state: dict[str, Any]) -> None:
    if not supports_resume_state(env):
        raise TypeError(f"{type(_base(env)).__name__} cannot restore a runtime state (no set_resume_state)")
    _base(env).set_resume_state(state)


def numpy_random_state(random: np.random.RandomState) -> dict[str, Any]:
    """A numpy ``RandomState``'s state as tensors and primitives (weights_only loading accepts tensors, not numpy
    arrays: the MT19937 key, uint32[624], travels as int64)."""
    kind, key, pos, has_gauss, gauss = random.get_state()
    return {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def set_numpy_random_state(random: np.random.RandomState, state: dict[str, Any]) -> None:
    """Put back a `numpy_random_state`."""
    random.set_state((state["kind"], state["key"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                      state["gauss"]))
