"""Do a run's latents hold the effect of its actions? A plain MLP on the run's frozen latents, as its dynamics'
reference.

When a run's dynamics does not respond to its actions (`counterfactual_latent_r2` about 0 in
`world_model_quality.py` and `more_world_model_steps.py`), either the latents do not carry the arm's response
precisely enough to learn it from, or the dynamics' way to it (noise levels, attention between tokens, a plateau)
is slow. This script separates the two on the run's own data: it loads the newest checkpoint's tokenizer (frozen),
samples the run's replay as `more_world_model_steps.py` does, and trains a `NextFrameMLP` (`dynamics_copy_probe.py`'s
reference) on (the last `--history` latent frames, the action taken after the last of them) -> the next latent
frame, one transition per replay row at a uniformly drawn position, as the dynamics' teacher forcing trains one
target per row, with the world model's AdamW settings and batch. No noise, no attention, no tokens: every input
reaches every hidden unit. `--space pixels` trains it on the frames themselves (one token of every pixel), which
leaves the tokenizer out; `--model conv` trains a small convolutional net instead (`NextFrameConv`), the local
reference: an MLP's output spans only its last layer's `--width` directions, which on reacher's 32x32 frames do
not fit even its training frames (its `loss` equals `loss_copy_last`). With `--space latents` the convolution reads
a local-attention tokenizer's latents laid out on their grid (latent j owns block j of the frame), so it asks
whether the latents keep a local move local enough for a local model. `--model attention` trains a plain
transformer over the latent tokens instead (`NextFrameAttention`: each token reads its own history frames, every
token attends to every other, standard pre-norm blocks of `--width`): attention without d4func's dynamics around
it, between the conv net and the dynamics. Every `--eval-every` steps it
measures, on the fixed held-out clips and counterfactual states that `more_world_model_steps.py` uses for the same
`--seed`:

* `latent_next_mse` against `latent_copy_last_mse` and `latent_context_mean_mse`: the first frame after the
  context (`d4func.next_latent.history_baseline_errors`);
* `loss` against `loss_copy_last`: the training loss since the last row, and copying the last frame's on the same
  transitions (an MLP above it has not fitted even its training data);
* `counterfactual_latent_r2` (and `_per_step`): from one real state, the MLP rolled open loop in latent space under
  two action sequences; how much of the change between the env's two branches (encoded as the acting policy
  encodes them) the MLP's change explains (`world_model_quality.change_explained`), the dynamics' figure of the same
  name. Its first step is the MLP's mean one step ahead, the dynamics' `counterfactual_next_latent_r2`.

An MLP that reaches a clearly positive `counterfactual_latent_r2` where the dynamics stays at 0 says the latents
hold the action's effect and the dynamics is slow to find it; an MLP at 0 too says the latents (the tokenizer, the
data) are the obstacle. Nothing in the run directory changes.

    python experiments/latent_mlp_reference.py --run runs/reacher32_copy/seed0 --steps 4000 --eval-every 1000 \
        [--history 2] [--width 256] [--space pixels] [--model conv] [--out runs/mlp_reference.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from tensordict import TensorDictBase
from torch import Tensor, nn

from d4func.dynamics import LearnedTokens
from d4func.functional import apply, grad_and_value, init, template
from d4func.latent_regions import latent_grid
from d4func.next_latent import history_baseline_errors
from d4func.optim import AdamWConfig, adamw_init, adamw_update
from d4func.tokenizer import encode_windowed
from d4func.train.phases import replay_batch

# A sibling script, for its replay opener and (through it) world_model_quality.py's loaders and metrics.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import more_world_model_steps as more_steps  # noqa: E402
from dynamics_copy_probe import NextFrameMLP  # noqa: E402

wmq = more_steps.wmq


def training_transitions(latents: Tensor, actions: Tensor, history: int, generator: torch.Generator
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """One transition per row of `latents` `[B, T, S, Dz]` and `actions` `[B, T, ...]` (TorchRL's convention: action
    t follows frame t), its target frame drawn uniformly from those with `history` frames before it: the history
    `[B, h, S, Dz]`, the action after its last frame and the target frame `[B, S, Dz]`."""
    rows, steps = latents.shape[:2]
    if steps <= history:
        raise ValueError(f"rows of {steps} frames leave no target behind a history of {history}")
    targets = torch.randint(history, steps, (rows,), generator=generator)
    offsets = torch.arange(-history, 0)
    picked = latents[torch.arange(rows)[:, None], targets[:, None] + offsets]
    return picked, actions[torch.arange(rows), targets - 1], latents[torch.arange(rows), targets]


def rollout(model: NextFrameMLP, params: TensorDictBase, history: Tensor, actions: Tensor) -> Tensor:
    """The MLP open loop: `actions` `[N, H, ...]` (each taken after the newest frame so far) from `history`
    `[N, h, S, Dz]`; returns the `H` generated frames `[N, H, S, Dz]`."""
    generated = []
    for step in range(actions.shape[1]):
        frame = apply(model, params, history, actions[:, step])
        generated.append(frame)
        history = torch.cat([history[:, 1:], frame[:, None]], dim=1)
    return torch.stack(generated, dim=1)


@torch.no_grad()
def measure(model: NextFrameMLP, params: TensorDictBase, held_out: dict[str, Tensor],
            counterfactual: dict[str, Tensor] | None) -> dict[str, Any]:
    """The module docstring's figures on precomputed held-out `latents`/`actions` and counterfactual latents."""
    history = held_out["history"]
    latents, target = held_out["latents"], held_out["target"]
    predicted = apply(model, params, latents[:, target - history:target], held_out["actions"][:, target - 1])
    result: dict[str, Any] = {"latent_next_mse": float((predicted - latents[:, target]).square().mean()),
                              **{f"latent_{k}": v for k, v in history_baseline_errors(latents, target).items()}}
    if counterfactual is not None:
        start = counterfactual["context"][:, -history:]
        branches = [rollout(model, params, start, actions) for actions in counterfactual["actions"]]
        overall, per_step = wmq.change_explained(branches[0] - branches[1],
                                                 counterfactual["real"][0] - counterfactual["real"][1])
        result["counterfactual_latent_r2"] = overall
        result["counterfactual_latent_r2_per_step"] = per_step
    return result


