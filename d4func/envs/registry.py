"""Build an env from a short name: ``"dmc:cartpole-swingup"``, ``"dmc:cartpole-swingup@0,1"``, ``"crafter"``,
``"reach"`` (the tiny pixel env the project ships, :mod:`d4func.envs.reach`).

The name is what configs, the ``d4func collect`` CLI and offline dataset metadata store. Backends are imported
on demand, so building a Crafter env never loads dm_control (and its EGL renderer).
"""

from __future__ import annotations

from typing import Any

import torch
from torchrl.envs import EnvBase

__all__ = ["env_config", "make_env"]


def env_config(name: str, seed: int = 0, image_size: int = 64, action_repeat: int = 2) -> dict[str, Any]:
    """The full, JSON-serialisable set of arguments that :func:`make_env` uses for ``name``."""
    if name.startswith("dmc:"):
        from d4func.envs.dmc import parse_dmc_name

        domain, task, cams = parse_dmc_name(name)
        return {
            "name": name,
            "kind": "dmc",
            "domain": domain,
            "task": task,
            "camera_ids": list(cams),
            "image_size": image_size,
            "action_repeat": action_repeat,
            "seed": seed,
        }
    if name == "crafter":
        # Crafter has no action repeat: every step is one game tick (Crafter paper, Sec. 3).
        return {"name": name, "kind": "crafter", "image_size": image_size, "seed": seed}
    if name == "reach":
        return {"name": name, "kind": "reach", "image_size": image_size, "seed": seed}
    raise ValueError(
        f"unknown env name {name!r}; expected 'dmc:DOMAIN-TASK', 'dmc:DOMAIN-TASK@CAMS', 'crafter' or 'reach'"
    )


def make_env(
    name: str,
    seed: int = 0,
    image_size: int = 64,
    action_repeat: int = 2,
    device: torch.device | str = "cpu",
    max_episode_steps: int | None = None,
) -> EnvBase:
    """A pixel env by name (see module docstring); ``action_repeat`` applies to DMC only. ``max_episode_steps``
    shortens episodes (env steps; None keeps the task's own length: 1000 / action_repeat for DMC, 10000 for
    Crafter, 12 for Reach)."""
    cfg = env_config(name, seed=seed, image_size=image_size, action_repeat=action_repeat)
    if cfg["kind"] == "dmc":
        from d4func.envs.dmc import make_dmc_env

        return make_dmc_env(
            cfg["domain"],
            cfg["task"],
            image_size=image_size,
            action_repeat=action_repeat,
            camera_ids=tuple(cfg["camera_ids"]),
            seed=seed,
            device=device,
            max_steps=max_episode_steps,
        )
    if cfg["kind"] == "reach":
        from d4func.envs.reach import make_reach_env

        if max_episode_steps is None:
            return make_reach_env(image_size=image_size, seed=seed, device=device)
        return make_reach_env(image_size=image_size, length=max_episode_steps, seed=seed, device=device)
    from d4func.envs.crafter_env import make_crafter_env

    if max_episode_steps is None:
        return make_crafter_env(seed=seed, image_size=image_size, device=device)
    return make_crafter_env(seed=seed, image_size=image_size, length=max_episode_steps, device=device)
