"""A run's models and one gradient step of every phase, on one replay batch `[B, T]` (`gradient_step`):

1. tokenizer (MSE [+ LPIPS], MAE masking) on the frames, every `loop.tokenizer_every` steps;
2. world model = dynamics with agent tokens + behaviour-cloning policy head + reward head (phase 2 of the paper,
   `agent_finetune_step`), on the frames encoded by the current tokenizer;
3. from `loop.agent_start` on: imagination (phase 3, `imagination_step`) from the first `replay.context_len`
   frames of every row, training the acting policy head with PMPO and the value head with TD(lambda). Its frozen
   parts (transformer, reward head, BC prior) are refreshed from the world model before every step, since online
   the world model keeps learning.

The online and offline loops (`loop.py`) call it once per gradient step; the benchmarks time it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor, nn

from d4func.dynamics import Dynamics
from d4func.functional import grad_and_value, init, template
from d4func.heads import AgentHeads
from d4func.tokenizer import Tokenizer, encode
from d4func.tokenizer_loss import latent_spread, new_tokenizer_train_state, tokenizer_train_step
from d4func.train.agent_step import (
    agent_finetune_step,
    imagination_frozen,
    imagination_step,
    init_finetune_loss_rms,
    new_imagination_state,
)
from d4func.train.run_config import RunConfig
from d4func.train.state import NonFiniteLossError, new_train_state

StepOutput = TypeVar("StepOutput")


@dataclass
class Models:
    """A run's three model templates; their parameters live in the train states (`init_states`)."""

    tokenizer: Tokenizer
    dynamics: Dynamics
    heads: AgentHeads


def build_models(cfg: RunConfig) -> Models:
    """The run's stateless model templates (`functional.template`: built on the meta device, no weights)."""
    return Models(template(Tokenizer, cfg.tokenizer), template(Dynamics, cfg.dynamics), template(AgentHeads, cfg.heads))


def init_states(cfg: RunConfig, models: Models) -> dict[str, TensorDictBase]:
    """Fresh train states: tokenizer, world model {dynamics, heads} (with its terms' running statistics under
    `finetune.normalize`); the agent's appears at `agent_start`."""
    world_model = new_train_state(TensorDict({"dynamics": init(models.dynamics, cfg.seed + 1),
                                              "heads": init(models.heads, cfg.seed + 2)}))
    if cfg.finetune.normalize:
        world_model["loss_rms"] = init_finetune_loss_rms()
    return {"tokenizer": new_tokenizer_train_state(init(models.tokenizer, cfg.seed)), "world_model": world_model}


def replay_batch(sample: TensorDictBase, final_frame: bool = False) -> dict[str, Tensor]:
    """A replay sample `[B, T]` in TorchRL's layout -> the tensors the train steps read.

    `final_frame` (`replay.final_frame`): append the frame after the row's last transition (its
    `("next", "pixels")`), giving `T + 1` frames, so the reward of that transition has a frame to be predicted at,
    an episode's terminal reward included. Actions and rewards get a zero entry at the new frame, which takes no
    action (`action_valid` False there: no behaviour-cloning target), and it is the row's last frame (`is_last`)
    when the row ends its episode.
    """
    reward = sample.get(("next", "reward"))
    done = sample.get(("next", "done"))
    batch = {
        "frames": sample.get("pixels"),
        "actions": sample.get("action"),
        "rewards": reward.reshape(reward.shape[:2]).float(),
        "is_last": done.reshape(done.shape[:2]),
    }
    if not final_frame:
        return batch
    next_frames = sample.get(("next", "pixels"), None)
    if next_frames is None:
        raise ValueError("replay.final_frame=true needs the frame after each transition (('next', 'pixels')), which "
                         "this replay does not store: set replay.final_frame=false")

    def pad(x: Tensor) -> Tensor:
        return torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)

    has_action = torch.ones_like(batch["is_last"])
    return {
        "frames": torch.cat([batch["frames"], next_frames[:, -1:]], dim=1),
        "actions": pad(batch["actions"]),
        "rewards": pad(batch["rewards"]),
        # The appended frame ends the episode iff the row's last transition did, and frame T - 1 is then no
        # longer the last; an earlier end (a padded row) stays where it is.
        "is_last": torch.cat([batch["is_last"][:, :-1], torch.zeros_like(batch["is_last"][:, :1]),
                              batch["is_last"][:, -1:]], dim=1),
        "action_valid": pad(has_action),
    }


