"""Reach: a tiny pixel env the project ships, for end-to-end learning checks that fit in CI.

A one-dimensional track of ``n_cells`` cells is drawn as an RGB image: the agent is a red column, the goal a green
column (yellow where they overlap). Each episode places both at random, distinct cells. Actions are categorical: 0 =
left, 1 = stay, 2 = right (a non-integer or out-of-range action raises a ``ValueError`` naming it). The reward is 1
for every step that ends on the goal; an episode lasts ``length`` steps (then ``truncated``). The policy has to read
the goal's position from pixels: a policy blind to the goal scores at most ``length / (n_cells - 1)`` on average
over the starts (12/7 = 1.71 with 8 cells, 12 steps: its path does not depend on the goal, so each step ends on it
with probability at most 1/7), which is what makes the env a check on the whole pipeline (tokenizer -> world
model -> agent).

- A uniform random policy scores about 1.25 per 12-step episode with 8 cells; moving straight to the goal and
  staying there scores ``length - distance + 1`` (10.0 on average with 8 cells, 12 steps; with
  ``epsilon = 0.5``, :class:`ReachExpertPolicy` scores about 5.3).
- :class:`ReachExpertPolicy` moves toward the goal, with probability ``epsilon`` taking a random action instead: the
  behaviour policy that records demonstrations.

Each step yields ``"pixels"`` (float ``[3, H, W]`` in [0, 1] after :func:`make_reach_env`'s transforms),
``"reward"`` ``[1]``, ``"done"`` / ``"terminated"`` (never: the goal does not end the episode) / ``"truncated"``,
``"step_count"`` and ``"is_init"``.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import Compose, EnvBase, InitTracker, StepCounter, ToTensorImage, TransformedEnv

from d4func.envs.actions import categorical_action

__all__ = [
    "REACH_LENGTH",
    "REACH_N_ACTIONS",
    "ReachEnv",
    "ReachExpertPolicy",
    "make_reach_env",
    "reach_positions",
]

REACH_N_ACTIONS = 3  # left, stay, right
REACH_LENGTH = 12  # env steps per episode
_MOVES = (-1, 0, 1)


class ReachEnv(EnvBase):
    """The raw env: uint8 ``[H, W, 3]`` pixels (use :func:`make_reach_env` for model-ready frames)."""

    def __init__(self, image_size: int = 16, n_cells: int = 8, length: int = REACH_LENGTH, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if n_cells < 2:
            raise ValueError(f"n_cells must be >= 2 (agent and goal start apart), got {n_cells}")
        if image_size < n_cells or image_size % n_cells:
            raise ValueError(f"image_size={image_size} must be a positive multiple of n_cells={n_cells}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        super().__init__(device=device, batch_size=torch.Size([]))
        self.image_size, self.n_cells, self.length = image_size, n_cells, length
        self.observation_spec = Composite(
            pixels=Bounded(0, 255, shape=(image_size, image_size, 3), dtype=torch.uint8, device=self.device),
            shape=(),
        )
        self.action_spec = Categorical(REACH_N_ACTIONS, shape=(), dtype=torch.int64, device=self.device)
        self.reward_spec = Unbounded(shape=(1,), dtype=torch.float32, device=self.device)
        flag = Categorical(2, shape=(1,), dtype=torch.bool, device=self.device)
        self.done_spec = Composite(done=flag.clone(), terminated=flag.clone(), truncated=flag.clone(), shape=())
        self.generator = torch.Generator().manual_seed(seed)
        self.agent = self.goal = self.t = 0
        self._next_start: tuple[int, int] | None = None

    def start_next_episode_at(self, agent: int, goal: int) -> None:
        """Make the next reset place the agent and the goal in these cells instead of drawing them (once: the
        resets after it draw again). For evaluations that visit every start (`experiments/reach_every_start.py`);
        call it on the base env (`TransformedEnv.base_env`) and reset the transformed env as usual."""
        for name, cell in (("agent", agent), ("goal", goal)):
            if isinstance(cell, bool) or not isinstance(cell, int) or not 0 <= cell < self.n_cells:
                raise ValueError(f"{name} must be a cell in [0, {self.n_cells}), got {cell!r}")
        if agent == goal:
            raise ValueError(f"agent and goal must start in different cells, got both in cell {agent}")
        self._next_start = (agent, goal)

    def _pixels(self) -> torch.Tensor:
        width = self.image_size // self.n_cells
        image = torch.zeros(self.image_size, self.image_size, 3, dtype=torch.uint8)
        image[:, self.agent * width:(self.agent + 1) * width, 0] = 255
        image[:, self.goal * width:(self.goal + 1) * width, 1] = 255
        return image.to(self.device)

    def _flags(self, truncated: bool) -> dict[str, torch.Tensor]:
        flag = torch.tensor([truncated], device=self.device)
        return {"done": flag, "terminated": torch.zeros_like(flag), "truncated": flag.clone()}

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        if self._next_start is not None:  # a chosen start draws nothing: the episodes after it are unchanged
            (self.agent, self.goal), self._next_start = self._next_start, None
        else:
            self.agent = int(torch.randint(self.n_cells, (), generator=self.generator))
            offset = int(torch.randint(1, self.n_cells, (), generator=self.generator))
            self.goal = (self.agent + offset) % self.n_cells  # any cell but the agent's
        self.t = 0
        return TensorDict(pixels=self._pixels(), **self._flags(False), batch_size=(), device=self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = categorical_action(tensordict["action"], REACH_N_ACTIONS, "Reach")
        self.agent = min(max(self.agent + _MOVES[action], 0), self.n_cells - 1)
        self.t += 1
        reward = float(self.agent == self.goal)
        return TensorDict(
            pixels=self._pixels(),
            reward=torch.tensor([reward], dtype=torch.float32, device=self.device),
            **self._flags(self.t >= self.length),
            batch_size=(),
            device=self.device,
        )

    def _set_seed(self, seed: int | None) -> None:
        if seed is not None:
            self.generator.manual_seed(int(seed))

    # Exact resume of online training (d4func.envs.resumable): the whole runtime state is four values.
    def get_resume_state(self) -> dict:
        return {"agent": self.agent, "goal": self.goal, "t": self.t, "generator": self.generator.get_state()}

    def set_resume_state(self, state: dict) -> None:
        self.agent, self.goal, self.t = int(state["agent"]), int(state["goal"]), int(state["t"])
        self.generator.set_state(state["generator"])


def make_reach_env(image_size: int = 16, n_cells: int = 8, length: int = REACH_LENGTH, seed: int = 0,
                   device: torch.device | str = "cpu") -> TransformedEnv:
    """Reach with float ``[3, H, W]`` frames in [0, 1], step counter and episode-start flag."""
    base = ReachEnv(image_size=image_size, n_cells=n_cells, length=length, seed=seed, device=device)
    return TransformedEnv(base, Compose(ToTensorImage(in_keys=["pixels"]), StepCounter(), InitTracker()))


def reach_positions(pixels: torch.Tensor, n_cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(agent cell, goal cell) read back from float frames ``[..., 3, H, W]``: the brightest red / green column."""
    columns = pixels.sum(dim=-2)  # [..., 3, W]
    cells = columns.unflatten(-1, (n_cells, -1)).sum(dim=-1)  # [..., 3, n_cells]
    return cells[..., 0, :].argmax(dim=-1), cells[..., 1, :].argmax(dim=-1)


class ReachExpertPolicy(TensorDictModuleBase):
    """Moves toward the goal seen in ``"pixels"`` and stays on it; with probability ``epsilon`` acts uniformly at
    random instead (a noisy demonstrator: behaviour cloning on its data has to find the signal in the noise)."""

    def __init__(self, n_cells: int = 8, epsilon: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        self.n_cells, self.epsilon = n_cells, epsilon
        self.generator = torch.Generator().manual_seed(seed)
        self.in_keys = ["pixels"]
        self.out_keys = ["action"]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        agent, goal = reach_positions(tensordict.get("pixels"), self.n_cells)
        expert = torch.sign(goal - agent) + 1  # -1/0/+1 -> left/stay/right
        random = torch.randint(REACH_N_ACTIONS, expert.shape, generator=self.generator)
        explore = torch.rand(expert.shape, generator=self.generator) < self.epsilon
        tensordict.set("action", torch.where(explore, random, expert).to(torch.int64))
        return tensordict
