"""The project's real train steps run data-parallel, for tests/test_distributed.py.

Run as `torchrun --standalone --nproc_per_node=2 dp_real_steps.py OUT` (gloo on CPU): every rank builds the same
full batches, takes its contiguous shard and its own generator `rank_generator(SEED, rank)`, and takes `N_STEPS`
steps of `dynamics_train_step` and of `tokenizer_train_step` with `grad_fn=data_parallel_grad_and_value`,
checking after each step that the whole train state is bitwise the same on both ranks. Rank 0 writes the final
states and the metrics the steps reported to OUT.

The references (`reference_dynamics`, `reference_tokenizer`) run in one process: for each step, the gradient of
each shard with a generator seeded as that rank's (so it draws the same signal levels, step sizes, noise and MAE
masks the rank drew), the mean of the shard gradients, then one AdamW update. Everything is float64 (the
tokenizer's running RMS statistics are float32 by design), so the comparison can be tight.
"""

from __future__ import annotations

import sys
from functools import partial

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from d4func.config import TransformerConfig
from d4func.dynamics import Dynamics, DynamicsConfig
from d4func.functional import grad_and_value, init, template
from d4func.heads import AgentHeads, HeadsConfig
from d4func.imagination import ImaginationConfig
from d4func.loss_rms import update_loss_rms
from d4func.optim import AdamWConfig
from d4func.tokenizer import Tokenizer, TokenizerConfig
from d4func.tokenizer_loss import (
    TokenizerLossConfig,
    new_tokenizer_train_state,
    tokenizer_loss,
    tokenizer_train_step,
)
from d4func.train import distributed as D
from d4func.train.agent_step import (
    agent_finetune_loss,
    agent_finetune_step,
    imagination_step,
    new_imagination_state,
)
from d4func.train.dynamics_step import dynamics_loss, dynamics_train_step
from d4func.train.state import apply_gradients, new_train_state

SEED, WORLD, N_STEPS, EMA = 5, 2, 2, 0.9
OPT = AdamWConfig(lr=1e-2)

DYN = DynamicsConfig(
    transformer=TransformerConfig(d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, time_every=2),
    latent_tokens=4, latent_dim=4, pack=2, n_registers=1, action_dim=2, k_max=4, sampling_steps=2,
    bootstrap_fraction=0.5,  # both target kinds (flow and bootstrapped half steps) in every shard
)
DYN_BATCH, DYN_T = 4, 3

_BLOCK = TransformerConfig(d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, time_every=2, logit_cap=None)
TOK = TokenizerConfig(height=8, width=8, channels=3, patch_size=4, n_latents=2, latent_dim=4,
                      encoder=_BLOCK, decoder=_BLOCK)
TOK_LOSS = TokenizerLossConfig(lpips_weight=0.0, mask=True)  # MAE masks: the tokenizer's per-rank randomness
TOK_BATCH, TOK_T = 4, 2

AGENT_DYN = DynamicsConfig(
    transformer=TransformerConfig(d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, time_every=2),
    latent_tokens=4, latent_dim=4, pack=2, n_registers=1, n_agent_tokens=1, action_dim=2, k_max=4, sampling_steps=1,
)
AGENT_HEADS = HeadsConfig.for_dynamics(AGENT_DYN, hidden=16, mtp=2, n_bins=17, bins_low=-3.0, bins_high=3.0)
IMAGINE = ImaginationConfig(horizon=2)
AGENT_BATCH, AGENT_T = 4, 3


def shard(x: Tensor, rank: int, world: int = WORLD) -> Tensor:
    """Rank `rank`'s contiguous slice of the batch dimension."""
    size = x.shape[0] // world
    return x[rank * size:(rank + 1) * size]


def dynamics_batches() -> list[tuple[Tensor, Tensor]]:
    """`N_STEPS` full batches (clean latents, actions), float64, identical on every rank."""
    gen = torch.Generator().manual_seed(1234)
    shapes = (DYN_BATCH, DYN_T, DYN.latent_tokens, DYN.latent_dim), (DYN_BATCH, DYN_T, DYN.action_dim)
    return [tuple(torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1 for shape in shapes)
            for _ in range(N_STEPS)]


def tokenizer_batches() -> list[Tensor]:
    """`N_STEPS` full batches of frames `[B, T, C, H, W]` in [0, 1], float64."""
    gen = torch.Generator().manual_seed(4321)
    return [torch.rand(TOK_BATCH, TOK_T, TOK.channels, TOK.height, TOK.width, generator=gen, dtype=torch.float64)
            for _ in range(N_STEPS)]


