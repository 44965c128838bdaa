"""`experiments/real_action_effect.py`: the real env's response to actions, the reference for world_model_quality."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("real_action_effect", REPO / "experiments/real_action_effect.py")
rae = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rae)


def test_the_same_actions_from_the_same_state_replay_the_same_frames_and_others_do_not():
    env = rae.make_task("dmc:cartpole-swingup", image_size=16, action_repeat=4, seed=0)
    env.reset()
    for _ in range(10):
        env.step(np.array([1.0]))
    state = env.physics.get_state().copy()
    pushes = np.ones((3, 1))
    first = rae.play_from(env, state, pushes)
    assert first.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(rae.play_from(env, state, pushes), first)  # the state is restored exactly
    assert np.abs(rae.play_from(env, state, -pushes) - first)[-1].mean() > 0  # opposite pushes move the cart


def test_effect_is_reported_per_step_and_grows_from_zero():
    result = rae.real_action_effect("dmc:cartpole-swingup", image_size=16, action_repeat=4, horizon=3, states=2)
    per_step = result["action_effect_per_step"]
    assert len(per_step) == 3 and result["action_effect"] == pytest.approx(float(np.mean(per_step)))
    assert 0 < per_step[0] < per_step[-1]  # the rollouts drift apart
    with pytest.raises(ValueError, match="horizon must be an int >= 1, got 0"):
        rae.real_action_effect("dmc:cartpole-swingup", horizon=0)
