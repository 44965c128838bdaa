"""How fast does the reward head learn a reward that a few latents show? A probe on synthetic latents.

On reacher-easy the reward head stays at the best constant for 8,000 updates where a small conv net on the same
latents explains a quarter of held-out reward variance (docs/results.md, Sec. 2, "Is it the head's loss, its many
offsets, or its way to the frame?"): the reward (the fingertip inside the target) is an event in one or two of a
frame's latents, and the head reads it through an agent token of the dynamics transformer. This probe isolates that
way from any tokenizer or environment. Each row is a random walk of latents shaped like the tokenizer's output (the
walk of `dynamics_copy_probe.random_walk_rows`, actions random and carrying nothing); the reward of the transition
into a frame is 1 when one of the frame's latent tokens shows the event, its first two elements both above
`--threshold` (`event_rewards`; `--where any`: any token, as the fingertip may be anywhere; `first`: one fixed
token), else 0: a conjunction, as the fingertip *and* the target make reacher's reward.

The dynamics and heads train with the world model's phase-2 update (`agent_finetune_step`, the loop's update; the
`finetune.*` weights of the config apply, so `--set finetune.dynamics_coef=0 --set finetune.bc_coef=0` trains the
reward term alone), and every `--eval-every` steps the reward head is read on fresh rows with their frames committed
at the context level (`imagination.commit_frames`, as the agent observes a frame), scored by `reward_r2` (1 - MSE /
variance) and `reward_corr`. `--reference pooled|flat` trains a plain reader instead, on the clean frames with the
head's twohot loss and bins, the reference for how hard the event is by itself, apart from the agent token's way to
it: `pooled` is an MLP on each latent token, the mean and the max over tokens and a zero-initialised linear readout
(its max keeps a one-token event from being averaged away, but it cannot tell the tokens apart: the reference for
`--where any`); `flat` is an MLP on the whole frame flattened (the reference for `--where first`).

    python experiments/reward_readout_probe.py --config experiments/configs/results_reacher32.yaml --steps 2000 \
        --eval-every 500 [--where any|first] [--threshold 0.7] [--reference pooled] \
        [--set finetune.dynamics_coef=0 --set finetune.bc_coef=0] [--out runs/readout_probe.json]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from einops import rearrange, reduce
from tensordict import TensorDict, TensorDictBase
from torch import Tensor, nn

from d4func.distributions import twohot_log_prob, twohot_mean
from d4func.dynamics import Dynamics, DynamicsConfig, actions_into_frames
from d4func.functional import apply, grad_and_value, init, template
from d4func.heads import AgentHeads, OutputLinear, reward_dist
from d4func.imagination import commit_frames, world_model_fn
from d4func.optim import adamw_init, adamw_update
from d4func.train.agent_step import agent_finetune_step
from d4func.train.run_config import RunConfig, load_run_config
from d4func.train.state import new_train_state
from d4func.transformer import empty_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dynamics_copy_probe import probe_parser, random_walk_rows, report  # noqa: E402
from world_model_quality import reward_fit  # noqa: E402

PLACES = ("any", "first")
REFERENCES = ("pooled", "flat")


def event_rewards(latents: Tensor, threshold: float, where: str = "any") -> Tensor:
    """1.0 where a frame `[..., S, Dz]` shows the event, else 0.0 (`[...]`): a latent token whose first two elements
    both exceed `threshold` (any token, or only the first with `where="first"`)."""
    if where not in PLACES:
        raise ValueError(f"where must be one of {PLACES}, got {where!r}")
    if latents.shape[-1] < 2:
        raise ValueError(f"the event reads two elements of a latent token: latent_dim must be >= 2, got "
                         f"{latents.shape[-1]}")
    inside = (latents[..., :2] > threshold).all(dim=-1)  # [..., S]
    if where == "first":
        inside = inside[..., :1]
    return inside.any(dim=-1).to(latents.dtype)


def reward_rows(cfg: DynamicsConfig, batch: int, steps: int, step_std: float, generator: torch.Generator,
                threshold: float, where: str) -> tuple[Tensor, Tensor, Tensor]:
    """Latents `[B, T, S, Dz]`, random actions and rewards `[B, T]` in TorchRL's convention: `rewards[:, t]` is the
    reward of the transition out of frame t, the event in frame t + 1 (drawn one frame past the row, so the last
    transition has a reward too)."""
    latents, actions, _ = random_walk_rows(cfg, batch, steps + 1, step_std, generator)
    return latents[:, :steps], actions[:, :steps], event_rewards(latents[:, 1:], threshold, where)


class FlatRewardReader(nn.Module):
    """Twohot logits of the reward into a frame from its latents `[B, S, Dz]` flattened: a two-layer MLP and a
    zero-initialised linear readout. Every element reaches every unit, so it knows which token shows what."""

    def __init__(self, latent_tokens: int, latent_dim: int, width: int, n_bins: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(latent_tokens * latent_dim, width), nn.SiLU(), nn.Linear(width, width),
                                 nn.SiLU())
        self.readout = OutputLinear(width, n_bins, 0.0)

    def forward(self, latents: Tensor) -> Tensor:
        return self.readout(self.mlp(rearrange(latents, "b s z -> b (s z)")))


class PooledRewardReader(nn.Module):
    """Twohot logits of the reward into a frame from its latents `[B, S, Dz]`: a two-layer MLP on each token, the
    mean and the max of its features over the tokens, a zero-initialised linear readout (as the reward head's)."""

    def __init__(self, latent_dim: int, width: int, n_bins: int) -> None:
        super().__init__()
        self.token_mlp = nn.Sequential(nn.Linear(latent_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.readout = OutputLinear(2 * width, n_bins, 0.0)

    def forward(self, latents: Tensor) -> Tensor:
        features = self.token_mlp(latents)
        pooled = torch.cat([reduce(features, "b s f -> b f", "mean"), reduce(features, "b s f -> b f", "max")], dim=-1)
        return self.readout(pooled)


def head_predictions(model: Dynamics, heads: AgentHeads, params: TensorDictBase, latents: Tensor,
                     actions: Tensor, generator: torch.Generator) -> Tensor:
    """The reward head's prediction `[B, T - 1]` of the reward into frames 1.. of each row, the frames committed at
    the context level (as the agent observes them)."""
    actions_in, mask_in = actions_into_frames(actions)
    agent_out, _ = commit_frames(world_model_fn(model, params["dynamics"]), model.cfg, latents, actions_in, mask_in,
                                 empty_cache(latents.shape[0], latents.device), generator)
    return reward_dist(heads, params["heads", "reward"], agent_out[:, 1:]).mean()


def probe(cfg: RunConfig, steps: int, eval_every: int, threshold: float = 0.7, where: str = "any",
          step_std: float = 0.15, eval_rows: int = 256, seed: int = 0, reference: str | None = None,
          width: int = 64, log=print) -> dict[str, Any]:
    """Train the dynamics and heads of `cfg` (or, with `reference`, a `PooledRewardReader` or `FlatRewardReader` of
    `width`) from fresh weights on `reward_rows`; score the reward into frames 1.. of `eval_rows` fresh rows at step 0
    and every `eval_every` steps. `train_ce` is the mean twohot cross-entropy of the reward into frames 1.. on the
    training batches since the last row (for the head: offset 0, `reward_ce_0`), before each batch's update;
    `train_dynamics_loss` the head's dynamics term over them (unweighted; None for the references), so that a
    setting which helps the reward can be seen not to cost the dynamics."""
    for name, value, low in (("steps", steps, 1), ("eval_every", eval_every, 1), ("eval_rows", eval_rows, 1),
                             ("width", width, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not -1.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (-1, 1), the latents' range, got {threshold}")
    if where not in PLACES:
        raise ValueError(f"where must be one of {PLACES}, got {where!r}")
    if reference is not None and reference not in REFERENCES:
        raise ValueError(f"reference must be None or one of {REFERENCES}, got {reference!r}")
    dyn_cfg, seq_len, batch = cfg.dynamics, cfg.replay.seq_len, cfg.replay.batch_size
    bins = cfg.heads.bins()
    train_gen = torch.Generator().manual_seed(seed + 1)
    eval_latents, eval_actions, eval_rewards = reward_rows(dyn_cfg, eval_rows, seq_len, step_std,
                                                           torch.Generator().manual_seed(seed + 2), threshold, where)
    if reference:
        model = (template(PooledRewardReader, dyn_cfg.latent_dim, width, bins.numel()) if reference == "pooled" else
                 template(FlatRewardReader, dyn_cfg.latent_tokens, dyn_cfg.latent_dim, width, bins.numel()))
        params = init(model, seed)
        moments = adamw_init(params)

        def loss_fn(p: TensorDictBase, frames: Tensor, target: Tensor) -> Tensor:
            return -twohot_log_prob(apply(model, p, frames), bins, target).mean()

        def predict() -> Tensor:
            return twohot_mean(apply(model, params, eval_latents[:, 1:].flatten(0, 1)), bins)
    else:
        dynamics, heads = template(Dynamics, dyn_cfg), template(AgentHeads, cfg.heads)
        state = new_train_state(TensorDict({"dynamics": init(dynamics, seed), "heads": init(heads, seed + 1)}),
                                with_ema=False)

        def predict() -> Tensor:
            return head_predictions(dynamics, heads, state["params"], eval_latents, eval_actions,
                                    torch.Generator().manual_seed(seed + 3))

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    def evaluate(step: int, seconds: float, train_ce: list[float], dynamics_loss: list[float]) -> dict[str, Any]:
        with torch.no_grad():
            predicted = predict()
        return {"step": step, "train_seconds": round(seconds, 1), "train_ce": mean(train_ce),
                "train_dynamics_loss": mean(dynamics_loss),
                **reward_fit(predicted.flatten(), eval_rewards[:, :-1].flatten())}

    rows = [evaluate(0, 0.0, [], [])]
    log(json.dumps(rows[-1]))
    train_ce: list[float] = []
    dynamics_loss: list[float] = []
    seconds = 0.0
    for step in range(1, steps + 1):
        started = time.perf_counter()
        latents, actions, rewards = reward_rows(dyn_cfg, batch, seq_len, step_std, train_gen, threshold, where)
        if reference:
            frames, target = latents[:, 1:].flatten(0, 1), rewards[:, :-1].flatten()
            grads, ce = grad_and_value(loss_fn)(params, frames, target)
            params, moments, _ = adamw_update(params, grads, moments, step - 1, cfg.optim.world_model)
        else:
            state, metrics = agent_finetune_step(state, {"latents": latents, "actions": actions, "rewards": rewards},
                                                 train_gen, model=dynamics, heads=heads, opt=cfg.optim.world_model,
                                                 cfg=cfg.finetune)
            ce = metrics["reward_ce_0"]
            dynamics_loss.append(float(metrics["dynamics_loss"]))
        seconds += time.perf_counter() - started
        train_ce.append(float(ce))
        if step % eval_every == 0 or step == steps:
            rows.append(evaluate(step, seconds, train_ce, dynamics_loss))
            log(json.dumps(rows[-1]))
            train_ce, dynamics_loss = [], []
    return {"threshold": threshold, "where": where, "step_std": step_std, "eval_rows": eval_rows, "seed": seed,
            "reference": reference, "width": width if reference else None,
            "reward_rate": float(eval_rewards.mean()), "context_signal": None if reference else dyn_cfg.context_signal,
            "noise_scale": dyn_cfg.noise_scale, "lr": cfg.optim.world_model.lr, "batch": [batch, seq_len],
            "finetune": None if reference else vars(cfg.finetune), "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    reader = (f"a {result['reference']} MLP of width {result['width']} on clean frames" if result["reference"]
              else f"the reward head, frames at signal {result['context_signal']:g}")
    lines = [f"reward of an event in {result['where']} latent token (threshold {result['threshold']:g}, rate "
             f"{result['reward_rate']:.3f}), read by {reader}, lr {result['lr']:g}",
             f"{'step':>6} {'seconds':>8} {'train CE':>9} {'held-out R2':>12} {'corr':>7} {'dynamics loss':>14}"]
    for r in result["rows"]:
        def show(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f}"
        lines.append(f"{r['step']:>6} {r['train_seconds']:>8.1f} {show(r['train_ce']):>9} "
                     f"{show(r['reward_r2']):>12} {show(r['reward_corr']):>7} "
                     f"{show(r.get('train_dynamics_loss')):>14}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = probe_parser(__doc__.split("\n")[0], steps=2000, eval_every=500)
    parser.add_argument("--threshold", type=float, default=0.7,
                        help="the event: a token's first two elements both above this")
    parser.add_argument("--where", choices=PLACES, default="any", help="which latent tokens may show the event")
    parser.add_argument("--reference", choices=REFERENCES, default=None,
                        help="train a plain reader of the clean frames instead of the dynamics and heads")
    parser.add_argument("--width", type=int, default=64, help="the reference reader's width")
    parser.add_argument("--eval-rows", type=int, default=256)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_run_config(args.config, args.overrides)
    result = probe(cfg, args.steps, args.eval_every, args.threshold, args.where, args.step_std, args.eval_rows,
                   args.seed, args.reference, args.width)
    return report(result, args, format_table)


if __name__ == "__main__":
    main()
