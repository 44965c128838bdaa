"""Env specs, reset/step shapes, action repeat, multi-camera, Crafter achievements and score."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.collectors import Collector
from torchrl.envs.utils import check_env_specs

from d4func.data.offline import UniformRandomPolicy
from d4func.envs.crafter_env import (
    CRAFTER_ACHIEVEMENTS,
    achievement_success_rates,
    crafter_score,
    make_crafter_env,
)
from d4func.envs.dmc import make_dmc_env, parse_dmc_name
from d4func.envs.registry import env_config, make_env

torch.set_num_threads(1)


def _random_actions(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, dim, generator=g) * 2 - 1


def _step(env, td, action):
    """One env step; returns the step's output and the next root (reset when the episode ended)."""
    out = env.step(td.clone(False).set("action", action))
    return out, env.maybe_reset(env.step_mdp(out))


# --------------------------------------------------------------------------------------------------------------
# DMControl


@pytest.fixture(scope="module")
def cartpole():
    env = make_dmc_env("cartpole", "swingup", image_size=64, action_repeat=2, seed=3)
    yield env
    env.close()


def test_dmc_specs_and_rollout(cartpole):
    env = cartpole
    check_env_specs(env)
    spec = env.action_spec
    assert spec.shape == (1,) and spec.dtype == torch.float32
    assert torch.equal(spec.space.low, -torch.ones(1)) and torch.equal(spec.space.high, torch.ones(1))
    assert env.observation_spec["pixels"].shape == (3, 64, 64)
    td = env.rollout(4, UniformRandomPolicy(spec, seed=0))
    px = td["pixels"]
    assert px.shape == (4, 3, 64, 64) and px.dtype == torch.float32
    assert px.min() >= 0 and px.max() <= 1 and px.std() > 0.05
    # frames are k / 255 exactly: float pixels straight from the renderer's uint8
    assert torch.equal((px * 255).round() / 255, px)
    assert td["next", "reward"].shape == (4, 1) and td["next", "reward"].dtype == torch.float32
    for key in ("done", "terminated", "truncated"):
        assert td["next", key].shape == (4, 1) and td["next", key].dtype == torch.bool
    assert td["step_count"].reshape(-1).tolist() == [0, 1, 2, 3]
    assert td["is_init"].reshape(-1).tolist() == [True, False, False, False]
    assert not torch.equal(td["pixels"][0], td["next", "pixels"][-1])


@pytest.mark.parametrize("repeat", [1, 3])
def test_dmc_action_repeat_matches_manual_stepping(repeat):
    """Each agent step = `repeat` physics-control steps with the same action; rewards summed; frame at the end."""
    from dm_control import suite

    env = make_dmc_env("cartpole", "swingup", image_size=32, action_repeat=repeat, seed=5)
    td = env.reset()
    raw = env.base_env._env._env  # the suite's control.Environment under our wrapper
    ref = suite.load("cartpole", "swingup", task_kwargs={"random": 123})
    ref.reset()
    with ref.physics.reset_context():
        ref.physics.set_state(raw.physics.get_state())
    frame = ref.physics.render(height=32, width=32, camera_id=0)
    assert torch.equal(td["pixels"], torch.from_numpy(frame.copy()).permute(2, 0, 1).div(255))
    actions = _random_actions(4, 1, seed=1)
    for a in actions:
        out, td = _step(env, td, a)
        reward = sum(ref.step(a.double().numpy()).reward for _ in range(repeat))
        frame = ref.physics.render(height=32, width=32, camera_id=0)
        assert out["next", "reward"].item() == pytest.approx(reward, rel=1e-6, abs=1e-7)
        assert torch.equal(out["next", "pixels"], torch.from_numpy(frame.copy()).permute(2, 0, 1).div(255))
    np.testing.assert_allclose(ref.physics.get_state(), raw.physics.get_state())
    env.close()


def test_dmc_episode_length_and_truncation():
    # time_limit 0.2 s = 20 control steps of 10 ms = 10 agent steps at action repeat 2
    env = make_dmc_env("cartpole", "swingup", image_size=16, action_repeat=2, seed=0, time_limit=0.2)
    td = env.rollout(50, UniformRandomPolicy(env.action_spec, seed=0), break_when_any_done=True)
    assert td.shape == (10,)
    done = td["next", "done"].reshape(-1)
    assert done[-1] and not done[:-1].any()
    assert td["next", "truncated"][-1].item() and not td["next", "terminated"][-1].item()
    env.close()


