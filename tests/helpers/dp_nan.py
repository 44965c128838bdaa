"""`d4func train ARGS` with a NaN planted in rank 1's world-model loss at loop gradient step NAN_STEP (environment,
default 3), for tests/test_distributed.py under torchrun: only that rank's loss goes bad, so the stop must still
reach both ranks at once (no rank left waiting in a collective) and rank 0 must save the state from before it."""

from __future__ import annotations

import os
import sys

import d4func.train.agent_step as agent_step
from d4func.cli import main

NAN_STEP = int(os.environ.get("NAN_STEP", "3"))
clean_loss = agent_step.agent_finetune_loss
calls = 0


def loss_with_a_nan_on_rank_1(*args, **kwargs):
    global calls
    loss, metrics = clean_loss(*args, **kwargs)
    calls += 1
    if os.environ["RANK"] == "1" and calls == NAN_STEP + 1:  # the first call is loop gradient step 0
        metrics = {**metrics, "reward_ce": metrics["reward_ce"] * float("nan")}
        loss = loss * float("nan")
    return loss, metrics


# agent_finetune_step reads the loss from its module's globals at call time.
agent_step.agent_finetune_loss = loss_with_a_nan_on_rank_1

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