SPACES = ("latents", "pixels")
MODELS = ("mlp", "conv", "attention")


class NextFrameConv(nn.Module):
    """Frame t+1 as frame t plus a small convolutional net of the `history` frames up to t (stacked as channels)
    and the action taken after frame t (constant planes; one-hot when discrete): `--model conv`, the local
    reference. An MLP's output is confined to its last layer's `width` directions, too few for a thin arm that
    can be anywhere in the frame (`NextFrameMLP` on reacher's 3,072 pixel values fits its training frames no
    better than copying the last one); a convolution predicts every element from its neighbourhood. Dilations 1, 2,
    4, 8, 1, 1 give a 35-element receptive field, so a pixel sees the whole arm of a 32x32 frame.

    `layout="pixels"` reads and returns `representation(run, "pixels")`'s layout, history `[B, h, 1, C*H*W]` ->
    frame `[B, 1, C*H*W]` (C counts every camera's channels), with `frame_shape = (C, H, W)`. `layout="latent_grid"`
    reads a local-attention tokenizer's latents laid out on their grid (`d4func.latent_regions.latent_grid`: latent
    j owns block j, in raster order), history `[B, h, lh*lw, Dz]` -> frame `[B, lh*lw, Dz]`, with
    `frame_shape = (Dz, lh, lw)`: the same local model on the latents, which asks whether they keep a local move
    local."""

    DILATIONS = (1, 2, 4, 8, 1, 1)
    # Per layout: how a history `[B, h, ...]` and a frame `[B, ...]` hold the c x y x x grid.
    LAYOUTS = {"pixels": ("b h 1 (c y x)", "b 1 (c y x)"), "latent_grid": ("b h (y x) c", "b (y x) c")}

    def __init__(self, frame_shape: tuple[int, int, int], action_size: int, channels: int, discrete: bool,
                 history: int, layout: str = "pixels") -> None:
        super().__init__()
        if layout not in self.LAYOUTS:
            raise ValueError(f"layout must be one of {tuple(self.LAYOUTS)}, got {layout!r}")
        self.frame_shape, self.action_size, self.discrete, self.layout = frame_shape, action_size, discrete, layout
        frame_channels = frame_shape[0]
        widths = [history * frame_channels + action_size, *[channels] * (len(self.DILATIONS) - 1)]
        self.hidden = nn.ModuleList(nn.Conv2d(w, channels, 3, padding=d, dilation=d)
                                    for w, d in zip(widths, self.DILATIONS, strict=True))
        self.out = nn.Conv2d(channels, frame_channels, 3, padding=1)

    def forward(self, history: Tensor, action: Tensor) -> Tensor:
        channels, height, width = self.frame_shape
        history_pattern, frame_pattern = self.LAYOUTS[self.layout]
        frames = rearrange(history, f"{history_pattern} -> b (h c) y x", c=channels, y=height, x=width)
        if self.discrete:
            action = F.one_hot(action.long(), self.action_size)
        planes = action.to(frames.dtype)[:, :, None, None].expand(-1, -1, height, width)
        x = torch.cat([frames, planes], dim=1)
        for conv in self.hidden:
            x = F.silu(conv(x))
        change = rearrange(self.out(x), f"b c y x -> {frame_pattern}")
        return history[:, -1] + change


