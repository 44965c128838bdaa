"""Counterfactual rollouts: one env state played forward under two action sequences.

Whether a world model knows what an action changes is a question the env itself can answer: from one state, play
two action sequences and compare the frames. A world model given the same history and the same two sequences
should change its prediction the same way. `counterfactual_clips` collects such pairs; it needs an env whose state
can be saved and restored mid-episode:

* envs whose base defines `get_resume_state` / `set_resume_state` (`d4func.envs.resumable`: Reach, Crafter, and
  DMControl tasks built by `make_dmc_env`);
* other TorchRL DMControl envs, through dm_control's `physics.get_state` / `set_state`.

Any other env has neither (`supports_counterfactuals` is False).
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDictBase
from torch import Tensor
from torchrl.envs import EnvBase
from torchrl.envs.utils import step_mdp

from d4func.data.offline import UniformRandomPolicy
from d4func.envs.dmc import innermost_control, physics_state, restore_physics_state
from d4func.envs.resumable import get_env_state, set_env_state, supports_resume_state

__all__ = ["MAX_WARMUP", "counterfactual_clips", "dm_control_env", "dm_physics", "restore_env", "snapshot_env",
           "supports_counterfactuals"]

MAX_WARMUP = 60  # random decisions before a state is taken (cartpole's episodes hold 250 at action repeat 4)


def _dm_env(env: EnvBase) -> Any | None:
    """The dm_env beneath a TorchRL DMControl env (`DMControlWrapper._env`), else None."""
    base = env
    while hasattr(base, "base_env"):
        base = base.base_env
    return getattr(base, "_env", None)


def dm_physics(env: EnvBase) -> Any | None:
    """The dm_control physics beneath a TorchRL DMControl env, else None."""
    return getattr(_dm_env(env), "physics", None)


def dm_control_env(env: EnvBase) -> Any | None:
    """The innermost dm_control `control.Environment` beneath a TorchRL DMControl env (`dmc.innermost_control`)."""
    return innermost_control(_dm_env(env))


def supports_counterfactuals(env: EnvBase) -> bool:
    return supports_resume_state(env) or dm_physics(env) is not None


def snapshot_env(env: EnvBase) -> Any:
    """The env's state mid-episode, for `restore_env`; raises for an env that cannot restore one. On a DMControl
    env without a resume state: `dmc.physics_state`."""
    if supports_resume_state(env):
        return get_env_state(env)
    physics = dm_physics(env)
    if physics is None:
        raise TypeError(f"{type(env).__name__} cannot save its state mid-episode (neither get_resume_state nor "
                        "dm_control physics): counterfactual rollouts need one")
    return physics_state(physics, dm_control_env(env))


def restore_env(env: EnvBase, snapshot: Any) -> None:
    if supports_resume_state(env):
        set_env_state(env, snapshot)
        return
    physics = dm_physics(env)
    if physics is None:
        raise TypeError(f"{type(env).__name__} cannot restore a state mid-episode")
    control = dm_control_env(env)
    restore_physics_state(physics, snapshot, control)
    if control is not None and snapshot["step_count"] is not None:
        # An episode that ended after the snapshot leaves dm_control set to reset on its next step: the snapshot
        # was taken mid-episode, so the next step continues it.
        control._reset_next_step = False


def _step(env: EnvBase, td: TensorDictBase, action: Tensor) -> tuple[TensorDictBase, Tensor, bool]:
    """One env step from root `td` with `action`: the next root tensordict, its frame and whether it ended."""
    out = env.step(td.clone(False).set("action", action))
    done = bool(out.get(("next", "done")).any())
    return step_mdp(out), out.get(("next", "pixels")), done


def counterfactual_clips(
    env: EnvBase,
    context_len: int,
    horizon: int,
    clips: int,
    seed: int = 0,
    max_warmup: int = MAX_WARMUP,
    max_attempts: int | None = None,
) -> dict[str, Tensor]:
    """`clips` states reached by a uniform random policy, each with the `context_len` frames that lead to it and
    the `horizon` frames that follow under two independent uniform random action sequences, played from the same
    state (the env is restored in between).

    Returns `context` `[N, C, ...]` (frames as the env gives them), `actions` `[2, N, C + H, ...]` in TorchRL's
    convention (action t follows frame t of `context` + the frames after it: the context's own actions, then the
    sequence, then one unused action so that frames and actions have the same length, as in a replay clip) and
    `frames` `[2, N, H, ...]`, the frames after each action of the sequence. The warm-up before the context is
    uniform in [0, `max_warmup`] random steps. A state whose episode ends within the warm-up or either rollout is
    drawn again, up to `max_attempts` (default 4 * clips) draws, and later warm-ups are shortened to fit the
    shortest episode seen."""
    for name, value, low in (("context_len", context_len, 1), ("horizon", horizon, 1), ("clips", clips, 1),
                             ("max_warmup", max_warmup, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not supports_counterfactuals(env):
        snapshot_env(env)  # raises, naming the env
    attempts = 4 * clips if max_attempts is None else max_attempts
    policy = UniformRandomPolicy(env.action_spec, seed=seed)
    warmups = torch.Generator().manual_seed(seed + 1)
    context, actions, frames = [], [], []
    for _ in range(attempts):
        if len(context) == clips:
            break
        td = env.reset()
        seen, taken, ended = [td.get("pixels")], [], False
        for _ in range(context_len - 1 + int(torch.randint(0, max_warmup + 1, (), generator=warmups))):
            action = policy(td.clone(False)).get("action")
            td, frame, ended = _step(env, td, action)
            if ended:
                break
            seen.append(frame)
            taken.append(action)
        if ended:
            # An episode of len(seen) steps: leave room for the context and both rollouts in later draws.
            max_warmup = max(0, min(max_warmup, len(seen) - context_len - horizon))
            continue
        snapshot = snapshot_env(env)
        history = taken[len(taken) - (context_len - 1):] if context_len > 1 else []
        branches = []
        for _ in range(2):
            restore_env(env, snapshot)
            sequence = [policy(td.clone(False)).get("action") for _ in range(horizon)]
            branch_td, branch_frames = td, []
            for action in sequence:
                branch_td, frame, ended = _step(env, branch_td, action)
                if ended:
                    break
                branch_frames.append(frame)
            if ended:
                max_warmup = max(0, min(max_warmup, len(seen) + len(branch_frames) - context_len - horizon))
                break
            unused = torch.zeros_like(sequence[0])
            branches.append((torch.stack([*history, *sequence, unused]), torch.stack(branch_frames)))
        if ended:
            continue
        context.append(torch.stack(seen[len(seen) - context_len:]))
        actions.append(torch.stack([branch[0] for branch in branches]))
        frames.append(torch.stack([branch[1] for branch in branches]))
    if len(context) < clips:
        raise RuntimeError(f"only {len(context)} of {clips} counterfactual clips in {attempts} attempts: episodes "
                           f"end within the warm-up (up to {max_warmup} steps) plus context_len={context_len} and "
                           f"horizon={horizon}; use a shorter warm-up or horizon")
    return {"context": torch.stack(context).float(),
            "actions": torch.stack(actions, dim=1),
            "frames": torch.stack(frames, dim=1).float()}
