"""Is a run's world model short of training? Continue it on the run's own replay and watch what changes.

An online run of `d4func/train/loop.py` trains its tokenizer, dynamics and heads side by side on `train_ratio` gradient
steps per env step. When its imagination cannot move the policy, the first suspects are a dynamics that ignores its
actions (`action_effect` in `world_model_quality.py`) and a reward head that explains little. This script asks whether
more world-model gradient steps on the same data fix them, without new env steps: it loads the newest checkpoint,
reopens the replay as of that checkpoint (`open_run_replay`; an offline run's dataset), and trains only the world-model
phase (dynamics with shortcut forcing, BC and reward heads: `agent_finetune_step`, the loop's own update) on the
**frozen** tokenizer, whose latents then stop moving under the dynamics (the paper trains the tokenizer first and
freezes it, Sec. 3). `--train-tokenizer` keeps training the tokenizer as the loop does (every `loop.tokenizer_every`
steps), which separates "too few steps" from "latents that keep moving". `--set KEY=VALUE` changes the run's config for
these steps (a training option such as `dynamics.clean_context_fraction=0.5` or `optim.world_model.lr=1e-4`; nothing
that changes a parameter's shape), to try a fix on the same model. `--fresh` starts the dynamics and heads from new
weights instead (the tokenizer still comes from the checkpoint), so architecture options
(`dynamics.transformer.rope_base=100`, ...) can be compared on the same latents. Every `--eval-every` steps it measures,
on one fixed set of held-out clips with one noise seed:

* `open_loop_pooled_own_actions` / `_other_actions`: pooled PSNR of the open-loop rollout under the clips' own
  actions and under another clip's (`world_model_quality.action_conditioning`);
* `action_effect`: the mean absolute pixel change between those two rollouts; compare it with the real env's
  (`experiments/real_action_effect.py`);
* `counterfactual_action_r2` (pixels), `counterfactual_latent_r2` (latents) and `counterfactual_next_latent_r2` (the
  model's mean of the first latent frame), with the per-step lists of the last two (open loop; one step from the
  env's frames): how much of the real env's change between two action sequences from one state the model's change
  explains
  (`world_model_quality.counterfactual_action_metrics`; None for envs that cannot restore a state), on `--clips`
  fixed states;
* `psnr_k4_pooled` and `psnr_copy_last_pooled`: the next frame at K = 4 against copying the last frame, and
  `psnr_reconstruction_pooled`, the tokenizer's own ceiling (fixed while the tokenizer is frozen);
* `reward_r2`: the reward head against the env's rewards (`world_model_quality.reward_metrics`);
* `latent_next_mse`, `latent_copy_last_mse`, `latent_copy_noisy_last_mse`, `latent_context_mean_mse`: the first
  frame after the context predicted in latent space from its history (`d4func.next_latent`), against carrying the
  last frame forward (clean, and as the model sees it at tau_ctx) and against the mean of the history.

Nothing in the run directory changes: the replay is only sampled, and the result is written to `--out`
(default `RUN_DIR/more_world_model_steps.json`).

    python experiments/more_world_model_steps.py --run runs/results_cartpole --steps 2000 --eval-every 500 \
        [--train-tokenizer] [--fresh] [--set dynamics.clean_context_fraction=0.5] [--out RUN/more.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase

from d4func.dynamics import actions_into_frames
from d4func.next_latent import next_latent_errors
from d4func.tokenizer import encode
from d4func.tokenizer_loss import tokenizer_train_step
from d4func.train import checkpoint
from d4func.train.agent_step import agent_finetune_step, init_finetune_loss_rms
from d4func.train.phases import Models, build_models, init_states, make_lpips_fn, replay_batch, world_model_batch
from d4func.train.run_config import RunConfig, load_run_config


def _load_quality_module():
    """`experiments/world_model_quality.py` (a script, not a package module) for its loaders and metrics; the copy
    already loaded when there is one, so both scripts share one `LoadedRun` class."""
    if "world_model_quality" in sys.modules:
        return sys.modules["world_model_quality"]
    path = Path(__file__).resolve().parent / "world_model_quality.py"
    spec = importlib.util.spec_from_file_location("world_model_quality", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


wmq = _load_quality_module()


@torch.no_grad()
def measure(run: Any, frames: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, seed: int,
            counterfactual_clips: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The world model of `run` on fixed held-out clips (one noise seed, so two calls differ only by the params),
    and on fixed `counterfactual_clips` (`world_model_quality.counterfactual_clips_for`) when there are some."""
    imagined, _, _ = wmq.open_loop(run, frames, actions, seed)
    counterfactual = wmq.counterfactual_action_metrics(run, counterfactual_clips, seed)
    next_frame = wmq.next_frame_metrics(run, frames, actions, seed)
    rewards_fit = wmq.reward_metrics(run, frames, actions, rewards, seed)
    context_len = run.cfg.replay.context_len
    latents = encode(run.tokenizer, run.tokenizer_params, frames[:, :context_len + 1])
    actions_in, mask = actions_into_frames(actions[:, :context_len + 1])
    latent = next_latent_errors(run.dynamics, run.dynamics_params, latents, actions_in, mask, context_len,
                                torch.Generator().manual_seed(seed))
    return {
        **wmq.action_conditioning(run, frames, actions, imagined, seed),
        **{key: counterfactual[key] for key in ("counterfactual_action_r2", "counterfactual_latent_r2",
                                                "counterfactual_next_latent_r2", "counterfactual_latent_r2_per_step",
                                                "counterfactual_next_latent_r2_per_step",
                                                "counterfactual_reconstruction_r2")},
        "psnr_k4_pooled": next_frame["pooled"]["k4"],
        "psnr_copy_last_pooled": next_frame["pooled"]["copy_last"],
        "psnr_reconstruction_pooled": next_frame["pooled"]["reconstruction"],
        "reward_r2": rewards_fit["reward_r2"],
        "latent_next_mse": latent["model_mse"],
        "latent_copy_last_mse": latent["copy_last_mse"],
        "latent_copy_noisy_last_mse": latent["copy_noisy_last_mse"],
        "latent_context_mean_mse": latent["context_mean_mse"],
    }


