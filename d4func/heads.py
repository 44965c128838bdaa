"""Agent heads on the dynamics transformer's agent tokens (paper Sec. 3.3, Eq. 9-10).

Three small MLP heads read the agent-token outputs `h_t` (`Dynamics.forward`'s `agent_out`, `[..., n_agent, D]`,
flattened to `[..., n_agent * D]`):

* policy: a_{t+n} for the `mtp` offsets n = 0 .. mtp-1 (multi-token prediction; the paper's L = 8 sums Eq. 9
  over n = 0 .. L, so its setting is `mtp = 9`, the default; the losses average over the offsets, see
  `d4func.train.agent_step.FinetuneConfig`). Continuous actions use
  `BoundedNormal.from_raw` (loc via tanh, log-std bounded between `min_std` and `max_std`), discrete ones a
  `Categorical` with uniform mixing `unimix`.
* reward: the reward *into* frame t+n (the reward of the transition that produced frame t+n; see
  `d4func/train/agent_step.py` for the alignment) for the same `mtp` offsets, as a symexp-twohot distribution.
* value: V(h_t), symexp twohot, one output (a value has no future offsets).

Multi-token prediction design: one MLP trunk per head and a single output layer producing all `mtp` offsets at once
(reshaped to `[..., L, out]`), i.e. L linear read-outs of one shared feature. The offsets describe the same state
from different lags, so they share what the trunk extracts; the extra offsets cost only L-times a linear layer,
and offset 0 (the one the policy acts with and the reward head annotates imagined steps with) gets the same trunk
features that the auxiliary offsets shape, which is the point of MTP as a representation-learning signal. L
separate MLPs would give the auxiliary offsets no influence on the offset-0 features of the head.

Each head has its own trunk: phase 3 trains only the policy and value heads (the transformer and reward head stay
frozen), so their parameters must be disjoint from the reward head's. `AgentHeads` keeps them under the keys
`policy`, `reward` and `value` of one params TensorDict, separate from the dynamics params; a single head is called
as `apply(heads.policy, params["policy"], agent_out)`.

Initialisation: the reward and value output layers start at zero, so they predict exactly 0 at first (uniform
logits over antisymmetric bins, DreamerV3's choice, which avoids large early value targets); the policy output
starts small (`policy_init_scale`), giving a near-uniform categorical and loc ~ 0 with the middle std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from tensordict import TensorDictBase
from torch import Tensor, nn

from d4func.distributions import BoundedNormal, Categorical, TwoHotDist, symexp_bins
from d4func.dynamics import DynamicsConfig
from d4func.functional import apply
from d4func.layers import RMSNorm, SwiGLU

__all__ = [
    "AgentHeads",
    "HeadsConfig",
    "MLPHead",
    "action_dist_from_raw",
    "policy_dist",
    "reward_dist",
    "uniform_policy_entropy",
    "value_dist",
]


@dataclass(frozen=True)
class HeadsConfig:
    d_model: int = 256  # width of the dynamics transformer (agent-token output size)
    n_agent_tokens: int = 1
    hidden: int = 256
    n_blocks: int = 1  # pre-norm SwiGLU residual blocks per trunk
    mtp: int = 9  # predicted offsets n = 0 .. mtp-1 of the policy and reward heads (paper: L = 8, n = 0 .. 8)
    action_dim: int = 0  # continuous action size; 0 for discrete actions
    n_actions: int = 0  # discrete action count; 0 for continuous actions
    n_bins: int = 255  # twohot bins of the reward and value heads (DreamerV3: 255 over symlog +-20)
    bins_low: float = -20.0
    bins_high: float = 20.0
    min_std: float = 0.1  # BoundedNormal log-std bounds (the continuous-PMPO stability guard)
    max_std: float = 1.0
    unimix: float = 0.01  # uniform mixing of the categorical policy (keeps log-probs and the KL finite)
    policy_init_scale: float = 0.1

    def __post_init__(self) -> None:
        for name in ("d_model", "n_agent_tokens", "hidden", "mtp"):
            if getattr(self, name) < 1:
                raise ValueError(f"HeadsConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_blocks < 0:
            raise ValueError(f"HeadsConfig.n_blocks must be >= 0, got {self.n_blocks}")
        if self.action_dim < 0 or self.n_actions < 0:
            raise ValueError(f"HeadsConfig action sizes must be >= 0, got action_dim={self.action_dim}, "
                             f"n_actions={self.n_actions}")
        if (self.action_dim > 0) == (self.n_actions > 0):
            raise ValueError("HeadsConfig needs exactly one of action_dim (continuous) or n_actions (discrete) > 0, "
                             f"got action_dim={self.action_dim}, n_actions={self.n_actions}")
        if self.n_actions == 1:
            raise ValueError("HeadsConfig.n_actions must be >= 2 for a discrete policy, got 1")
        if self.n_bins < 2:
            raise ValueError(f"HeadsConfig.n_bins must be >= 2, got {self.n_bins}")
        if not self.bins_low < self.bins_high:
            raise ValueError(f"HeadsConfig needs bins_low < bins_high, got {self.bins_low}, {self.bins_high}")
        if not 0.0 < self.min_std < self.max_std:
            raise ValueError(f"HeadsConfig needs 0 < min_std < max_std, got {self.min_std}, {self.max_std}")
        if not 0.0 <= self.unimix < 1.0:
            raise ValueError(f"HeadsConfig.unimix must lie in [0, 1), got {self.unimix}")
        if self.policy_init_scale < 0.0:
            raise ValueError(f"HeadsConfig.policy_init_scale must be >= 0, got {self.policy_init_scale}")

    @classmethod
    def for_dynamics(cls, dynamics: DynamicsConfig, **overrides) -> HeadsConfig:
        """Heads matching a dynamics model: its width, agent-token count and action space."""
        if dynamics.n_agent_tokens < 1:
            raise ValueError("the dynamics model has no agent tokens (DynamicsConfig.n_agent_tokens = 0)")
        base = dict(d_model=dynamics.transformer.d_model, n_agent_tokens=dynamics.n_agent_tokens,
                    action_dim=dynamics.action_dim, n_actions=dynamics.n_actions)
        return cls(**{**base, **overrides})

    @property
    def discrete(self) -> bool:
        return self.n_actions > 0

    @property
    def in_dim(self) -> int:
        return self.d_model * self.n_agent_tokens

    @property
    def policy_out(self) -> int:
        """Raw policy outputs per offset: K logits, or A locations and A std parameters."""
        return self.n_actions if self.discrete else 2 * self.action_dim

    def bins(self, device: torch.device | str | None = None) -> Tensor:
        """The twohot bins of the reward and value heads (computed, never stored: templates hold no buffers)."""
        return symexp_bins(self.n_bins, self.bins_low, self.bins_high, device=device)


class OutputLinear(nn.Linear):
    """A linear read-out whose initial weights are the default ones times `scale` (0: exactly zero), bias 0."""

    def __init__(self, in_features: int, out_features: int, scale: float) -> None:
        self.scale = scale
        super().__init__(in_features, out_features)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.weight.mul_(self.scale)
            self.bias.zero_()


class ResidualSwiGLU(nn.Module):
    """x + SwiGLU(RMSNorm(x)), the transformer's pre-norm MLP block on its own."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