class AttentionBlock(nn.Module):
    """A standard pre-norm transformer block (LayerNorm, multi-head self-attention without a mask, a GELU MLP of
    4x the width): `NextFrameAttention`'s building block, written plainly so that nothing of d4func's transformer
    (RMSNorm, QK-norm, RoPE, soft-capping, space/time layers) is in the reference."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        self.heads = heads
        self.attn_norm, self.mlp_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.attn_out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(self.attn_norm(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        x = x + self.attn_out(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))
        return x + self.mlp(self.mlp_norm(x))


class NextFrameAttention(nn.Module):
    """Frame t+1 as frame t plus a plain transformer over the latent tokens: `--model attention`, the reference
    between the conv net and d4func's dynamics. Each latent token reads its own `history` frames stacked as
    features (the conv net's input, token by token), plus a learned position of its own; one more token holds the
    action taken after frame t (one-hot when discrete). `layers` standard pre-norm blocks (`AttentionBlock`) let
    every token attend to every other, and a linear read-out of each latent token gives its change. Against the
    conv net it has no locality; against d4func's dynamics it has no noise in a target slot, no separate time
    layers (the history sits in each token's features) and none of d4func's transformer parts."""

    def __init__(self, latent_tokens: int, latent_dim: int, action_size: int, width: int, discrete: bool,
                 history: int, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.action_size, self.discrete = action_size, discrete
        self.latent_in = nn.Linear(history * latent_dim, width)
        self.action_in = nn.Linear(action_size, width)
        self.positions = LearnedTokens(latent_tokens + 1, width)
        self.blocks = nn.ModuleList(AttentionBlock(width, heads) for _ in range(layers))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, latent_dim)

    def forward(self, history: Tensor, action: Tensor) -> Tensor:
        """history `[B, h, S, Dz]`, action `[B, A]` (continuous) or `[B]` (discrete index) -> frame `[B, S, Dz]`."""
        if self.discrete:
            action = F.one_hot(action.long(), self.action_size)
        latents = self.latent_in(rearrange(history, "b h s z -> b s (h z)"))
        x = torch.cat([latents, self.action_in(action.to(history.dtype))[:, None]], dim=1) + self.positions()
        for block in self.blocks:
            x = block(x)
        return history[:, -1] + self.out(self.out_norm(x[:, :-1]))


def conv_frame_shape(run: Any, space: str) -> tuple[tuple[int, int, int], str]:
    """`NextFrameConv`'s `(frame_shape, layout)` for `space`: the frames (every camera's channels stacked), or the
    latents on their grid, which only a local-attention tokenizer has (a global latent reads every patch: no
    place in the frame)."""
    tok = run.cfg.tokenizer
    if space == "pixels":
        return (tok.n_cameras * tok.channels, tok.height, tok.width), "pixels"
    if tok.latent_attention != "local" or tok.n_cameras != 1:
        raise ValueError(f"model_kind='conv' on latents lays them on the patch grid, which needs a one-camera "
                         f"tokenizer with latent_attention='local', got latent_attention={tok.latent_attention!r}, "
                         f"n_cameras={tok.n_cameras}")
    rows, cols = latent_grid(*tok.patch_grid, tok.n_latents)
    return (tok.latent_dim, rows, cols), "latent_grid"


def representation(run: Any, space: str) -> Callable[[Tensor, int | None], Tensor]:
    """`represent(frames, window)`: frames `[B, T, ...]` -> `[B, T, S, D]`, the frozen tokenizer's latents (encoded
    beside at most `window` frames, as the acting policy encodes them; None: all at once) or, for `space="pixels"`,
    the frames themselves as one token of every pixel (which leaves the tokenizer out of the question)."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if space == "pixels":
        return lambda frames, window: rearrange(frames, "b t ... -> b t 1 (...)")
    return lambda frames, window: encode_windowed(run.tokenizer, run.tokenizer_params, frames, window)


