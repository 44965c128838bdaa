"""TorchRL pixel envs: DMControl (single and multi-camera) and Crafter.

Names resolve lazily (PEP 562) so that importing ``d4func.envs`` loads neither dm_control (and its EGL renderer)
nor crafter until one of them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "make_dmc_env": "d4func.envs.dmc",
    "parse_dmc_name": "d4func.envs.dmc",
    "make_crafter_env": "d4func.envs.crafter_env",
    "crafter_score": "d4func.envs.crafter_env",
    "achievement_success_rates": "d4func.envs.crafter_env",
    "CRAFTER_ACHIEVEMENTS": "d4func.envs.crafter_env",
    "CRAFTER_N_ACTIONS": "d4func.envs.crafter_env",
    "make_env": "d4func.envs.registry",
    "env_config": "d4func.envs.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'd4func.envs' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
