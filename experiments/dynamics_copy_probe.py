"""How fast does a dynamics configuration learn to carry the last frame forward? A probe on synthetic latents.

Predicting the next frame starts with carrying the previous one forward; everything an action changes comes on top.
This probe isolates that skill from any tokenizer or environment. Each training row is a random walk of latents,
`z_t = tanh(atanh(z_{t-1}) + step_t)`, steps Gaussian with std `--step-std`, the first frame uniform in (-1, 1),
shaped like the tokenizer's output `[S, Dz]`; actions are random and carry no information. The dynamics trains on
the shortcut-forcing loss (`dynamics_train_step`, the same update as every other use in d4func), and every
`--eval-every` steps `d4func.next_latent.next_latent_errors` scores its prediction of the middle frame of fresh rows
from pure noise against two baselines:

* `copy_last_mse`: the previous frame itself. The walk's steps are unpredictable, so this is also about the best
  a model can do;
* `copy_noisy_last_mse`: the previous frame as the model sees it, at tau_ctx: with the default context noise
  (0.125 at k_max = 16) about as far from the next frame as the walk's own step, so it bounds what a model can
  reach from a noisy context far more tightly than `copy_last_mse`;
* `context_mean_mse`: the mean of the context frames, what a model that blurs its history together gets.

    python experiments/dynamics_copy_probe.py --config experiments/configs/results_cartpole.yaml --steps 1000
    python experiments/dynamics_copy_probe.py --config experiments/configs/results_cartpole.yaml \\
        --set optim.world_model.lr=1e-3 --set dynamics.context_noise=0.0 --set dynamics.clean_context_fraction=0.5 \\
        --out runs/copy_probe_lr.json

With `--action-gain G` the actions move the walk (each row then also scores how much of an action's true effect
the model's response explains, `action_effect_r2`); `--action-pose [global|local]` makes that effect turn with
the state, of one element everywhere or of each token's own. `--mlp-reference WIDTH` trains a plain MLP on (last
frame, action) instead, the reference for how hard an effect is by itself; `--pool-rows N` trains on a fixed pool
of rows, as a replay of N * seq_len transitions would give, instead of fresh rows for every batch.

    python experiments/dynamics_copy_probe.py --config experiments/configs/results_reacher32.yaml --steps 2000 \
        --eval-every 500 --action-gain 0.3 --action-pose local [--mlp-reference 256] [--pool-rows 625]

The dynamics, batch shape and optimiser come from a loop config (`RunConfig`, with `--set KEY=VALUE` overrides);
the result is JSON at `--out` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from d4func.dynamics import Dynamics, DynamicsConfig, actions_into_frames
from d4func.functional import apply, grad_and_value, init, template
from d4func.next_latent import history_baseline_errors, next_latent_errors, predict_next_latent
from d4func.optim import AdamWConfig, adamw_init, adamw_update
from d4func.train.dynamics_step import dynamics_train_step
from d4func.train.run_config import RunConfig, load_run_config
from d4func.train.state import new_train_state


def action_directions(cfg: DynamicsConfig, generator: torch.Generator, pose_dependent: bool = False) -> Tensor:
    """How the actions move the latents in `--action-gain` rows: one fixed random direction per action component
    (`[action_dim, S, Dz]`, applied as `a @ W`) or per discrete action (`[n_actions, S, Dz]`, centred over the
    actions so that a uniformly random action moves nothing on average), elements drawn from N(0, 1) (continuous:
    divided by sqrt(action_dim)), so a uniform action in [-1, 1] moves each element with variance 1/3.

    `pose_dependent` (`--action-pose`) draws two such sets, `[2, count, S, Dz]`: the direction an action moves the
    walk then turns with the previous frame's pose (`pose_of`), cos(pi p) W_0 + sin(pi p) W_1, as a torque on
    reacher moves the arm's pixels one way or another depending on where the arm is. The move is as loud as a
    fixed one (cos^2 + sin^2 = 1), but the model must read the pose from its history to know it. Each latent token
    turns with its own pose element (`pose_of(..., local=True)`) or all with one (the first token's)."""
    count = cfg.n_actions if cfg.discrete else cfg.action_dim
    sets = 2 if pose_dependent else 1
    directions = torch.randn(sets, count, cfg.latent_tokens, cfg.latent_dim, generator=generator)
    if cfg.discrete:
        directions = directions - directions.mean(dim=1, keepdim=True)
    else:
        directions = directions / count**0.5
    return directions if pose_dependent else directions[0]


POSES = ("global", "local")


def pose_of(latents: Tensor, local: bool = False) -> Tensor:
    """The pose `[..., S]` each latent token's pose-dependent directions turn with, in (-1, 1), from frames
    `[..., S, Dz]`: every token's first element (`local`: a token's move depends on its own state, as a patch of
    the reacher arm moves according to the arm's angle there) or, for all tokens, the first token's first element
    (global: one element decides the move everywhere, so the model must carry it across tokens too)."""
    if local:
        return latents[..., 0]
    return latents[..., :1, 0].expand(latents.shape[:-1])


def action_moves(actions: Tensor, directions: Tensor, discrete: bool, pose: Tensor | None = None) -> Tensor:
    """The move `[..., S, Dz]` each action (`[...]` indices or `[..., A]` vectors) makes. Pose-dependent
    directions (`[2, count, S, Dz]`) need the previous frame's `pose` (`[..., S]`, `pose_of`); fixed ones ignore
    it."""
    if directions.dim() == 4:
        if pose is None:
            raise ValueError("pose-dependent action directions need the previous frame's pose (pose_of)")
        angle = rearrange(torch.pi * pose, "... s -> ... 1 s 1")
        directions = torch.cos(angle) * directions[0] + torch.sin(angle) * directions[1]  # [..., count, S, Dz]
        if discrete:
            index = rearrange(actions, "... -> ... 1 1 1")
            return torch.take_along_dim(directions, index, dim=-3).squeeze(-3)
        return torch.einsum("...a,...asd->...sd", actions, directions)
    if discrete:
        return directions[actions]
    return torch.einsum("...a,asd->...sd", actions, directions)


def random_walk_rows(cfg: DynamicsConfig, batch: int, steps: int, step_std: float, generator: torch.Generator,
                     action_gain: float = 0.0, directions: Tensor | None = None,
                     local_pose: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Latents `[B, T, S, Dz]` (a random walk in atanh space, inside (-1, 1) like the tokenizer's tanh bottleneck),
    random actions in TorchRL's convention (`actions[:, t]` taken after frame t), and the walk itself (atanh space).
    With `action_gain` > 0 each action adds `action_gain` times its move (`action_moves`) to the next step, turned
    by the pose of the frame it is taken after (`pose_of(..., local_pose)`) when the directions are
    pose-dependent."""
    first = torch.rand(batch, 1, cfg.latent_tokens, cfg.latent_dim, generator=generator) * 1.8 - 0.9
    moves = step_std * torch.randn(batch, steps, cfg.latent_tokens, cfg.latent_dim, generator=generator)
    moves[:, 0] = 0.0
    if cfg.discrete:
        actions = torch.randint(0, cfg.n_actions, (batch, steps), generator=generator)
    else:
        actions = torch.rand(batch, steps, cfg.action_dim, generator=generator) * 2 - 1
    if action_gain > 0:
        if directions is None:
            raise ValueError("action_gain > 0 needs the action directions (action_directions)")
        if directions.dim() == 4:  # each move turns with the frame before it: built one step at a time
            positions = [torch.atanh(first[:, 0])]
            for t in range(1, steps):
                pose = pose_of(torch.tanh(positions[-1]), local_pose)
                push = action_gain * action_moves(actions[:, t - 1], directions, cfg.discrete, pose)
                positions.append(positions[-1] + moves[:, t] + push)
            walk = torch.stack(positions, dim=1)
            return torch.tanh(walk), actions, walk
        moves[:, 1:] += action_gain * action_moves(actions[:, :-1], directions, cfg.discrete)
    walk = torch.atanh(first) + moves.cumsum(dim=1)
    return torch.tanh(walk), actions, walk


def dynamics_predictor(model: Dynamics, params, target: int, seed: int) -> Callable[[Tensor, Tensor], Tensor]:
    """`predict(latents, actions)`: the dynamics' prediction of frame `target` from pure noise behind its history
    (`predict_next_latent`, one fixed noise seed), actions in TorchRL's convention."""
    def predict(latents: Tensor, actions: Tensor) -> Tensor:
        actions_in, mask = actions_into_frames(actions)
        predicted, _ = predict_next_latent(model, params, latents, actions_in, mask, target,
                                           torch.Generator().manual_seed(seed))
        return predicted

    return predict


def action_effects(predict: Callable[[Tensor, Tensor], Tensor], walk: Tensor, actions: Tensor, target: int,
                   action_gain: float, directions: Tensor, discrete: bool,
                   local_pose: bool = False) -> dict[str, float]:
    """How much a model's prediction of frame `target` (`predict(latents, actions)`) moves when only the action into
    it is swapped for another row's, against how much the truth moves (mean absolute change over elements); how
    much of the true change the model's change explains (`action_effect_r2`); and the MSE of the oracle that knows
    the action but not the walk's random step (the floor a model can reach)."""
    other = actions.clone()
    other[:, target - 1] = actions.roll(1, dims=0)[:, target - 1]
    latents = torch.tanh(walk)
    predictions = [predict(latents, acts) for acts in (actions, other)]
    pose = pose_of(latents[:, target - 1], local_pose)  # the frame both actions are taken after
    move = action_moves(actions[:, target - 1], directions, discrete, pose)
    other_move = action_moves(other[:, target - 1], directions, discrete, pose)
    truth = latents[:, target]
    moved_truth = torch.tanh(walk[:, target] + action_gain * (other_move - move))
    oracle = torch.tanh(walk[:, target - 1] + action_gain * move)
    model_change, true_change = predictions[1] - predictions[0], moved_truth - truth
    return {"model_action_effect": float(model_change.abs().mean()),
            "true_action_effect": float(true_change.abs().mean()),
            # 1: the model's change is the true one; 0: it ignores the action; < 0: it responds, but wrongly. None
            # when no swap changes the truth (every swapped action equal to the one it replaces).
            "action_effect_r2": (float(1 - (model_change - true_change).square().sum() / true_change.square().sum())
                                 if bool(true_change.any()) else None),
            "action_oracle_mse": float((oracle - truth).square().mean())}


class NextFrameMLP(nn.Module):
    """Frame t+1 as frame t plus an MLP of the `history` frames up to t (flattened) and the action taken after frame
    t (one-hot when discrete). No noise, no attention: every input reaches every hidden unit, so it shows how hard
    an action's effect is to learn by itself, apart from the dynamics' way there. The reference for
    `--mlp-reference` here (one frame of history, `mlp_reference_model`) and for experiments/latent_mlp_reference.py
    on a run's own latents."""

    def __init__(self, latent_tokens: int, latent_dim: int, action_size: int, hidden: int, discrete: bool,
                 history: int = 1) -> None:
        super().__init__()
        self.latent_tokens, self.action_size, self.discrete = latent_tokens, action_size, discrete
        frame = latent_tokens * latent_dim
        self.net = nn.Sequential(nn.Linear(history * frame + action_size, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, frame))

    def forward(self, history: Tensor, action: Tensor) -> Tensor:
        """history `[B, h, S, Dz]`, action `[B, A]` (continuous) or `[B]` (discrete index) -> frame `[B, S, Dz]`."""
        if self.discrete:
            action = F.one_hot(action.long(), self.action_size).to(history.dtype)
        change = self.net(torch.cat([rearrange(history, "b h s z -> b (h s z)"), action], dim=-1))
        return history[:, -1] + rearrange(change, "b (s z) -> b s z", s=self.latent_tokens)


def mlp_reference_model(cfg: DynamicsConfig, hidden: int) -> NextFrameMLP:
    """`--mlp-reference`'s `NextFrameMLP` (a template): one frame of `cfg`'s latents and its actions."""
    return template(NextFrameMLP, cfg.latent_tokens, cfg.latent_dim, cfg.n_actions if cfg.discrete else cfg.action_dim,
                    hidden, cfg.discrete)


def mlp_train_step(model: NextFrameMLP, params, moments, step: int, latents: Tensor, actions: Tensor, target: int,
                   opt: AdamWConfig):
    """One AdamW step (the world model's optimiser settings) on the MSE of frame `target` given frame `target - 1`
    and the action taken after it; returns params, moments and the loss."""
    def loss_fn(p):
        return (apply(model, p, latents[:, target - 1:target], actions[:, target - 1]) - latents[:, target]
                ).square().mean()

    grads, loss = grad_and_value(loss_fn)(params)
    params, moments, _ = adamw_update(params, grads, moments, step, opt)
    return params, moments, loss


def pool_batch(latents: Tensor, actions: Tensor, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """`batch` rows drawn uniformly, with replacement, from a fixed pool of rows (`--pool-rows`)."""
    picked = torch.randint(0, latents.shape[0], (batch,), generator=generator)
    return latents[picked], actions[picked]


def mlp_predictor(model: NextFrameMLP, params, target: int) -> Callable[[Tensor, Tensor], Tensor]:
    """`predict(latents, actions)`: the MLP's frame `target` from frame `target - 1` and the action after it."""
    def predict(latents: Tensor, actions: Tensor) -> Tensor:
        return apply(model, params, latents[:, target - 1:target], actions[:, target - 1])

    return predict


def probe(cfg: RunConfig, steps: int, eval_every: int, step_std: float = 0.15, eval_rows: int = 64,
          seed: int = 0, action_gain: float = 0.0, action_pose: str | None = None, mlp_reference: int = 0,
          pool_rows: int = 0, log=print) -> dict[str, Any]:
    """Train `cfg.dynamics` from fresh weights on random walks; measure every `eval_every` steps. With
    `action_gain` > 0 the actions move the walk (`random_walk_rows`), along directions that turn with the pose
    of one element everywhere (`action_pose="global"`) or of each token's own (`"local"`) (`action_directions`,
    `pose_of`), and each row also scores `action_effects`. `mlp_reference` > 0 trains a `NextFrameMLP` of that
    width instead, on the same rows, batches and optimiser settings, one transition (into `target`) per row as the
    dynamics' teacher forcing has; it sees the clean last frame, so its "copy noisy last" is copying the last.
    `pool_rows` > 0 draws that many training rows once and samples every batch from them (with replacement), as a
    replay holding `pool_rows * seq_len` transitions would; 0 draws fresh rows for every batch."""
    # Swapping actions between evaluation rows needs two of them.
    for name, value, low in (("steps", steps, 1), ("eval_every", eval_every, 1),
                             ("eval_rows", eval_rows, 2 if action_gain > 0 else 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not step_std > 0:
        raise ValueError(f"step_std must be > 0, got {step_std}")
    if not action_gain >= 0:
        raise ValueError(f"action_gain must be >= 0, got {action_gain}")
    if action_pose is not None and action_pose not in POSES:
        raise ValueError(f"action_pose must be None or one of {POSES}, got {action_pose!r}")
    if not isinstance(pool_rows, int) or pool_rows < 0:
        raise ValueError(f"pool_rows must be an int >= 0 (0: fresh rows for every batch), got {pool_rows!r}")
    if not isinstance(mlp_reference, int) or mlp_reference < 0:
        raise ValueError(f"mlp_reference must be an int >= 0 (0: train the dynamics), got {mlp_reference!r}")
    local_pose = action_pose == "local"
    seq_len = cfg.replay.seq_len  # >= 2: the run config keeps context_len (>= 1) below it
    if mlp_reference:
        model = mlp_reference_model(cfg.dynamics, mlp_reference)
        params = init(model, seed)
        moments = adamw_init(params)
    else:
        model = template(Dynamics, cfg.dynamics)
        state = new_train_state(init(model, seed), with_ema=False)
    train_gen = torch.Generator().manual_seed(seed + 1)
    eval_gen = torch.Generator().manual_seed(seed + 2)
    directions = action_directions(cfg.dynamics, torch.Generator().manual_seed(seed + 4), action_pose is not None)
    eval_latents, eval_actions, eval_walk = random_walk_rows(cfg.dynamics, eval_rows, seq_len, step_std, eval_gen,
                                                             action_gain, directions, local_pose)
    target = seq_len // 2  # half the row as context, as a replay context of `context_len` frames would give
    if pool_rows:
        pool_latents, pool_actions, _ = random_walk_rows(cfg.dynamics, pool_rows, seq_len, step_std, train_gen,
                                                         action_gain, directions, local_pose)

    rows = []
    seconds = 0.0
    for step in range(1, steps + 1):
        started = time.perf_counter()
        if pool_rows:
            latents, actions = pool_batch(pool_latents, pool_actions, cfg.replay.batch_size, train_gen)
        else:
            latents, actions, _ = random_walk_rows(cfg.dynamics, cfg.replay.batch_size, seq_len, step_std,
                                                   train_gen, action_gain, directions, local_pose)
        if mlp_reference:
            params, moments, loss = mlp_train_step(model, params, moments, step - 1, latents, actions, target,
                                                   cfg.optim.world_model)
        else:
            actions_in, mask = actions_into_frames(actions)
            state, metrics = dynamics_train_step(state, latents, actions_in, train_gen, model=model,
                                                 opt=cfg.optim.world_model, action_mask=mask)
            loss = metrics["loss"]
        seconds += time.perf_counter() - started
        if step % eval_every == 0 or step == steps:
            if mlp_reference:
                predict = mlp_predictor(model, params, target)
                baselines = history_baseline_errors(eval_latents, target)
                errors = {"model_mse": float((predict(eval_latents, eval_actions) - eval_latents[:, target])
                                             .square().mean()),
                          "copy_last_mse": baselines["copy_last_mse"],
                          "copy_noisy_last_mse": baselines["copy_last_mse"],  # the MLP reads the clean last frame
                          "context_mean_mse": baselines["context_mean_mse"]}
            else:
                actions_in, mask = actions_into_frames(eval_actions)
                errors = next_latent_errors(model, state["params"], eval_latents, actions_in, mask, target,
                                            torch.Generator().manual_seed(seed + 3))
                predict = dynamics_predictor(model, state["params"], target, seed + 3)
            if action_gain > 0:
                errors.update(action_effects(predict, eval_walk, eval_actions, target, action_gain, directions,
                                             cfg.dynamics.discrete, local_pose))
            row = {"step": step, "train_seconds": round(seconds, 1), "loss": float(loss), **errors}
            log(json.dumps(row))
            rows.append(row)
    return {"step_std": step_std, "action_gain": action_gain, "action_pose": action_pose, "eval_rows": eval_rows,
            "target_frame": target, "seed": seed, "mlp_reference": mlp_reference, "pool_rows": pool_rows,
            "context_signal": 1.0 if mlp_reference else cfg.dynamics.context_signal,
            "lr": cfg.optim.world_model.lr, "batch": [cfg.replay.batch_size, seq_len], "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    acting = result.get("action_gain", 0.0) > 0
    source = (f"an MLP of width {result['mlp_reference']} from the clean last frame" if result.get("mlp_reference")
              else f"pure noise, context at signal {result['context_signal']:g}")
    lines = [f"next-frame MSE on random-walk latents (frame {result['target_frame']} from {source}, "
             f"lr {result['lr']:g}, action gain {result.get('action_gain', 0):g}"
             + (f", pose-dependent: {result['action_pose']})" if result.get("action_pose") else ")"),
             f"{'step':>6} {'loss':>8} {'model':>8} {'copy last':>10} {'copy noisy last':>16} {'context mean':>13}"
             + (f" {'oracle':>8} {'effect model/true':>18} {'effect R2':>9}" if acting else "")]
    for r in result["rows"]:
        line = (f"{r['step']:>6} {r['loss']:>8.4f} {r['model_mse']:>8.4f} {r['copy_last_mse']:>10.4f} "
                f"{r['copy_noisy_last_mse']:>16.4f} {r['context_mean_mse']:>13.4f}")
        if acting:
            r2 = "n/a" if r["action_effect_r2"] is None else f"{r['action_effect_r2']:.3f}"
            line += (f" {r['action_oracle_mse']:>8.4f} {r['model_action_effect']:>11.4f}/{r['true_action_effect']:.4f}"
                     f" {r2:>9}")
        lines.append(line)
    return "\n".join(lines)


def probe_parser(description: str, steps: int, eval_every: int) -> argparse.ArgumentParser:
    """The arguments every synthetic probe here takes: the loop config and its overrides, the training length, the
    random walk's step, the seed, the thread count and the JSON path (`report`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="a loop config (RunConfig YAML); default: RunConfig()")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--eval-every", type=int, default=eval_every)
    parser.add_argument("--step-std", type=float, default=0.15, help="std of the walk's steps (atanh space)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON path (default: none)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = probe_parser(__doc__.split("\n")[0], steps=1000, eval_every=250)
    parser.add_argument("--action-gain", type=float, default=0.0,
                        help="how far each action moves the walk (0: actions carry no information)")
    parser.add_argument("--action-pose", nargs="?", const="global", default=None, choices=POSES,
                        help="the direction an action moves the walk turns with the previous frame's pose: one "
                             "element's everywhere (global, the default when given alone) or each token's own (local)")
    parser.add_argument("--mlp-reference", type=int, default=0, metavar="WIDTH",
                        help="train a plain MLP of this width on (last frame, action) instead of the dynamics")
    parser.add_argument("--pool-rows", type=int, default=0, metavar="ROWS",
                        help="train on a fixed pool of this many rows (a finite replay) instead of fresh rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_run_config(args.config, args.overrides)
    result = probe(cfg, args.steps, args.eval_every, args.step_std, seed=args.seed,
                   action_gain=args.action_gain, action_pose=args.action_pose, mlp_reference=args.mlp_reference,
                   pool_rows=args.pool_rows)
    return report(result, args, format_table)


def report(result: dict[str, Any], args: argparse.Namespace, table: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """A synthetic probe's ending: `result` with the config and overrides it ran under, printed as `table(result)`
    and written as JSON to `args.out` when given."""
    result.update({"config": args.config, "overrides": args.overrides})
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
