"""The Reach env itself: what its frames draw, when it rewards and ends, how it draws and reseeds its starts, and its
resume state (the pipeline-level Reach tests are in test_reach_every_start.py and test_reach_blind_bound.py)."""

from __future__ import annotations

import torch

from d4func.envs.reach import REACH_LENGTH, ReachEnv, make_reach_env

N_CELLS = 8
LEFT, STAY, RIGHT = 0, 1, 2


def _starts(env, n: int) -> list[tuple[int, int]]:
    starts = []
    for _ in range(n):
        env.reset()
        starts.append((env.base_env.agent, env.base_env.goal))
    return starts


def test_a_frame_fills_the_agents_cell_red_and_the_goals_cell_green_and_nothing_else():
    env = ReachEnv(image_size=16, n_cells=N_CELLS)
    env.start_next_episode_at(2, 5)
    pixels = env.reset()["pixels"]
    expected = torch.zeros(16, 16, 3, dtype=torch.uint8)
    expected[:, 4:6, 0] = 255  # cell 2 of 8 is columns 4..5 at 2 pixels per cell
    expected[:, 10:12, 1] = 255  # cell 5
    assert torch.equal(pixels, expected)


def test_reward_is_paid_after_the_move_for_every_step_on_the_goal_and_only_truncation_ends_the_episode():
    env = make_reach_env(seed=0)
    env.base_env.start_next_episode_at(0, 2)
    td = env.reset()
    actions = [RIGHT, RIGHT, STAY, RIGHT, LEFT] + [STAY] * (REACH_LENGTH - 5)
    rewards, truncated, terminated = [], [], []
    for action in actions:
        td = env.step(td.set("action", torch.tensor(action)))
        rewards.append(td["next", "reward"].item())
        truncated.append(td["next", "truncated"].item())
        terminated.append(td["next", "terminated"].item())
        td = td["next"]
    # cells after each move: 1, 2 (goal), 2, 3, 2, then stays on the goal
    assert rewards == [0.0, 1.0, 1.0, 0.0] + [1.0] * (REACH_LENGTH - 4)
    assert truncated == [False] * (REACH_LENGTH - 1) + [True]
    assert not any(terminated)  # standing on the goal does not end the episode


def test_drawn_starts_never_put_the_goal_on_the_agent_and_cover_every_pair():
    starts = _starts(make_reach_env(seed=3), 400)
    assert all(agent != goal for agent, goal in starts)
    assert len(set(starts)) == N_CELLS * (N_CELLS - 1)  # 56 pairs, 400 draws: every one seen


def test_set_seed_restarts_the_drawn_starts_of_that_seed():
    env = make_reach_env(seed=0)
    _starts(env, 3)
    env.set_seed(5)
    reseeded = _starts(env, 6)
    assert reseeded == _starts(make_reach_env(seed=5), 6)
    assert reseeded != _starts(make_reach_env(seed=0), 6)


def test_a_resume_state_continues_the_episode_and_the_starts_after_it_in_an_env_of_another_seed():
    def play(env, td, actions):
        seen = []
        for action in actions:
            out = env.step(td.set("action", torch.tensor(action)))
            seen += [out["next", "pixels"].clone(), out["next", "reward"].clone(), out["next", "done"].clone()]
            td = env.maybe_reset(env.step_mdp(out))
            seen.append(td["pixels"].clone())
        return seen, td

    actions = torch.randint(3, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    env = make_reach_env(seed=1)
    _, td = play(env, env.reset(), actions[:5])  # mid-episode
    state = env.base_env.get_resume_state()
    expected, _ = play(env, td.clone(), actions[5:])  # steps 6..40: episodes end at steps 12, 24 and 36
    resumed = make_reach_env(seed=9)
    resumed.reset()
    resumed.base_env.set_resume_state(state)
    got, _ = play(resumed, td.clone(), actions[5:])
    assert sum(bool(done) for done in expected[2::4]) == 3
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_moves_into_a_wall_leave_the_agent_in_the_end_cell():
    env = ReachEnv(image_size=16, n_cells=N_CELLS)
    for agent, goal, action in ((0, 4, LEFT), (N_CELLS - 1, 4, RIGHT)):
        env.start_next_episode_at(agent, goal)
        td = env.reset()
        for _ in range(2):
            td = env.step(td.set("action", torch.tensor(action)))["next"]
        assert env.agent == agent
        red_row = (torch.arange(16) // 2 == agent).to(torch.uint8) * 255  # 2 pixels per cell
        assert torch.equal(td["pixels"][0, :, 0], red_row)