@torch.no_grad()
def held_out_data(run: Any, represent: Callable[[Tensor, int | None], Tensor], episodes: int, clips: int,
                  horizon: int, seed: int, max_steps: int, history: int
                  ) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    """The held-out clips and counterfactual states of `more_world_model_steps.py` for this `seed`, represented
    once."""
    context_len = run.cfg.replay.context_len
    if history > context_len:
        raise ValueError(f"history={history} exceeds the run's replay.context_len={context_len}: the held-out clips "
                         "and counterfactual states have only that many frames before the first predicted one")
    window = run.cfg.replay.row_frames
    frames, actions, _ = wmq.held_out_clips(run, episodes, clips, horizon, seed, max_steps)
    held_out = {"latents": represent(frames[:, :context_len + 1], None), "actions": actions, "target": context_len,
                "history": history}
    clips_cf = wmq.counterfactual_clips_for(run, clips, horizon, seed, max_steps)
    if clips_cf is None:
        return held_out, None
    context = clips_cf["context"]
    real = torch.stack([represent(torch.cat([context, frames_b], dim=1), window)[:, context.shape[1]:]
                        for frames_b in clips_cf["frames"]])
    # actions [2, N, C + H, ...] follow each frame: the sequence starts after the context's last frame.
    branch_actions = clips_cf["actions"][:, :, context.shape[1] - 1:context.shape[1] - 1 + horizon]
    return held_out, {"context": represent(context, window), "actions": branch_actions, "real": real}


