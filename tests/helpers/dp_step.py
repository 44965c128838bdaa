"""Data-parallel steps of a tiny dynamics model, for tests/test_distributed.py.

Run as `torchrun --standalone --nproc_per_node=2 dp_step.py OUT` (gloo on CPU): every rank builds the same full
batch, takes its contiguous shard, and takes `N_STEPS` data-parallel AdamW steps; rank 0 writes the final train
state, the reduced metrics and checks of the collectives to OUT. `single_process_steps` is the reference: the same
steps on the full batch in one process.

The loss is deterministic given the batch (x-prediction MSE at per-frame signal levels and step sizes drawn into
the batch, ramp-weighted as in shortcut forcing), a mean over all frames of the batch, so averaging the gradients
of equal shards gives the full-batch gradient. float64 keeps the comparison tight.
"""

from __future__ import annotations

import sys

import torch
from tensordict import TensorDictBase
from torch import Tensor

from d4func.config import TransformerConfig
from d4func.dynamics import Dynamics, DynamicsConfig
from d4func.functional import apply, grad_and_value, init, template
from d4func.objectives import add_noise, ramp_weight, sample_signal_levels, sample_step_sizes
from d4func.optim import AdamWConfig
from d4func.train import distributed as D
from d4func.train.state import apply_gradients, check_finite, new_train_state

CFG = DynamicsConfig(
    transformer=TransformerConfig(d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, time_every=2),
    latent_tokens=4, latent_dim=4, pack=2, n_registers=1, action_dim=2, k_max=4, sampling_steps=2,
)
OPT = AdamWConfig(lr=1e-2)
BATCH, STEPS, N_STEPS = 4, 3, 2


def batches() -> list[tuple[Tensor, ...]]:
    """`N_STEPS` full batches (latents, actions, tau, d, noise), float64, identical on every rank."""
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(N_STEPS):
        latents = torch.rand(BATCH, STEPS, CFG.latent_tokens, CFG.latent_dim, generator=gen, dtype=torch.float64)
        actions = torch.rand(BATCH, STEPS, CFG.action_dim, generator=gen, dtype=torch.float64) * 2 - 1
        d = sample_step_sizes((BATCH, STEPS), CFG.k_max, gen).double()
        tau = sample_signal_levels(d, gen)
        noise = torch.randn(latents.shape, generator=gen, dtype=torch.float64)
        out.append((latents * 2 - 1, actions, tau, d, noise))
    return out


def xpred_loss(params: TensorDictBase, latents: Tensor, actions: Tensor, tau: Tensor, d: Tensor, noise: Tensor,
               *, model: Dynamics) -> tuple[Tensor, dict[str, Tensor]]:
    x_hat = apply(model, params, add_noise(latents, tau, noise), tau, d, actions)[0]
    per_frame = (x_hat - latents).square().mean(dim=(-2, -1))
    loss = (ramp_weight(tau) * per_frame).mean()
    return loss, {"loss": loss.detach(), "mse": per_frame.mean().detach()}


def initial_params(seed: int = 0) -> TensorDictBase:
    return init(template(Dynamics, CFG), seed, dtype=torch.float64)


def single_process_steps() -> tuple[TensorDictBase, list[dict[str, Tensor]]]:
    model = template(Dynamics, CFG)
    state = new_train_state(initial_params())
    history = []
    for batch in batches():
        grads, (_, metrics) = grad_and_value(xpred_loss, has_aux=True)(state["params"], *batch, model=model)
        state, _ = apply_gradients(state, grads, OPT, 0.9)
        history.append(metrics)
    return state, history


def main(out: str) -> None:
    torch.set_num_threads(1)
    info = D.init_distributed(backend="gloo")
    rank, world = info.rank, info.world_size
    model = template(Dynamics, CFG)
    # Each rank initialises differently on purpose: broadcast_tree must make them start from rank 0's params.
    params = D.broadcast_tree(initial_params(seed=rank))
    state = new_train_state(params)
    grad_fn = D.data_parallel_grad_and_value(xpred_loss, has_aux=True)
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    history = []
    for batch in batches():
        grads, (loss, metrics) = grad_fn(state["params"], *(x[shard] for x in batch), model=model)
        check_finite(metrics, state["step"])
        state, _ = apply_gradients(state, grads, OPT, 0.9)
        D.check_in_sync(state)
        history.append({**metrics, "value": loss})
    # A replica that drifts must be caught.
    drifted = state["params"].clone()
    if rank == 1:
        leaf = next(iter(drifted.values(include_nested=True, leaves_only=True)))
        leaf.view(-1)[0] += 1e-12
    try:
        D.check_in_sync(drifted)
        drift_caught = False
    except RuntimeError:
        drift_caught = True
    D.check_ranks_agree(True, "a decision every rank took alike")
    try:
        D.check_ranks_agree(rank == 0, "whether to resume")
        disagreement = ""
    except RuntimeError as error:
        disagreement = str(error)
    rng = D.gather_rng_states({"data": D.rank_generator(0, rank)})
    if rank == 0:
        torch.save({"state": state.to_dict(), "history": history, "world": world, "drift_caught": drift_caught,
                    "disagreement": disagreement,
                    "data_states_differ": not torch.equal(rng[0]["generators"]["data"]["state"],
                                                          rng[1]["generators"]["data"]["state"]),
                    "n_rng": len(rng)}, out)
    D.shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
