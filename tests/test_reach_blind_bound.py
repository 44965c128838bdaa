"""Reach's return is out of reach of any policy blind to the goal: the reason the CI learning test's margin
(`tests/test_learning_e2e.py`: random + 2.0, about 3.1) can only be cleared by reading the goal from pixels.

Reach is deterministic given the start, so a policy that does not use the goal plays a fixed action sequence from
each start. Its path is then independent of the goal, which is uniform over the n_cells - 1 cells other than the
agent's: each of the `length` steps ends on the goal with probability at most 1/(n_cells - 1), so the expected
return over all starts is at most length/(n_cells - 1) = 12/7 = 1.71 (8 cells, 12 steps).
"""

from __future__ import annotations

from fractions import Fraction

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d4func.envs.reach import REACH_LENGTH, REACH_N_ACTIONS, ReachEnv

N_CELLS = 8
BLIND_BOUND = Fraction(REACH_LENGTH, N_CELLS - 1)


def mean_return_over_every_start(actions: list[int]) -> Fraction:
    """Exact mean return of an open-loop action sequence over all n_cells * (n_cells - 1) starts."""
    env = ReachEnv(image_size=N_CELLS, n_cells=N_CELLS)
    total, starts = 0, 0
    for agent in range(N_CELLS):
        for goal in range(N_CELLS):
            if goal == agent:
                continue
            env.start_next_episode_at(agent, goal)
            td = env.reset()
            for action in actions:
                td = env.step(td.set("action", torch.tensor(action)))
                total += int(td.get(("next", "reward")).item())
                td = td.get("next")
            starts += 1
    return Fraction(total, starts)


def test_always_right_scores_three_halves():
    # By hand: the goal lies right of the agent in 28 of the 56 starts; the agent passes over it once (1 step on
    # it), except when it is the last cell (7 starts), where it stays from step 7 - a on: 13 - (7 - a) steps.
    # (21 * 1 + sum(6 + a for a in 0..6)) / 56 = (21 + 63) / 56 = 3/2.
    assert mean_return_over_every_start([2] * REACH_LENGTH) == Fraction(3, 2)
    assert mean_return_over_every_start([1] * REACH_LENGTH) == 0  # staying never meets the goal


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, REACH_N_ACTIONS - 1), min_size=REACH_LENGTH, max_size=REACH_LENGTH))
def test_no_goal_blind_action_sequence_beats_length_over_other_cells(actions):
    assert mean_return_over_every_start(actions) <= BLIND_BOUND
