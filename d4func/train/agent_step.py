"""Agent training steps: phase-2 finetuning (BC + reward + dynamics) and phase-3 imagination (PMPO + value).

Phase 2 (paper Sec. 3.3, Eq. 9-10): the dynamics model with agent tokens and the heads train together; params are
`{"dynamics": ..., "heads": {"policy", "reward", "value"}}`. Phase 3 (Sec. 3.4): only the policy and value heads
train; the transformer, the reward head and the BC prior (a frozen copy of the finetuned policy head) live in the
train state's `frozen` entry, which `apply_gradients` carries over untouched.

Time alignment. Batches use TorchRL's convention: `actions[:, t]` is taken after observing frame t, `rewards[:, t]`
is the reward of that transition (`("next", "reward")`), `is_last[:, t]` is True when frame t is the last frame of
its episode in the row (`("next", "done")`, or the row ends early and is padded). The dynamics model reads the
action leading *into* each frame (`actions_into_frames`), so the agent token h_t has seen frames <= t and actions
< t. Hence:
* policy, offset n: h_t predicts a_{t+n} (offset 0 is the action to take at frame t);
* reward, offset n: h_t predicts the reward *into* frame t+n, r_{t+n-1} (offset 0 is the reward of the transition
  that produced frame t, which h_t sees together with its action). In imagination the reward of a_t is therefore
  read at the next frame's agent token. The reward of the transition out of a row's last frame has no frame in the
  row; `replay.final_frame` (on by default) appends that next frame to every row (`phases.replay_batch`), with
  `action_valid` False at it, so an episode's last reward is learned too.
A target is valid when it lies inside the row and in frame t's episode (`mtp_targets` on `is_last`); steps after a
row's first `is_last` are padding (a replay row never crosses an episode boundary, `d4func/data/replay.py`): they
contribute to no loss term, the dynamics term included, and since the transformer is causal nothing before them
reads them.

What the agent tokens read in phase 2: the frames of the same forward pass that makes the shortcut-forcing
prediction, i.e. every frame at its own sampled signal level tau and step size d (the paper reads agent tokens from
the one forward pass of the dynamics model). Nothing extra is computed. The policy later reads frames committed at
tau_ctx = 1 - context_noise with d = d_min (`imagination.commit_frames`), a point on the training grid; the noisier
training frames act as augmentation for the heads (their targets are the same clean actions and rewards).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from d4func.dynamics import Dynamics, actions_into_frames
from d4func.functional import apply, grad_and_value
from d4func.heads import AgentHeads, policy_dist, reward_dist
from d4func.imagination import ImaginationConfig, imagination_loss, imagine
from d4func.loss_rms import init_loss_rms, normalize_losses, update_loss_rms
from d4func.multi_token import mtp_targets
from d4func.objectives import (
    add_noise,
    check_self_forcing_has_targets,
    counted_mean,
    frame_weight,
    sample_noise,
    sample_training_frames,
    self_forced_latents,
    shortcut_targets,
)
from d4func.optim import AdamWConfig
from d4func.train.dynamics_step import denoiser
from d4func.train.state import checked_update, checked_update_with_loss_rms, new_train_state

__all__ = [
    "FINETUNE_TERMS",
    "FinetuneConfig",
    "agent_finetune_loss",
    "agent_finetune_step",
    "imagination_step",
    "init_finetune_loss_rms",
    "new_imagination_state",
]


@dataclass(frozen=True)
class FinetuneConfig:
    """Weights of the world-model phase's three terms (`finetune.*` in the run config).

    Each term is a mean: the dynamics loss over frames, behaviour cloning and reward over the valid (row, frame,
    offset) entries, so the weights do not change with `heads.mtp`. The paper sums Eq. 9-10 over the offsets
    n = 0..L instead, which weighs those two terms `mtp` times more against the dynamics loss: set `bc_coef` and
    `reward_coef` to `heads.mtp` for that balance. Measured on Crafter at 1,110 updates (docs/results.md, section 3):
    that balance ends with a 1.6-1.9x higher dynamics loss, for a reward head that learned a little on one seed of
    two.

    `normalize` (opt-in): divide each term by a running estimate of its own RMS before weighting, as the tokenizer's
    MSE and LPIPS are (`d4func.loss_rms`; the paper normalises every loss term so, Sec. 3.1). The terms' raw scales
    differ by two orders of magnitude at small scale (a dynamics MSE of about 0.03 beside a behaviour-cloning NLL
    and a twohot reward cross-entropy of about 1 each), and the transformer they share then follows the heads:
    measured on cartpole-swingup's frozen latents (docs/results.md, section 2), the dynamics term alone beat
    copying the last frame within 2,000 updates where the three unnormalised terms together did not in 18,000.
    The running statistics live in the world-model train state (`init_finetune_loss_rms`)."""

    dynamics_coef: float = 1.0
    bc_coef: float = 1.0
    reward_coef: float = 1.0
    normalize: bool = False
    rms_decay: float = 0.99  # EMA decay of the running mean of each term's square (the tokenizer's)
    rms_eps: float = 1e-8

    def __post_init__(self) -> None:
        for name in ("dynamics_coef", "bc_coef", "reward_coef"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"FinetuneConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.rms_decay < 1.0:
            raise ValueError(f"FinetuneConfig.rms_decay must lie in [0, 1), got {self.rms_decay}")
        if self.rms_eps <= 0:
            raise ValueError(f"FinetuneConfig.rms_eps must be > 0, got {self.rms_eps}")


# The phase-2 loss terms, as named in the running statistics of `FinetuneConfig.normalize`, and the metric that
# reports each.
FINETUNE_TERM_METRICS = {"dynamics": "dynamics_loss", "bc": "bc_nll", "reward": "reward_ce"}
FINETUNE_TERMS = tuple(FINETUNE_TERM_METRICS)


def init_finetune_loss_rms(device: torch.device | str | None = None) -> TensorDict:
    """Empty running statistics of the phase-2 terms, for `state["loss_rms"]` when `FinetuneConfig.normalize`."""
    return init_loss_rms(FINETUNE_TERMS, device=device)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over mask (0 when the mask is empty, without NaN gradients)."""
    w = mask.to(x.dtype)
    den = w.sum()
    return (w * x).sum() / torch.where(den > 0, den, torch.ones_like(den))


