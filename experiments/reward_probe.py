"""Can a run's reward be read from the frame it leads to? A small convolutional net as the reward head's reference.

A world model whose reward head stays at the best constant (`reward_r2` about 0 in `world_model_quality.py` and
`more_world_model_steps.py`) gives imagination nothing to improve on. Either the frames (or the tokenizer's latents)
do not show the reward clearly enough, or the reward head's way to it (an agent token reading the frame's latents
through the dynamics transformer) is slow. This script separates the two on the run's own replay: a `RewardConv`
reads the frame after each transition (`("next", "pixels")`, or the frozen tokenizer's latents of those frames laid
on their grid, `--space latents`) and regresses the transition's reward (MSE), with the world model's AdamW settings
and batch. `--loss twohot` trains it as the reward head is trained instead: logits over the run's twohot bins
(`heads.n_bins` symexp-spaced bins), cross-entropy to the twohot target, the expectation as the prediction, a
zero-initialised output layer; beside the MSE probe that separates the head's loss from its way to the frame.
Every `--eval-every` steps it measures `reward_r2` (1 - MSE / variance) and `reward_corr` on held-out
clips, the same clips `world_model_quality.reward_metrics` scores the run's own reward head on (its figure is in the
output as `reward_head`). Rewards of the frames' incoming transitions: frame t of a clip shows the state the
reward of transition t - 1 was paid for. Beside them, `loss_r2` is the fit on the training batches since the last
row (1 - their MSE / their rewards' variance): a net that fits its training episodes and not held-out ones has
learned those episodes, not the reward. `--data` trains on another recording of the run's env instead of the
run's replay (more episodes, say). Nothing in the run directory changes.

    python experiments/reward_probe.py --run runs/reacher32_offP --steps 3000 --eval-every 1000 \
        [--space latents] [--width 32] [--loss twohot] [--clips 64] [--data runs/data/other] \
        [--out runs/reward_probe.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from tensordict import TensorDictBase
from torch import Tensor, nn

from d4func.distributions import twohot_log_prob, twohot_mean
from d4func.functional import apply, grad_and_value, init, template
from d4func.heads import OutputLinear
from d4func.optim import adamw_init, adamw_update

sys.path.insert(0, str(Path(__file__).resolve().parent))
import latent_mlp_reference as reference  # noqa: E402

wmq = reference.wmq
more_steps = reference.more_steps
LOSSES = ("mse", "twohot")


class RewardConv(nn.Module):
    """Reward of the transition into a frame, from that frame: dilated 3x3 convolutions (receptive field 19 with
    dilations 1, 2, 4, 1, 1, so a feature sees the fingertip and the target beside it), then the mean and the max of
    each channel over the frame and a linear readout. The max keeps a few-pixel event (the tip inside the target)
    from being averaged away over a mostly empty frame. Input `[B, C, H, W]`, output `[B]` (or `[B, outputs]`
    logits for `outputs > 1`, whose readout starts at zero as the reward head's does)."""

    DILATIONS = (1, 2, 4, 1, 1)

    def __init__(self, channels_in: int, width: int, outputs: int = 1) -> None:
        super().__init__()
        widths = [channels_in, *[width] * (len(self.DILATIONS) - 1)]
        self.hidden = nn.ModuleList(nn.Conv2d(w, width, 3, padding=d, dilation=d)
                                    for w, d in zip(widths, self.DILATIONS, strict=True))
        self.readout = nn.Linear(2 * width, 1) if outputs == 1 else OutputLinear(2 * width, outputs, 0.0)

    def forward(self, frame: Tensor) -> Tensor:
        x = frame
        for conv in self.hidden:
            x = F.silu(conv(x))
        pooled = torch.cat([reduce(x, "b c y x -> b c", "mean"), reduce(x, "b c y x -> b c", "max")], dim=-1)
        out = self.readout(pooled)
        return out[:, 0] if out.shape[-1] == 1 else out


def as_grid(run: Any, space: str, frames: Tensor) -> Tensor:
    """Frames `[B, T, C, H, W]` -> `[B*T, C', H', W']` in `space`: the pixels, or the frozen tokenizer's latents
    of the sequence (encoded all at once) on their grid."""
    (channels, rows, cols), layout = reference.conv_frame_shape(run, space)
    represented = reference.representation(run, space)(frames, None)  # [B, T, S, D]
    pattern = "b t 1 (c y x)" if layout == "pixels" else "b t (y x) c"
    return rearrange(represented, f"{pattern} -> (b t) c y x", c=channels, y=rows, x=cols)


def training_replay(run_dir: str | Path, run: Any, data: str | Path | None, seed: int):
    """The run's replay, or the dataset at `data`, which must record the run's env (the held-out clips are played
    there) and fit its models as the loop requires of an offline dataset (`check_dataset_fits`: frame shape,
    actions, action repeat)."""
    cfg = run.cfg
    if data is None:
        return more_steps.run_replay(run_dir, cfg, seed=cfg.seed + seed)
    from d4func.data.offline import load_offline, read_metadata
    from d4func.train.compat import check_dataset_fits

    metadata = read_metadata(data)
    recorded = (metadata.get("env_config") or {}).get("name")
    if recorded != run.env_name:
        raise ValueError(f"dataset {str(data)!r} records {{'name': {recorded!r}}}, the run {{'name': "
                         f"{run.env_name!r}}}: train on the run's env")
    check_dataset_fits(cfg, metadata, str(data))
    return load_offline(data, cfg.replay.seq_len, cfg.replay.batch_size, seed=cfg.seed + seed)


def train_probe(run_dir: str | Path, steps: int, eval_every: int, space: str = "pixels", width: int = 32,
                episodes: int = 8, clips: int = 64, seed: int = 0, max_steps: int = 200,
                data: str | Path | None = None, loss: str = "mse", log=print) -> dict[str, Any]:
    """Train a `RewardConv` of `width` channels on the run's replay (or the dataset at `data`) for `steps` AdamW
    steps on `loss` ("mse" or "twohot"); measure at step 0 and every `eval_every` steps (module docstring)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    for name, value, low in (("steps", steps, 1), ("eval_every", eval_every, 1), ("width", width, 1),
                             ("episodes", episodes, 1), ("clips", clips, 2), ("seed", seed, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    run = wmq.load_run(run_dir)
    cfg = run.cfg
    frames, actions, rewards = wmq.held_out_clips(run, episodes, clips, cfg.replay.seq_len - cfg.replay.context_len,
                                                  seed, max_steps)
    reward_head = wmq.reward_metrics(run, frames, actions, rewards, seed)
    with torch.no_grad():
        held_out = as_grid(run, space, frames)
    n_clips, clip_len = frames.shape[:2]
    # Frame t >= 1 of a clip shows the outcome of transition t - 1 (the reward head's pairing).
    held_out = rearrange(held_out, "(b t) c y x -> b t c y x", b=n_clips, t=clip_len)[:, 1:].flatten(0, 1)
    held_out_rewards = rewards[:, :-1].flatten()
    bins = cfg.heads.bins()
    model = template(RewardConv, held_out.shape[1], width, bins.numel() if loss == "twohot" else 1)
    params = init(model, cfg.seed + seed)
    moments = adamw_init(params)
    replay = training_replay(run_dir, run, data, seed)

    def prediction(out: Tensor) -> Tensor:
        return twohot_mean(out, bins) if loss == "twohot" else out

    def loss_fn(p: TensorDictBase, inputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """The training loss and, as aux, the MSE of the prediction (for twohot: of its expectation)."""
        out = apply(model, p, inputs)
        mse = (prediction(out) - target).square().mean()
        return (-twohot_log_prob(out, bins, target).mean() if loss == "twohot" else mse), mse

    def evaluate(step: int, seconds: float, fit: list[float], targets: list[Tensor]) -> dict[str, Any]:
        with torch.no_grad():
            predicted = prediction(apply(model, params, held_out))
        mse = sum(fit) / len(fit) if fit else None
        variance = float(torch.cat(targets).double().var(unbiased=False)) if targets else 0.0
        return {"step": step, "train_seconds": round(seconds, 1), "loss": mse,
                "loss_r2": 1.0 - mse / variance if mse is not None and variance > 0 else None,
                **wmq.reward_fit(predicted, held_out_rewards)}

    rows = [evaluate(0, 0.0, [], [])]
    log(json.dumps(rows[-1]))
    fit: list[float] = []  # each training batch's MSE (for the twohot loss: of its expectation, before the update)
    targets: list[Tensor] = []
    seconds = 0.0
    for step in range(1, steps + 1):
        started = time.perf_counter()
        sample = replay.sample()
        # ("next", "pixels") is the frame each transition led to, inside or past the row: no boundary to mask.
        with torch.no_grad():
            inputs = as_grid(run, space, sample.get(("next", "pixels")))
        target = sample.get(("next", "reward")).float().flatten()
        grads, (_, mse) = grad_and_value(loss_fn, has_aux=True)(params, inputs, target)
        params, moments, _ = adamw_update(params, grads, moments, step - 1, cfg.optim.world_model)
        seconds += time.perf_counter() - started
        fit.append(float(mse))
        targets.append(target)
        if step % eval_every == 0 or step == steps:
            rows.append(evaluate(step, seconds, fit, targets))
            log(json.dumps(rows[-1]))
            fit, targets = [], []
    return {"run": str(run_dir), "checkpoint": str(run.checkpoint), "run_step": run.step, "env": run.env_name,
            "data": None if data is None else str(data), "replay_transitions": replay.transition_count(),
            "space": space, "width": width, "loss": loss,
            "lr": cfg.optim.world_model.lr, "episodes": episodes, "clips": clips, "seed": seed,
            "held_out_rewards": {"count": held_out_rewards.numel(),
                                 "positive": int((held_out_rewards > 0).sum()),
                                 "variance": float(held_out_rewards.double().var(unbiased=False))},
            "reward_head": reward_head, "batch": [cfg.replay.batch_size, cfg.replay.seq_len], "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run directory of a d4func.train.loop run")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--space", choices=reference.SPACES, default="pixels",
                        help="what the net reads: the frames, or the frozen tokenizer's latents on their grid")
    parser.add_argument("--width", type=int, default=32, help="channels of each convolution")
    parser.add_argument("--loss", choices=LOSSES, default="mse",
                        help="mse: regression; twohot: the reward head's loss and readout (module docstring)")
    parser.add_argument("--episodes", type=int, default=8, help="held-out episodes")
    parser.add_argument("--clips", type=int, default=64, help="held-out clips drawn from them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--data", default=None,
                        help="train on this recording of the run's env instead of the run's replay")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON path (default RUN/reward_probe.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train_probe(args.run, args.steps, args.eval_every, args.space, args.width, args.episodes, args.clips,
                         args.seed, args.max_steps, args.data, args.loss)
    out = Path(args.out) if args.out else Path(args.run) / "reward_probe.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"reward head of the run: R2 {result['reward_head']['reward_r2']}; probe at the end: "
          f"R2 {result['rows'][-1]['reward_r2']}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
