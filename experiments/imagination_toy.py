"""Does imagination training beat behaviour cloning? A two-target gridworld small enough for a CPU (issue 5, point 6).

Task. An agent on an N x N grid (a red square in the rendered image) sees two targets, A (green) and B (blue), and
moves with five discrete actions (no-op, up, down, left, right; `moving_shapes.DISCRETE_DIRECTIONS`). Every step it
stands on B earns reward 1; A earns nothing. Episodes last `episode_len` steps from random positions.

Data. The behaviour policy heads for A in `1 - goal_b_prob` of the episodes and for B in the rest, greedily with
`epsilon` random actions. So the demonstrations are mostly *the wrong behaviour*, but they contain the right one
and the rewards: the offline setting where imagination should help. A BC policy reproduces the mixture.

Pipeline (Dreamer 4's phases 2 and 3 in miniature, no tokenizer): frames are rendered as one-hot images and cut
into pixel patches that stand in for tokenizer latents (`2 x - 1`, in [-1, 1] like the tokenizer's tanh).
Phase 2 trains the dynamics model with agent tokens, the policy (BC) and the reward head together
(`agent_finetune_step`); phase 3 trains policy and value heads in imagination from dataset contexts
(`imagination_step`, PMPO with the reverse KL to the BC prior). The policy acts in the real environment through the
same world model: each real frame is committed to the KV cache at tau_ctx and the policy reads its agent token.

    python experiments/imagination_toy.py --seed 0 [--config experiments/configs/agent_toy.yaml] [key=value ...]

Prints one JSON line per evaluation and a final summary with the real returns of: random, the behaviour policy,
an oracle (greedy to B), BC (the finetuned policy) and the imagination-trained policy, each sampled and greedy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from einops import rearrange
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from d4func.config import TransformerConfig, load_config
from d4func.data.moving_shapes import DISCRETE_DIRECTIONS
from d4func.dynamics import Dynamics, DynamicsConfig
from d4func.functional import count_params, init, template
from d4func.heads import AgentHeads, HeadsConfig, policy_dist
from d4func.imagination import ImaginationConfig, commit_frames, world_model_fn
from d4func.optim import AdamWConfig
from d4func.train.agent_step import (
    FinetuneConfig,
    agent_finetune_step,
    imagination_params,
    imagination_step,
    new_imagination_state,
)
from d4func.train.state import new_train_state
from d4func.transformer import empty_cache

N_ACTIONS = len(DISCRETE_DIRECTIONS)


def _dynamics() -> DynamicsConfig:
    return DynamicsConfig(
        # Layers: space, time, space. Time attention links a token slot only to the same slot at other steps, so a
        # space layer after it is what lets a patch learn that the agent arrived from a neighbouring patch.
        transformer=TransformerConfig(d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, mlp_ratio=2.0, time_every=2),
        latent_tokens=3, latent_dim=9, pack=1, n_registers=1, n_agent_tokens=1, n_actions=N_ACTIONS, k_max=8,
        sampling_steps=2,
    )


def _imagination() -> ImaginationConfig:
    # Short real episodes: a shorter discount than the paper's 0.997 keeps the imagined (never-ending) values in
    # the scale of what an episode can earn.
    return ImaginationConfig(horizon=10, gamma=0.9)


@dataclass(frozen=True)
class ToyConfig:
    grid: int = 8  # width in cells
    height: int = 1  # 1: a one-dimensional corridor (up and down then do nothing); > 1: a grid
    tokens: str = "profiles"  # latent layout: "patches" | "channels" | "profiles" (see render_latents)
    patch: int = 3
    blob: float = 0.6  # Gaussian width of the rendered objects, in cells
    episode_len: int = 12
    goal_b_prob: float = 0.25  # share of demonstrations that head for the rewarded target B
    epsilon: float = 0.2  # random-action rate of the behaviour policy
    n_episodes: int = 2000
    dynamics: DynamicsConfig = field(default_factory=_dynamics)
    heads_hidden: int = 32
    mtp: int = 8
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    finetune_steps: int = 2000
    finetune_lr: float = 3e-3
    batch: int = 16
    imagination: ImaginationConfig = field(default_factory=_imagination)
    value_warmup: int = 50  # imagination steps that train the value head alone before PMPO starts
    imagine_steps: int = 400
    imagine_lr: float = 1e-3
    imagine_batch: int = 64
    context_len: int = 2
    eval_envs: int = 512
    eval_every: int = 100

    def __post_init__(self) -> None:
        if self.tokens not in ("patches", "channels", "profiles"):
            raise ValueError(f"ToyConfig.tokens must be 'patches', 'channels' or 'profiles', got {self.tokens!r}")
        if self.grid < 2 or self.height < 1:
            raise ValueError(f"ToyConfig needs grid >= 2 and height >= 1, got {self.grid}, {self.height}")
        if self.tokens == "patches" and (self.grid % self.patch or self.height % self.patch):
            raise ValueError(f"ToyConfig.patch={self.patch} must divide grid={self.grid} and height={self.height}")
        shape = latent_shape(self)
        if (self.dynamics.latent_tokens, self.dynamics.latent_dim) != shape:
            raise ValueError(f"ToyConfig.dynamics needs (latent_tokens, latent_dim) = {shape} for tokens="
                             f"{self.tokens!r}, got ({self.dynamics.latent_tokens}, {self.dynamics.latent_dim})")
        if self.dynamics.n_actions != N_ACTIONS or self.dynamics.n_agent_tokens < 1:
            raise ValueError(f"ToyConfig.dynamics needs n_actions={N_ACTIONS} and agent tokens")
        if not 1 <= self.context_len < self.episode_len:
            raise ValueError(f"ToyConfig.context_len must lie in [1, episode_len), got {self.context_len}")
        for name in ("goal_b_prob", "epsilon"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ToyConfig.{name} must lie in [0, 1], got {getattr(self, name)}")


# --- the environment (batched, stateless functions of a state dict) ---------------------------------------------


def _cells(cfg: ToyConfig, n: int, gen: torch.Generator) -> Tensor:
    """n random cells (x, y) of the width x height grid."""
    return torch.stack([torch.randint(0, cfg.grid, (n,), generator=gen),
                        torch.randint(0, cfg.height, (n,), generator=gen)], dim=-1)


def reset(cfg: ToyConfig, n: int, gen: torch.Generator) -> dict[str, Tensor]:
    """n episodes: agent, A and B at random cells, A != B."""
    agent, a, b = _cells(cfg, n, gen), _cells(cfg, n, gen), _cells(cfg, n, gen)
    clash = (a == b).all(-1)
    while bool(clash.any()):
        b[clash] = _cells(cfg, int(clash.sum()), gen)
        clash = (a == b).all(-1)
    return {"agent": agent, "a": a, "b": b}


def step(cfg: ToyConfig, state: dict[str, Tensor], action: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Move (stopping at the walls); reward 1 when the agent ends the step on B."""
    upper = torch.tensor([cfg.grid - 1, cfg.height - 1])
    moved = torch.minimum((state["agent"] + DISCRETE_DIRECTIONS[action].long()).clamp(min=0), upper)
    new = {**state, "agent": moved}
    return new, (moved == state["b"]).all(-1).float()


