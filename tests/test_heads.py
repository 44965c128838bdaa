"""Agent heads: shapes for both action spaces, multi-token offsets, initialisation, parameter layout."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d4func.config import TransformerConfig
from d4func.distributions import BoundedNormal, Categorical
from d4func.dynamics import DynamicsConfig
from d4func.functional import apply, grad_and_value, init, template
from d4func.heads import AgentHeads, HeadsConfig, policy_dist, reward_dist, uniform_policy_entropy, value_dist

torch.set_num_threads(1)


def make(discrete: bool, n_agent: int = 2, mtp: int = 4, seed: int = 0, **kw) -> tuple[AgentHeads, object]:
    cfg = HeadsConfig(d_model=16, n_agent_tokens=n_agent, hidden=24, mtp=mtp, n_actions=5 if discrete else 0,
                      action_dim=0 if discrete else 3, n_bins=41, **kw)
    heads = template(AgentHeads, cfg)
    return heads, init(heads, seed)


@settings(max_examples=12, deadline=None)
@given(discrete=st.booleans(), n_agent=st.integers(1, 3), mtp=st.integers(1, 8),
       batch=st.lists(st.integers(1, 3), min_size=1, max_size=3), seed=st.integers(0, 99))
def test_head_output_shapes(discrete, n_agent, mtp, batch, seed):
    heads, params = make(discrete, n_agent, mtp, seed)
    x = torch.randn(*batch, n_agent, 16, generator=torch.Generator().manual_seed(seed))
    policy_raw, reward_logits, value_logits = apply(heads, params, x)
    assert policy_raw.shape == (*batch, mtp, 5 if discrete else 6)
    assert reward_logits.shape == (*batch, mtp, 41)
    assert value_logits.shape == (*batch, 41)

    acting = policy_dist(heads, params["policy"], x)
    every = policy_dist(heads, params["policy"], x, offset=None)
    assert isinstance(acting, Categorical if discrete else BoundedNormal)
    gen = torch.Generator().manual_seed(seed)
    sample = acting.sample(gen)
    if discrete:
        assert acting.logits.shape == (*batch, 5) and every.logits.shape == (*batch, mtp, 5)
        assert sample.shape == tuple(batch) and sample.dtype == torch.int64
    else:
        assert acting.loc.shape == (*batch, 3) and every.loc.shape == (*batch, mtp, 3)
        assert sample.shape == (*batch, 3) and sample.abs().max() <= 1.0
        # The log-std bound of from_raw holds for whatever the head outputs.
        assert (every.std >= 0.1 - 1e-6).all() and (every.std <= 1.0 + 1e-6).all()
    assert reward_dist(heads, params["reward"], x, offset=None).mean().shape == (*batch, mtp)
    assert value_dist(heads, params["value"], x).mean().shape == tuple(batch)


@pytest.mark.parametrize("discrete", [True, False])
def test_offsets_are_separate_read_outs_of_one_trunk(discrete):
    """policy_dist(offset=n) is slice n of all offsets, and offset n's loss moves only its own output rows (plus
    the shared trunk): the (offset, output) reshape is grouped the right way round."""
    heads, params = make(discrete, mtp=4)
    x = torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(1))
    every = policy_dist(heads, params["policy"], x, offset=None)
    for n in range(4):
        one = policy_dist(heads, params["policy"], x, offset=n)
        if discrete:
            torch.testing.assert_close(one.logits, every.logits[:, n])
        else:
            torch.testing.assert_close(one.loc, every.loc[:, n])
            torch.testing.assert_close(one.std, every.std[:, n])
    target = torch.zeros(6, dtype=torch.long) if discrete else torch.full((6, 3), 0.5)
    per_offset = heads.cfg.policy_out
    for n in (0, 2):
        def loss(p, n=n):
            return -policy_dist(heads, p, x, offset=n).log_prob(target).mean()

        grads, _ = grad_and_value(loss)(params["policy"])
        rows = grads["out", "weight"].abs().sum(-1).reshape(4, per_offset).sum(-1)
        assert rows[n] > 0
        assert torch.count_nonzero(rows) == 1, f"offset {n} moved the rows of offsets {rows.nonzero().flatten()}"
        assert grads["inp", "weight"].abs().sum() > 0  # the trunk is shared


def test_reward_and_value_start_at_zero_and_policy_near_uniform():
    heads, params = make(True, mtp=3)
    x = torch.randn(4, 7, 2, 16)
    assert torch.equal(reward_dist(heads, params["reward"], x, offset=None).mean(), torch.zeros(4, 7, 3))
    assert torch.equal(value_dist(heads, params["value"], x).mean(), torch.zeros(4, 7))
    entropy = policy_dist(heads, params["policy"], x).entropy()
    assert (entropy > 0.95 * uniform_policy_entropy(heads.cfg)).all()
    assert uniform_policy_entropy(heads.cfg) == pytest.approx(math.log(5))


def test_the_policy_heads_std_bounds_come_from_its_config():
    """`heads.min_std` / `heads.max_std` reach the distribution: extreme raw std outputs land on the configured
    bounds, not on BoundedNormal's defaults (0.1, 1.0)."""
    heads, params = make(False, n_agent=1, mtp=1, min_std=0.3, max_std=0.6)
    params = params.clone()
    out = params["policy", "out"]
    out["weight"] = torch.zeros_like(out["weight"])
    for raw_std, expected in ((-1e3, 0.3), (1e3, 0.6)):
        out["bias"] = torch.cat([torch.zeros(3), torch.full((3,), raw_std)])
        dist = policy_dist(heads, params["policy"], torch.randn(2, 1, 16))
        torch.testing.assert_close(dist.std, torch.full((2, 3), expected))