def agent_batches() -> list[dict[str, Tensor]]:
    """`N_STEPS` full phase-2 batches (latents, continuous actions, rewards), float64, no episode ends; the last
    frame takes no action (`action_valid`), as in rows with `replay.final_frame`."""
    gen = torch.Generator().manual_seed(99)
    out = []
    for _ in range(N_STEPS):
        latents = torch.rand(AGENT_BATCH, AGENT_T, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
        actions = torch.rand(AGENT_BATCH, AGENT_T, 2, generator=gen, dtype=torch.float64) * 2 - 1
        acted = (torch.arange(AGENT_T) < AGENT_T - 1).expand(AGENT_BATCH, AGENT_T).clone()
        out.append({"latents": latents, "actions": actions, "rewards": actions[..., 0].clone(), "action_valid": acted})
    return out


def shard_batch(batch: dict[str, Tensor], rank: int) -> dict[str, Tensor]:
    return {name: shard(value, rank) for name, value in batch.items()}


def agent_params(seed: int = 0) -> TensorDictBase:
    return TensorDict({"dynamics": init(template(Dynamics, AGENT_DYN), seed, dtype=torch.float64),
                       "heads": init(template(AgentHeads, AGENT_HEADS), seed + 1, dtype=torch.float64)})


def dynamics_params(seed: int = 0) -> TensorDictBase:
    return init(template(Dynamics, DYN), seed, dtype=torch.float64)


def tokenizer_params(seed: int = 0) -> TensorDictBase:
    return init(template(Tokenizer, TOK), seed, dtype=torch.float64)


def _mean(trees: list[TensorDictBase]) -> TensorDictBase:
    """Leafwise mean: the sum in rank order divided by the count, as `all_reduce_mean` computes it."""
    total = trees[0]
    for tree in trees[1:]:
        total = total + tree
    return total / len(trees)


def _mean_metrics(metrics: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-name mean over shards (the maximum for `D.MAX_METRICS`), in float64 and cast back, as `reduce_metrics`
    computes it."""
    def reduce(name: str) -> Tensor:
        values = torch.stack([m[name].double() for m in metrics])
        value = values.max() if name in D.MAX_METRICS else values.sum() / len(metrics)
        return value.to(metrics[0][name].dtype)

    return {name: reduce(name) for name in metrics[0]}


def reference_dynamics() -> tuple[TensorDictBase, list[dict[str, Tensor]]]:
    """Final state and per-step loss metrics: mean of the shards' gradients, each shard with its rank's generator."""
    model = template(Dynamics, DYN)
    state = new_train_state(dynamics_params())
    gens = [D.rank_generator(SEED, rank) for rank in range(WORLD)]
    history = []
    for latents, actions in dynamics_batches():
        outs = [grad_and_value(dynamics_loss, has_aux=True)(state["params"], shard(latents, r), shard(actions, r),
                                                            gens[r], model=model) for r in range(WORLD)]
        grads = _mean([g for g, _ in outs])
        history.append(_mean_metrics([metrics for _, (_, metrics) in outs]))
        state, _ = apply_gradients(state, grads, OPT, EMA)
    return state, history


def reference_tokenizer() -> tuple[TensorDictBase, list[dict[str, Tensor]]]:
    """As `reference_dynamics`; the running RMS statistics are updated with the rank mean of each term."""
    model = template(Tokenizer, TOK)
    state = new_tokenizer_train_state(tokenizer_params())
    gens = [D.rank_generator(SEED, rank) for rank in range(WORLD)]
    history = []
    for frames in tokenizer_batches():
        loss_fn = partial(tokenizer_loss, template=model, cfg=TOK_LOSS, loss_rms=state["loss_rms"])
        outs = [grad_and_value(loss_fn, has_aux=True)(state["params"], shard(frames, r), gens[r])
                for r in range(WORLD)]
        grads = _mean([g for g, _ in outs])
        metrics = _mean_metrics([{"loss": loss, **{k: v for k, v in m.items() if k != "loss_rms"}}
                                 for _, (loss, m) in outs])
        history.append(metrics)
        rms = update_loss_rms(state["loss_rms"], {"mse": metrics["mse"]}, TOK_LOSS.rms_decay)
        state, _ = apply_gradients(state, grads, OPT, EMA)
        state["loss_rms"] = rms
    return state, history


def reference_finetune() -> tuple[TensorDictBase, list[dict[str, Tensor]]]:
    """As `reference_dynamics`, for the phase-2 agent finetuning loss (no padding: every shard mean is over all of
    the shard's steps, so the rank mean is the mean over the whole batch's steps)."""
    model, heads = template(Dynamics, AGENT_DYN), template(AgentHeads, AGENT_HEADS)
    state = new_train_state(agent_params())
    gens = [D.rank_generator(SEED, rank) for rank in range(WORLD)]
    history = []
    for batch in agent_batches():
        outs = []
        for r in range(WORLD):
            part = shard_batch(batch, r)
            outs.append(grad_and_value(agent_finetune_loss, has_aux=True)(
                state["params"], part["latents"], part["actions"], part["rewards"], None, gens[r],
                model=model, heads=heads, action_valid=part["action_valid"]))
        history.append(_mean_metrics([metrics for _, (_, metrics) in outs]))
        state, _ = apply_gradients(state, _mean([g for g, _ in outs]), OPT, EMA)
    return state, history


def _in_sync(state: TensorDictBase, metrics: dict[str, Tensor], what: str) -> None:
    """The whole train state and every reported metric are bitwise the same on all ranks."""
    D.check_in_sync(state, f"{what} state")
    D.check_in_sync(TensorDict(metrics, []), f"{what} metrics")


def main(out: str) -> None:
    torch.set_num_threads(1)
    info = D.init_distributed(backend="gloo")
    rank = info.rank
    if info.world_size != WORLD:
        raise RuntimeError(f"run with --nproc_per_node={WORLD}, got world size {info.world_size}")
    result: dict[str, object] = {}

    model = template(Dynamics, DYN)
    # Ranks initialise differently on purpose: broadcast_tree makes them start from rank 0's params.
    state = new_train_state(D.broadcast_tree(dynamics_params(seed=rank)))
    gen = D.rank_generator(SEED, rank)
    history = []
    for latents, actions in dynamics_batches():
        state, metrics = dynamics_train_step(state, shard(latents, rank), shard(actions, rank), gen, model=model,
                                             opt=OPT, ema_decay=EMA, grad_fn=D.data_parallel_grad_and_value)
        _in_sync(state, metrics, "dynamics")
        history.append(metrics)
    result["dynamics"] = {"state": state.to_dict(), "history": history}

    tok = template(Tokenizer, TOK)
    state = new_tokenizer_train_state(D.broadcast_tree(tokenizer_params(seed=rank)))
    gen = D.rank_generator(SEED, rank)
    history = []
    for frames in tokenizer_batches():
        state, metrics = tokenizer_train_step(state, shard(frames, rank), gen, template=tok, cfg=TOK_LOSS,
                                              optim=OPT, ema_decay=EMA, grad_fn=D.data_parallel_grad_and_value)
        _in_sync(state, metrics, "tokenizer")  # the state includes the running loss statistics
        history.append(metrics)
    result["tokenizer"] = {"state": state.to_dict(), "history": history}

    model, heads = template(Dynamics, AGENT_DYN), template(AgentHeads, AGENT_HEADS)
    state = new_train_state(D.broadcast_tree(agent_params(seed=rank)))
    gen = D.rank_generator(SEED, rank)
    history = []
    for batch in agent_batches():
        state, metrics = agent_finetune_step(state, shard_batch(batch, rank), gen, model=model, heads=heads, opt=OPT,
                                             ema_decay=EMA, grad_fn=D.data_parallel_grad_and_value)
        _in_sync(state, metrics, "finetune")
        history.append(metrics)
    result["finetune"] = {"state": state.to_dict(), "history": history}

    # Phase 3 from the finetuned params: each rank imagines from its own contexts with its own generator; only
    # replica agreement is checked here (the rollout is drawn outside the gradient function). float32: `imagine`
    # feeds float32 sampled actions to the dynamics model, so it does not run on float64 params.
    agent = TensorDict({"dynamics": state["params", "dynamics"], "heads": state["params", "heads"]}).float()
    state = new_imagination_state(agent)
    losses = []
    for batch in agent_batches():
        part = shard_batch(batch, rank)
        context = {"latents": part["latents"].float(), "actions": part["actions"].float()}
        state, metrics = imagination_step(state, context, gen,
                                          model=model, heads=heads, opt=OPT, cfg=IMAGINE,
                                          grad_fn=D.data_parallel_grad_and_value)
        _in_sync(state, metrics, "imagination")
        losses.append(metrics["value_loss"])
    result["imagination"] = {"steps": int(state["step"]), "value_loss": losses}

    # Rank reduction of metrics: means, except maxima over the batch, which stay maxima over the ranks.
    reduced = D.reduce_metrics({"loss": torch.tensor(rank + 1.0), "adv_absmax": torch.tensor(rank + 1.0)})
    if (float(reduced["loss"]), float(reduced["adv_absmax"])) != (1.5, 2.0):
        raise AssertionError(f"rank {rank}: reduce_metrics gave {reduced}, expected loss 1.5 and adv_absmax 2.0")

    if rank == 0:
        torch.save(result, out)
    D.shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