def with_overrides(run: Any, overrides: list[str], fresh: bool = False) -> Any:
    """`run` with `key.sub=value` overrides applied to its config and its model templates rebuilt from it; raises
    naming the parameters whose shapes an override would change, of the tokenizer always and of the dynamics and
    heads unless they start `fresh` (the checkpoint's params would not fit)."""
    if not overrides:
        return run
    fixed = [item for item in overrides if item.split("=", 1)[0].startswith(("replay.", "env."))]
    if fixed:
        raise ValueError(f"overrides {fixed} cannot apply: the run's replay is reopened as the run saved it and the "
                         "held-out clips come from the run's own env")
    config_file = Path(run.checkpoint).parent / "config.json"
    cfg = load_run_config(str(config_file), overrides)
    models = build_models(cfg)
    for name, old, new in (("tokenizer", run.tokenizer, models.tokenizer), ("dynamics", run.dynamics, models.dynamics),
                           ("heads", run.heads, models.heads)):
        old_shapes = {k: tuple(v.shape) for k, v in old.state_dict().items()}
        new_shapes = {k: tuple(v.shape) for k, v in new.state_dict().items()}
        if old_shapes != new_shapes and not (fresh and name != "tokenizer"):
            changed = sorted(k for k in old_shapes.keys() | new_shapes.keys() if old_shapes.get(k) != new_shapes.get(k))
            raise ValueError(f"overrides {overrides} change the {name}'s parameters ({', '.join(changed[:4])}"
                             f"{', ...' if len(changed) > 4 else ''}): the checkpoint's params would not fit")
    return dataclasses.replace(run, cfg=cfg, tokenizer=models.tokenizer, dynamics=models.dynamics, heads=models.heads)