def test_dmc_seed_reproducible():
    a = make_dmc_env("cartpole", "swingup", image_size=16, seed=7).reset()["pixels"]
    b = make_dmc_env("cartpole", "swingup", image_size=16, seed=7).reset()["pixels"]
    c = make_dmc_env("cartpole", "swingup", image_size=16, seed=8).reset()["pixels"]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("domain, task, action_dim, repeat, time_limit", [
    ("cartpole", "swingup", 1, 4, 0.5),  # 12 decisions per episode (10 ms control steps)
    ("reacher", "easy", 2, 2, 0.2),  # 5 decisions (20 ms); each episode places its target in the model
    ("quadruped", "escape", 12, 2, 0.1),  # its terrain too, which a rendering context must be sent again
])
def test_dmc_resume_state_continues_the_episode_and_the_next_ones_in_a_fresh_env(
        tmp_path, domain, task, action_dim, repeat, time_limit):
    # The state travels through a weights_only checkpoint load, into an env built with another seed, mid-episode:
    # the frames, rewards and ends that follow, and the initial states of the episodes after, are bitwise the same.
    # Reacher's target lies in the model (geom_pos), not in the physics state: the resumed episode must keep it.
    from torchrl.envs.utils import step_mdp

    from d4func.envs.resumable import get_env_state, set_env_state, supports_resume_state

    def make(seed):
        return make_dmc_env(domain, task, image_size=16, action_repeat=repeat, seed=seed, time_limit=time_limit)

    generator = torch.Generator().manual_seed(0)
    actions = [torch.rand(action_dim, generator=generator) * 2 - 1 for _ in range(40)]

    def play(env, td, actions):
        seen = []
        for action in actions:
            td = env.step(td.set("action", action))
            seen += [td["next", "pixels"].clone(), td["next", "reward"].clone(), td["next", "done"].clone()]
            done = bool(td["next", "done"])
            td = step_mdp(td)
            if done:
                td = env.reset()
                seen.append(td["pixels"].clone())
        return seen

    env = make(3)
    assert supports_resume_state(env)
    td = env.reset()
    play(env, td, actions[:5])  # mid-episode
    td = step_mdp(env.step(td.set("action", actions[5])))
    torch.save(get_env_state(env), tmp_path / "state.pt")
    carried = td.clone()
    expected = play(env, td, actions[6:])
    resumed = make(99)
    resumed.reset()
    set_env_state(resumed, torch.load(tmp_path / "state.pt", weights_only=True))
    got = play(resumed, carried, actions[6:])
    assert len(got) == len(expected) > 3 * len(actions[6:])  # two episodes ended on the way
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    fresh = make(99)
    fresh.reset()
    assert not all(torch.equal(a, b) for a, b in zip(play(fresh, carried.clone(), actions[6:]), expected, strict=False))


def test_dmc_multicamera():
    multi = make_dmc_env("cartpole", "swingup", image_size=64, camera_ids=(0, 1), seed=2)
    single = make_dmc_env("cartpole", "swingup", image_size=64, camera_ids=(1,), seed=2)
    assert multi.observation_spec["pixels"].shape == (2, 3, 64, 64)
    actions = _random_actions(2, 1, seed=0)
    tm, ts = multi.reset(), single.reset()
    for a in actions:
        om, tm = _step(multi, tm, a)
        os_, ts = _step(single, ts, a)
        px = om["next", "pixels"]
        assert px.shape == (2, 3, 64, 64) and px.dtype == torch.float32
        assert (px[0] - px[1]).abs().mean() > 0.01  # two different viewpoints
        assert torch.equal(px[1], os_["next", "pixels"])  # camera 1 of the pair = camera 1 alone
    multi.close()
    single.close()


def test_make_env_stacks_the_cameras_in_the_order_the_name_lists_them():
    reversed_ = make_env("dmc:cartpole-swingup@1,0", seed=2, image_size=16).reset()["pixels"]
    ordered = make_dmc_env("cartpole", "swingup", image_size=16, camera_ids=(0, 1), seed=2).reset()["pixels"]
    assert reversed_.shape == (2, 3, 16, 16) and not torch.equal(ordered[0], ordered[1])
    assert torch.equal(reversed_, ordered.flip(0))


