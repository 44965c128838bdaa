"""Imagination training (paper Sec. 3.4, Eq. 11; Algorithm 1 phases 2-3).

Section 1 is the pure RL math, model-independent: lambda-returns, the PMPO policy loss, the reverse KL to the
behaviour-cloning prior and the twohot value loss with its slow-target regulariser. Every function maps tensors to
tensors (and a metrics dict); none holds state or draws randomness. (The multi-token-prediction targets of phase-2
finetuning are in `d4func/multi_token.py`; `mtp_targets` stays importable from here.)

Section 2 rolls the policy out inside the world model from replay contexts (issue 5, point 4): `commit_frames`
puts frames into the KV cache and returns the agent-token outputs that the heads read, `imagine` alternates policy
sampling and `sampler.denoise_frame`, one rollout per context.

Section 3 is the phase-3 objective on a rollout, `imagination_loss` (PMPO + value), and its `ImaginationConfig`;
the train steps that use it are in `d4func/train/agent_step.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from d4func.distributions import BoundedNormal, Categorical, kl_divergence, twohot_log_prob, twohot_mean
from d4func.dynamics import Dynamics, DynamicsConfig, actions_into_frames
from d4func.functional import apply
from d4func.heads import AgentHeads, policy_dist, reward_dist
from d4func.multi_token import mtp_targets
from d4func.objectives import add_noise, sample_noise
from d4func.sampler import Frames, WorldModelFn, denoise_frame
from d4func.transformer import empty_cache, keep_last_steps

__all__ = [
    "ImaginationConfig",
    "Rollout",
    "advantage_stats",
    "center_per_step",
    "commit_frames",
    "imagination_loss",
    "imagine",
    "lambda_returns",
    "mtp_targets",
    "pmpo_loss",
    "reverse_kl",
    "value_loss",
    "world_model_fn",
]


# ===============================================================================================================
# Section 1: pure RL math
# ===============================================================================================================


def lambda_returns(
    rewards: Tensor, values: Tensor, continues: Tensor, gamma: float = 0.997, lam: float = 0.95
) -> Tensor:
    """TD(lambda) returns of an imagined trajectory of horizon H (paper Sec. 3.4, gamma = 0.997).

    rewards, continues: [..., H]; values: [..., H+1] (V_0 .. V_H, V_H bootstraps the tail). Returns [..., H]:
        R_t = r_t + gamma c_t ((1 - lam) V_{t+1} + lam R_{t+1}),  R_H = V_H.
    r_t and c_t belong to the transition out of step t (c_t = 0 when that transition ends the episode, or the
    predicted continue probability). lam = 0 gives one-step TD targets, lam = 1 discounted Monte Carlo returns
    bootstrapped with V_H. The result carries gradients of its inputs; detach it where it is a target.
    """
    if rewards.dim() < 1:
        raise ValueError("rewards must have a trailing time axis [..., H]")
    if continues.shape != rewards.shape:
        raise ValueError(
            f"continues shape {tuple(continues.shape)} must equal rewards shape {tuple(rewards.shape)} ([..., H])"
        )
    horizon = rewards.shape[-1]
    expected = (*rewards.shape[:-1], horizon + 1)
    if tuple(values.shape) != expected:
        raise ValueError(
            f"values shape {tuple(values.shape)} must be {expected}: rewards' batch shape and H+1 = {horizon + 1} "
            "steps (the last value bootstraps)"
        )
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    # The one-step part r_t + gamma c_t (1 - lam) V_{t+1} is computed for all t at once; only the lam R_{t+1}
    # recursion is sequential (H is short: an imagination horizon).
    base = rewards + gamma * continues * (1.0 - lam) * values[..., 1:]
    ret = values[..., -1]
    out = []
    for t in reversed(range(horizon)):
        ret = base[..., t] + gamma * lam * continues[..., t] * ret
        out.append(ret)
    return torch.stack(out[::-1], dim=-1)


def center_per_step(advantages: Tensor, weights: Tensor | None = None) -> Tensor:
    """Advantages `[B, H]` minus their (weighted) mean over the batch at each imagined step t.

    A per-step baseline for PMPO's signs (`ImaginationConfig.center_advantages`): any offset shared by every
    rollout at step t, such as a value head that lags the returns by the same amount everywhere, cancels, so the
    signs compare each action with the others taken at that step. Steps whose weights sum to 0 are left at 0. The
    mean is over the rollouts given: with one rollout every advantage becomes 0, and under data parallelism each
    rank centres its own shard."""
    if advantages.dim() != 2:
        raise ValueError(f"advantages must be [B, H], got shape {tuple(advantages.shape)}")
    w = torch.ones_like(advantages) if weights is None else weights.to(advantages.dtype)
    _check_same_shape("advantages", advantages, weights=w)
    total = w.sum(dim=0, keepdim=True)
    mean = (w * advantages).sum(dim=0, keepdim=True) / torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, advantages - mean, torch.zeros_like(advantages))


def _check_same_shape(reference_name: str, reference: Tensor, **others: Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.shape != reference.shape:
            raise ValueError(
                f"{name} shape {tuple(t.shape)} must equal {reference_name} shape {tuple(reference.shape)}"
            )


def _weighted_mean(x: Tensor, w: Tensor) -> Tensor:
    """sum(w x) / sum(w), and 0 when sum(w) = 0. The denominator is replaced *before* the division so that an
    empty set contributes neither NaN values nor NaN gradients (a masked 0/0 still back-propagates NaN)."""
    den = w.sum()
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, (w * x).sum() / safe, torch.zeros_like(den))


def pmpo_loss(
    log_probs: Tensor,
    advantages: Tensor,
    kl: Tensor,
    alpha: float = 0.5,
    beta: float = 0.3,
    *,
    weights: Tensor | None = None,
    entropy: Tensor | None = None,
    entropy_floor: float | None = None,
    entropy_floor_coef: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PMPO policy loss (paper Eq. 11): only the sign of each advantage counts.

        loss = -alpha mean_{A>0} log pi(a|s) + (1 - alpha) mean_{A<0} log pi(a|s) + beta mean KL(pi || pi_prior)

    log_probs: log pi of the taken (imagined) actions, with gradient; advantages: same shape, e.g. R^lambda - V
    (treated as constants; no return normalisation is needed because only signs are used, so scaling the
    advantages by any positive constant leaves the loss unchanged); kl: same shape, the reverse KL from the policy
    to the frozen BC prior (`reverse_kl`). Advantages of exactly 0 carry no preference and join neither set. The
    two sets are averaged separately, so an empty set contributes 0 (no NaN).

    weights (optional, same shape, >= 0): per-sample weights, e.g. 0 for padded or post-termination imagined
    steps; they weight the averages within each set and in the KL mean.
    entropy (optional, same shape): the policy's entropy at those states; logged, and if `entropy_floor` is given
    a hinge penalty entropy_floor_coef * mean(relu(entropy_floor - entropy)) is added. The penalty is zero above
    the floor, so it leaves PMPO unchanged unless the policy is collapsing (the continuous-action failure mode of
    issue 5; `BoundedNormal.from_raw`'s log-std bound is the hard floor, this one is soft and tunable).

    Returns (loss, metrics); metrics are detached scalars: policy_loss, pos_term, neg_term, kl, frac_pos,
    frac_neg, adv_mean, adv_std, adv_absmax, and entropy / entropy_penalty when entropy is given.
    """
    _check_same_shape("log_probs", log_probs, advantages=advantages, kl=kl, weights=weights, entropy=entropy)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if beta < 0.0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if entropy_floor is not None and entropy is None:
        raise ValueError("entropy_floor was given but entropy was not")
    if entropy_floor_coef < 0.0:
        raise ValueError(f"entropy_floor_coef must be >= 0, got {entropy_floor_coef}")

    adv = advantages.detach()
    w = torch.ones_like(log_probs) if weights is None else weights.detach().to(log_probs.dtype)
    pos = (adv > 0).to(log_probs.dtype) * w
    neg = (adv < 0).to(log_probs.dtype) * w
    pos_term = _weighted_mean(log_probs, pos)
    neg_term = _weighted_mean(log_probs, neg)
    kl_mean = _weighted_mean(kl, w)
    loss = -alpha * pos_term + (1.0 - alpha) * neg_term + beta * kl_mean

    metrics: dict[str, Tensor] = {}
    if entropy is not None:
        metrics["entropy"] = _weighted_mean(entropy.detach(), w)
        if entropy_floor is not None:
            penalty = _weighted_mean(torch.relu(entropy_floor - entropy), w)
            loss = loss + entropy_floor_coef * penalty
            metrics["entropy_penalty"] = penalty.detach()

    metrics.update(
        policy_loss=loss.detach(),
        pos_term=pos_term.detach(),
        neg_term=neg_term.detach(),
        kl=kl_mean.detach(),
        **advantage_stats(adv, w),
    )
    return loss, metrics