def test_params_are_one_tree_with_disjoint_heads_and_no_buffers():
    heads, params = make(False)
    assert set(params.keys()) == {"policy", "reward", "value"}
    again = init(heads, 0)
    assert (params == again).all()  # a function of the seed alone
    other = init(heads, 1)
    assert not torch.equal(params["policy", "inp", "weight"], other["policy", "inp", "weight"])
    assert next(heads.buffers(), None) is None
    for name, module in heads.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert hasattr(module, "reset_parameters"), name


def test_for_dynamics_matches_the_world_model():
    dyn = DynamicsConfig(transformer=TransformerConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, time_every=2),
                         latent_tokens=4, latent_dim=4, n_agent_tokens=3, n_actions=7)
    cfg = HeadsConfig.for_dynamics(dyn, hidden=8)
    assert (cfg.d_model, cfg.n_agent_tokens, cfg.n_actions, cfg.action_dim, cfg.hidden) == (32, 3, 7, 0, 8)
    with pytest.raises(ValueError, match="no agent tokens"):
        HeadsConfig.for_dynamics(DynamicsConfig(transformer=dyn.transformer, latent_tokens=4, latent_dim=4,
                                                n_actions=7))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n_actions=0, action_dim=0), "exactly one of"),
        (dict(n_actions=4, action_dim=2), "exactly one of"),
        (dict(n_actions=1), "n_actions must be >= 2"),
        (dict(n_actions=4, mtp=0), "mtp must be >= 1"),
        (dict(action_dim=2, min_std=1.0, max_std=0.5), "min_std < max_std"),
        (dict(action_dim=2, min_std=0.0), "0 < min_std"),  # log(0): the std bound would be -inf
        (dict(n_actions=4, unimix=1.0), "unimix"),
        (dict(n_actions=4, bins_low=1.0, bins_high=1.0), "bins_low < bins_high"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HeadsConfig(**kwargs)


def test_bad_inputs_raise_clear_errors():
    heads, params = make(True, n_agent=2, mtp=3)
    with pytest.raises(ValueError, match="n_agent_tokens=2"):
        policy_dist(heads, params["policy"], torch.randn(4, 16))
    with pytest.raises(ValueError, match="offset must lie in"):
        policy_dist(heads, params["policy"], torch.randn(4, 2, 16), offset=3)


@pytest.mark.parametrize("action_dim", [1, 2, 5])
def test_the_uniform_entropy_of_a_continuous_policy_counts_every_action_dimension(action_dim):
    # The entropy floor's reference scale is the uniform density on the box [-1, 1]^A: 1 / 2^A, entropy A log 2
    # nats, growing with each action dimension (a bounded policy's entropy can never exceed it).
    heads, _ = make(False, mtp=1, n_agent=1)
    cfg = HeadsConfig(d_model=16, n_agent_tokens=1, hidden=8, mtp=1, action_dim=action_dim, n_bins=41)
    assert uniform_policy_entropy(cfg) == pytest.approx(action_dim * math.log(2.0))
    widest = BoundedNormal(torch.zeros(3), torch.full((3,), 1e3))  # nearly uniform on [-1, 1] per dimension
    assert uniform_policy_entropy(heads.cfg) == pytest.approx(widest.entropy().sum().item(), rel=1e-3)