def test_make_env_passes_the_seed_and_image_size_to_reach_and_crafter():
    from d4func.envs.reach import make_reach_env

    def starts(env):
        return [env.reset()["pixels"] for _ in range(4)]

    got, expected = starts(make_env("reach", seed=5, image_size=32)), starts(make_reach_env(image_size=32, seed=5))
    assert got[0].shape == (3, 32, 32) and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(got, starts(make_reach_env(image_size=32)), strict=True))
    assert make_env("crafter", seed=5).base_env._env._seed == 5  # the seed of its sequence of worlds


def test_crafter_accepts_its_smallest_image_size():
    env = make_crafter_env(image_size=18, length=3)
    assert env.reset()["pixels"].shape == (3, 18, 18)
    with pytest.raises(ValueError, match="image_size must be >= 18 .* got 17"):
        make_crafter_env(image_size=17)


def test_dmc_bad_arguments():
    with pytest.raises(ValueError, match="camera id 5"):
        make_dmc_env("cartpole", "swingup", camera_ids=(0, 5))
    with pytest.raises(ValueError, match="nope"):
        make_dmc_env("cartpole", "nope")
    with pytest.raises(ValueError, match="action_repeat"):
        make_dmc_env("cartpole", "swingup", action_repeat=0)


def test_collector_runs_random_policy_on_dmc():
    env = make_dmc_env("cartpole", "swingup", image_size=32, seed=0)
    collector = Collector(env, None, frames_per_batch=4, total_frames=8)
    batches = list(collector)
    collector.shutdown()
    assert len(batches) == 2
    for b in batches:
        assert b.shape == (4,)
        assert b["pixels"].shape == (4, 3, 32, 32)
        assert b["action"].abs().max() <= 1
        assert ("collector", "traj_ids") in b.keys(True)
    steps = torch.cat([b["step_count"].reshape(-1) for b in batches])
    assert steps.tolist() == list(range(8))


def test_env_names():
    assert parse_dmc_name("dmc:cartpole-swingup") == ("cartpole", "swingup", (0,))
    assert parse_dmc_name("dmc:cartpole-swingup@0,1") == ("cartpole", "swingup", (0, 1))
    assert parse_dmc_name("ball_in_cup-catch") == ("ball_in_cup", "catch", (0,))
    with pytest.raises(ValueError, match="camera list"):
        parse_dmc_name("dmc:cartpole-swingup@a")
    for bad in ("dmc:cartpole", "dmc:walker-run-fast@0"):
        with pytest.raises(ValueError, match=f"bad DMC env name '{bad}'"):
            parse_dmc_name(bad)
    with pytest.raises(ValueError, match="unknown env name"):
        env_config("atari:pong")
    assert env_config("dmc:cartpole-swingup@0,1")["camera_ids"] == [0, 1]
    assert env_config("crafter", seed=3) == {"name": "crafter", "kind": "crafter", "image_size": 64, "seed": 3}


# --------------------------------------------------------------------------------------------------------------
# Crafter


def test_crafter_specs():
    env = make_env("crafter", seed=0)
    check_env_specs(env)
    assert env.action_spec.space.n == 17 and env.action_spec.shape == ()
    assert env.observation_spec["pixels"].shape == (3, 64, 64)
    assert env.observation_spec["achievements"].shape == (22,)
    assert len(CRAFTER_ACHIEVEMENTS) == 22 and "collect_diamond" in CRAFTER_ACHIEVEMENTS
    td = env.reset()
    assert td["pixels"].dtype == torch.float32 and 0 <= td["pixels"].min() and td["pixels"].max() <= 1
    assert not td["achievements"].any()
    with pytest.raises(ValueError, match="image_size"):
        make_crafter_env(image_size=4)


