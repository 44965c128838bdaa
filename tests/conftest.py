"""Test-session settings."""

import os

import torch

# The test models are tiny: one intra-op thread beats two, whose hand-offs cost more than these small ops (and
# oversubscribe a 2-core CI runner when hypothesis and the OS want the other core). Override with D4FUNC_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("D4FUNC_TEST_THREADS", "1")))
