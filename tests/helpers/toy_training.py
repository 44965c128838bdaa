"""A small but real resumable training run, used in-process (exact resume) and as a subprocess (SIGKILL tests).

Each step "collects" one 4-step episode into a memmapped replay on disk, samples a `[2, 4]` batch from it and
takes one shortcut-forcing step of a tiny dynamics model (`dynamics_train_step`). Every RNG kind a loop uses draws
here: torch's global RNG (actions), numpy's and python's global RNGs (a data scale), explicit torch generators
(observations, the loss's tau/d/noise) and the replay sampler's generator. Every `every` steps it checkpoints the
train state, the step, the replay position, the loss history and the config; on start it resumes from the newest
checkpoint in `run_dir` if there is one.

Command line (subprocess tests): `python toy_training.py RUN_DIR --steps N --every K [--sleep S]
[--pause-step P --pause-stage partial|written]`; prints `step i` after each step and `saved i` after each
checkpoint, flushed, and with --pause-* blocks inside the checkpoint write of step P (after printing
`paused <stage> <tmp path>`) so the test can SIGKILL it there. At the end it writes `RUN_DIR/final.pt`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase

from d4func.config import TransformerConfig
from d4func.data.replay import make_replay, save_replay
from d4func.dynamics import Dynamics, DynamicsConfig, actions_into_frames
from d4func.functional import init, template
from d4func.optim import AdamWConfig
from d4func.train import checkpoint
from d4func.train.dynamics_step import dynamics_train_step
from d4func.train.state import new_train_state

CFG = DynamicsConfig(
    transformer=TransformerConfig(d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, time_every=2),
    latent_tokens=4, latent_dim=4, pack=2, n_registers=1, action_dim=2, k_max=4, sampling_steps=2,
)
OPT = AdamWConfig(lr=1e-3)
EPISODE = 4  # transitions per collected episode = sequence length sampled
BATCH = 2


def _episode(step: int, env_gen: torch.Generator) -> TensorDict:
    scale = float(np.random.uniform(0.5, 1.0)) * (0.5 + 0.5 * random.random())
    latents = (torch.rand(EPISODE, CFG.latent_tokens, CFG.latent_dim, generator=env_gen) * 2 - 1) * scale
    return TensorDict(
        {
            "latents": latents,
            "action": torch.rand(EPISODE, CFG.action_dim) * 2 - 1,  # global torch RNG
            "step_count": torch.arange(EPISODE).unsqueeze(-1),
            ("collector", "traj_ids"): torch.full((EPISODE,), step),
        },
        [EPISODE],
    )


def run(
    run_dir: str | Path,
    steps: int,
    every: int,
    *,
    seed: int = 0,
    keep_last: int = 2,
    sleep: float = 0.0,
    log: Callable[[str], None] = lambda line: None,
) -> tuple[TensorDictBase, torch.Tensor]:
    """Train until `steps` (resuming from `run_dir`'s newest checkpoint); checkpoint every `every` steps (0: never).
    Returns the final train state and the per-step loss history."""
    run_dir = Path(run_dir)
    model = template(Dynamics, CFG)
    env_gen = torch.Generator().manual_seed(seed + 1)
    loss_gen = torch.Generator().manual_seed(seed + 2)
    generators = {"env": env_gen, "loss": loss_gen}
    rb = make_replay(256, EPISODE, BATCH, path=run_dir / "replay", seed=seed + 3, share_next_pixels=False)
    ckpt = checkpoint.restore(run_dir, generators)
    if ckpt is None:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        state, start, history = new_train_state(init(model, seed)), 0, []
    else:
        state, start = ckpt.payload["states"]["dynamics"], ckpt.payload["step"]
        history = list(ckpt.payload["loss_history"].unbind(0))
        checkpoint.restore_replay_position(rb, ckpt.payload["replay"])
        if checkpoint.config_from_dict(DynamicsConfig, ckpt.payload["config"]) != CFG:
            raise RuntimeError("checkpoint config differs from this run's")
    for step in range(start, steps):
        rb.extend(_episode(step, env_gen))
        if step == 0:
            save_replay(rb)  # storage metadata, once; checkpoints carry the position from here on
        batch = rb.sample()
        actions, mask = actions_into_frames(batch["action"])
        state, metrics = dynamics_train_step(state, batch["latents"], actions, loss_gen, model=model, opt=OPT,
                                             ema_decay=0.9, action_mask=mask)
        history.append(metrics["loss"])
        log(f"step {step + 1}")
        if sleep:
            time.sleep(sleep)
        if every and (step + 1) % every == 0:
            payload = {
                "states": {"dynamics": state},
                "step": step + 1,
                "replay": checkpoint.replay_position(rb),
                "loss_history": torch.stack(history),
                "config": checkpoint.config_to_dict(CFG),
            }
            checkpoint.save_checkpoint(run_dir, step + 1, payload, keep_last=keep_last, generators=generators)
            log(f"saved {step + 1}")
    return state, torch.stack(history)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--every", type=int, required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--pause-step", type=int, default=None)
    parser.add_argument("--pause-stage", choices=("partial", "written"), default="written")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    def emit(line: str) -> None:
        print(line, flush=True)

    if args.pause_step is not None:
        target = checkpoint.checkpoint_name(args.pause_step)

        def pause(stage: str, tmp: Path) -> None:
            if stage == args.pause_stage and tmp.name.startswith("." + target):
                emit(f"paused {stage} {tmp}")
                time.sleep(600)  # the test kills us here

        checkpoint._write_hook = pause
    state, history = run(args.run_dir, args.steps, args.every, sleep=args.sleep, log=emit)
    torch.save({"state": state.to_dict(), "history": history}, Path(args.run_dir) / "final.pt")
    emit("done")


if __name__ == "__main__":
    main(sys.argv[1:])
