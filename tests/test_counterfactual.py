"""`d4func.envs.counterfactual`: a restored state replays the same frames, the clips hold a real history and two
rollouts from one state, warm-ups shrink to fit short episodes, and envs without a restorable state are refused."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Composite, Unbounded
from torchrl.envs import EnvBase

from d4func.data.offline import UniformRandomPolicy
from d4func.envs.counterfactual import (
    counterfactual_clips,
    dm_control_env,
    dm_physics,
    restore_env,
    snapshot_env,
    supports_counterfactuals,
)
from d4func.envs.reach import reach_positions
from d4func.envs.registry import make_env
from d4func.envs.resumable import supports_resume_state

ENVS = [("reach", 1), ("dmc:cartpole-swingup", 4)]


def _env(name: str, repeat: int, seed: int = 3):
    return make_env(name, seed=seed, image_size=18 if name == "crafter" else 16, action_repeat=repeat)


class _StatelessEnv(EnvBase):
    """An env that can neither save nor restore its state (no resume state, no dm_control physics)."""

    def __init__(self) -> None:
        super().__init__(batch_size=())
        self.observation_spec = Composite(pixels=Unbounded(shape=(3, 4, 4)), shape=())
        self.action_spec = Bounded(-1.0, 1.0, shape=(1,))

    def _reset(self, tensordict=None, **kwargs):
        return TensorDict(pixels=torch.zeros(3, 4, 4), done=torch.zeros(1, dtype=torch.bool), batch_size=())

    def _step(self, tensordict):
        return TensorDict(pixels=torch.zeros(3, 4, 4), reward=torch.zeros(1), done=torch.zeros(1, dtype=torch.bool),
                          batch_size=())

    def _set_seed(self, seed):
        pass


def _play(env, td, actions):
    frames = []
    for action in actions:
        out = env.step(td.clone(False).set("action", action))
        frames.append(out.get(("next", "pixels")))
        td = out.get("next").exclude("reward", "done", "terminated", "truncated")
    return torch.stack(frames)


@pytest.mark.parametrize("name, repeat", [*ENVS, ("crafter", 1)])  # Crafter: its creatures move by the world's RNG
def test_a_restored_state_replays_the_same_frames(name, repeat):
    env = _env(name, repeat)
    assert supports_counterfactuals(env)
    policy = UniformRandomPolicy(env.action_spec, seed=0)
    td = env.reset()
    for _ in range(2):
        td = env.step(policy(td)).get("next").exclude("reward", "done", "terminated", "truncated")
    snapshot = snapshot_env(env)
    actions = [policy(td.clone(False)).get("action") for _ in range(4)]
    first = _play(env, td, actions)
    restore_env(env, snapshot)
    torch.testing.assert_close(_play(env, td, actions), first, rtol=0, atol=0)
    env.close()


@pytest.mark.parametrize("name, repeat", ENVS)
def test_clips_hold_a_real_history_and_two_rollouts_from_one_state(name, repeat):
    env = _env(name, repeat)
    clips = counterfactual_clips(env, context_len=3, horizon=4, clips=3, seed=1, max_warmup=5)
    context, actions, frames = clips["context"], clips["actions"], clips["frames"]
    assert context.shape == (3, 3, 3, 16, 16) and frames.shape == (2, 3, 4, 3, 16, 16)
    assert actions.shape[:3] == (2, 3, 7)
    assert 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0
    # Both branches share the history's actions, and every clip's two sequences differ somewhere.
    torch.testing.assert_close(actions[0, :, :2], actions[1, :, :2])
    assert all(not torch.equal(actions[0, i, 2:6], actions[1, i, 2:6]) for i in range(3))
    # The same call draws the same clips (seeded policy and warm-ups).
    again = counterfactual_clips(_env(name, repeat), context_len=3, horizon=4, clips=3, seed=1, max_warmup=5)
    assert all(torch.equal(clips[k], again[k]) for k in clips)
    env.close()


def test_cartpole_branches_move_apart_under_different_pushes():
    clips = counterfactual_clips(_env("dmc:cartpole-swingup", 4), context_len=2, horizon=5, clips=4, seed=0,
                                 max_warmup=3)
    change = (clips["frames"][0] - clips["frames"][1]).abs().flatten(2).mean(dim=2).mean(dim=0)
    assert change[-1] > change[0] >= 0  # the rollouts drift apart


def test_warmups_shrink_to_fit_short_episodes():
    # Reach's episodes last 12 steps: warm-ups of up to 60 would all end the episode; later draws fit instead.
    clips = counterfactual_clips(_env("reach", 1), context_len=3, horizon=6, clips=4, seed=0, max_warmup=60)
    assert clips["frames"].shape[:3] == (2, 4, 6)
    with pytest.raises(RuntimeError, match="only 0 of 2 counterfactual clips"):
        counterfactual_clips(_env("reach", 1), context_len=8, horizon=8, clips=2, seed=0, max_warmup=0)


def test_envs_without_a_restorable_state_and_bad_arguments_are_refused():
    stateless = _StatelessEnv()
    assert not supports_counterfactuals(stateless)
    with pytest.raises(TypeError, match="_StatelessEnv cannot save its state mid-episode"):
        counterfactual_clips(stateless, context_len=2, horizon=2, clips=1)
    with pytest.raises(ValueError, match="horizon must be an int >= 1, got 0"):
        counterfactual_clips(_env("reach", 1), context_len=2, horizon=0, clips=1)


def test_reach_clips_follow_their_actions_frame_by_frame():
    # Reach's agent moves one cell per action (0 left, 1 stay, 2 right, clamped to the track): along the context
    # and each branch, frame t + 1 is frame t moved by action t, so actions and frames line up as in a replay clip
    # and each branch starts from the restored state, not from where the other branch ended.
    clips = counterfactual_clips(_env("reach", 1), context_len=3, horizon=5, clips=6, seed=2, max_warmup=3)
    for branch in range(2):
        frames = torch.cat([clips["context"], clips["frames"][branch]], dim=1)
        agent = torch.stack([reach_positions(frames[:, t], 8)[0] for t in range(frames.shape[1])], dim=1)
        moves = clips["actions"][branch][:, :-1] - 1
        torch.testing.assert_close(agent[:, 1:], (agent[:, :-1] + moves).clamp(0, 7))


def test_dmcontrol_restore_puts_back_the_step_count_and_time():
    env = _env("dmc:cartpole-swingup", 4)
    td = env.reset()
    for _ in range(3):
        td = env.step(td.set("action", torch.zeros(1))).get("next").exclude("reward", "done", "terminated",
                                                                             "truncated")
    snapshot = snapshot_env(env)
    control, physics = dm_control_env(env), dm_physics(env)
    count, time = control._step_count, float(physics.data.time)
    assert count == 12 and time > 0  # 3 decisions at action repeat 4
    for _ in range(2):
        td = env.step(td.set("action", torch.ones(1))).get("next").exclude("reward", "done", "terminated",
                                                                            "truncated")
    restore_env(env, snapshot)
    assert control._step_count == count and float(physics.data.time) == time
    env.close()


def _plain_dmc(domain: str, task: str, repeat: int):
    """A TorchRL DMControl env without a resume state (not built by make_dmc_env): the physics fallback."""
    from dm_control import suite
    from torchrl.envs.libs.dm_control import DMControlWrapper

    from d4func.envs.dmc import MultiCameraRepeatWrapper

    raw = suite.load(domain, task, task_kwargs={"random": 3})
    return DMControlWrapper(MultiCameraRepeatWrapper(raw, camera_ids=(0,), height=16, width=16, action_repeat=repeat))


@pytest.mark.parametrize("resume_state", [True, False])
def test_dmcontrol_restore_is_bitwise_with_contacts_and_after_the_episode_ended(resume_state):
    # Walker touches the floor: the constraint solver's warm start must come back too, or the restored branch
    # drifts from the original at round-off level. And an episode that ended after the snapshot (dm_control then
    # resets on the next step) must continue from the snapshot, not start a new episode.
    env = _env("dmc:walker-walk", 2) if resume_state else _plain_dmc("walker", "walk", 2)
    assert supports_resume_state(env) == resume_state
    policy = UniformRandomPolicy(env.action_spec, seed=0)
    td = env.reset()
    for _ in range(20 if resume_state else 60):  # long enough to fall onto the floor
        td = env.step(policy(td)).get("next").exclude("reward", "done", "terminated", "truncated")
    physics, control = dm_physics(env), dm_control_env(env)
    snapshot = snapshot_env(env)
    actions = [policy(td.clone(False)).get("action") for _ in range(8)]
    _play(env, td, actions)
    state = physics.get_state().copy()
    control._reset_next_step = True  # what dm_control sets when the episode's time limit is reached
    restore_env(env, snapshot)
    _play(env, td, actions)
    assert physics.get_state().tobytes() == state.tobytes()
    assert physics.data.ncon > 0  # the check covered contacts
    env.close()


@pytest.mark.parametrize("seed", range(4))
def test_one_warmup_that_ends_the_episode_fits_every_later_one(seed):
    # Reach's episodes last 12 steps: context 3 + horizon 6 leave room for warm-ups of up to 3 steps. Warm-ups of
    # up to 60 almost always end the episode, but the first that does shows its length, so the second draw fits:
    # two attempts are enough for one clip.
    clips = counterfactual_clips(_env("reach", 1), context_len=3, horizon=6, clips=1, seed=seed, max_warmup=60,
                                 max_attempts=2)
    assert clips["frames"].shape[:3] == (2, 1, 6)

