"""How much a DMControl task's frames depend on the actions: the reference for the `action_effect` that
`experiments/world_model_quality.py` measures on a world model.

From states reached by a uniform random policy, two independent uniform random action sequences of `horizon`
decisions are played from the same physics state (dm_control's `physics.get_state` / `set_state`), and both are
rendered as the d4func env renders them (`MultiCameraRepeatWrapper`: same cameras, image size and action repeat).
The figure is the mean absolute pixel change between the two rollouts, in [0, 1] pixel units, over the horizon and
per step. `world_model_quality.py` plays another clip's actions, also those of a random policy, so the two
figures compare like with like.

    python experiments/real_action_effect.py --env dmc:cartpole-swingup --image-size 64 --action-repeat 4 \\
        --horizon 8 --states 16
"""

from __future__ import annotations

import argparse
import json

import numpy as np

# d4func.envs.dmc first: it imports torch before dm_control sets up rendering (the other order has segfaulted here).
from d4func.envs.dmc import MultiCameraRepeatWrapper, parse_dmc_name, suite

MAX_WARMUP = 60  # random decisions before a state is taken (cartpole's episodes hold 250 at action repeat 4)


def make_task(env_name: str, image_size: int, action_repeat: int, seed: int) -> MultiCameraRepeatWrapper:
    """The dm_env beneath d4func's DMControl env (`d4func.envs.dmc.make_dmc_env`), whose physics can be set."""
    domain, task, cameras = parse_dmc_name(env_name)
    raw = suite.load(domain, task, task_kwargs={"random": seed})
    return MultiCameraRepeatWrapper(raw, cameras, image_size, image_size, action_repeat)


def play_from(env: MultiCameraRepeatWrapper, state: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Frames `[len(actions), ...]` in [0, 1] after each action, starting from physics `state`.

    The episode is reset first so that its step limit cannot end the rollout; the physics state then overrides the
    reset's initial state."""
    env.reset()
    physics = env.physics
    with physics.reset_context():
        physics.set_state(state)
    return np.stack([env.step(action).observation["pixels"] for action in actions]).astype(np.float32) / 255.0


def real_action_effect(
    env_name: str, image_size: int = 64, action_repeat: int = 4, horizon: int = 8, states: int = 16, seed: int = 0
) -> dict[str, object]:
    """Mean absolute pixel change between two random action sequences played from the same states."""
    for name, value in (("image_size", image_size), ("action_repeat", action_repeat), ("horizon", horizon),
                        ("states", states)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    env = make_task(env_name, image_size, action_repeat, seed)
    rng = np.random.default_rng(seed)
    shape = env.action_spec().shape
    per_state = []
    for _ in range(states):
        env.reset()
        for _ in range(int(rng.integers(0, MAX_WARMUP + 1))):
            if env.step(rng.uniform(-1.0, 1.0, size=shape)).last():
                env.reset()
        state = env.physics.get_state().copy()
        first, second = (rng.uniform(-1.0, 1.0, size=(horizon, *shape)) for _ in range(2))
        change = np.abs(play_from(env, state, first) - play_from(env, state, second))
        per_state.append(change.reshape(horizon, -1).mean(axis=1))
    per_step = np.mean(per_state, axis=0)
    return {"env": env_name, "image_size": image_size, "action_repeat": action_repeat, "horizon": horizon,
            "states": states, "seed": seed, "action_effect": float(per_step.mean()),
            "action_effect_per_step": [float(v) for v in per_step]}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="dmc:cartpole-swingup")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--action-repeat", type=int, default=4)
    parser.add_argument("--horizon", type=int, default=8)
    parser.add_argument("--states", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = real_action_effect(args.env, args.image_size, args.action_repeat, args.horizon, args.states, args.seed)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