def test_crafter_achievements_tracked_across_episode():
    # A 60-step episode limit guarantees the reset path runs (truncation) even if the random player survives.
    env = make_crafter_env(seed=0, length=60)
    player_env = env.base_env._env
    policy = UniformRandomPolicy(env.action_spec, seed=0)
    td = env.reset()
    previous = td["achievements"]
    n_done = 0
    unlocked_any = False
    for _ in range(150):
        out = env.step(policy(td.clone()))
        ach = out["next", "achievements"]
        # the vector is exactly crafter's own record of this episode, and only grows within it
        assert ach.tolist() == [player_env._player.achievements[n] > 0 for n in CRAFTER_ACHIEVEMENTS]
        assert (ach | previous).equal(ach)
        unlocked_any |= bool(ach.any())
        td = env.maybe_reset(env.step_mdp(out))
        previous = td["achievements"]
        if out["next", "done"].item():
            n_done += 1
            assert out["next", "terminated"].item() != out["next", "truncated"].item()
            assert not td["achievements"].any()  # a new episode starts with nothing unlocked
            assert td["is_init"].item() and td["step_count"].item() == 0
    assert unlocked_any, "a seeded random run of 150 steps unlocks something (e.g. collect_sapling)"
    assert n_done >= 2  # 150 steps with episodes of at most 60: the reset path ran


