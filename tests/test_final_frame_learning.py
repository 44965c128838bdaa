"""`replay.final_frame` end to end: a reward paid only on an episode's last transition (a terminal success) is
learned from an imported offline dataset.

Episodes of 6 steps get darker-to-lighter frames, a white frame after the last action, and reward 1 for that last
action only. Without the final frame that reward never has a frame to be predicted at: the reward head predicts
0 everywhere (measured: 0.0 / 0.0 / 0.0 into the last three frames after 1,000 offline steps). With it, the same
run predicts 0.80 into the white frame and under 0.001 elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from d4func.data.import_episodes import import_episodes
from d4func.dynamics import actions_into_frames
from d4func.heads import reward_dist
from d4func.imagination import commit_frames, world_model_fn
from d4func.tokenizer import encode
from d4func.train import checkpoint
from d4func.train.loop import train
from d4func.train.phases import build_models
from d4func.train.run_config import load_run_config
from d4func.transformer import empty_cache

DEBUG = str(Path(__file__).resolve().parents[1] / "experiments/configs/debug.yaml")
STEPS = 6


def success_episode(rng: np.random.Generator) -> dict[str, np.ndarray | bool]:
    frames = np.zeros((STEPS + 1, 32, 32, 3), dtype=np.uint8)
    frames[:STEPS] = (40 + 20 * np.arange(STEPS, dtype=np.uint8))[:, None, None, None]
    frames[STEPS] = 255  # the frame the successful last action leads to
    frames[..., 0] = rng.integers(0, 40, size=(STEPS + 1, 32, 32))
    reward = np.zeros(STEPS, dtype=np.float32)
    reward[-1] = 1.0
    return {"pixels": frames, "action": rng.uniform(-1, 1, (STEPS, 1)).astype(np.float32), "reward": reward,
            "terminated": True}


@pytest.mark.slow
def test_a_terminal_reward_is_learned_at_the_final_frame(tmp_path):
    rng = np.random.default_rng(0)
    import_episodes([success_episode(rng) for _ in range(16)], tmp_path / "data")
    cfg = load_run_config(DEBUG, [
        f"run_dir={tmp_path / 'run'}", "loop.mode=offline", f"loop.offline_data={tmp_path / 'data'}",
        "loop.offline_steps=1000", "loop.agent_start=100000", "loop.gif_every=100000", "loop.checkpoint_every=100000",
        "replay.seq_len=4", "replay.context_len=2", "replay.final_frame=true", "env.eval_episodes=0",
        "optim.world_model.lr=1e-3"])
    train(cfg, progress=False)
    states = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path / "run")).payload["states"]
    models = build_models(cfg)

    episode = success_episode(np.random.default_rng(1))  # unseen noise
    frames = torch.as_tensor(episode["pixels"]).permute(0, 3, 1, 2).float().div(255)[None, STEPS - 3:]
    actions = torch.cat([torch.as_tensor(episode["action"])[None, STEPS - 3:], torch.zeros(1, 1, 1)], dim=1)
    with torch.no_grad():
        latents = encode(models.tokenizer, states["tokenizer"]["params"], frames)
        actions_in, mask_in = actions_into_frames(actions)
        model_fn = world_model_fn(models.dynamics, states["world_model"]["params", "dynamics"])
        agent_out, _ = commit_frames(model_fn, models.dynamics.cfg, latents, actions_in, mask_in, empty_cache(1),
                                     torch.Generator().manual_seed(0))
        # the reward into each of the last three frames: two ordinary steps, then the success
        predicted = reward_dist(models.heads, states["world_model"]["params", "heads", "reward"],
                                agent_out[:, 1:]).mean().reshape(-1)
    assert predicted[:2].abs().max() < 0.2 and predicted[2] > 0.5, predicted.tolist()