def advantage_stats(advantages: Tensor, weights: Tensor) -> dict[str, Tensor]:
    """Weighted shares of positive and negative advantages and their mean, std and largest magnitude (detached):
    the signs PMPO sees, logged as agent/frac_pos, frac_neg, adv_mean, adv_std, adv_absmax."""
    adv, w = advantages.detach(), weights.detach()
    total = w.sum().clamp_min(torch.finfo(w.dtype).tiny)
    adv_mean = (w * adv).sum() / total
    return {
        "frac_pos": ((adv > 0).to(w.dtype) * w).sum() / total,
        "frac_neg": ((adv < 0).to(w.dtype) * w).sum() / total,
        "adv_mean": adv_mean,
        "adv_std": ((w * (adv - adv_mean) ** 2).sum() / total).sqrt(),
        "adv_absmax": torch.where(w > 0, adv.abs(), torch.zeros_like(adv)).max(),
    }


def reverse_kl(policy: BoundedNormal | Categorical, prior: BoundedNormal | Categorical) -> Tensor:
    """KL(pi || pi_prior), the reverse KL of paper Eq. 11 from the policy being trained to the frozen
    behaviour-cloning prior, per batch element (summed over action dimensions). Exact for both families
    (categorical: sum p log(p/q); bounded normal: closed form of two truncated normals). The prior is detached
    here, since it is frozen, so gradients reach only the policy."""
    return kl_divergence(policy, prior.detach())