class MLPHead(nn.Module):
    """RMSNorm -> Linear(in, hidden) -> n_blocks residual SwiGLU blocks -> RMSNorm -> Linear(hidden, groups * out),
    reshaped to `[..., groups, out]` (`groups` = `mtp`, the MTP heads' offsets), or `[..., out]` with no offset axis
    when `groups` is None (the value head)."""

    def __init__(
        self, in_dim: int, hidden: int, n_blocks: int, out: int, groups: int | None, init_scale: float
    ) -> None:
        super().__init__()
        self.groups = groups
        self.in_norm = RMSNorm(in_dim)
        self.inp = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(ResidualSwiGLU(hidden) for _ in range(n_blocks))
        self.out_norm = RMSNorm(hidden)
        self.out = OutputLinear(hidden, (groups or 1) * out, init_scale)

    def forward(self, agent_out: Tensor) -> Tensor:
        x = self.inp(self.in_norm(rearrange(agent_out, "... n d -> ... (n d)")))
        for block in self.blocks:
            x = block(x)
        y = self.out(self.out_norm(x))
        if self.groups is None:
            return y
        return rearrange(y, "... (g o) -> ... g o", g=self.groups)


class AgentHeads(nn.Module):
    """Policy, reward and value heads. `forward(agent_out [..., n_agent, D])` returns
    (policy_raw [..., L, P], reward_logits [..., L, K], value_logits [..., K])."""

    def __init__(self, cfg: HeadsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.policy = MLPHead(cfg.in_dim, cfg.hidden, cfg.n_blocks, cfg.policy_out, cfg.mtp, cfg.policy_init_scale)
        self.reward = MLPHead(cfg.in_dim, cfg.hidden, cfg.n_blocks, cfg.n_bins, cfg.mtp, 0.0)
        self.value = MLPHead(cfg.in_dim, cfg.hidden, cfg.n_blocks, cfg.n_bins, None, 0.0)

    def forward(self, agent_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.policy(agent_out), self.reward(agent_out), self.value(agent_out)


def _check_features(cfg: HeadsConfig, agent_out: Tensor) -> None:
    if agent_out.dim() < 2 or agent_out.shape[-2:] != (cfg.n_agent_tokens, cfg.d_model):
        raise ValueError(f"agent_out must be [..., n_agent_tokens={cfg.n_agent_tokens}, d_model={cfg.d_model}], "
                         f"got {tuple(agent_out.shape)}")


def _select(x: Tensor, offset: int | None, cfg: HeadsConfig) -> Tensor:
    """x [..., L, out] -> the given offset's [..., out], or all offsets when offset is None."""
    if offset is None:
        return x
    if not 0 <= offset < cfg.mtp:
        raise ValueError(f"offset must lie in [0, mtp={cfg.mtp}), got {offset}")
    return x[..., offset, :]


def action_dist_from_raw(cfg: HeadsConfig, raw: Tensor) -> BoundedNormal | Categorical:
    """Raw policy outputs [..., P] -> the action distribution (continuous: first A are loc, last A the std params)."""
    if raw.shape[-1] != cfg.policy_out:
        raise ValueError(f"raw policy outputs must have {cfg.policy_out} entries, got {raw.shape[-1]}")
    if cfg.discrete:
        return Categorical(raw, unimix=cfg.unimix)
    loc, std = raw.chunk(2, dim=-1)
    return BoundedNormal.from_raw(loc, std, cfg.min_std, cfg.max_std)


def policy_dist(
    heads: AgentHeads, params: TensorDictBase, agent_out: Tensor, offset: int | None = 0
) -> BoundedNormal | Categorical:
    """The policy at `agent_out` [..., n_agent, D]: batch shape [...] for one `offset` (0 = the acting policy), or
    [..., L] for all offsets with `offset=None`. `params` are the policy head's (`agent_params["policy"]`)."""
    _check_features(heads.cfg, agent_out)
    raw = apply(heads.policy, params, agent_out)
    return action_dist_from_raw(heads.cfg, _select(raw, offset, heads.cfg))


def reward_dist(heads: AgentHeads, params: TensorDictBase, agent_out: Tensor, offset: int | None = 0) -> TwoHotDist:
    """The reward into the frame `offset` steps after `agent_out`'s frame (or all offsets, [..., L])."""
    _check_features(heads.cfg, agent_out)
    logits = apply(heads.reward, params, agent_out)
    return TwoHotDist(_select(logits, offset, heads.cfg), heads.cfg.bins(agent_out.device))


def value_dist(heads: AgentHeads, params: TensorDictBase, agent_out: Tensor) -> TwoHotDist:
    """V(h_t) as a twohot distribution with batch shape [...]."""
    _check_features(heads.cfg, agent_out)
    return TwoHotDist(apply(heads.value, params, agent_out), heads.cfg.bins(agent_out.device))


def uniform_policy_entropy(cfg: HeadsConfig) -> float:
    """Entropy of the uniform policy over the action space, in nats: log K, or A * log 2 for the box [-1, 1]^A.
    A reference scale for entropy floors."""
    return math.log(cfg.n_actions) if cfg.discrete else cfg.action_dim * math.log(2.0)
