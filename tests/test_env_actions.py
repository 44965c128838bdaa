"""Bad actions are rejected with a ValueError naming them, through TorchRL's `env.step(td)` path; good ones step.

DMC actions must be finite and in [-1, 1] (up to `ACTION_TOLERANCE`, which is clipped) and of the task's shape;
Reach and Crafter actions must be integer class indices in range (an integral float such as 2.0 is accepted).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d4func.envs.actions import categorical_action
from d4func.envs.crafter_env import CRAFTER_N_ACTIONS, make_crafter_env
from d4func.envs.dmc import ACTION_TOLERANCE, check_unit_action, make_dmc_env
from d4func.envs.reach import REACH_N_ACTIONS, make_reach_env

torch.set_num_threads(1)

FEW = settings(max_examples=15, deadline=None)
FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


def _named(value: float) -> str:
    """How the error message spells a float32 action value (float64 repr of the float32 value)."""
    return repr(float(np.float32(value)))


def _out_of_box(v: float) -> bool:
    return not math.isfinite(v) or abs(v) > 1.0 + ACTION_TOLERANCE


def _non_integral(v: float) -> bool:
    return not math.isfinite(v) or not float(v).is_integer()


@pytest.fixture(scope="module")
def dmc():
    env = make_dmc_env("cartpole", "swingup", image_size=16, action_repeat=2, seed=0, time_limit=0.5)
    yield env, env.reset()
    env.close()


@pytest.fixture(scope="module")
def reach():
    env = make_reach_env(seed=0)
    yield env
    env.close()


@pytest.fixture(scope="module")
def crafter():
    env = make_crafter_env(seed=0, image_size=32, length=10_000)
    yield env, env.reset()
    env.close()


def _step(env, root, action: torch.Tensor):
    return env.step(root.clone(False).set("action", action))


# --------------------------------------------------------------------------------------------------------------
# DMC


@FEW
@given(value=FLOAT32.filter(_out_of_box))
def test_dmc_rejects_nonfinite_or_out_of_range_action(dmc, value):
    env, root = dmc
    with pytest.raises(ValueError, match=r"\[-1, 1\]") as err:
        _step(env, root, torch.tensor([value], dtype=torch.float32))
    assert f"{_named(value)} at index 0" in str(err.value)


@pytest.mark.parametrize("shape", [(), (2,), (1, 1)])
def test_dmc_rejects_wrong_action_shape(dmc, shape):
    env, root = dmc
    with pytest.raises(ValueError, match="shape") as err:
        _step(env, root, torch.zeros(shape))
    assert "(1,)" in str(err.value) and str(shape) in str(err.value)


@FEW
@given(value=st.one_of(st.floats(-1.0, 1.0, width=32), st.sampled_from([-1.0, 1.0, 1.0 + 5e-7, -1.0 - 5e-7])))
def test_dmc_in_range_actions_step(dmc, value):
    env, _ = dmc
    out = _step(env, env.reset(), torch.tensor([value], dtype=torch.float32))
    assert out["next", "pixels"].shape == (3, 16, 16)
    assert bool(torch.isfinite(out["next", "reward"]).all())
    assert int(out["next", "step_count"]) == 1


@FEW
@given(
    values=st.lists(
        st.one_of(st.floats(-2.0, 2.0), st.sampled_from([math.nan, math.inf, -math.inf])), min_size=1, max_size=6
    ),
)
def test_check_unit_action_names_every_bad_entry_or_clips(values):
    action = np.asarray(values, dtype=np.float64)
    bad = [i for i, v in enumerate(values) if _out_of_box(v)]
    if not bad:
        out = check_unit_action(action, action.shape)
        assert out.min() >= -1.0 and out.max() <= 1.0
        assert np.abs(out - action).max(initial=0.0) <= ACTION_TOLERANCE
        return
    with pytest.raises(ValueError) as err:
        check_unit_action(action, action.shape)
    message = str(err.value)
    for i in bad:
        assert f"{float(action[i])!r} at index {i}" in message
    assert message.count(" at index ") == len(bad)  # in-range entries are not blamed


def test_check_unit_action_clips_within_tolerance_to_the_bound():
    out = check_unit_action([1.0 + 0.5 * ACTION_TOLERANCE, -1.0 - 0.5 * ACTION_TOLERANCE, 0.25], (3,))
    assert out.tolist() == [1.0, -1.0, 0.25]


# --------------------------------------------------------------------------------------------------------------
# Reach and Crafter (categorical)


@FEW
@given(value=FLOAT32.filter(_non_integral))
def test_reach_rejects_non_integral_action(reach, value):
    root = reach.reset()
    with pytest.raises(ValueError, match="integer class index") as err:
        _step(reach, root, torch.tensor(value, dtype=torch.float32))
    assert _named(value) in str(err.value)


@FEW
@given(value=st.one_of(st.integers(-(2**40), -1), st.integers(REACH_N_ACTIONS, 2**40)), as_float=st.booleans())
def test_reach_rejects_out_of_range_integral_action(reach, value, as_float):
    action = torch.tensor(float(value), dtype=torch.float64) if as_float else torch.tensor(value)
    with pytest.raises(ValueError, match=rf"\[0, {REACH_N_ACTIONS}\)") as err:
        _step(reach, reach.reset(), action)
    assert f"got {value}" in str(err.value)


@FEW
@given(index=st.integers(0, REACH_N_ACTIONS - 1), form=st.sampled_from(["int64", "float32", "int64[1]"]))
def test_reach_integral_actions_step_the_chosen_move(reach, index, form):
    action = {
        "int64": torch.tensor(index),
        "float32": torch.tensor(float(index)),
        "int64[1]": torch.tensor([index]),
    }[form]
    root = reach.reset()
    base = reach.base_env
    before = base.agent
    _step(reach, root, action)
    assert base.agent == min(max(before + (index - 1), 0), base.n_cells - 1)  # 0/1/2 = left/stay/right


def test_categorical_action_rejects_multi_element_and_bool_tensors():
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        categorical_action(torch.tensor([0, 1, 0]), REACH_N_ACTIONS, "Reach")
    with pytest.raises(ValueError, match="torch.bool"):
        categorical_action(torch.tensor(True), REACH_N_ACTIONS, "Reach")
    with pytest.raises(ValueError, match="'left'"):
        categorical_action("left", REACH_N_ACTIONS, "Reach")
    assert categorical_action(np.int64(2), REACH_N_ACTIONS, "Reach") == 2


@settings(max_examples=10, deadline=None)
@given(value=FLOAT32.filter(_non_integral))
def test_crafter_rejects_non_integral_action(crafter, value):
    env, root = crafter
    with pytest.raises(ValueError, match="Crafter action must be an integer class index") as err:
        _step(env, root, torch.tensor(value, dtype=torch.float32))
    assert _named(value) in str(err.value)


@pytest.mark.parametrize("value", [-1, CRAFTER_N_ACTIONS, 99])
def test_crafter_rejects_out_of_range_action(crafter, value):
    env, root = crafter
    with pytest.raises(ValueError, match=rf"\[0, {CRAFTER_N_ACTIONS}\), got {value}"):
        _step(env, root, torch.tensor(value))


@pytest.fixture(scope="module")
def crafter_live(crafter):
    """A Crafter episode that the stepping test carries on from example to example (a reset, which generates a
    world, costs ~1 s; a step ~6 ms)."""
    env, root = crafter
    return {"env": env, "root": root.clone()}


@settings(max_examples=10, deadline=None)
@given(index=st.integers(0, CRAFTER_N_ACTIONS - 1), as_float=st.booleans())
def test_crafter_integral_actions_step(crafter_live, index, as_float):
    env, root = crafter_live["env"], crafter_live["root"]
    action = torch.tensor(float(index)) if as_float else torch.tensor(index)
    out = _step(env, root, action)
    assert int(out["next", "step_count"]) == int(root["step_count"]) + 1
    assert out["next", "pixels"].shape == (3, 32, 32)
    crafter_live["root"] = env.maybe_reset(env.step_mdp(out))


def test_categorical_action_rejects_a_python_bool_and_an_empty_tensor_by_name():
    with pytest.raises(ValueError, match="got True"):
        categorical_action(True, REACH_N_ACTIONS, "Reach")
    with pytest.raises(ValueError, match=r"shape \(0,\): \[\]"):
        categorical_action(torch.tensor([], dtype=torch.int64), REACH_N_ACTIONS, "Reach")


def test_dmc_actions_are_rescaled_to_an_asymmetric_native_box():
    """[-1, 1] maps affinely onto the task's own [low, high] per dimension (cartpole's is [-1, 1], where a rescale
    that forgets the centre or swaps the bounds' roles can hide): -1 -> low, 0 -> the middle, 1 -> high."""
    from dm_control import suite
    from dm_env import specs

    from d4func.envs.dmc import MultiCameraRepeatWrapper

    raw = suite.load("cartpole", "swingup", task_kwargs={"random": 0})
    raw.action_spec = lambda: specs.BoundedArray((1,), np.float64, minimum=[-3.0], maximum=[1.0], name="force")
    sent, step = [], raw.step
    raw.step = lambda native: sent.append(float(native[0])) or step(np.clip(native, -1.0, 1.0))
    env = MultiCameraRepeatWrapper(raw, camera_ids=(0,), height=8, width=8, action_repeat=2)
    assert env.action_spec().minimum == -1.0 and env.action_spec().maximum == 1.0
    env.reset()
    for action in (-1.0, 0.0, 0.5, 1.0):
        env.step(np.array([action]))
    assert sent == [-3.0, -3.0, -1.0, -1.0, 0.0, 0.0, 1.0, 1.0]  # each action repeated twice