def value_loss(
    value_logits: Tensor,
    returns: Tensor,
    bins: Tensor,
    slow_value_logits: Tensor | None = None,
    slow_reg: float = 1.0,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Twohot cross-entropy of the value head towards the lambda-returns (paper Sec. 3.4; DreamerV3).

    value_logits: [..., K] for the states whose returns are given; returns: [...] (treated as constants);
    bins: [K] symexp-spaced bins. With `slow_value_logits` (the EMA "slow" value network's logits at the same
    states), a regulariser slow_reg * CE(value, twohot(mean of slow value)) pulls the value towards the slow
    target's prediction as in DreamerV3 (slow_reg = 1 there), which damps value drift between target updates.
    weights (optional, [...], >= 0): per-state weights for the mean (e.g. the cumulative continue product).
    Returns (loss, metrics) with detached scalars: value_loss, value_ce, value_mean, return_mean and, with the
    slow target, value_slow_reg.
    """
    if value_logits.shape[:-1] != returns.shape:
        raise ValueError(
            f"returns shape {tuple(returns.shape)} must equal value_logits' batch shape "
            f"{tuple(value_logits.shape[:-1])}"
        )
    if slow_value_logits is not None and slow_value_logits.shape != value_logits.shape:
        raise ValueError(
            f"slow_value_logits shape {tuple(slow_value_logits.shape)} must equal value_logits shape "
            f"{tuple(value_logits.shape)}"
        )
    _check_same_shape("returns", returns, weights=weights)
    if slow_reg < 0.0:
        raise ValueError(f"slow_reg must be >= 0, got {slow_reg}")
    w = torch.ones_like(returns, dtype=torch.float32) if weights is None else weights.detach().float()

    ce = -twohot_log_prob(value_logits, bins, returns.detach())
    ce_mean = _weighted_mean(ce, w)
    loss = ce_mean
    metrics: dict[str, Tensor] = {}
    if slow_value_logits is not None:
        slow_target = twohot_mean(slow_value_logits.detach(), bins)
        reg = _weighted_mean(-twohot_log_prob(value_logits, bins, slow_target), w)
        loss = loss + slow_reg * reg
        metrics["value_slow_reg"] = reg.detach()
    metrics.update(
        value_loss=loss.detach(),
        value_ce=ce_mean.detach(),
        value_mean=_weighted_mean(twohot_mean(value_logits.detach(), bins), w),
        return_mean=_weighted_mean(returns.detach().float(), w),
    )
    return loss, metrics


# ===============================================================================================================
# Section 2: rollouts inside the world model
# ===============================================================================================================


class Rollout(NamedTuple):
    """One imagined trajectory per context, horizon H; all detached (the world model is frozen in phase 3).

    features  [B, H+1, n_agent, D]: agent-token outputs at the last context frame (index 0) and at each imagined
              frame, each read in the call that commits that frame at the context signal level (see `imagine`).
    actions   [B, H, A] float or [B, H] long: a_t, sampled from the policy at features[:, t].
    rewards   [B, H]: r_t, the reward head's prediction (offset 0) at features[:, t+1], i.e. the reward into
              imagined frame t+1, which that frame's agent token reads together with a_t (its action token).
    continues [B, H]: c_t, the continuation after a_t (assumed 1: no continue head, see `imagine`).
    latents   [B, H, S, Dz]: the imagined frames.
    """

    features: Tensor
    actions: Tensor
    rewards: Tensor
    continues: Tensor
    latents: Tensor

    @property
    def horizon(self) -> int:
        return self.rewards.shape[1]


def world_model_fn(model: Dynamics, params: TensorDictBase, tasks: Tensor | None = None) -> WorldModelFn:
    """The dynamics model with fixed params (and task ids `[B]`) as the sampler's `model_fn`."""

    def fn(z: Tensor, tau: Tensor, d: Tensor, actions: Tensor | None = None, action_mask: Tensor | None = None,
           cache: TensorDict | None = None):
        return apply(model, params, z, tau, d, actions, action_mask, cache, tasks)

    return fn


def commit_frames(
    model_fn: WorldModelFn,
    cfg: DynamicsConfig,
    latents: Tensor,
    actions: Tensor | None,
    action_mask: Tensor | None,
    cache: TensorDict,
    generator: torch.Generator | None,
    *,
    signal_level: float | None = None,
) -> tuple[Tensor, TensorDict]:
    """Append clean frames `[B, n, S, Dz]` (with the actions leading into them) to the KV cache, re-noised to the
    context signal level tau_ctx with step size d_min exactly as the sampler keeps its context (paper Sec. 3.2).

    Returns the agent-token outputs of those frames `[B, n, n_agent, D]` and the cache with the frames committed.
    This is how the agent observes a frame, whether it comes from replay, from the real environment or from the
    world model's own imagination: the same call, the same signal level. `signal_level` replaces tau_ctx for
    diagnostics only (how much the agent tokens read the frames: 0 commits pure noise, 1 the clean frames).
    """
    if latents.dim() != 4:
        raise ValueError(f"latents must be [B, n, S, Dz], got shape {tuple(latents.shape)}")
    level = cfg.context_signal if signal_level is None else signal_level
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"signal_level must be in [0, 1], got {signal_level}")
    batch, count = latents.shape[:2]
    signal = torch.full((batch, count), level, device=latents.device)
    noise = sample_noise(latents, generator, cfg.noise_scale)
    _, agent_out, cache = model_fn(add_noise(latents, signal, noise), signal, torch.full_like(signal, cfg.d_min),
                                   actions, action_mask, cache=cache)
    if agent_out is None:
        raise ValueError("the dynamics model has no agent tokens (DynamicsConfig.n_agent_tokens = 0)")
    return agent_out, cache