def world_model_batch(latents: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The phase-2 batch (`agent_finetune_step`): a `replay_batch`'s frames replaced by their latents."""
    keys = ("actions", "rewards", "is_last", "action_valid")
    return {"latents": latents, **{key: batch[key] for key in keys if key in batch}}


def refresh_agent_frozen(agent: TensorDictBase, world_model: TensorDictBase) -> TensorDictBase:
    """The imagination state with its frozen parts taken from the current world model, as the loop trains both.

    The dynamics and reward head must be the current ones (imagination should use the world model being trained).
    The reverse-KL prior follows too: it is the policy head as behaviour cloning trains it on the replay at this
    step. Offline that converges to the dataset's BC policy, the paper's frozen prior (Eq. 11); online, the replay
    holds the prefill's random actions and then the agent's own, so the prior is a lagging copy of the policies
    that collected the data (a trust region more than a demonstrator's prior). A prior frozen at `agent_start`
    would online hold the agent to the random prefill, which is why it is not frozen there."""
    agent = agent.copy()
    agent["frozen"] = imagination_frozen(world_model["params"])
    return agent


def make_lpips_fn(cfg: RunConfig) -> nn.Module | None:
    """The frozen LPIPS module when the tokenizer loss uses it (raises, naming what to provide, when its ImageNet
    backbone weights are not on disk), else None."""
    if cfg.tokenizer_loss.lpips_weight <= 0:
        return None
    from d4func.lpips_loss import make_lpips

    # On the learner's device: the tokenizer step compares reconstructions there.
    return make_lpips(cfg.tokenizer_loss.lpips_net, cfg.tokenizer_loss.lpips_backbone_path, device=cfg.device)


def world_model_latents(tokenizer: Tokenizer, params: TensorDictBase, frames: Tensor) -> Tensor:
    """The latents the world model trains on and imagination starts from: encoded without gradients and in float32
    even inside the train step's bf16 autocast, as acting encodes them (an encode under autocast runs its matmuls in
    bf16, so `.float()` afterwards would only widen values already rounded to ~3 digits)."""
    with torch.no_grad(), torch.autocast(frames.device.type, enabled=False):
        return encode(tokenizer, params, frames)


def in_phase(phase: str, step_fn: Callable[..., StepOutput]) -> Callable[..., StepOutput]:
    """`step_fn` whose NaN / inf stop also names the phase (the state's own step count is per phase)."""

    def run(*args: Any, **kwargs: Any) -> StepOutput:
        try:
            return step_fn(*args, **kwargs)
        except NonFiniteLossError as error:
            raise NonFiniteLossError(f"{phase} phase: {error}") from error

    return run


# Which gradient steps update the tokenizer when `loop.tokenizer_every` > 1 (see `gradient_step`), as checkpoints
# record it: checkpoints without the entry were written when the count started at 0, and a run resumed from one
# updates its tokenizer on other steps than it would have (`Trainer.try_resume` warns).
TOKENIZER_CADENCE = "every-nth-counted-from-1"


def gradient_step(
    cfg: RunConfig,
    models: Models,
    states: dict[str, TensorDictBase],
    batch: dict[str, Tensor],
    generator: torch.Generator,
    grad_step: int,
    agent_active: bool,
    lpips_fn: nn.Module | None = None,
    grad_fn: Callable = grad_and_value,
) -> tuple[dict[str, TensorDictBase], dict[str, float]]:
    """One update of every phase (the module docstring); returns new states and scalar metrics.

    `grad_fn`: `grad_and_value`, or `distributed.data_parallel_grad_and_value` under torchrun (every phase's
    gradients and metrics are then averaged over the ranks)."""
    metrics: dict[str, float] = {}
    states = dict(states)
    # Every tokenizer_every-th step counted from 1 (`grad_step` counts from 0), as logging counts: a row logged at
    # a multiple of tokenizer_every then carries the tokenizer's metrics (counted from 0, none ever did). Checkpoints
    # record this as TOKENIZER_CADENCE.
    if (grad_step + 1) % cfg.loop.tokenizer_every == 0:
        states["tokenizer"], tok = in_phase("tokenizer", tokenizer_train_step)(
            states["tokenizer"], batch["frames"], generator, template=models.tokenizer, cfg=cfg.tokenizer_loss,
            optim=cfg.optim.tokenizer, lpips_fn=lpips_fn, grad_fn=grad_fn, ema_decay=cfg.optim.ema_decay,
        )
        metrics.update({f"tokenizer/{k}": float(v) for k, v in tok.items()})
    latents = world_model_latents(models.tokenizer, states["tokenizer"]["params"], batch["frames"])
    # On the unmasked latents the world model trains on; near 0 means a collapsed tokenizer (see latent_spread).
    # Under torchrun this is each rank's own shard (rank 0's is logged).
    metrics["tokenizer/latent_spread"] = float(latent_spread(latents))
    states["world_model"], wm = in_phase("world_model", agent_finetune_step)(
        states["world_model"], world_model_batch(latents, batch), generator, model=models.dynamics, heads=models.heads,
        opt=cfg.optim.world_model, cfg=cfg.finetune, ema_decay=cfg.optim.ema_decay, grad_fn=grad_fn,
        self_forcing=cfg.dynamics.self_forcing_at(grad_step),
    )
    metrics.update({f"world_model/{k}": float(v) for k, v in wm.items()})
    if agent_active:
        if "agent" not in states:
            states["agent"] = new_imagination_state(states["world_model"]["params"])
        agent = refresh_agent_frozen(states["agent"], states["world_model"])
        context = cfg.replay.context_len
        im_batch = {"latents": latents[:, :context], "actions": batch["actions"][:, :context]}
        states["agent"], im = in_phase("agent", imagination_step)(agent, im_batch, generator, model=models.dynamics,
                                               heads=models.heads, opt=cfg.optim.agent, cfg=cfg.imagination,
                                                                        grad_fn=grad_fn, window=cfg.replay.row_frames)
        metrics.update({f"agent/{k}": float(v) for k, v in im.items()})
    return states, metrics
