"""How much of a dataset's actions can be predicted from what the world model sees, on held-out episodes?

Behaviour cloning (the policy head, paper Sec. 3.3) can only be as good as the actions are predictable from the
agent's inputs. This probe separates the two. It fits small MLP probes on the episodes of a run's offline dataset
that predict the action at frame t, with the policy head's own distribution (bounded normal or categorical), and
scores them on held-out episodes: those of `--held-out DATASET`, recorded apart and never seen by the run (the
clean test), or else every `--held-out-every`-th episode of the run's dataset, which the probes do not train on
but the run did (its BC head and agent tokens have seen their actions: `held_out_seen_by_run` says so). Inputs:

- nothing (a constant input: the best state-independent fit, the *marginal*);
- the tokenizer latents of frame t, and of frames t - k + 1 .. t (`--history` k);
- the world model's agent token at frame t, with every frame committed at the context signal level, as the policy
  sees frames while acting (`imagination.commit_frames`),
- the episode's previous `--action-history` k actions (zeros with a flag before the episode's start), which the
  run's own model sees within a row only: a planner's actions can follow from its earlier ones,

and reports each probe's negative log-likelihood (NLL) of the held-out actions at its best evaluation (an optimistic
figure: the best of `--steps / --eval-every` evaluations), beside the run's BC head on the same frames. A probe no
better than the marginal means that, at this dataset size, the inputs do not predict the actions on new episodes,
whatever the head; a BC head far above a probe means the head, not the data, is the limit.

The BC head is also read with its frames committed at other signal levels (`--signal-levels`, beside the context
level): at 1 it sees the clean frames, at 0 pure noise in their place, so it knows only the actions of its row. The
difference says how much of what the head predicts comes from the frames rather than the action history.

Frames are taken in windows of `replay.seq_len` frames, each starting at the window's first frame, as training rows
do; positions with fewer than k frames of history in their window are left out of every figure.

    python experiments/bc_probe.py --run runs/results_cartpole_expert_v2_seed2 \
        --held-out runs/expert/cartpole_expert64_v2_seed11                              # docs/results.md, Sec. 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from world_model_quality import LoadedRun, load_run  # noqa: E402

from d4func.data.merge_datasets import dataset_episodes  # noqa: E402
from d4func.dynamics import actions_into_frames  # noqa: E402
from d4func.heads import HeadsConfig, action_dist_from_raw, policy_dist  # noqa: E402
from d4func.imagination import commit_frames, world_model_fn  # noqa: E402
from d4func.tokenizer import encode  # noqa: E402
from d4func.transformer import empty_cache  # noqa: E402

RESULT_FILE = "bc_probe.json"


def previous_actions(actions: Tensor, history: int, n_actions: int = 0) -> Tensor:
    """Per step of an episode's actions `[T, ...]` (continuous `[T, A]` or discrete `[T]`), its previous `history`
    actions, oldest first, each with a flag saying it exists (zeros before the episode's start): `[T, history *
    (A + 1)]`, discrete actions one-hot (`A = n_actions`)."""
    if history < 1:
        raise ValueError(f"action history must be >= 1, got {history}")
    coded = (torch.nn.functional.one_hot(actions.long(), n_actions).float() if n_actions
             else actions.float().reshape(actions.shape[0], -1))
    flagged = torch.cat([coded, torch.ones(coded.shape[0], 1)], dim=-1)
    padded = torch.cat([torch.zeros(history, flagged.shape[-1]), flagged[:-1]])  # row i + history: action i - 1
    windows = padded.unfold(0, history, 1)  # [T, A + 1, history]: steps t - history .. t - 1
    return rearrange(windows, "t f h -> t (h f)")


def episode_windows(run: LoadedRun, data: str | Path, held_out: Callable[[int], bool], max_episodes: int | None,
                    *, action_history: int = 1, signal_levels: tuple[float, ...] = ()) -> dict[str, Tensor]:
    """Every episode of `data` cut into windows of `replay.seq_len` frames (a shorter last window is dropped):
    latents `[N, T, S, Dz]`, agent tokens `[N, T, n_agent, D]` (acting condition), actions `[N, T, ...]`,
    the episode's previous `action_history` actions per step (`previous_actions`, `[N, T, F]`), `held_out` `[N]`
    (`held_out(episode_index)` of the window's episode) and for each of `signal_levels` the agent tokens with the
    frames committed at that level (key `agent@<level>`)."""
    length = run.cfg.replay.seq_len
    model_fn = world_model_fn(run.dynamics, run.dynamics_params)
    out: dict[str, list[Tensor]] = {"latents": [], "agent": [], "actions": [], "previous_actions": [],
                                    "held_out": [], **{f"agent@{level}": [] for level in signal_levels}}
    generator = torch.Generator().manual_seed(0)
    # Each other level draws its noise from its own generator, so no level's figures depend on which others are read.
    level_generators = {level: torch.Generator().manual_seed(1 + round(level * 1_000_000)) for level in signal_levels}
    for index, episode in enumerate(dataset_episodes(data)):
        if max_episodes is not None and index >= max_episodes:
            break
        steps = episode["action"].shape[0] // length * length
        if steps == 0:
            continue
        frames = rearrange(episode["pixels"][:steps].float() / 255.0, "(n t) ... -> n t ...", t=length)
        actions = rearrange(episode["action"][:steps], "(n t) ... -> n t ...", t=length)
        with torch.no_grad():
            latents = encode(run.tokenizer, run.tokenizer_params, frames)
            actions_in, mask_in = actions_into_frames(actions)
            agent, _ = commit_frames(model_fn, run.dynamics.cfg, latents, actions_in, mask_in,
                                     empty_cache(latents.shape[0], latents.device), generator)
            for level in signal_levels:
                at_level, _ = commit_frames(model_fn, run.dynamics.cfg, latents, actions_in, mask_in,
                                            empty_cache(latents.shape[0], latents.device), level_generators[level],
                                            signal_level=level)
                out[f"agent@{level}"].append(at_level)
        history = previous_actions(episode["action"], action_history, run.heads.cfg.n_actions)
        out["previous_actions"].append(rearrange(history[:steps], "(n t) f -> n t f", t=length))
        out["latents"].append(latents)
        out["agent"].append(agent)
        out["actions"].append(actions)
        out["held_out"].append(torch.full((latents.shape[0],), held_out(index)))
    if not out["latents"]:
        raise ValueError(f"{data} holds no episode of at least replay.seq_len={length} steps")
    return {key: torch.cat(value) for key, value in out.items()}


def history_features(latents: Tensor, history: int) -> Tensor:
    """Latents of frames t - history + 1 .. t, flattened: `[N, T - history + 1, history * S * Dz]`."""
    windows = latents.unfold(1, history, 1)  # [N, T - h + 1, S, Dz, h]
    return rearrange(windows, "n t s d h -> n t (h s d)")


def fit_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, heads_cfg: HeadsConfig, *,
              steps: int, eval_every: int, seed: int = 0, hidden: int = 256, batch: int = 256, lr: float = 1e-3
              ) -> dict[str, Any]:
    """An MLP from features `[M, F]` to the policy head's action distribution, trained by NLL on the training
    pairs; returns the held-out NLL at each evaluation and the best of them (with the training NLL there)."""
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError(f"need training and held-out pairs, got {train_x.shape[0]} and {test_x.shape[0]}")
    torch.manual_seed(seed)
    features = train_x.shape[-1]
    net = nn.Sequential(nn.LayerNorm(features), nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                        nn.SiLU(), nn.Linear(hidden, heads_cfg.policy_out))
    opt = torch.optim.Adam(net.parameters(), lr)

    def nll(x: Tensor, y: Tensor) -> Tensor:
        return -action_dist_from_raw(heads_cfg, net(x)).log_prob(y).mean()

    curve = []
    for step in range(1, steps + 1):
        picked = torch.randint(0, train_x.shape[0], (batch,))
        loss = nll(train_x[picked], train_y[picked])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                curve.append({"step": step, "train_nll": float(nll(train_x, train_y)),
                              "held_out_nll": float(nll(test_x, test_y))})
    best = min(curve, key=lambda point: point["held_out_nll"])
    return {"held_out_nll": best["held_out_nll"], "train_nll": best["train_nll"], "best_step": best["step"],
            "curve": curve}


def probe_run(run_dir: str | Path, data: str | Path | None = None, *, held_out_data: str | Path | None = None,
              history: int = 4, held_out_every: int = 5, steps: int = 2000, eval_every: int = 250,
              max_episodes: int | None = None, action_history: int | None = None,
              signal_levels: tuple[float, ...] = (1.0, 0.5, 0.0)) -> dict[str, Any]:
    """The probes of the module docstring on the newest checkpoint of `run_dir`: trained on the episodes of `data`
    (default: the run's dataset), scored on those of `held_out_data`, or without it on every
    `held_out_every`-th episode of `data` (at most `max_episodes` of each dataset). `action_history` defaults to
    `replay.seq_len - 1`, the most actions a training row shows before its last frame."""
    run = load_run(run_dir)
    data = data if data is not None else run.cfg.loop.offline_data
    if not data:
        raise ValueError(f"run {run_dir} names no offline dataset (loop.offline_data): pass --data")
    if history < 1 or history > run.cfg.replay.seq_len:
        raise ValueError(f"history must be in 1..replay.seq_len={run.cfg.replay.seq_len}, got {history}")
    action_history = run.cfg.replay.seq_len - 1 if action_history is None else action_history
    if action_history < 1:
        raise ValueError(f"action_history must be >= 1, got {action_history}")
    bad_levels = [level for level in signal_levels if not 0.0 <= level <= 1.0]
    if bad_levels:
        raise ValueError(f"signal levels must be in [0, 1], got {bad_levels}")
    context_level = run.dynamics.cfg.context_signal
    signal_levels = tuple(sorted({float(level) for level in signal_levels} - {context_level}, reverse=True))

    def windows_of(path: str | Path, held_out: Callable[[int], bool]) -> dict[str, Tensor]:
        return episode_windows(run, path, held_out, max_episodes, action_history=action_history,
                               signal_levels=signal_levels)

    if held_out_data is None:
        if held_out_every < 2:
            raise ValueError(f"held_out_every must be >= 2 (1 would hold out every episode), got {held_out_every}")
        windows = windows_of(data, lambda i: i % held_out_every == held_out_every - 1)
    else:
        parts = [windows_of(data, lambda i: False), windows_of(held_out_data, lambda i: True)]
        windows = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    first = history - 1  # positions with `history` frames in their window
    actions = windows["actions"][:, first:]
    held_out = windows["held_out"]
    heads_cfg = run.heads.cfg

    def pairs(features: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        flat_x = features[:, -actions.shape[1]:]
        return (flat_x[~held_out].flatten(0, 1), actions[~held_out].flatten(0, 1),
                flat_x[held_out].flatten(0, 1), actions[held_out].flatten(0, 1))

    def bc_nll(agent: Tensor) -> dict[str, float]:
        with torch.no_grad():
            nll = -policy_dist(run.heads, run.heads_params["policy"], agent[:, first:]).log_prob(actions)
        return {"train": float(nll[~held_out].mean()), "held_out": float(nll[held_out].mean())}

    by_signal = {level: bc_nll(windows[f"agent@{level}"]) for level in signal_levels}
    by_signal[context_level] = bc_nll(windows["agent"])
    inputs: dict[str, Callable[[], Tensor]] = {
        "marginal (no input)": lambda: torch.zeros(*windows["latents"].shape[:2], 1),
        "latents of frame t": lambda: history_features(windows["latents"], 1),
        f"latents of frames t-{history - 1}..t": lambda: history_features(windows["latents"], history),
        "agent token at t": lambda: rearrange(windows["agent"], "n t a d -> n t (a d)"),
        f"actions t-{action_history}..t-1 of the episode": lambda: windows["previous_actions"],
    }
    probes = {name: fit_probe(*pairs(make()), heads_cfg, steps=steps, eval_every=eval_every)
              for name, make in inputs.items()}
    return {
        "run": str(run_dir), "checkpoint": str(run.checkpoint), "step": run.step, "data": str(data),
        "held_out_data": None if held_out_data is None else str(held_out_data),
        "held_out_every": None if held_out_data is not None else held_out_every,
        # Without a held-out dataset the held-out episodes are the run's own: it trained on their actions.
        "held_out_seen_by_run": held_out_data is None and Path(data) == Path(str(run.cfg.loop.offline_data)),
        "history": history, "steps": steps,
        "pairs": {"train": int((~held_out).sum()) * actions.shape[1],
                  "held_out": int(held_out.sum()) * actions.shape[1]},
        "bc_head_nll": by_signal[context_level], "context_signal": context_level,
        # The BC head with its frames committed at each signal level (1: clean, 0: pure noise in their place).
        "bc_head_nll_by_signal": {f"{level:g}": by_signal[level] for level in sorted(by_signal, reverse=True)},
        "action_history": action_history,
        "probes": probes,
    }


def format_table(result: dict[str, Any]) -> str:
    rows = ["| predictor | held-out NLL | training NLL |", "|---|---|---|"]
    bc = result["bc_head_nll"]
    seen = " (held-out episodes seen by the run)" if result["held_out_seen_by_run"] else ""
    rows.append(f"| the run's BC head (step {result['step']}){seen} | {bc['held_out']:.3f} | {bc['train']:.3f} |")
    context = f"{result['context_signal']:g}"
    for level, nll in result["bc_head_nll_by_signal"].items():
        if level != context:
            what = {"1": "clean frames", "0": "pure noise for frames"}.get(level, f"frames at signal level {level}")
            rows.append(f"| the BC head, {what} | {nll['held_out']:.3f} | {nll['train']:.3f} |")
    for name, probe in result["probes"].items():
        rows.append(f"| probe: {name} (best at step {probe['best_step']}) | {probe['held_out_nll']:.3f} | "
                    f"{probe['train_nll']:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run directory of d4func.train.loop (newest checkpoint)")
    parser.add_argument("--data", default=None, help="the probes' training episodes (default: the run's "
                        "loop.offline_data)")
    parser.add_argument("--held-out", default=None, help="a dataset of the same env the run never saw: the held-out "
                        "episodes (default: every --held-out-every-th episode of --data)")
    parser.add_argument("--history", type=int, default=4)
    parser.add_argument("--held-out-every", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--max-episodes", type=int, default=None)
    parser.add_argument("--action-history", type=int, default=None, help="previous actions the action probe reads "
                        "(default: replay.seq_len - 1)")
    parser.add_argument("--signal-levels", type=float, nargs="*", default=[1.0, 0.5, 0.0],
                        help="signal levels to read the BC head at besides the context level (1 clean, 0 noise)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = probe_run(args.run, args.data, held_out_data=args.held_out, history=args.history,
                       held_out_every=args.held_out_every,
                       steps=args.steps, eval_every=args.eval_every, max_episodes=args.max_episodes,
                       action_history=args.action_history, signal_levels=tuple(args.signal_levels))
    (Path(args.run) / RESULT_FILE).write_text(json.dumps(result, indent=2))
    print(format_table(result))
    print(f"(a uniform policy on [-1, 1] scores {math.log(2):.3f} per action dimension; written to "
          f"{Path(args.run) / RESULT_FILE})")
    return result


if __name__ == "__main__":
    main()