def _slide(cache: TensorDict, window: int | None) -> TensorDict:
    """The cache the next imagined frame is generated beside: at most `window - 1` frames (all when None)."""
    return cache if window is None else keep_last_steps(cache, window - 1)


def imagine(
    model: Dynamics,
    heads: AgentHeads,
    params: TensorDictBase,
    context: Tensor,
    context_actions: Tensor | None,
    generator: torch.Generator | None,
    *,
    horizon: int,
    steps: int | None = None,
    tasks: Tensor | None = None,
    context_action_mask: Tensor | None = None,
    greedy: bool = False,
    window: int | None = None,
) -> Rollout:
    """Roll the policy out for `horizon` steps inside the world model, one rollout per context (paper Sec. 3.4).

    params: {"dynamics": ..., "heads": {"policy", "reward", ...}}. context: replay latents `[B, T0, S, Dz]`;
    context_actions: their actions in TorchRL's convention (`[B, T0, A]` float or `[B, T0]` long, action t taken
    after frame t; the last one is not used, the policy replaces it), or None for none known;
    context_action_mask `[B, T0]` optionally marks unknown ones. steps: K denoising steps per frame (default
    `cfg.sampling_steps`). greedy: act with the policy's mode instead of sampling (evaluation). window: the most
    frames the world model attends to at once, the length of its training rows (`replay.row_frames`), as the
    acting policy keeps it (`train.acting`); None attends to the whole rollout. Without it, a context of T0 frames
    and a horizon H put the last imagined frames H + T0 - row_frames steps beyond any time distance training
    showed.

    Which agent output the policy reads: the one from the call that *commits* a frame at tau_ctx (`commit_frames`),
    not the last denoising call (where the frame is still at signal 1 - 1/K). That is the frame as the world model
    keeps it in its context and exactly what the agent sees of a real observation, so the policy meets the same
    input distribution in imagination and in the environment. The cost is one extra call per imagined frame over
    the sampler's fused commit (K + 1 calls per step instead of K).

    Continuation: the model has no continue head, so c_t = 1 (an imagined episode never ends within the horizon);
    the value bootstraps the tail. Runs without gradient (phase 3 freezes the transformer; PMPO trains through
    log-probs of the sampled actions, never through the world model).
    """
    cfg = model.cfg
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if window is not None and window < 2:
        raise ValueError(f"window must be >= 2 frames (a history and the frame being generated), got {window}")
    steps = cfg.sampling_steps if steps is None else steps
    cfg.check_sampling_steps(steps)
    if context.dim() != 4 or context.shape[1] < 1:
        raise ValueError(f"context must be [B, T0 >= 1, S, Dz], got shape {tuple(context.shape)}")
    batch, context_len = context.shape[:2]
    actions_in, mask_in = None, None
    if context_actions is not None:
        if context_actions.shape[:2] != (batch, context_len):
            raise ValueError(f"context_actions must start with [B, T0] = [{batch}, {context_len}], got "
                             f"{tuple(context_actions.shape)}")
        actions_in, mask_in = actions_into_frames(context_actions)
        if context_action_mask is not None:
            if context_action_mask.shape != (batch, context_len):
                raise ValueError(f"context_action_mask must be [B, T0] = [{batch}, {context_len}], got "
                                 f"{tuple(context_action_mask.shape)}")
            mask_in = mask_in & actions_into_frames(context_action_mask)[0].bool()
    if window is not None and context_len > window - 1:
        # As `sampler.generate`: the history kept beside the first imagined frame is the last window - 1 frames, so
        # the first policy feature reads no frame outside the window either.
        keep = slice(context_len - (window - 1), context_len)
        context = context[:, keep]
        actions_in = None if actions_in is None else actions_in[:, keep]
        mask_in = None if mask_in is None else mask_in[:, keep]
        context_len = window - 1
    heads_params = params["heads"]
    device = context.device
    with torch.no_grad():
        model_fn = world_model_fn(model, params["dynamics"], tasks)
        agent, cache = commit_frames(model_fn, cfg, context, actions_in, mask_in, empty_cache(batch, device),
                                     generator)
        cache = _slide(cache, window)
        h = agent[:, -1]
        nothing_pending = Frames(context[:, :0], torch.zeros(batch, 0, device=device),
                                 torch.zeros(batch, 0, device=device), None, None)
        known = torch.ones(batch, 1, dtype=torch.bool, device=device)
        features, actions, rewards, frames = [h], [], [], []
        for _ in range(horizon):
            policy = policy_dist(heads, heads_params["policy"], h)
            action = policy.mode() if greedy else policy.sample(generator)
            into = action[:, None]
            frame, _, cache = denoise_frame(model_fn, nothing_pending, cache, into, known, generator, steps,
                                            cfg.noise_scale)
            agent, cache = commit_frames(model_fn, cfg, frame[:, None], into, known, cache, generator)
            cache = _slide(cache, window)
            h = agent[:, 0]
            features.append(h)
            actions.append(action)
            rewards.append(reward_dist(heads, heads_params["reward"], h).mean())
            frames.append(frame)
    rewards_t = torch.stack(rewards, dim=1)
    return Rollout(
        features=torch.stack(features, dim=1),
        actions=torch.stack(actions, dim=1),
        rewards=rewards_t,
        continues=torch.ones_like(rewards_t),
        latents=torch.stack(frames, dim=1),
    )