def train_reference(
    run_dir: str | Path,
    steps: int,
    eval_every: int,
    width: int = 256,
    history: int = 2,
    space: str = "latents",
    episodes: int = 8,
    clips: int = 16,
    horizon: int = 8,
    seed: int = 0,
    max_steps: int = 200,
    lr: float | None = None,
    model_kind: str = "mlp",
    log=print,
) -> dict[str, Any]:
    """Train a `NextFrameMLP` of `width` on the frozen latents (or, `space="pixels"`, the frames) of the run in
    `run_dir` (`model_kind="conv"`: a `NextFrameConv` of `width` channels on the frames or the latents;
    `"attention"`: a `NextFrameAttention` of `width` on the latents) for
    `steps` AdamW steps (the world model's settings, its learning rate replaced by `lr` if given); measure at step 0
    and every `eval_every` steps (module docstring)."""
    if model_kind not in MODELS:
        raise ValueError(f"model_kind must be one of {MODELS}, got {model_kind!r}")
    if model_kind == "attention" and space != "latents":
        raise ValueError(f"model_kind='attention' attends between latent tokens; space={space!r} has one token a "
                         "frame: use space='latents'")
    for name, value, low in (("steps", steps, 1), ("eval_every", eval_every, 1), ("width", width, 1),
                             ("history", history, 1), ("episodes", episodes, 1), ("clips", clips, 2),
                             ("horizon", horizon, 1), ("seed", seed, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    run = wmq.load_run(run_dir)
    cfg = run.cfg
    dyn = cfg.dynamics
    discrete = dyn.n_actions > 0
    represent = representation(run, space)
    held_out, counterfactual = held_out_data(run, represent, episodes, clips, horizon, seed, max_steps, history)
    tokens, token_dim = held_out["latents"].shape[2:]
    action_size = dyn.n_actions if discrete else dyn.action_dim
    replay = more_steps.run_replay(run_dir, cfg, seed=cfg.seed + seed)
    if model_kind == "conv":
        frame_shape, layout = conv_frame_shape(run, space)
        model = template(NextFrameConv, frame_shape, action_size, width, discrete, history, layout)
    elif model_kind == "attention":
        model = template(NextFrameAttention, tokens, token_dim, action_size, width, discrete, history)
    else:
        model = template(NextFrameMLP, tokens, token_dim, action_size, width, discrete, history)
    params = init(model, cfg.seed + seed)
    moments = adamw_init(params)
    opt: AdamWConfig = cfg.optim.world_model if lr is None else replace(cfg.optim.world_model, lr=lr)
    generator = torch.Generator().manual_seed(cfg.seed + seed + 7)

    def loss_fn(p: TensorDictBase, inputs: Tensor, action: Tensor, target: Tensor) -> Tensor:
        return (apply(model, p, inputs, action) - target).square().mean()

    rows = [{"step": 0, "train_seconds": 0.0, "loss": None, **measure(model, params, held_out, counterfactual)}]
    log(json.dumps(rows[-1]))
    # The loss of copying the last frame on the same training transitions: a loss above it means the MLP has not
    # even learned what a constant zero change would give (the optimiser, not the data, is then the question).
    losses: list[float] = []
    copy_last_losses: list[float] = []
    seconds = 0.0
    for step in range(1, steps + 1):
        started = time.perf_counter()
        batch = replay_batch(replay.sample(), cfg.replay.final_frame)
        with torch.no_grad():
            latents = represent(batch["frames"], None)
        inputs, action, target = training_transitions(latents, batch["actions"], history, generator)
        grads, loss = grad_and_value(loss_fn)(params, inputs, action, target)
        params, moments, _ = adamw_update(params, grads, moments, step - 1, opt)  # updates taken before this one
        seconds += time.perf_counter() - started
        losses.append(float(loss))
        copy_last_losses.append(float((inputs[:, -1] - target).square().mean()))
        if step % eval_every == 0 or step == steps:
            rows.append({"step": step, "train_seconds": round(seconds, 1), "loss": sum(losses) / len(losses),
                         "loss_copy_last": sum(copy_last_losses) / len(copy_last_losses),
                         **measure(model, params, held_out, counterfactual)})
            log(json.dumps(rows[-1]))
            losses, copy_last_losses = [], []
    return {"run": str(run_dir), "checkpoint": str(run.checkpoint), "run_step": run.step, "env": run.env_name,
            "replay_transitions": replay.transition_count(), "model": model_kind, "width": width, "history": history,
            "space": space, "lr": opt.lr, "episodes": episodes, "clips": clips, "horizon": horizon, "seed": seed,
            "batch": [cfg.replay.batch_size, cfg.replay.seq_len], "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run directory of a d4func.train.loop run")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--width", type=int, default=256,
                        help="hidden units of each of the MLP's two layers (--model conv: channels of each layer)")
    parser.add_argument("--model", choices=MODELS, default="mlp",
                        help="conv: a dilated convolutional net on the frames, or on the latents laid out on "
                             "their grid (a local-attention tokenizer's); attention: a plain transformer over the "
                             "latent tokens, each token reading its own history (NextFrameAttention)")
    parser.add_argument("--history", type=int, default=2, help="latent frames the MLP reads")
    parser.add_argument("--space", choices=SPACES, default="latents",
                        help="what the MLP reads and predicts: the frozen tokenizer's latents, or the frames")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--horizon", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW learning rate (default: the run's optim.world_model.lr)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON path (default RUN/latent_mlp_reference.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train_reference(args.run, args.steps, args.eval_every, args.width, args.history, args.space, args.episodes,
                             args.clips, args.horizon, args.seed, args.max_steps, args.lr, args.model)
    out = Path(args.out) if args.out else Path(args.run) / "latent_mlp_reference.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