def _check_batch(latents: Tensor, actions: Tensor, rewards: Tensor, is_last: Tensor | None, discrete: bool) -> None:
    if latents.dim() != 4:
        raise ValueError(f"latents must be [B, T, S, Dz], got shape {tuple(latents.shape)}")
    bt = tuple(latents.shape[:2])
    if tuple(actions.shape[:2]) != bt or actions.dim() != (2 if discrete else 3):
        want = "[B, T] long" if discrete else "[B, T, A] float"
        raise ValueError(f"actions must be {want} with [B, T] = {list(bt)}, got {tuple(actions.shape)}")
    if tuple(rewards.shape) != bt:
        raise ValueError(f"rewards must be [B, T] = {list(bt)}, got {tuple(rewards.shape)}")
    if is_last is not None and (tuple(is_last.shape) != bt or is_last.dtype != torch.bool):
        raise ValueError(f"is_last must be bool [B, T] = {list(bt)}, got {is_last.dtype} {tuple(is_last.shape)}")


def agent_finetune_loss(
    params: TensorDictBase,
    latents: Tensor,
    actions: Tensor,
    rewards: Tensor,
    is_last: Tensor | None,
    generator: torch.Generator | None,
    *,
    model: Dynamics,
    heads: AgentHeads,
    cfg: FinetuneConfig = FinetuneConfig(),  # noqa: B008 (frozen dataclass: immutable default)
    tasks: Tensor | None = None,
    action_valid: Tensor | None = None,
    self_forcing: float | None = None,
    loss_rms: TensorDictBase | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Phase-2 loss: shortcut forcing + behaviour cloning (all `mtp` offsets) + reward prediction (twohot CE).

    params: {"dynamics", "heads"}; latents: clean latents `[B, T, S, Dz]`; actions, rewards, is_last: see the
    module docstring (TorchRL convention; is_last None means every row is one episode with no end inside).
    action_valid: bool `[B, T]`, False where a frame took no action (the final frame `replay.final_frame` appends):
    no behaviour-cloning target there; None means every frame took one.

    One forward pass of the dynamics model at the sampled (tau, d) gives both the denoising prediction and the
    agent-token outputs. The draws (d, tau, noise) are made in the same order as `shortcut_forcing_loss`, so with
    no padding the dynamics term equals `dynamics_loss` for the same generator state. `self_forcing`: the share of
    self-forced rows (None: the model's `self_forcing`; the loop passes `DynamicsConfig.self_forcing_at(step)`).

    `loss_rms`: the running statistics of the terms (`init_finetune_loss_rms`), needed exactly when `cfg.normalize`;
    each term is then divided by its running RMS, updated with this batch first.

    Returns (loss, metrics): dynamics_loss (+ flow_mse, bootstrap_mse), bc_nll (all offsets), bc_nll_0 (the acting
    offset), reward_ce, reward_ce_0 (every term raw, normalised or not), policy_entropy, loss (the weighted sum that
    is differentiated); with `cfg.normalize` also `loss_rms`, the updated statistics.
    """
    if cfg.normalize != (loss_rms is not None):
        raise ValueError(f"FinetuneConfig.normalize={cfg.normalize} needs loss_rms exactly when normalising, got "
                         f"loss_rms={'None' if loss_rms is None else 'statistics'}")
    dyn_cfg = model.cfg
    _check_batch(latents, actions, rewards, is_last, dyn_cfg.discrete)
    batch, steps = latents.shape[:2]
    device = latents.device
    if is_last is None:
        is_last = torch.zeros(batch, steps, dtype=torch.bool, device=device)
    # Steps after the first episode end in a row are padding (module docstring).
    ends = is_last.long()
    valid_step = (ends.cumsum(dim=1) - ends) == 0

    # --- dynamics: shortcut forcing, drawing d, tau and noise as `shortcut_forcing_loss` does --------------------
    actions_in, mask_in = actions_into_frames(actions)
    d, tau, counted = sample_training_frames((batch, steps), dyn_cfg.k_max, generator, device,
                                             dyn_cfg.bootstrap_fraction, dyn_cfg.clean_context_fraction,
                                             dyn_cfg.context_signal, dyn_cfg.forcing)
    noise = sample_noise(latents, generator, dyn_cfg.noise_scale)
    z_tau = add_noise(latents, tau, noise)
    stopped = denoiser(model, params["dynamics"].detach(), actions_in, mask_in, tasks)
    dyn_latents = latents
    self_forcing = dyn_cfg.self_forcing if self_forcing is None else self_forcing
    check_self_forcing_has_targets(self_forcing, counted, dyn_cfg.forcing)
    if self_forcing > 0.0:
        # The dynamics term reads the model's own last history frames in that share of rows; the heads read the
        # same forward pass (objectives.self_forced_latents).
        dyn_latents = self_forced_latents(stopped, latents, z_tau, tau, d, counted, self_forcing,
                                          dyn_cfg.sampling_steps, generator, dyn_cfg.noise_scale,
                                          dyn_cfg.self_forcing_frames)
        z_tau = add_noise(dyn_latents, tau, noise)
    x_hat, agent_out, _ = apply(model, params["dynamics"], z_tau, tau, d, actions_in, mask_in, None, tasks)
    if agent_out is None:
        raise ValueError("the dynamics model has no agent tokens (DynamicsConfig.n_agent_tokens = 0)")
    target, is_flow = shortcut_targets(stopped, dyn_latents, z_tau, tau, d, dyn_cfg.d_min)
    per_frame = (x_hat - target).square().mean(dim=(-2, -1))
    dyn_frames = valid_step if counted is None else valid_step & counted
    dyn_loss = counted_mean(frame_weight(tau, dyn_cfg.loss_weight) * per_frame, dyn_frames)

    # --- behaviour cloning: h_t -> a_{t+n} ------------------------------------------------------------------------
    L = heads.cfg.mtp
    action_targets, bc_valid = mtp_targets(actions, is_last, L)
    bc_valid = bc_valid & valid_step[:, :, None]
    if action_valid is not None:
        if action_valid.shape != (batch, steps) or action_valid.dtype != torch.bool:
            raise ValueError(f"action_valid must be bool [B, T] = {[batch, steps]}, got {action_valid.dtype} "
                             f"{list(action_valid.shape)}")
        target_taken, _ = mtp_targets(action_valid.float(), is_last, L)
        bc_valid = bc_valid & (target_taken > 0.5)
    policy = policy_dist(heads, params["heads", "policy"], agent_out, offset=None)  # batch [B, T, L]
    nll = -policy.log_prob(action_targets)
    bc = _masked_mean(nll, bc_valid)

    # --- reward: h_t -> reward into frame t+n = rewards[t+n-1] ------------------------------------------------------
    rewards_in = torch.cat([torch.zeros_like(rewards[:, :1]), rewards[:, :-1]], dim=1)
    has_reward_in = torch.ones_like(rewards_in)
    has_reward_in[:, 0] = 0.0  # the first frame of a row: its incoming transition is not in the row
    reward_targets, reward_valid = mtp_targets(torch.stack([rewards_in, has_reward_in], dim=-1), is_last, L)
    reward_valid = reward_valid & (reward_targets[..., 1] > 0.5) & valid_step[:, :, None]
    reward = reward_dist(heads, params["heads", "reward"], agent_out, offset=None)  # batch [B, T, L]
    ce = -reward.log_prob(reward_targets[..., 0])
    reward_ce = _masked_mean(ce, reward_valid)

    terms = {"dynamics": dyn_loss, "bc": bc, "reward": reward_ce}
    new_rms = None
    if loss_rms is not None:
        new_rms = update_loss_rms(loss_rms, terms, cfg.rms_decay)
        terms = normalize_losses(terms, new_rms, cfg.rms_decay, cfg.rms_eps)
    loss = cfg.dynamics_coef * terms["dynamics"] + cfg.bc_coef * terms["bc"] + cfg.reward_coef * terms["reward"]
    flow_w = (is_flow & dyn_frames).float()
    boot_w = (~is_flow & dyn_frames).float()
    metrics = {
        "loss": loss.detach(),
        "dynamics_loss": dyn_loss.detach(),
        "flow_mse": _masked_mean(per_frame.detach(), flow_w > 0),
        "bootstrap_mse": _masked_mean(per_frame.detach(), boot_w > 0),
        "bc_nll": bc.detach(),
        "bc_nll_0": _masked_mean(nll[:, :, 0].detach(), bc_valid[:, :, 0]),
        "reward_ce": reward_ce.detach(),
        "reward_ce_0": _masked_mean(ce[:, :, 0].detach(), reward_valid[:, :, 0]),
        "policy_entropy": _masked_mean(policy.entropy()[:, :, 0].detach(),
                                       valid_step if action_valid is None else valid_step & action_valid),
    }
    if new_rms is not None:
        metrics["loss_rms"] = new_rms
    return loss, metrics


def agent_finetune_step(
    state: TensorDictBase,
    batch: TensorDictBase | dict[str, Tensor],
    generator: torch.Generator | None,
    *,
    model: Dynamics,
    heads: AgentHeads,
    opt: AdamWConfig,
    cfg: FinetuneConfig = FinetuneConfig(),  # noqa: B008 (frozen dataclass: immutable default)
    ema_decay: float | None = None,
    grad_fn: Callable[..., Any] = grad_and_value,
    self_forcing: float | None = None,
) -> tuple[TensorDictBase, dict[str, Tensor]]:
    """One phase-2 update of `state` (params {"dynamics", "heads"}) on a batch with "latents", "actions",
    "rewards" and optionally "is_last", "tasks" and "action_valid" (see the module docstring for their alignment).

    `grad_fn(loss_fn, has_aux=True)(params, *args) -> (grads, (loss, metrics))`: `functional.grad_and_value`, or
    `distributed.data_parallel_grad_and_value` for a data-parallel step on this rank's shard. The loss terms are
    means over the shard's valid steps, so with padding the rank average weighs shards equally rather than steps.
    `self_forcing` as in `agent_finetune_loss`. With `cfg.normalize` the state holds the terms' running statistics
    (`state["loss_rms"]`, `init_finetune_loss_rms`); they are updated from the terms as `grad_fn` reports them (rank
    means under data parallelism), so every replica keeps the same statistics, as the tokenizer's step does."""
    get = batch.get
    if cfg.normalize and "loss_rms" not in state.keys():
        raise KeyError("FinetuneConfig.normalize needs the running statistics state['loss_rms']: add "
                       "init_finetune_loss_rms() to the world-model train state")
    loss_rms = state["loss_rms"] if cfg.normalize else None
    grads, (_, metrics) = grad_fn(agent_finetune_loss, has_aux=True)(
        state["params"], batch["latents"], batch["actions"], batch["rewards"], get("is_last", None), generator,
        model=model, heads=heads, cfg=cfg, tasks=get("tasks", None), action_valid=get("action_valid", None),
        self_forcing=self_forcing, loss_rms=loss_rms,
    )
    if loss_rms is None:
        return checked_update(state, grads, metrics, opt, ema_decay)
    return checked_update_with_loss_rms(state, grads, metrics, FINETUNE_TERM_METRICS, cfg.rms_decay, opt, ema_decay)


def new_imagination_state(agent_params: TensorDictBase) -> TensorDict:
    """Phase-3 train state from finetuned params {"dynamics", "heads"}.

    params = {"policy", "value"} (the only trained part) with AdamW moments; ema = their slow copy (the slow value
    target is ema["value"]); frozen = {"dynamics", "reward", "prior_policy"}, the prior being a copy of the
    finetuned (behaviour-cloning) policy head that stays fixed for the whole phase (paper Eq. 11). The training
    loop, which keeps training the world model beside the agent, refreshes these at every step
    (`phases.refresh_agent_frozen`).
    """
    head_params = agent_params["heads"]
    trainable = TensorDict({"policy": head_params["policy"].clone(), "value": head_params["value"].clone()})
    state = new_train_state(trainable)
    state["frozen"] = imagination_frozen(agent_params).clone()
    return state


def imagination_frozen(agent_params: TensorDictBase) -> TensorDict:
    """The parts phase 3 holds fixed, taken from finetuned params {"dynamics", "heads"}: the dynamics, the reward
    head and the behaviour-cloning policy as the reverse-KL prior (paper Eq. 11). Shares storage with the input."""
    heads = agent_params["heads"]
    return TensorDict({
        "dynamics": agent_params["dynamics"],
        "reward": heads["reward"],
        "prior_policy": heads["policy"],
    })


def imagination_params(state: TensorDictBase) -> TensorDict:
    """The full agent params {"dynamics", "heads": {"policy", "reward", "value"}} of a phase-3 state (for acting)."""
    frozen, params = state["frozen"], state["params"]
    return TensorDict({
        "dynamics": frozen["dynamics"],
        "heads": TensorDict({"policy": params["policy"], "reward": frozen["reward"], "value": params["value"]}),
    })


def imagination_step(
    state: TensorDictBase,
    batch: TensorDictBase | dict[str, Tensor],
    generator: torch.Generator | None,
    *,
    model: Dynamics,
    heads: AgentHeads,
    opt: AdamWConfig,
    cfg: ImaginationConfig = ImaginationConfig(),  # noqa: B008 (frozen dataclass: immutable default)
    grad_fn: Callable[..., Any] = grad_and_value,
    window: int | None = None,
) -> tuple[TensorDictBase, dict[str, Tensor]]:
    """One phase-3 update: imagine one rollout per replay context (batch "latents" `[B, T0, S, Dz]`, "actions" in
    TorchRL's convention, optional "tasks"), then a PMPO + value step on the policy and value heads only. The slow
    value target is the EMA of the value params (decay `cfg.slow_decay`). `grad_fn` as in `agent_finetune_step`:
    under data parallelism each rank imagines from its own contexts with its own generator. `window`: the frames the
    world model attends to while imagining (`imagine`; the loop passes `replay.row_frames`)."""
    get = batch.get
    rollout = imagine(model, heads, imagination_params(state), batch["latents"], get("actions", None), generator,
                      horizon=cfg.horizon, steps=cfg.sampling_steps, tasks=get("tasks", None), window=window)
    frozen = state["frozen"]

    def loss_fn(trainable: TensorDictBase) -> tuple[Tensor, dict[str, Tensor]]:
        return imagination_loss(trainable, rollout, heads=heads, prior_policy=frozen["prior_policy"],
                                slow_value=state["ema", "value"], cfg=cfg)

    grads, (_, metrics) = grad_fn(loss_fn, has_aux=True)(state["params"])
    return checked_update(state, grads, metrics, opt, cfg.slow_decay)