# ===============================================================================================================
# Section 3: the phase-3 objective
# ===============================================================================================================


@dataclass(frozen=True)
class ImaginationConfig:
    horizon: int = 16  # imagined steps per rollout (the paper gives none)
    gamma: float = 0.997
    lam: float = 0.95
    alpha: float = 0.5  # PMPO weight of the positive-advantage set
    beta: float = 0.3  # reverse-KL weight towards the BC prior
    entropy_floor: float | None = None  # soft hinge below this policy entropy (nats); None disables it
    entropy_floor_coef: float = 1.0
    value_coef: float = 1.0
    # 0 trains the value head alone: a warm-up before PMPO. While the value lags the returns (it starts at 0),
    # nearly every advantage is positive and sign-only PMPO merely sharpens the policy on its own samples.
    policy_coef: float = 1.0
    slow_reg: float = 1.0  # weight of the pull towards the slow (EMA) value's prediction
    slow_decay: float = 0.98  # EMA decay of the slow value params per step (DreamerV3)
    sampling_steps: int | None = None  # K per imagined frame; None: DynamicsConfig.sampling_steps
    # Not in the paper (False keeps Eq. 11 as written): PMPO takes the signs of advantages minus their batch mean at
    # each imagined step (`center_per_step`). The value head starts at 0 and must climb to about r / (1 - gamma),
    # ~100 at gamma 0.997, by bootstrapping; until it gets there almost every advantage is positive (logged as
    # agent/frac_pos; agent/uncentered_frac_pos when centring) and sign-only PMPO prefers no action over another.
    # The value loss is unchanged.
    center_advantages: bool = False

    def __post_init__(self) -> None:
        if self.horizon < 1:
            raise ValueError(f"ImaginationConfig.horizon must be >= 1, got {self.horizon}")
        for name in ("gamma", "lam", "alpha", "slow_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ImaginationConfig.{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("beta", "entropy_floor_coef", "value_coef", "policy_coef", "slow_reg"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"ImaginationConfig.{name} must be >= 0, got {getattr(self, name)}")
        k = self.sampling_steps
        if k is not None and (k < 1 or k & (k - 1)):
            raise ValueError(f"ImaginationConfig.sampling_steps must be a power of two or None, got "
                             f"{self.sampling_steps}")


def imagination_loss(
    head_params: TensorDictBase,
    rollout: Rollout,
    *,
    heads: AgentHeads,
    prior_policy: TensorDictBase,
    slow_value: TensorDictBase,
    cfg: ImaginationConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PMPO policy loss + twohot value loss on one rollout (paper Eq. 11 and Sec. 3.4).

    head_params: {"policy", "value"} (the trained heads; anything else is ignored); prior_policy: the frozen BC
    policy head params; slow_value: the EMA value head params. Per imagined step t < H:
      values V_0..V_H from the value head; R = lambda_returns(r, sg(V), c); advantages A_t = R_t - sg(V_t)
      (minus their batch mean at step t with `cfg.center_advantages`);
      policy: pmpo_loss(log pi(a_t | h_t), A, KL(pi || prior), alpha, beta) with the optional entropy floor;
      value: twohot CE of V_t towards sg(R_t), plus the slow-value regulariser;
      loss = policy_coef * policy + value_coef * value.
    Steps after a predicted termination are weighted by the cumulative continuation prod_{i<t} c_i (all 1 when
    continues are assumed). Returns (loss, metrics): the PMPO and value metrics (policy entropy, KL to the prior,
    advantage mean / std / max and the sign fractions among them) plus the imagined reward and return.
    """
    horizon = rollout.horizon
    batch = rollout.rewards.shape[0]
    if rollout.features.shape[:2] != (batch, horizon + 1):
        raise ValueError(f"rollout.features must be [B, H+1, ...] = [{batch}, {horizon + 1}, ...], got "
                         f"{tuple(rollout.features.shape)}")
    if rollout.continues.shape != rollout.rewards.shape:
        raise ValueError(f"rollout.continues shape {tuple(rollout.continues.shape)} must equal rewards shape "
                         f"{tuple(rollout.rewards.shape)}")
    features = rollout.features.detach()
    acting = features[:, :horizon]
    policy = policy_dist(heads, head_params["policy"], acting)
    prior = policy_dist(heads, prior_policy, acting)
    log_probs = policy.log_prob(rollout.actions)
    kl = reverse_kl(policy, prior)
    entropy = policy.entropy()

    bins = heads.cfg.bins(features.device)
    value_logits = apply(heads.value, head_params["value"], features)  # [B, H+1, K]
    values = twohot_mean(value_logits, bins).detach()
    continues = rollout.continues.detach()
    returns = lambda_returns(rollout.rewards.detach(), values, continues, cfg.gamma, cfg.lam)
    advantages = returns - values[:, :horizon]
    weights = torch.cumprod(torch.cat([torch.ones_like(continues[:, :1]), continues[:, :-1]], dim=1), dim=1)
    uncentered = advantages
    if cfg.center_advantages:
        advantages = center_per_step(advantages, weights)

    policy_loss, policy_metrics = pmpo_loss(
        log_probs, advantages, kl, cfg.alpha, cfg.beta, weights=weights, entropy=entropy,
        entropy_floor=cfg.entropy_floor, entropy_floor_coef=cfg.entropy_floor_coef,
    )
    slow_logits = apply(heads.value, slow_value, acting) if cfg.slow_reg > 0 else None
    v_loss, value_metrics = value_loss(value_logits[:, :horizon], returns, bins, slow_logits, cfg.slow_reg, weights)
    loss = cfg.policy_coef * policy_loss + cfg.value_coef * v_loss
    metrics = {
        **policy_metrics,
        **value_metrics,
        "loss": loss.detach(),
        "imagined_reward": rollout.rewards.detach().mean(),
        "imagined_return": returns[:, 0].mean(),
    }
    if cfg.center_advantages:  # the value-lag diagnostic, which the centred frac_pos and adv_mean no longer show
        plain = advantage_stats(uncentered, weights)
        metrics["uncentered_frac_pos"] = plain["frac_pos"]
        metrics["uncentered_adv_mean"] = plain["adv_mean"]
    return loss, metrics