def test_crafter_seeded_worlds():
    # world generation takes ~1 s per reset on this CPU: keep resets few
    env = make_crafter_env(seed=1)
    a = env.reset()["pixels"]
    env.set_seed(2)
    c = env.reset()["pixels"]
    env.set_seed(1)  # restarts seed 1's sequence of worlds
    b = env.reset()["pixels"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crafter_score_hand_cases():
    assert crafter_score([0.0] * 22) == pytest.approx(0.0, abs=1e-12)
    assert crafter_score([100.0] * 22) == pytest.approx(100.0)
    assert crafter_score([100.0, 0.0]) == pytest.approx(math.sqrt(101.0) - 1.0)
    assert crafter_score({"a": 3.0, "b": 15.0}) == pytest.approx(math.sqrt(4.0 * 16.0) - 1.0)
    assert crafter_score(torch.tensor([10.0, 10.0, 10.0])) == pytest.approx(10.0)
    # the geometric mean sits below the arithmetic mean when rates differ
    assert crafter_score([90.0, 10.0]) < 50.0
    for bad in ([], [-1.0], [100.5]):
        with pytest.raises(ValueError):
            crafter_score(bad)


def test_achievement_success_rates():
    eps = torch.zeros(4, 22, dtype=torch.bool)
    eps[:, 0] = True
    eps[:2, 1] = True
    rates = achievement_success_rates(eps)
    assert rates[0] == 100.0 and rates[1] == 50.0 and rates[2:].eq(0).all()
    with pytest.raises(ValueError, match="episodes"):
        achievement_success_rates(torch.zeros(4, 21, dtype=torch.bool))
    with pytest.raises(ValueError, match="no episodes"):  # not a NaN rate per achievement
        achievement_success_rates(torch.zeros(0, 22, dtype=torch.bool))


def test_make_env_max_episode_steps_truncates_dmc_and_crafter():
    from d4func.envs.registry import make_env

    dmc = make_env("dmc:cartpole-swingup", image_size=16, action_repeat=4, max_episode_steps=7)
    rollout = dmc.rollout(20, break_when_any_done=False)
    assert rollout["next", "truncated"].squeeze(-1).nonzero().flatten().tolist() == [6, 13]
    crafter = make_env("crafter", max_episode_steps=5)
    rollout = crafter.rollout(12, break_when_any_done=False)
    assert rollout["next", "done"].squeeze(-1).nonzero().flatten().tolist()[:1] == [4]


def test_a_time_limit_inside_an_action_repeat_ends_the_episode_there():
    """5 control steps at action repeat 2: the third agent step hits the limit after one repeat and must end the
    episode (stepping on would let dm_control reset by itself, unseen)."""
    env = make_dmc_env("cartpole", "swingup", image_size=16, action_repeat=2, seed=0, time_limit=0.05)
    td = env.rollout(10, UniformRandomPolicy(env.action_spec, seed=0), break_when_any_done=False)
    done = td["next", "done"].reshape(-1)
    assert done[:3].tolist() == [False, False, True]
    assert td["next", "truncated"][2].item() and not td["next", "terminated"][2].item()
    env.close()


def test_a_termination_inside_an_action_repeat_ends_the_step_there_as_terminated():
    """A task that ends with discount 0 (a death, not the time limit) on the second of three repeats: the agent
    step stops there, sums the two rewards, and reports terminated (no bootstrap), not truncated."""
    from dm_env import StepType

    env = make_dmc_env("cartpole", "swingup", image_size=16, action_repeat=3, seed=0)
    raw = env.base_env._env._env
    rewards, step = [], raw.step

    def step_that_dies_on_the_second_call(action):
        time_step = step(action)
        rewards.append(time_step.reward)
        if len(rewards) == 2:
            time_step = time_step._replace(step_type=StepType.LAST, discount=0.0)
        return time_step

    raw.step = step_that_dies_on_the_second_call
    out = env.step(env.reset().set("action", torch.tensor([0.3])))
    assert len(rewards) == 2
    assert out["next", "reward"].item() == pytest.approx(sum(rewards), rel=1e-6)
    assert out["next", "terminated"].item() and not out["next", "truncated"].item() and out["next", "done"].item()
    env.close()


@pytest.mark.parametrize("repeat", [1, 4])
def test_make_env_passes_the_action_repeat_to_the_env_and_its_config(repeat):
    """One agent step of make_env's DMC env sums `repeat` control steps of the raw task (same seed, same action)."""
    from dm_control import suite

    env = make_env("dmc:cartpole-swingup", seed=3, image_size=16, action_repeat=repeat)
    assert env_config("dmc:cartpole-swingup", action_repeat=repeat)["action_repeat"] == repeat
    td = env.reset()
    ref = suite.load("cartpole", "swingup", task_kwargs={"random": 0})
    ref.reset()
    with ref.physics.reset_context():  # the same start as make_env's env
        ref.physics.set_state(env.base_env._env._env.physics.get_state())
    for action in (0.7, -0.4):
        out = env.step(td.set("action", torch.tensor([action])))
        td = out["next"]
        expected = sum(ref.step(np.array([action])).reward for _ in range(repeat))
        assert out["next", "reward"].item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    env.close()


def test_make_env_episode_lengths_and_image_sizes_reach_reach_and_crafter():
    reach = make_env("reach", max_episode_steps=5)
    rollout = reach.rollout(12, break_when_any_done=False)
    assert rollout["next", "truncated"].squeeze(-1).nonzero().flatten().tolist()[:1] == [4]
    assert make_env("crafter", image_size=32).reset()["pixels"].shape == (3, 32, 32)
    assert make_env("crafter", image_size=32, max_episode_steps=9).reset()["pixels"].shape == (3, 32, 32)


def test_uniform_random_policy_covers_the_whole_box():
    from torchrl.data import Bounded

    policy = UniformRandomPolicy(Bounded(-1.0, 1.0, shape=(2,)), seed=0)
    draws = torch.stack([policy(TensorDict({}, batch_size=[]))["action"] for _ in range(500)])
    assert draws.min() < -0.95 and draws.max() > 0.95 and draws.abs().max() <= 1.0


def test_crafter_separates_death_from_the_time_limit():
    """Death ends an episode as terminated (no bootstrap past it), the step limit as truncated, never both."""
    env = make_crafter_env(seed=0, length=5)
    td = env.reset()
    for _ in range(5):
        out = env.step(td.set("action", torch.tensor(0)))
        td = out["next"]
    assert td["truncated"].item() and not td["terminated"].item()
    td = env.reset()
    env.base_env._env._player.inventory["health"] = 0  # the next tick finds the player dead
    td = env.step(td.set("action", torch.tensor(0)))["next"]
    assert td["terminated"].item() and not td["truncated"].item() and td["done"].item()


def test_evaluation_scores_crafter_by_what_each_episode_unlocked_by_its_end():
    """`run_episodes` scores an episode by the achievements unlocked when it ends (the vector only grows within an
    episode), so a score read at its first step, before anything is unlocked, would be 0."""
    from d4func.train.evaluation import run_episodes

    env = make_crafter_env(seed=0, length=60)
    player_env = env.base_env._env
    policy = UniformRandomPolicy(env.action_spec, seed=0)
    unlocked = []
    for _ in range(3):
        result = run_episodes(env, policy, 1)
        final = torch.tensor([player_env._player.achievements[n] > 0 for n in CRAFTER_ACHIEVEMENTS])
        assert result["crafter_score"] == pytest.approx(crafter_score(achievement_success_rates(final[None])))
        unlocked.append(final)
    assert any(u.any() for u in unlocked), "three seeded random episodes of 60 steps unlock something"