def render_image(cfg: ToyConfig, state: dict[str, Tensor]) -> Tensor:
    """Image [n, 3, H, W] in [0, 1]: agent, A and B channels, each object a Gaussian blob of width `blob` cells (a
    move is then a smooth shift rather than a jump between one-hot pixels)."""
    columns = torch.arange(cfg.grid, dtype=torch.float32)
    rows = torch.arange(cfg.height, dtype=torch.float32)
    channels = []
    for key in ("agent", "a", "b"):
        x, y = state[key][:, 0].float(), state[key][:, 1].float()
        gx = torch.exp(-0.5 * ((columns[None] - x[:, None]) / cfg.blob) ** 2)  # [n, W] over columns
        gy = torch.exp(-0.5 * ((rows[None] - y[:, None]) / cfg.blob) ** 2)  # [n, H] over rows
        channels.append(gy[:, :, None] * gx[:, None, :])
    return torch.stack(channels, dim=1)


def latent_shape(cfg: ToyConfig) -> tuple[int, int]:
    """(S, Dz) of `render_latents` for the configured `tokens` layout."""
    if cfg.tokens == "patches":
        return (cfg.grid // cfg.patch) * (cfg.height // cfg.patch), 3 * cfg.patch**2
    if cfg.tokens == "channels":
        return 3, cfg.grid * cfg.height
    return 3, cfg.grid + cfg.height


def render_latents(cfg: ToyConfig, state: dict[str, Tensor]) -> Tensor:
    """The image as latents [n, S, Dz] in [-1, 1] (`2 x - 1`), standing in for a tokenizer. `tokens`:
    "patches": p x p pixel patches of all channels; "channels": one token per colour channel (the whole channel);
    "profiles": one token per channel holding its column and row profiles (the channel's max over rows and over
    columns), a 1-D rendering in which a move is a shift of one profile."""
    image = render_image(cfg, state)
    if cfg.tokens == "patches":
        latents = rearrange(image, "n c (h p) (w q) -> n (h w) (c p q)", p=cfg.patch, q=cfg.patch)
    elif cfg.tokens == "channels":
        latents = rearrange(image, "n c h w -> n c (h w)")
    else:
        latents = torch.cat([image.amax(dim=2), image.amax(dim=3)], dim=-1)
    return 2.0 * latents - 1.0


def greedy_action(agent: Tensor, goal: Tensor) -> Tensor:
    """The action that reduces the larger coordinate gap to `goal` (x first on ties); no-op when there."""
    dx, dy = goal[:, 0] - agent[:, 0], goal[:, 1] - agent[:, 1]
    horizontal = torch.where(dx > 0, 4, 3)  # right, left
    vertical = torch.where(dy > 0, 2, 1)  # down (y grows downwards), up
    action = torch.where(dx.abs() >= dy.abs(), horizontal, vertical)
    return torch.where((dx == 0) & (dy == 0), torch.zeros_like(action), action)


def collect(cfg: ToyConfig, n: int, gen: torch.Generator) -> dict[str, Tensor]:
    """Behaviour-policy episodes: latents [n, T, S, Dz], actions [n, T] long, rewards [n, T] (TorchRL convention:
    rewards[:, t] follows actions[:, t])."""
    state = reset(cfg, n, gen)
    to_b = torch.rand(n, generator=gen) < cfg.goal_b_prob
    goal = torch.where(to_b[:, None], state["b"], state["a"])
    latents, actions, rewards = [], [], []
    for _ in range(cfg.episode_len):
        latents.append(render_latents(cfg, state))
        action = greedy_action(state["agent"], goal)
        explore = torch.rand(n, generator=gen) < cfg.epsilon
        action = torch.where(explore, torch.randint(0, N_ACTIONS, (n,), generator=gen), action)
        state, reward = step(cfg, state, action)
        actions.append(action)
        rewards.append(reward)
    return {"latents": torch.stack(latents, 1), "actions": torch.stack(actions, 1),
            "rewards": torch.stack(rewards, 1), "to_b": to_b}


def scripted_returns(cfg: ToyConfig, kind: str, n: int, gen: torch.Generator) -> Tensor:
    """Real returns [n] of a scripted policy: 'random', 'oracle' (greedy to B) or 'behaviour' (the data's)."""
    if kind == "behaviour":
        return collect(cfg, n, gen)["rewards"].sum(1)
    state = reset(cfg, n, gen)
    total = torch.zeros(n)
    for _ in range(cfg.episode_len):
        if kind == "random":
            action = torch.randint(0, N_ACTIONS, (n,), generator=gen)
        else:
            action = greedy_action(state["agent"], state["b"])
        state, reward = step(cfg, state, action)
        total += reward
    return total


def agent_returns(cfg: ToyConfig, model: Dynamics, heads: AgentHeads, params: TensorDictBase, n: int, greedy: bool,
                  gen: torch.Generator) -> Tensor:
    """Real returns [n] of the agent acting through the world model: every real frame is committed to the KV cache
    (with the action that led into it) and the policy reads that frame's agent token."""
    state = reset(cfg, n, gen)
    model_fn = world_model_fn(model, params["dynamics"])
    cache = empty_cache(n)
    previous = torch.zeros(n, dtype=torch.long)
    known = torch.zeros(n, 1, dtype=torch.bool)
    total = torch.zeros(n)
    with torch.no_grad():
        for _ in range(cfg.episode_len):
            frame = render_latents(cfg, state)[:, None]
            agent, cache = commit_frames(model_fn, model.cfg, frame, previous[:, None], known, cache, gen)
            policy = policy_dist(heads, params["heads", "policy"], agent[:, 0])
            action = policy.mode() if greedy else policy.sample(gen)
            state, reward = step(cfg, state, action)
            total += reward
            previous, known = action, torch.ones(n, 1, dtype=torch.bool)
    return total


def mean_and_se(returns: Tensor) -> dict[str, float]:
    return {"mean": round(float(returns.mean()), 4), "se": round(float(returns.std() / returns.numel() ** 0.5), 4)}


# --- training -----------------------------------------------------------------------------------------------------


def sample_rows(data: dict[str, Tensor], batch: int, gen: torch.Generator) -> dict[str, Tensor]:
    index = torch.randint(0, data["latents"].shape[0], (batch,), generator=gen)
    return {key: data[key][index] for key in ("latents", "actions", "rewards")}


def sample_contexts(data: dict[str, Tensor], batch: int, length: int, gen: torch.Generator) -> dict[str, Tensor]:
    """Replay contexts: `length` consecutive frames (and their actions) from random episodes and start steps."""
    episodes, steps = data["actions"].shape
    index = torch.randint(0, episodes, (batch,), generator=gen)
    start = torch.randint(0, steps - length + 1, (batch,), generator=gen)
    window = start[:, None] + torch.arange(length)[None]
    return {"latents": data["latents"][index[:, None], window], "actions": data["actions"][index[:, None], window]}


def run(cfg: ToyConfig, seed: int, log=print) -> dict:
    """Phase 2 then phase 3 for one seed; returns the summary (real returns as mean and standard error over
    `eval_envs` episodes, the same start states for every policy)."""
    gen = torch.Generator().manual_seed(seed)
    eval_seed = 10_000 + seed
    model = template(Dynamics, cfg.dynamics)
    heads = template(AgentHeads, HeadsConfig.for_dynamics(cfg.dynamics, hidden=cfg.heads_hidden, mtp=cfg.mtp))
    params = TensorDict({"dynamics": init(model, seed), "heads": init(heads, seed + 1)})
    data = collect(cfg, cfg.n_episodes, gen)
    n = cfg.eval_envs
    summary: dict = {"seed": seed, "params": count_params(params)}
    for kind in ("random", "behaviour", "oracle"):
        summary[kind] = mean_and_se(scripted_returns(cfg, kind, n, torch.Generator().manual_seed(eval_seed)))
    log(json.dumps({"phase": "references", **summary}))

    def returns(agent_params: TensorDictBase) -> dict[str, Tensor]:
        # The same start states for every evaluation (same generator seed), so returns pair up episode by episode.
        return {mode: agent_returns(cfg, model, heads, agent_params, n, mode == "greedy",
                                    torch.Generator().manual_seed(eval_seed))
                for mode in ("sample", "greedy")}

    def evaluate(agent_params: TensorDictBase) -> dict[str, dict[str, float]]:
        return {mode: mean_and_se(r) for mode, r in returns(agent_params).items()}

    start = time.time()
    state = new_train_state(params, with_ema=False)
    opt = AdamWConfig(lr=cfg.finetune_lr)
    for i in range(cfg.finetune_steps):
        state, metrics = agent_finetune_step(state, sample_rows(data, cfg.batch, gen), gen, model=model, heads=heads,
                                             opt=opt, cfg=cfg.finetune)
        if (i + 1) % cfg.eval_every == 0 or i + 1 == cfg.finetune_steps:
            log(json.dumps({"phase": "finetune", "step": i + 1, "seconds": round(time.time() - start, 1),
                            **{k: round(float(v), 4) for k, v in metrics.items()}}))
    bc_returns = returns(state["params"])
    summary["bc"] = {mode: mean_and_se(r) for mode, r in bc_returns.items()}
    log(json.dumps({"phase": "bc", **summary["bc"]}))

    start = time.time()
    istate = new_imagination_state(state["params"])
    opt = AdamWConfig(lr=cfg.imagine_lr)
    warmup = replace(cfg.imagination, policy_coef=0.0)
    keys = ("entropy", "kl", "adv_mean", "adv_std", "frac_pos", "value_mean", "return_mean", "imagined_reward",
            "imagined_return", "policy_loss", "value_loss")
    for i in range(cfg.value_warmup + cfg.imagine_steps):
        batch = sample_contexts(data, cfg.imagine_batch, cfg.context_len, gen)
        icfg = warmup if i < cfg.value_warmup else cfg.imagination
        istate, metrics = imagination_step(istate, batch, gen, model=model, heads=heads, opt=opt, cfg=icfg)
        done = i + 1 - cfg.value_warmup
        if done > 0 and (done % cfg.eval_every == 0 or done == cfg.imagine_steps):
            log(json.dumps({"phase": "imagine", "step": done, "seconds": round(time.time() - start, 1),
                            **{k: round(float(metrics[k]), 4) for k in keys},
                            **evaluate(imagination_params(istate))}))
        elif done == 0:
            log(json.dumps({"phase": "value_warmup", "steps": cfg.value_warmup,
                            **{k: round(float(metrics[k]), 4) for k in keys}}))
    final_returns = returns(imagination_params(istate))
    summary["imagination"] = {mode: mean_and_se(r) for mode, r in final_returns.items()}
    # Paired over start states: imagination minus BC, mean and standard error of the per-episode difference.
    summary["gain"] = {mode: mean_and_se(final_returns[mode] - bc_returns[mode]) for mode in final_returns}
    summary["minutes"] = round((time.time() - start) / 60, 2)
    log(json.dumps({"phase": "summary", **summary}))
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=None, help="YAML file merged into ToyConfig")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. imagine_steps=200")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(ToyConfig, args.config, args.overrides)
    print(json.dumps({"config": asdict(cfg)}, default=str), file=sys.stderr)
    return run(cfg, args.seed)


if __name__ == "__main__":
    main()
