"""Crafter (Hafner 2021) as a TorchRL env: the discrete, open-world stand-in for the paper's Minecraft.

Dreamer 4's headline result is collecting diamonds in Minecraft from offline data (paper Sec. 5); Crafter has the
same tech tree in 2D, with ``collect_diamond`` as one of its 22 achievements. Each step yields

- ``"pixels"``: float32 ``[3, H, W]`` in [0, 1] (64x64 by default, Crafter's native size);
- ``"achievements"``: bool ``[22]``, the achievements unlocked so far in the current episode, in the order of
  :data:`CRAFTER_ACHIEVEMENTS`; its value on the last step of an episode is that episode's achievement record;
- ``"reward"`` (``[1]`` float32), ``"done"``, ``"terminated"`` (the player died) and ``"truncated"`` (the
  episode hit its length limit), all ``[1]``;
- ``"step_count"`` and ``"is_init"`` as in the DMC env.

Actions are categorical: an int64 scalar in ``[0, 17)`` (Design Sec. 4: discrete actions are ints); a value that is
not an integer (1.7, NaN) or is out of range raises a ``ValueError`` naming it.
:func:`crafter_score` is the benchmark's aggregate score (Crafter paper, Sec. 3.3).

The same seed and actions give the same episodes (Crafter's own world does not: see
``d4func.envs.crafter_state``), and the env's runtime state is saved in checkpoints, so an online Crafter run
resumes mid-episode exactly and counterfactual rollouts can restore a state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import crafter
import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Binary, Bounded, Categorical, Composite, Unbounded
from torchrl.envs import Compose, EnvBase, InitTracker, StepCounter, ToTensorImage, TransformedEnv

from d4func.envs.actions import categorical_action
from d4func.envs.crafter_state import crafter_state, make_reproducible, restore_crafter_state

__all__ = [
    "CRAFTER_ACHIEVEMENTS",
    "CRAFTER_N_ACTIONS",
    "CrafterEnv",
    "achievement_success_rates",
    "crafter_score",
    "make_crafter_env",
]

CRAFTER_ACHIEVEMENTS: tuple[str, ...] = tuple(crafter.constants.achievements)
CRAFTER_N_ACTIONS: int = len(crafter.constants.actions)
CRAFTER_MIN_IMAGE_SIZE: int = 18  # measured: 16 and 17 fail inside crafter's renderer at reset


class CrafterEnv(EnvBase):
    """The raw Crafter env: uint8 ``[H, W, 3]`` pixels (use :func:`make_crafter_env` for model-ready frames)."""

    def __init__(
        self, seed: int = 0, image_size: int = 64, length: int = 10000, device: torch.device | str = "cpu"
    ) -> None:
        if image_size < CRAFTER_MIN_IMAGE_SIZE:
            # Crafter draws a 9x9 tile view above a 9x2 inventory strip; below 18 pixels its renderer gives a tile
            # zero pixels and fails at reset ("height and width must be > 0"), so stop here with the reason.
            raise ValueError(
                f"image_size must be >= {CRAFTER_MIN_IMAGE_SIZE} for Crafter's 9x9 view (2 pixels per tile), got "
                f"{image_size}"
            )
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        super().__init__(device=device, batch_size=torch.Size([]))
        # reproducible: Crafter's own world despawns creatures in the order of their memory addresses
        self._env = make_reproducible(crafter.Env(size=(image_size, image_size), length=length, seed=seed))
        self.image_size = image_size
        n_ach = len(CRAFTER_ACHIEVEMENTS)
        self.observation_spec = Composite(
            pixels=Bounded(0, 255, shape=(image_size, image_size, 3), dtype=torch.uint8, device=self.device),
            achievements=Binary(n=n_ach, shape=(n_ach,), dtype=torch.bool, device=self.device),
            shape=(),
        )
        self.action_spec = Categorical(CRAFTER_N_ACTIONS, shape=(), dtype=torch.int64, device=self.device)
        self.reward_spec = Unbounded(shape=(1,), dtype=torch.float32, device=self.device)
        flag = Categorical(2, shape=(1,), dtype=torch.bool, device=self.device)
        self.done_spec = Composite(
            done=flag.clone(), terminated=flag.clone(), truncated=flag.clone(), shape=()
        )

    def _pixels(self, obs: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(obs)).to(self.device)

    def _unlocked(self) -> torch.Tensor:
        counts = self._env._player.achievements
        return torch.tensor([counts[name] > 0 for name in CRAFTER_ACHIEVEMENTS], dtype=torch.bool, device=self.device)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        obs = self._env.reset()
        false = torch.zeros(1, dtype=torch.bool, device=self.device)
        return TensorDict(
            pixels=self._pixels(obs),
            achievements=self._unlocked(),
            done=false,
            terminated=false.clone(),
            truncated=false.clone(),
            batch_size=(),
            device=self.device,
        )

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = categorical_action(tensordict["action"], CRAFTER_N_ACTIONS, "Crafter")
        obs, reward, done, info = self._env.step(action)
        # Crafter signals death through discount 0; any other end of episode is the time limit.
        terminated = bool(done) and info["discount"] == 0.0
        truncated = bool(done) and not terminated
        return TensorDict(
            pixels=self._pixels(obs),
            achievements=self._unlocked(),
            reward=torch.tensor([reward], dtype=torch.float32, device=self.device),
            done=torch.tensor([bool(done)], device=self.device),
            terminated=torch.tensor([terminated], device=self.device),
            truncated=torch.tensor([truncated], device=self.device),
            batch_size=(),
            device=self.device,
        )

    def _set_seed(self, seed: int | None) -> None:
        # Crafter derives each episode's world from (seed, episode index): restart that sequence.
        if seed is not None:
            self._env._seed = int(seed)
            self._env._episode = 0

    # Exact resume of online training and counterfactual rollouts (d4func.envs.resumable): the whole world.
    def get_resume_state(self) -> dict:
        return crafter_state(self._env)

    def set_resume_state(self, state: dict) -> None:
        restore_crafter_state(self._env, state)


def make_crafter_env(
    seed: int = 0, image_size: int = 64, length: int = 10000, device: torch.device | str = "cpu"
) -> TransformedEnv:
    """Crafter with float ``[3, H, W]`` frames in [0, 1], step counter and episode-start flag.

    ``seed`` fixes the sequence of generated worlds; ``length`` is the episode time limit (Crafter's default
    10000 steps). See the module docstring for the keys of each step.
    """
    base = CrafterEnv(seed=seed, image_size=image_size, length=length, device=device)
    base.set_seed(seed)
    return TransformedEnv(
        base,
        Compose(ToTensorImage(in_keys=["pixels"]), StepCounter(), InitTracker()),
    )


def achievement_success_rates(episode_achievements: torch.Tensor) -> torch.Tensor:
    """Per-achievement success rates in percent from per-episode records ``[E, 22]`` bool -> ``[22]`` float.

    The success rate of an achievement is the share of episodes in which it was unlocked at least once.
    """
    if episode_achievements.ndim != 2 or episode_achievements.shape[1] != len(CRAFTER_ACHIEVEMENTS):
        raise ValueError(
            f"episode_achievements must be [episodes, {len(CRAFTER_ACHIEVEMENTS)}], "
            f"got shape {tuple(episode_achievements.shape)}"
        )
    if episode_achievements.shape[0] == 0:
        raise ValueError("episode_achievements holds no episodes; success rates are undefined")
    return 100.0 * episode_achievements.to(torch.float64).mean(0)


def crafter_score(success_rates: Sequence[float] | Mapping[str, float] | torch.Tensor) -> float:
    """Crafter score: geometric mean of success rates, ``exp(mean_i log(1 + s_i)) - 1`` with ``s_i`` in percent.

    Crafter paper, Sec. 3.3: the +1 keeps the log finite for achievements never unlocked, and the geometric
    mean rewards unlocking hard achievements more than polishing easy ones. Returns a percentage in [0, 100].
    """
    if isinstance(success_rates, Mapping):
        values = [float(v) for v in success_rates.values()]
    elif isinstance(success_rates, torch.Tensor):
        values = [float(v) for v in success_rates.reshape(-1).tolist()]
    else:
        values = [float(v) for v in success_rates]
    if not values:
        raise ValueError("crafter_score needs at least one success rate, got none")
    for v in values:
        if not 0.0 <= v <= 100.0:
            raise ValueError(f"success rates are percentages in [0, 100], got {v}")
    return math.exp(sum(math.log1p(v) for v in values) / len(values)) - 1.0
