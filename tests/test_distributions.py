"""Tests for d4func.distributions: symlog/symexp, symexp twohot, bounded normal, categorical."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d4func.distributions import (
    BoundedNormal,
    Categorical,
    TwoHotDist,
    bounded_normal_min_entropy,
    kl_divergence,
    symexp,
    symexp_bins,
    symlog,
    twohot,
    twohot_log_prob,
    twohot_mean,
)

torch.set_num_threads(1)
FAST = settings(max_examples=40, deadline=None)
BINS = symexp_bins()


# --- symlog / symexp ---------------------------------------------------------------------------------------------


@FAST
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=20))
def test_symexp_inverts_symlog(xs: list[float]) -> None:
    x = torch.tensor(xs, dtype=torch.float64)
    torch.testing.assert_close(symexp(symlog(x)), x, rtol=1e-10, atol=1e-10)


@FAST
@given(st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=20))
def test_symlog_inverts_symexp(ys: list[float]) -> None:
    y = torch.tensor(ys, dtype=torch.float64)
    torch.testing.assert_close(symlog(symexp(y)), y, rtol=1e-10, atol=1e-10)


def test_symlog_values() -> None:
    x = torch.tensor([-(math.e - 1.0), 0.0, math.e**2 - 1.0], dtype=torch.float64)
    torch.testing.assert_close(symlog(x), torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64))


def test_symexp_bins_layout() -> None:
    assert BINS.shape == (255,)
    assert bool((BINS[1:] > BINS[:-1]).all())
    assert BINS[127].item() == 0.0  # odd count over a symmetric range: an exact zero bin
    assert torch.equal(BINS, -BINS.flip(0))  # exactly antisymmetric
    torch.testing.assert_close(
        BINS[-1].double(), torch.tensor(math.expm1(20.0), dtype=torch.float64), rtol=1e-6, atol=0
    )
    gaps = symlog(BINS.double()).diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, 40.0 / 254), rtol=1e-4, atol=1e-5)
    small = symexp_bins(5, -2.0, 3.0, dtype=torch.float64)
    torch.testing.assert_close(small, symexp(torch.linspace(-2.0, 3.0, 5, dtype=torch.float64)))


@pytest.mark.parametrize("kwargs", [{"n": 1}, {"low": 1.0, "high": 1.0}, {"low": 2.0, "high": -2.0}])
def test_symexp_bins_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        symexp_bins(**kwargs)


# --- twohot ------------------------------------------------------------------------------------------------------


@FAST
@given(st.lists(st.floats(-1e9, 1e9, allow_nan=False), min_size=1, max_size=16))
def test_twohot_weights_are_two_adjacent_bins_that_reconstruct_x(xs: list[float]) -> None:
    bins = BINS.double()
    x = torch.tensor(xs, dtype=torch.float64)
    w = twohot(x, bins)
    assert w.shape == (len(xs), 255)
    assert bool((w >= 0).all())
    torch.testing.assert_close(w.sum(-1), torch.ones(len(xs), dtype=torch.float64))
    for row in w:
        nz = torch.nonzero(row).flatten()
        assert 1 <= nz.numel() <= 2
        if nz.numel() == 2:
            assert nz[1] - nz[0] == 1
    clipped = x.clamp(bins[0], bins[-1])
    torch.testing.assert_close((w * bins).sum(-1), clipped, rtol=1e-9, atol=1e-9)


def test_twohot_on_a_bin_is_one_hot_and_clips_out_of_range() -> None:
    x = torch.stack([BINS[0], BINS[100], BINS[-1], BINS[-1] * 10, BINS[0] * 10])
    w = twohot(x, BINS)
    assert w.argmax(-1).tolist() == [0, 100, 254, 254, 0]
    torch.testing.assert_close(w.max(-1).values, torch.ones(5))


def test_twohot_simple_interpolation() -> None:
    bins = torch.tensor([-1.0, 0.0, 2.0, 6.0])
    w = twohot(torch.tensor([0.5, 5.0]), bins)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.75, 0.25, 0.0], [0.0, 0.0, 0.25, 0.75]]))


def test_twohot_rejects_unsorted_bins() -> None:
    with pytest.raises(ValueError, match="increasing"):
        twohot(torch.zeros(2), torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        twohot(torch.zeros(2), torch.zeros(2, 3))


def test_twohot_mean_of_uniform_logits_is_exactly_zero() -> None:
    # A zero-initialised head must predict exactly 0 despite bins as large as 4.9e8 (symmetric summation).
    assert torch.equal(twohot_mean(torch.zeros(4, 255), BINS), torch.zeros(4))


@FAST
@given(st.lists(st.floats(-1e5, 1e5, allow_nan=False), min_size=1, max_size=16))
def test_twohot_mean_recovers_target_from_its_twohot_logits(xs: list[float]) -> None:
    target = torch.tensor(xs)
    logits = torch.log(twohot(target, BINS))  # softmax(log w) = w: all mass on the target's two bins
    torch.testing.assert_close(twohot_mean(logits, BINS), target, rtol=1e-5, atol=1e-5)
    # and a head with finite logits, large on the target's two bins (log-weights) and ~ -20.7 on all others,
    # predicts it up to the 253 * 1e-9 mass left elsewhere
    peaked = torch.log(twohot(target, BINS) + 1e-9)
    torch.testing.assert_close(twohot_mean(peaked, BINS), target, rtol=1e-5, atol=1e-4)


@FAST
@given(st.integers(0, 2**31 - 1))
def test_twohot_log_prob_is_cross_entropy_and_maximised_by_the_targets_twohot(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(6, generator=g) * 50
    logits = torch.randn(6, 255, generator=g)
    expected = (twohot(target, BINS) * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(twohot_log_prob(logits, BINS, target), expected)
    best = twohot_log_prob(torch.log(twohot(target, BINS)), BINS, target)
    assert bool((best >= twohot_log_prob(logits, BINS, target)).all())
    dist = TwoHotDist(logits, BINS)
    torch.testing.assert_close(dist.log_prob(target), expected)
    torch.testing.assert_close(dist.mean(), twohot_mean(logits, BINS))


def test_twohot_log_prob_shape_errors() -> None:
    with pytest.raises(ValueError, match="bins"):
        twohot_log_prob(torch.zeros(3, 10), BINS, torch.zeros(3))
    with pytest.raises(ValueError, match="target shape"):
        twohot_log_prob(torch.zeros(3, 255), BINS, torch.zeros(4))


# --- bounded normal ----------------------------------------------------------------------------------------------


def _scipy_truncnorm(loc: torch.Tensor, std: torch.Tensor) -> scipy.stats.rv_continuous:
    loc_n, std_n = loc.double().numpy(), std.double().numpy()
    return scipy.stats.truncnorm((-1 - loc_n) / std_n, (1 - loc_n) / std_n, loc=loc_n, scale=std_n)


@FAST
@given(st.integers(0, 2**31 - 1))
def test_bounded_normal_matches_scipy_truncnorm(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    raw_loc, raw_std = torch.randn(5, 3, generator=g) * 2, torch.randn(5, 3, generator=g) * 3
    dist = BoundedNormal.from_raw(raw_loc, raw_std)
    ref = _scipy_truncnorm(dist.loc, dist.std)
    action = torch.rand(5, 3, generator=g) * 2 - 1
    action[0] = 1.0  # the edges of the box are in the support
    action[1] = -1.0
    expected_lp = ref.logpdf(action.double().numpy()).sum(-1)
    np.testing.assert_allclose(dist.log_prob(action).numpy(), expected_lp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dist.entropy().numpy(), ref.entropy().sum(-1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dist.mean().numpy(), ref.mean(), rtol=1e-4, atol=1e-5)


def test_bounded_normal_log_prob_finite_at_edges_for_extreme_heads() -> None:
    raw = torch.tensor([-1e4, -30.0, 0.0, 30.0, 1e4]).reshape(5, 1)
    for raw_std in (torch.full((5, 1), -1e4), torch.full((5, 1), 1e4)):
        dist = BoundedNormal.from_raw(raw, raw_std)
        for edge in (-1.0, 1.0, -1.0 - 1e-6, 1.0 + 1e-6):
            lp = dist.log_prob(torch.full((5, 1), edge))
            assert bool(torch.isfinite(lp).all()), (edge, lp)
        assert bool(torch.isfinite(dist.entropy()).all())


def test_bounded_normal_density_integrates_to_one() -> None:
    xs = torch.linspace(-1, 1, 40001, dtype=torch.float64).unsqueeze(-1)
    for loc, std in [(0.0, 1.0), (0.95, 0.1), (-1.0, 0.3)]:
        dist = BoundedNormal(torch.full_like(xs, loc), torch.full_like(xs, std))
        total = torch.trapezoid(dist.log_prob(xs).exp(), xs[:, 0])
        assert abs(total.item() - 1.0) < 1e-6


def test_from_raw_bounds_std_and_loc() -> None:
    raw = torch.linspace(-1e3, 1e3, 101).unsqueeze(-1)
    dist = BoundedNormal.from_raw(raw, raw, min_std=0.1, max_std=1.0)
    assert bool((dist.std >= 0.1 - 1e-7).all()) and bool((dist.std <= 1.0 + 1e-7).all())
    assert bool((dist.loc.abs() <= 1.0).all())
    assert dist.std[0].item() == pytest.approx(0.1) and dist.std[-1].item() == pytest.approx(1.0)
    mid = BoundedNormal.from_raw(torch.zeros(1), torch.zeros(1))
    assert mid.std.item() == pytest.approx(math.sqrt(0.1))
    with pytest.raises(ValueError, match="min_std"):
        BoundedNormal.from_raw(raw, raw, min_std=1.0, max_std=0.5)


@FAST
@given(st.integers(0, 2**31 - 1))
def test_bounded_normal_entropy_never_below_the_floor(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(64, 2, 2, generator=g) * 20
    dist = BoundedNormal.from_raw(raw[..., 0], raw[..., 1])
    assert bool((dist.entropy() >= bounded_normal_min_entropy(0.1, action_dims=2) - 1e-4).all())


def test_bounded_normal_samples_in_box_reproducible_and_distributed() -> None:
    loc = torch.tensor([0.3, 0.95, -1.0, 0.0])
    std = torch.tensor([0.5, 0.1, 1.0, 0.1])
    n = 20000
    dist = BoundedNormal(loc.expand(n, 4), std.expand(n, 4))
    s1 = dist.sample(torch.Generator().manual_seed(3))
    s2 = dist.sample(torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2)
    assert not s1.requires_grad
    assert bool((s1 >= -1).all()) and bool((s1 <= 1).all())
    for j in range(4):
        stat = scipy.stats.kstest(s1[:, j].numpy(), _scipy_truncnorm(loc[j], std[j]).cdf)
        assert stat.pvalue > 1e-3, (j, stat)
    torch.testing.assert_close(s1.mean(0), dist.mean()[0], atol=0.02, rtol=0)
    torch.testing.assert_close(dist.mode()[0], loc)


@settings(max_examples=60, deadline=None)
@given(loc=st.floats(-0.999, 0.999), std=st.floats(0.1, 1.0),
       u=st.sampled_from([2.0**-53, 2.0**-24, 1e-6, 0.5, 1 - 1e-6, 1 - 2.0**-24, 1 - 2.0**-53, 1.0]))
def test_bounded_normal_extreme_draws_stay_near_their_own_tail(loc: float, std: float, u: float) -> None:
    """The largest (smallest) uniform draws land in the upper (lower) tail, never on the opposite bound: in float32
    the CDF at a bound ~19 std away rounded to 1, the inverse CDF returned inf and the clip put the action on the
    far bound (loc -0.9, std 0.1: a draw at +1 with density e^-180, once in 2^24 samples)."""
    dist = BoundedNormal(torch.tensor([loc]), torch.tensor([std]))
    x = dist.quantile(torch.tensor([u], dtype=torch.float64)).item()
    assert -1.0 <= x <= 1.0
    assert x <= loc + 9 * std + 1e-6, f"u={u} put the action {x} more than 9 std above loc {loc} (std {std})"
    assert x >= loc - 9 * std - 1e-6, f"u={u} put the action {x} more than 9 std below loc {loc} (std {std})"
    if u > 0.5:
        assert x >= dist.quantile(torch.tensor([0.5], dtype=torch.float64)).item()


def test_bounded_normal_quantile_is_monotone_and_inverts_the_cdf() -> None:
    loc, std = torch.tensor([-0.9, 0.2, 0.95]), torch.tensor([0.1, 0.5, 0.3])
    u = torch.linspace(0, 1, 2001, dtype=torch.float64)[:, None].expand(2001, 3)
    x = BoundedNormal(loc.expand(2001, 3), std.expand(2001, 3)).quantile(u)
    assert bool((x[1:] >= x[:-1]).all())
    for j in range(3):
        cdf = _scipy_truncnorm(loc[j], std[j]).cdf(x[1:-1, j].double().numpy())
        np.testing.assert_allclose(cdf, u[1:-1, j].numpy(), atol=2e-6)


def test_bounded_normal_kl_matches_numerical_integration_and_is_zero_for_itself() -> None:
    xs = torch.linspace(-1, 1, 100001, dtype=torch.float64).unsqueeze(-1)
    for (lp, sp), (lq, sq) in [((0.5, 0.2), (0.0, 0.3)), ((-0.9, 1.0), (0.7, 0.1)), ((0.0, 0.5), (0.0, 0.5))]:
        p = BoundedNormal(torch.full_like(xs, lp), torch.full_like(xs, sp))
        q = BoundedNormal(torch.full_like(xs, lq), torch.full_like(xs, sq))
        log_p, log_q = p.log_prob(xs), q.log_prob(xs)
        numeric = torch.trapezoid(log_p.exp() * (log_p - log_q), xs[:, 0]).item()
        exact = kl_divergence(p, q)[0].item()
        assert exact == pytest.approx(numeric, rel=1e-5, abs=1e-7)
    same = BoundedNormal(torch.tensor([[0.2, -0.4]]), torch.tensor([[0.3, 0.9]]))
    assert kl_divergence(same, same).item() == pytest.approx(0.0, abs=1e-6)


def test_bounded_normal_kl_log_prob_and_entropy_sum_over_action_dimensions() -> None:
    """A BoundedNormal over A dimensions is A independent ones: its KL, log-probability and entropy are the sums of
    the per-dimension ones (a mean would shrink the reverse-KL prior of Eq. 11 by A against the log-probs)."""
    gen = torch.Generator().manual_seed(0)
    p = BoundedNormal(torch.rand(4, 3, generator=gen) * 2 - 1, torch.rand(4, 3, generator=gen) + 0.1)
    q = BoundedNormal(torch.rand(4, 3, generator=gen) * 2 - 1, torch.rand(4, 3, generator=gen) + 0.1)
    x = torch.rand(4, 3, generator=gen) * 2 - 1
    dims = [(BoundedNormal(p.loc[:, i:i + 1], p.std[:, i:i + 1]), BoundedNormal(q.loc[:, i:i + 1], q.std[:, i:i + 1]))
            for i in range(3)]
    torch.testing.assert_close(kl_divergence(p, q), sum(kl_divergence(pi, qi) for pi, qi in dims))
    torch.testing.assert_close(p.log_prob(x), sum(pi.log_prob(x[:, i:i + 1]) for i, (pi, _) in enumerate(dims)))
    torch.testing.assert_close(p.entropy(), sum(pi.entropy() for pi, _ in dims))


def test_from_raw_loc_is_tanh_and_keeps_its_gradient_past_one() -> None:
    """loc = tanh(raw_loc): a head whose raw output has drifted past +-1 can still be pulled back (a clamp would
    leave it without gradient there)."""
    raw_loc = torch.tensor([[-3.0], [0.4], [3.0]], requires_grad=True)
    dist = BoundedNormal.from_raw(raw_loc, torch.zeros(3, 1))
    torch.testing.assert_close(dist.loc, torch.tanh(raw_loc.detach()))
    (grad,) = torch.autograd.grad(dist.log_prob(torch.zeros(3, 1)).sum(), raw_loc)
    assert bool((grad.abs() > 1e-4).all()), grad


def test_bounded_normal_shape_errors() -> None:
    with pytest.raises(ValueError, match="must match"):
        BoundedNormal(torch.zeros(2, 3), torch.ones(2, 2))
    with pytest.raises(ValueError, match="dimensions"):
        BoundedNormal(torch.zeros(2, 3), torch.ones(2, 3)).log_prob(torch.zeros(2, 2))
    with pytest.raises(TypeError):
        kl_divergence(BoundedNormal(torch.zeros(1, 2), torch.ones(1, 2)), Categorical(torch.zeros(1, 2)))


# --- categorical -------------------------------------------------------------------------------------------------


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(2, 9))
def test_categorical_matches_torch_distributions(seed: int, k: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 3, k, generator=g) * 3
    other = torch.randn(4, 3, k, generator=g)
    action = torch.randint(0, k, (4, 3), generator=g)
    ours, ref = Categorical(logits), torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(ours.log_prob(action), ref.log_prob(action))
    torch.testing.assert_close(ours.entropy(), ref.entropy())
    torch.testing.assert_close(ours.mode(), ref.probs.argmax(-1))
    torch.testing.assert_close(
        kl_divergence(ours, Categorical(other)),
        torch.distributions.kl_divergence(ref, torch.distributions.Categorical(logits=other)),
    )


def test_categorical_unimix() -> None:
    logits = torch.tensor([[20.0, 0.0, -20.0, -1e4]])
    dist = Categorical(logits, unimix=0.01)
    expected = 0.99 * torch.softmax(logits, -1) + 0.01 / 4
    torch.testing.assert_close(dist.probs, expected)
    assert bool(torch.isfinite(dist.log_prob(torch.tensor([3]))).all())
    ref = torch.distributions.Categorical(probs=expected)
    torch.testing.assert_close(dist.entropy(), ref.entropy())
    with pytest.raises(ValueError, match="unimix"):
        Categorical(logits, unimix=1.0)


def test_categorical_sampling_frequencies_and_reproducibility() -> None:
    probs = torch.tensor([0.1, 0.6, 0.3])
    dist = Categorical(probs.log().expand(30000, 3))
    s1 = dist.sample(torch.Generator().manual_seed(0))
    assert torch.equal(s1, dist.sample(torch.Generator().manual_seed(0)))
    assert s1.shape == (30000,) and s1.dtype == torch.int64
    freq = torch.bincount(s1, minlength=3).float() / 30000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_categorical_input_errors() -> None:
    dist = Categorical(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="integer"):
        dist.log_prob(torch.zeros(2))
    with pytest.raises(ValueError, match="batch shape"):
        dist.log_prob(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="2 classes"):
        Categorical(torch.zeros(2, 1))