def run_replay(run_dir: str | Path, cfg: RunConfig, seed: int):
    """What the run trained on, for sampling: an online run's replay as of its newest checkpoint, or an offline
    run's dataset (`loop.offline_data`, a path relative to the directory the run was started from)."""
    if cfg.loop.mode == "offline":
        from d4func.data.offline import load_offline

        return load_offline(cfg.loop.offline_data, cfg.replay.seq_len, cfg.replay.batch_size, seed=seed)
    return checkpoint.open_run_replay(run_dir, seed=seed)


def continue_world_model(
    run_dir: str | Path,
    steps: int,
    eval_every: int,
    episodes: int = 8,
    clips: int = 16,
    horizon: int = 8,
    seed: int = 0,
    max_steps: int = 200,
    train_tokenizer: bool = False,
    overrides: list[str] | None = None,
    fresh: bool = False,
    log=print,
) -> dict[str, Any]:
    """Train the world-model phase of the run in `run_dir` for `steps` more gradient steps on its replay, its
    tokenizer frozen unless `train_tokenizer`; measure (see the module docstring) at step 0 and every `eval_every`
    steps. `overrides` (`key.sub=value`) change the run's config for the new steps; `fresh` trains the dynamics and
    heads from new weights (seeded as the loop seeds them) on the checkpoint's tokenizer."""
    for name, value, low in (("steps", steps, 1), ("eval_every", eval_every, 1), ("episodes", episodes, 1),
                             ("clips", clips, 2), ("horizon", horizon, 1), ("seed", seed, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    run = with_overrides(wmq.load_run(run_dir), overrides or [], fresh)
    cfg = run.cfg
    states = checkpoint.load_checkpoint(run.checkpoint).payload["states"]
    state: TensorDictBase = states["world_model"]
    if fresh:
        state = init_states(cfg, Models(run.tokenizer, run.dynamics, run.heads))["world_model"]
    elif cfg.finetune.normalize and "loss_rms" not in state.keys():  # --set finetune.normalize=true on a run without
        state = state.clone(recurse=False)
        state["loss_rms"] = init_finetune_loss_rms()
    tokenizer_state: TensorDictBase = states["tokenizer"]
    lpips_fn = make_lpips_fn(cfg) if train_tokenizer else None
    replay = run_replay(run_dir, cfg, seed=cfg.seed + seed)
    frames, actions, rewards = wmq.held_out_clips(run, episodes, clips, horizon, seed, max_steps)
    counterfactual = wmq.counterfactual_clips_for(run, clips, horizon, seed, max_steps)
    generator = torch.Generator().manual_seed(cfg.seed + seed + 7)

    def evaluate(step: int, seconds: float, losses: list[float], dynamics_losses: list[float]) -> dict[str, Any]:
        current = dataclasses.replace(run, tokenizer_params=tokenizer_state["params"],
                                      dynamics_params=state["params", "dynamics"],
                                      heads_params=state["params", "heads"])
        row = {"extra_steps": step, "train_seconds": round(seconds, 1),
               "world_model_loss": sum(losses) / len(losses) if losses else None,
               # The shortcut-forcing term alone: the other two (behaviour cloning, reward) can hide its course.
               "dynamics_loss": sum(dynamics_losses) / len(dynamics_losses) if dynamics_losses else None,
               **measure(current, frames, actions, rewards, seed, counterfactual)}
        log(json.dumps(row))
        return row

    rows = [evaluate(0, 0.0, [], [])]
    losses: list[float] = []
    dynamics_losses: list[float] = []
    seconds = 0.0
    for step in range(1, steps + 1):
        started = time.perf_counter()
        batch = replay_batch(replay.sample(), cfg.replay.final_frame)
        if train_tokenizer and step % cfg.loop.tokenizer_every == 0:
            tokenizer_state, _ = tokenizer_train_step(tokenizer_state, batch["frames"], generator,
                                                      template=run.tokenizer, cfg=cfg.tokenizer_loss,
                                                      optim=cfg.optim.tokenizer, lpips_fn=lpips_fn,
                                                      ema_decay=cfg.optim.ema_decay)
        with torch.no_grad():
            latents = encode(run.tokenizer, tokenizer_state["params"], batch["frames"])
        wm_batch = world_model_batch(latents, batch)
        state, metrics = agent_finetune_step(state, wm_batch, generator, model=run.dynamics, heads=run.heads,
                                             opt=cfg.optim.world_model, cfg=cfg.finetune,
                                             ema_decay=cfg.optim.ema_decay)
        seconds += time.perf_counter() - started
        losses.append(float(metrics["loss"]))
        dynamics_losses.append(float(metrics["dynamics_loss"]))
        if step % eval_every == 0 or step == steps:
            rows.append(evaluate(step, seconds, losses, dynamics_losses))
            losses, dynamics_losses = [], []
    return {
        "run": str(run_dir),
        "checkpoint": str(run.checkpoint),
        "run_step": run.step,
        "env": run.env_name,
        "replay_transitions": replay.transition_count(),
        "episodes": episodes,
        "clips": clips,
        "horizon": horizon,
        "seed": seed,
        "tokenizer": "trained" if train_tokenizer else "frozen",
        "overrides": list(overrides or []),
        "fresh": fresh,
        "batch": [cfg.replay.batch_size, cfg.replay.seq_len],
        "rows": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    num = wmq._num
    header = (f"{'extra steps':>11} {'loss':>7} {'own (dB)':>9} {'other (dB)':>11} {'action effect':>14} "
              f"{'cf. R2':>7} {'latent cf. R2':>13} {'1-step mean cf. R2':>18} "
              f"{'K=4 (dB)':>9} {'copy last':>10} {'reward R2':>10} {'latent: model':>14} {'copy last':>10} "
              f"{'hist. mean':>10}")
    lines = [f"{result['run']} (checkpoint at step {result['run_step']}, {result['replay_transitions']} replay "
             f"transitions), {'a fresh' if result['fresh'] else 'the'} world model trained on with the tokenizer "
             f"{result['tokenizer']}"
             + (f", {' '.join(result['overrides'])}" if result["overrides"] else ""), header]
    for row in result["rows"]:
        lines.append(f"{row['extra_steps']:>11} {num(row['world_model_loss']):>7} "
                     f"{num(row['open_loop_pooled_own_actions']):>9} {num(row['open_loop_pooled_other_actions']):>11} "
                     f"{num(row['action_effect']):>14} {num(row['counterfactual_action_r2']):>7} "
                     f"{num(row.get('counterfactual_latent_r2')):>13} "
                     f"{num(row.get('counterfactual_next_latent_r2')):>18} {num(row['psnr_k4_pooled']):>9} "
                     f"{num(row['psnr_copy_last_pooled']):>10} {num(row['reward_r2']):>10} "
                     f"{num(row['latent_next_mse']):>14} {num(row['latent_copy_last_mse']):>10} "
                     f"{num(row['latent_context_mean_mse']):>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run directory of a d4func.train.loop run (online or offline)")
    parser.add_argument("--steps", type=int, default=2000, help="extra world-model gradient steps")
    parser.add_argument("--eval-every", type=int, default=500, help="gradient steps between measurements")
    parser.add_argument("--episodes", type=int, default=8, help="held-out episodes to roll")
    parser.add_argument("--clips", type=int, default=16, help="clips drawn from them (2 or more)")
    parser.add_argument("--horizon", type=int, default=8, help="frames predicted after the context")
    parser.add_argument("--seed", type=int, default=0, help="held-out env, clips, sampling noise and batches")
    parser.add_argument("--max-steps", type=int, default=200, help="cap on the env steps of one episode")
    parser.add_argument("--train-tokenizer", action="store_true", help="keep training the tokenizer (as the loop)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a training option of the run's config for these steps (repeatable)")
    parser.add_argument("--fresh", action="store_true", help="new dynamics and heads on the run's tokenizer")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default=None, help="JSON path (default RUN/more_world_model_steps.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = continue_world_model(args.run, args.steps, args.eval_every, args.episodes, args.clips, args.horizon,
                                  args.seed, args.max_steps, args.train_tokenizer, args.overrides, args.fresh)
    out = Path(args.out) if args.out else Path(args.run) / "more_world_model_steps.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(format_table(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
