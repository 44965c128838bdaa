"""Procedural moving-shapes videos: the project's own toy data, no download needed.

Coloured discs, squares and triangles drift across a dark background and bounce off the walls. Optionally one more
shape (drawn on top) is *controlled*: its velocity is set by the action, either a continuous 2-D action in [-1, 1]
(velocity = action · control_speed pixels per step) or one of five discrete actions (no-op, up, down, left, right).
The controlled shape stops at the walls instead of bouncing, so its motion is a function of the actions alone.

Everything is a function of the torch.Generator (or integer seed) passed in: the same seed gives the same video.

Conventions (TorchRL's): `actions[t]` is the action taken after observing `frames[t]`; it produces `frames[t + 1]`.
So the last action has no visible effect inside the clip. Actions are `[T, A]` floats: `A = 2` for continuous
control, one-hot `A = 5` for discrete control (`actions.argmax(-1)` gives the indices), `A = 0` without control.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ACTION_MODES = ("none", "continuous", "discrete")
# Discrete action i moves the controlled shape by DISCRETE_DIRECTIONS[i] (x, y) · control_speed; y points down.
DISCRETE_DIRECTIONS = torch.tensor([[0.0, 0.0], [0.0, -1.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])
SHAPE_KINDS = ("disc", "square", "triangle")
# Saturated colours, distinct from each other and from the background.
PALETTE = torch.tensor(
    [
        [0.95, 0.20, 0.20],
        [0.20, 0.85, 0.25],
        [0.25, 0.40, 0.95],
        [0.95, 0.85, 0.20],
        [0.90, 0.30, 0.90],
        [0.20, 0.85, 0.90],
        [0.98, 0.60, 0.15],
        [0.95, 0.95, 0.95],
    ]
)
BACKGROUND = 0.08


@dataclass(frozen=True)
class MovingShapesConfig:
    image_size: int = 64
    n_shapes: int = 3  # freely bouncing shapes (not counting the controlled one)
    min_radius: float = 0.08  # shape radius as a fraction of the image size
    max_radius: float = 0.16
    max_speed: float = 0.05  # fraction of the image size per step
    action_mode: str = "none"  # "none" | "continuous" | "discrete"
    control_speed: float = 0.06  # fraction of the image size per step at full action
    action_repeat_prob: float = 0.8  # random actions: chance to keep the previous action at each step

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"MovingShapesConfig.image_size must be >= 8, got {self.image_size}")
        if self.n_shapes < 0:
            raise ValueError(f"MovingShapesConfig.n_shapes must be >= 0, got {self.n_shapes}")
        if not 0 < self.min_radius <= self.max_radius < 0.5:
            raise ValueError(
                f"MovingShapesConfig needs 0 < min_radius <= max_radius < 0.5, got {self.min_radius}, {self.max_radius}"
            )
        if self.max_speed < 0 or self.control_speed < 0:
            raise ValueError(
                f"MovingShapesConfig speeds must be >= 0, got max_speed={self.max_speed}, "
                f"control_speed={self.control_speed}"
            )
        if self.action_mode not in ACTION_MODES:
            raise ValueError(f"MovingShapesConfig.action_mode must be one of {ACTION_MODES}, got {self.action_mode!r}")
        if self.action_mode == "none" and self.n_shapes == 0:
            raise ValueError("MovingShapesConfig: n_shapes=0 without a controlled shape leaves nothing to draw")
        if not 0.0 <= self.action_repeat_prob <= 1.0:
            raise ValueError(f"MovingShapesConfig.action_repeat_prob must lie in [0, 1], got {self.action_repeat_prob}")

    @property
    def action_dim(self) -> int:
        return {"none": 0, "continuous": 2, "discrete": len(DISCRETE_DIRECTIONS)}[self.action_mode]


def _generator(seed_or_generator: int | torch.Generator) -> torch.Generator:
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    return torch.Generator().manual_seed(int(seed_or_generator))


def _uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def random_actions(cfg: MovingShapesConfig, steps: int, seed_or_generator: int | torch.Generator) -> Tensor:
    """A sticky random policy's actions `[steps, A]`: each step keeps the last action with `action_repeat_prob`."""
    gen = _generator(seed_or_generator)
    if cfg.action_mode == "none":
        return torch.zeros(steps, 0)
    keep = torch.rand(steps, generator=gen) < cfg.action_repeat_prob
    if cfg.action_mode == "continuous":
        fresh = _uniform(gen, (steps, 2), -1.0, 1.0)
    else:
        fresh = torch.randint(len(DISCRETE_DIRECTIONS), (steps,), generator=gen)
    actions = fresh.clone()
    for t in range(1, steps):
        if keep[t]:
            actions[t] = actions[t - 1]
    if cfg.action_mode == "discrete":
        return torch.nn.functional.one_hot(actions, len(DISCRETE_DIRECTIONS)).float()
    return actions


