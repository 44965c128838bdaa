"""`experiments/real_action_effect.py`: the real env's response to actions, the reference for world_model_quality."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from d4func.envs.counterfactual import counterfactual_clips
from d4func.envs.registry import make_env

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("real_action_effect", REPO / "experiments/real_action_effect.py")
rae = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rae)


def test_effect_is_reported_per_step_and_grows_from_zero():
    # A seed other than the default: the states and both action sequences are drawn from it.
    result = rae.real_action_effect("dmc:cartpole-swingup", image_size=16, action_repeat=4, horizon=3, states=2,
                                    seed=1)
    per_step = result["action_effect_per_step"]
    assert len(per_step) == 3 and result["action_effect"] == pytest.approx(float(sum(per_step) / 3))
    assert 0 < per_step[0] < per_step[-1]  # the rollouts drift apart
    # By hand on the same clips: the mean absolute pixel difference of the two branches per step (over states and
    # pixels), and the first step's action share: half the squared difference of the two branches' first frames
    # (two independent actions) over the squared change from the state's frame.
    clips = counterfactual_clips(make_env("dmc:cartpole-swingup", seed=1, image_size=16, action_repeat=4),
                                 context_len=1, horizon=3, clips=2, seed=1, max_warmup=rae.MAX_WARMUP)
    branches = clips["frames"]
    assert per_step == pytest.approx([float((branches[0][:, h] - branches[1][:, h]).abs().mean()) for h in range(3)],
                                     rel=1e-5)
    first, second = branches[0][:, 0], branches[1][:, 0]
    share = float((first - second).square().sum() / 2 / (first - clips["context"][:, 0]).square().sum())
    assert result["action_share_first_step"] == pytest.approx(share, rel=1e-5)
    assert 0 < share < 1  # on cartpole the history decides most of a frame's change


@pytest.mark.parametrize("name", ["image_size", "action_repeat", "horizon", "states"])
def test_sizes_below_one_are_refused_by_name(name):
    with pytest.raises(ValueError, match=f"{name} must be an int >= 1, got 0"):
        rae.real_action_effect("dmc:cartpole-swingup", **{name: 0})