def _coverage(kind: str, centre: Tensor, radius: Tensor, grid: Tensor) -> Tensor:
    """Anti-aliased coverage `[T, H, W]` in [0, 1] of one shape whose centre `[T, 2]` (x, y) moves over time."""
    dx = grid[None, 0] - centre[:, 0, None, None]
    dy = grid[None, 1] - centre[:, 1, None, None]
    if kind == "disc":
        dist = torch.sqrt(dx * dx + dy * dy) - radius
    elif kind == "square":
        dist = torch.maximum(dx.abs(), dy.abs()) - radius * 0.85
    else:
        # Upward triangle as the intersection of three half-planes (signed distances to its edges).
        bottom = dy - radius * 0.7
        left = (-dx * 0.866 - dy * 0.5) - radius * 0.5
        right = (dx * 0.866 - dy * 0.5) - radius * 0.5
        dist = torch.maximum(bottom, torch.maximum(left, right))
    return (0.5 - dist).clamp(0.0, 1.0)  # one-pixel soft edge


def _bounce(pos0: Tensor, vel0: Tensor, low: Tensor, high: Tensor, steps: int) -> Tensor:
    """Positions `[steps, 2]` of a point moving at `vel0` and reflecting off the box [low, high]."""
    positions = [pos0]
    pos, vel = pos0.clone(), vel0.clone()
    for _ in range(steps - 1):
        pos = pos + vel
        over, under = pos > high, pos < low
        pos = torch.where(over, 2 * high - pos, torch.where(under, 2 * low - pos, pos))
        vel = torch.where(over | under, -vel, vel)
        positions.append(pos)
    return torch.stack(positions)


def moving_shapes_video(
    cfg: MovingShapesConfig,
    steps: int,
    seed_or_generator: int | torch.Generator,
    actions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One clip: frames `[steps, 3, S, S]` float in [0, 1] and actions `[steps, A]`.

    With control and `actions=None`, the actions come from `random_actions` (same generator); given actions must be
    `[steps, A]` (continuous values are clipped to [-1, 1]; discrete ones are one-hot or any scores, argmax wins).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    gen = _generator(seed_or_generator)
    size = cfg.image_size
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"))  # [2, H, W]: (x, y) pixel centres
    frames = torch.full((steps, 3, size, size), BACKGROUND)

    def paint(kind_index: int, colour: Tensor, centre: Tensor, radius: Tensor) -> None:
        nonlocal frames
        alpha = _coverage(SHAPE_KINDS[kind_index], centre, radius, grid)[:, None]
        frames = frames * (1 - alpha) + colour[None, :, None, None] * alpha

    for _ in range(cfg.n_shapes):
        radius = _uniform(gen, (), cfg.min_radius, cfg.max_radius) * size
        low, high = radius.expand(2), (size - radius).expand(2)
        pos0 = low + (high - low) * torch.rand(2, generator=gen)
        angle = _uniform(gen, (), 0.0, 2 * torch.pi)
        speed = _uniform(gen, (), 0.3, 1.0) * cfg.max_speed * size
        vel0 = torch.stack((angle.cos(), angle.sin())) * speed
        kind = int(torch.randint(len(SHAPE_KINDS), (), generator=gen))
        colour = PALETTE[int(torch.randint(len(PALETTE), (), generator=gen))]
        paint(kind, colour, _bounce(pos0, vel0, low, high, steps), radius)

    if cfg.action_mode == "none":
        if actions is not None and actions.numel():
            raise ValueError("actions were given but MovingShapesConfig.action_mode is 'none'")
        return frames.clamp(0.0, 1.0), torch.zeros(steps, 0)

    if actions is None:
        actions = random_actions(cfg, steps, gen)
    if tuple(actions.shape) != (steps, cfg.action_dim):
        raise ValueError(f"actions must be [{steps}, {cfg.action_dim}], got {tuple(actions.shape)}")
    actions = actions.float()
    if cfg.action_mode == "continuous":
        actions = actions.clamp(-1.0, 1.0)
        velocity = actions * cfg.control_speed * size
    else:
        actions = torch.nn.functional.one_hot(actions.argmax(-1), cfg.action_dim).float()
        velocity = DISCRETE_DIRECTIONS[actions.argmax(-1)] * cfg.control_speed * size
    # The controlled shape, a white disc with a red core so that no free shape looks like it.
    radius = torch.as_tensor(0.5 * (cfg.min_radius + cfg.max_radius) * size)
    low, high = radius.expand(2), (size - radius).expand(2)
    pos = low + (high - low) * torch.rand(2, generator=gen)
    positions = [pos]
    for t in range(steps - 1):
        pos = torch.minimum(torch.maximum(pos + velocity[t], low), high)  # stops at the walls
        positions.append(pos)
    centre = torch.stack(positions)
    paint(0, PALETTE[7], centre, radius)
    paint(0, PALETTE[0], centre, radius * 0.55)
    return frames.clamp(0.0, 1.0), actions


def moving_shapes_batch(
    cfg: MovingShapesConfig, batch: int, steps: int, seed_or_generator: int | torch.Generator
) -> tuple[Tensor, Tensor]:
    """`batch` independent clips: frames `[batch, steps, 3, S, S]` and actions `[batch, steps, A]`."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    gen = _generator(seed_or_generator)
    clips = [moving_shapes_video(cfg, steps, gen) for _ in range(batch)]
    return torch.stack([c[0] for c in clips]), torch.stack([c[1] for c in clips])
