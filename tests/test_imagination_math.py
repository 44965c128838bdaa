"""Tests for the pure RL math of d4func.imagination: lambda-returns, PMPO, reverse KL, value loss, MTP targets,
and the continuous-PMPO stability guard (issue 5, point 5)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrl.objectives.value.functional import td_lambda_return_estimate

from d4func.distributions import (
    BoundedNormal,
    Categorical,
    bounded_normal_min_entropy,
    symexp_bins,
    twohot_log_prob,
    twohot_mean,
)
from d4func.imagination import center_per_step, lambda_returns, pmpo_loss, reverse_kl, value_loss
from d4func.multi_token import mtp_targets

torch.set_num_threads(1)
FAST = settings(max_examples=30, deadline=None)
BINS = symexp_bins()


# --- lambda-returns ----------------------------------------------------------------------------------------------


def test_lambda_returns_three_step_hand_case() -> None:
    # gamma = 0.9, lam = 0.8, r = [1, 2, 3], c = [1, 0.5, 1], V = [0.5, 1, 2, 4] (V_3 bootstraps).
    # R_3 = V_3 = 4
    # R_2 = 3 + 0.9 * 1   * (0.2 * 4 + 0.8 * 4)     = 3 + 0.9 * 4         = 6.6
    # R_1 = 2 + 0.9 * 0.5 * (0.2 * 2 + 0.8 * 6.6)   = 2 + 0.45 * 5.68     = 4.556
    # R_0 = 1 + 0.9 * 1   * (0.2 * 1 + 0.8 * 4.556) = 1 + 0.9 * 3.8448    = 4.46032
    r = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    c = torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64)
    v = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    out = lambda_returns(r, v, c, gamma=0.9, lam=0.8)
    torch.testing.assert_close(out, torch.tensor([4.46032, 4.556, 6.6], dtype=torch.float64))


def test_lambda_returns_termination_cuts_bootstrap() -> None:
    # c_1 = 0: the episode ends after step 1, so R_1 = r_1 and nothing beyond leaks into R_0.
    r = torch.tensor([1.0, 2.0, 100.0])
    c = torch.tensor([1.0, 0.0, 1.0])
    v = torch.tensor([0.0, 3.0, 50.0, 70.0])
    out = lambda_returns(r, v, c, gamma=0.5, lam=0.5)
    assert out[1].item() == pytest.approx(2.0)
    assert out[0].item() == pytest.approx(1.0 + 0.5 * (0.5 * 3.0 + 0.5 * 2.0))


def _random_case(seed: int, batch: tuple[int, ...], horizon: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(*batch, horizon, generator=g, dtype=torch.float64)
    v = torch.randn(*batch, horizon + 1, generator=g, dtype=torch.float64)
    c = (torch.rand(*batch, horizon, generator=g, dtype=torch.float64) > 0.2).double()
    return r, v, c


@FAST
@given(st.integers(0, 2**31 - 1), st.lists(st.integers(1, 3), max_size=2), st.integers(1, 7))
def test_lambda_zero_is_one_step_td(seed: int, batch: list[int], horizon: int) -> None:
    r, v, c = _random_case(seed, tuple(batch), horizon)
    out = lambda_returns(r, v, c, gamma=0.97, lam=0.0)
    torch.testing.assert_close(out, r + 0.97 * c * v[..., 1:])


@FAST
@given(st.integers(0, 2**31 - 1), st.lists(st.integers(1, 3), max_size=2), st.integers(1, 7))
def test_lambda_one_is_discounted_monte_carlo_plus_bootstrap(seed: int, batch: list[int], horizon: int) -> None:
    r, v, _ = _random_case(seed, tuple(batch), horizon)
    gamma = 0.9
    out = lambda_returns(r, v, torch.ones_like(r), gamma=gamma, lam=1.0)
    for t in range(horizon):
        expected = sum(gamma ** (k - t) * r[..., k] for k in range(t, horizon)) + gamma ** (horizon - t) * v[..., -1]
        torch.testing.assert_close(out[..., t], expected)


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 9))
def test_lambda_returns_equal_torchrl_td_lambda(seed: int, batch: int, horizon: int) -> None:
    r, v, c = _random_case(seed, (batch,), horizon)
    ours = lambda_returns(r, v, c, gamma=0.997, lam=0.95)
    terminated = (c == 0).unsqueeze(-1)
    # TorchRL: time on dim -2, next_state_value[t] = V_{t+1}, (1 - terminated_t) = c_t.
    ref = td_lambda_return_estimate(0.997, 0.95, v[:, 1:, None], r[..., None], terminated, terminated)[..., 0]
    torch.testing.assert_close(ours, ref)


def test_lambda_returns_shape_errors() -> None:
    r = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="values shape"):
        lambda_returns(r, torch.zeros(2, 5), torch.ones(2, 5))
    with pytest.raises(ValueError, match="values shape"):
        lambda_returns(r, torch.zeros(3, 6), torch.ones(2, 5))
    with pytest.raises(ValueError, match="continues shape"):
        lambda_returns(r, torch.zeros(2, 6), torch.ones(2, 4))
    with pytest.raises(ValueError, match="lam"):
        lambda_returns(r, torch.zeros(2, 6), torch.ones(2, 5), lam=1.5)


# --- PMPO --------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(2, 6), horizon=st.integers(1, 5))
def test_center_per_step_cancels_any_offset_shared_at_a_step(seed: int, batch: int, horizon: int) -> None:
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(batch, horizon, generator=g, dtype=torch.float64)
    weights = torch.rand(batch, horizon, generator=g, dtype=torch.float64)
    centered = center_per_step(adv, weights)
    assert torch.allclose((weights * centered).sum(0), torch.zeros(horizon, dtype=torch.float64), atol=1e-12)
    # A value head lagging the returns by c_t at step t (the same for every rollout) changes nothing.
    lag = 100.0 * torch.rand(1, horizon, generator=g, dtype=torch.float64)
    assert torch.allclose(center_per_step(adv + lag, weights), centered, atol=1e-9)


def test_center_per_step_hand_cases_and_errors() -> None:
    # Unweighted: step means 2 and -1.
    hand = center_per_step(torch.tensor([[1.0, 0.0], [3.0, -2.0]]))
    assert torch.equal(hand, torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
    # A step with no weight (every rollout ended before it) stays at 0, without NaN.
    zero_at_1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert torch.equal(center_per_step(torch.tensor([[1.0, 5.0], [3.0, 7.0]]), zero_at_1)[:, 1], torch.zeros(2))
    with pytest.raises(ValueError, match=r"\[B, H\]"):
        center_per_step(torch.zeros(3))


def test_pmpo_gradient_weights_each_set_by_alpha_over_its_size() -> None:
    log_probs = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -0.7], requires_grad=True)
    adv = torch.tensor([2.0, 0.1, -1.0, -0.2, -5.0, 0.0])  # 2 positive, 3 negative, 1 zero
    alpha = 0.3
    loss, metrics = pmpo_loss(log_probs, adv, torch.zeros(6), alpha=alpha, beta=0.3)
    (grad,) = torch.autograd.grad(loss, log_probs)
    expected = torch.tensor([-alpha / 2, -alpha / 2, (1 - alpha) / 3, (1 - alpha) / 3, (1 - alpha) / 3, 0.0])
    torch.testing.assert_close(grad, expected)
    expected_loss = -alpha * (-1.0 - 2.0) / 2 + (1 - alpha) * (-0.5 - 3.0 - 1.5) / 3
    assert loss.item() == pytest.approx(expected_loss)
    assert metrics["frac_pos"].item() == pytest.approx(2 / 6)
    assert metrics["frac_neg"].item() == pytest.approx(3 / 6)
    assert metrics["adv_absmax"].item() == pytest.approx(5.0)
    assert metrics["adv_mean"].item() == pytest.approx(adv.mean().item())
    assert metrics["adv_std"].item() == pytest.approx(adv.std(unbiased=False).item(), rel=1e-5)


@FAST
@given(st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
def test_pmpo_invariant_to_positive_scaling_of_advantages(seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    log_probs, adv, kl = (
        torch.randn(3, 16, generator=g),
        torch.randn(3, 16, generator=g),
        torch.rand(3, 16, generator=g),
    )
    a, _ = pmpo_loss(log_probs, adv, kl)
    b, _ = pmpo_loss(log_probs, adv * scale, kl)
    assert a.item() == b.item()


def test_pmpo_step_raises_positive_and_lowers_negative_log_probs() -> None:
    # Eight independent states, each with its own 4-way categorical; one sampled action per state.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=g).requires_grad_(True)
    actions = torch.randint(0, 4, (8,), generator=g)
    adv = torch.tensor([1.0, -2.0, 0.5, -0.1, 3.0, -1.0, 0.2, -4.0])
    prior = Categorical(logits.detach())

    def objective(lg: torch.Tensor) -> torch.Tensor:
        pi = Categorical(lg)
        return pmpo_loss(pi.log_prob(actions), adv, reverse_kl(pi, prior))[0]

    (grad,) = torch.autograd.grad(objective(logits), logits)
    before = Categorical(logits.detach()).log_prob(actions)
    after = Categorical(logits.detach() - 0.1 * grad).log_prob(actions)
    assert bool((after[adv > 0] > before[adv > 0]).all())
    assert bool((after[adv < 0] < before[adv < 0]).all())


def test_pmpo_alpha_selects_the_sets() -> None:
    log_probs = torch.randn(10, requires_grad=True)
    adv = torch.linspace(-1, 1, 10)
    for alpha, silent in ((1.0, adv < 0), (0.0, adv > 0)):
        loss, _ = pmpo_loss(log_probs, adv, torch.zeros(10), alpha=alpha)
        (grad,) = torch.autograd.grad(loss, log_probs)
        assert bool((grad[silent] == 0).all())
        assert bool((grad[~silent & (adv != 0)] != 0).all())


def test_pmpo_empty_sets_give_no_nan() -> None:
    gen = torch.Generator().manual_seed(0)  # seeded: the global RNG made this depend on the tests run before it
    log_probs = torch.randn(5, generator=gen).requires_grad_()
    kl = torch.rand(5, generator=gen)
    advantages = -torch.rand(5, generator=gen) - 0.1  # no positive advantages
    loss, metrics = pmpo_loss(log_probs, advantages, kl, alpha=0.5, beta=0.3)
    (grad,) = torch.autograd.grad(loss, log_probs)
    assert torch.isfinite(loss) and bool(torch.isfinite(grad).all())
    # float32 sums of terms near 0: an absolute tolerance (a relative one fails where the sum nearly cancels)
    assert loss.item() == pytest.approx(0.5 * log_probs.mean().item() + 0.3 * kl.mean().item(), abs=1e-6)
    assert metrics["pos_term"].item() == 0.0
    # all weights zero: nothing to learn from, loss and gradients are zero, not NaN
    loss, metrics = pmpo_loss(log_probs, torch.randn(5), kl, weights=torch.zeros(5))
    (grad,) = torch.autograd.grad(loss, log_probs)
    assert loss.item() == 0.0 and bool((grad == 0).all())
    assert all(bool(torch.isfinite(m)) for m in metrics.values())


def test_pmpo_kl_term_and_weights() -> None:
    log_probs, adv, kl = torch.randn(6), torch.randn(6), torch.rand(6)
    base, _ = pmpo_loss(log_probs, adv, torch.zeros(6), beta=0.3)
    with_kl, metrics = pmpo_loss(log_probs, adv, kl, beta=0.3)
    assert (with_kl - base).item() == pytest.approx(0.3 * kl.mean().item(), rel=1e-5)
    assert metrics["kl"].item() == pytest.approx(kl.mean().item())
    lp = log_probs.clone().requires_grad_(True)
    w = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    loss, _ = pmpo_loss(lp, adv, kl, weights=w)
    (grad,) = torch.autograd.grad(loss, lp)
    assert bool((grad[w == 0] == 0).all())
    # a weight-0 sample does not change the loss, whatever its values
    lp2 = lp.detach().clone()
    lp2[1] = 1e3
    assert pmpo_loss(lp2, adv, kl, weights=w)[0].item() == pytest.approx(loss.item())


def test_pmpo_shape_and_argument_errors() -> None:
    with pytest.raises(ValueError, match="advantages shape"):
        pmpo_loss(torch.zeros(4), torch.zeros(5), torch.zeros(4))
    with pytest.raises(ValueError, match="alpha"):
        pmpo_loss(torch.zeros(4), torch.zeros(4), torch.zeros(4), alpha=1.5)
    with pytest.raises(ValueError, match="entropy_floor"):
        pmpo_loss(torch.zeros(4), torch.zeros(4), torch.zeros(4), entropy_floor=0.0)


def test_pmpo_entropy_floor_penalty_is_a_hinge() -> None:
    lp, adv, kl = torch.randn(4), torch.randn(4), torch.zeros(4)
    base, _ = pmpo_loss(lp, adv, kl)
    above = torch.full((4,), 1.0, requires_grad=True)
    loss, metrics = pmpo_loss(lp, adv, kl, entropy=above, entropy_floor=0.5)
    assert loss.item() == pytest.approx(base.item()) and metrics["entropy"].item() == pytest.approx(1.0)
    below = torch.tensor([0.0, 1.0, -1.0, 0.5], requires_grad=True)
    loss, metrics = pmpo_loss(lp, adv, kl, entropy=below, entropy_floor=0.5, entropy_floor_coef=2.0)
    assert (loss - base).item() == pytest.approx(2.0 * (0.5 + 0.0 + 1.5 + 0.0) / 4)
    (grad,) = torch.autograd.grad(loss, below)
    torch.testing.assert_close(grad, torch.tensor([-0.5, 0.0, -0.5, 0.0]))  # descent raises low entropies


# --- reverse KL --------------------------------------------------------------------------------------------------


@FAST
@given(st.integers(0, 2**31 - 1))
def test_reverse_kl_nonnegative_zero_at_prior_and_only_trains_the_policy(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits, prior_logits = torch.randn(5, 6, generator=g) * 2, torch.randn(5, 6, generator=g) * 2
    raw, prior_raw = torch.randn(5, 2, 2, generator=g) * 2, torch.randn(5, 2, 2, generator=g) * 2
    cases = [
        (lambda x: Categorical(x, unimix=0.01), logits, prior_logits),
        (lambda x: BoundedNormal.from_raw(x[..., 0], x[..., 1]), raw, prior_raw),
    ]
    for make, p, q in cases:
        p = p.clone().requires_grad_(True)
        q = q.clone().requires_grad_(True)
        kl = reverse_kl(make(p), make(q))
        assert kl.shape == (5,)
        assert bool((kl >= 0).all())
        assert torch.allclose(reverse_kl(make(p), make(p.detach())), torch.zeros(5), atol=1e-5)
        grads = torch.autograd.grad(kl.sum(), [p, q], allow_unused=True)
        assert grads[0] is not None and bool(torch.isfinite(grads[0]).all())
        assert grads[1] is None  # the prior is frozen


def test_reverse_kl_direction() -> None:
    # KL(pi || prior) is large when pi puts mass where the prior has almost none, not the other way round.
    pi = Categorical(torch.tensor([0.0, 0.0]).log_softmax(-1))
    prior = Categorical(torch.tensor([0.999, 0.001]).log())
    expected = 0.5 * math.log(0.5 / 0.999) + 0.5 * math.log(0.5 / 0.001)
    assert reverse_kl(pi, prior).item() == pytest.approx(expected, rel=1e-5)


# --- value loss --------------------------------------------------------------------------------------------------


def test_value_loss_is_twohot_cross_entropy_and_reports_metrics() -> None:
    g = torch.Generator().manual_seed(0)
    logits, returns = torch.randn(3, 4, 255, generator=g), torch.randn(3, 4, generator=g) * 10
    loss, metrics = value_loss(logits, returns, BINS)
    assert loss.item() == pytest.approx(-twohot_log_prob(logits, BINS, returns).mean().item(), rel=1e-6)
    assert metrics["return_mean"].item() == pytest.approx(returns.mean().item(), rel=1e-5)
    w = torch.zeros(3, 4)
    w[0] = 1.0
    masked, _ = value_loss(logits, returns, BINS, weights=w)
    assert masked.item() == pytest.approx(-twohot_log_prob(logits[0], BINS, returns[0]).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="returns shape"):
        value_loss(logits, returns[:2], BINS)


def _fit_value(returns: torch.Tensor, slow_logits: torch.Tensor | None, steps: int = 300) -> torch.Tensor:
    logits = torch.zeros(returns.shape[0], 255, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.3)
    for _ in range(steps):
        loss, _ = value_loss(logits, returns, BINS, slow_value_logits=slow_logits, slow_reg=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return twohot_mean(logits.detach(), BINS)


def test_value_loss_fits_returns_and_slow_regulariser_pulls_towards_slow_target() -> None:
    returns = torch.tensor([3.0, -12.0])
    torch.testing.assert_close(_fit_value(returns, None), returns, rtol=0.02, atol=0.05)
    # The minimiser of CE(R) + CE(slow mean) puts half the mass on each twohot: its mean is halfway.
    slow_logits = torch.log(torch.zeros(2, 255).index_fill_(1, torch.tensor([127]), 1.0) + 1e-12)  # slow says 0
    fitted = _fit_value(returns, slow_logits)
    torch.testing.assert_close(fitted, returns / 2, rtol=0.05, atol=0.1)


# --- multi-token prediction targets ------------------------------------------------------------------------------


def test_mtp_targets_hand_case() -> None:
    # One sequence of T = 6 steps, an episode ends at t = 2 (steps 3.. belong to the next episode), L = 3.
    x = torch.tensor([[10, 11, 12, 13, 14, 15]])
    last = torch.tensor([[False, False, True, False, False, False]])
    targets, valid = mtp_targets(x, last, L=3)
    expected_valid = torch.tensor(
        [
            [True, True, True],  # t=0: 10 11 12
            [True, True, False],  # t=1: 11 12 | (13 is the next episode)
            [True, False, False],  # t=2: 12 |
            [True, True, True],  # t=3: 13 14 15
            [True, True, False],  # t=4: 14 15 | end of sequence
            [True, False, False],  # t=5: 15 |
        ]
    )
    expected_targets = torch.tensor([[10, 11, 12], [11, 12, 0], [12, 0, 0], [13, 14, 15], [14, 15, 0], [15, 0, 0]])
    assert torch.equal(valid[0], expected_valid)
    assert torch.equal(targets[0], expected_targets)


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 10), st.integers(1, 9))
def test_mtp_targets_match_brute_force(seed: int, batch: int, length: int, horizon: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, 2, generator=g)
    last = torch.rand(batch, length, generator=g) < 0.3
    targets, valid = mtp_targets(x, last, L=horizon)
    assert targets.shape == (batch, length, horizon, 2) and valid.shape == (batch, length, horizon)
    for b in range(batch):
        for t in range(length):
            for n in range(horizon):
                ok = t + n < length and not bool(last[b, t : t + n].any())
                assert bool(valid[b, t, n]) == ok
                expected = x[b, t + n] if ok else torch.zeros(2)
                assert torch.equal(targets[b, t, n], expected)


def test_mtp_targets_input_errors() -> None:
    with pytest.raises(ValueError, match="mask_is_last_or_done shape"):
        mtp_targets(torch.zeros(2, 5), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        mtp_targets(torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="L must"):
        mtp_targets(torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.bool), L=0)


# --- continuous PMPO stability guard (issue 5, point 5) ------------------------------------------------------------


def _bandit(
    bounded: bool, beta: float, steps: int = 300, entropy_floor: float | None = None, target: float = 0.6
) -> tuple[float, float, float, bool]:
    """PMPO on a 1-D continuous bandit r(a) = -(a - target)^2, 64 samples per step, Adam on the head's two raw
    outputs; the prior is the initial policy. Returns final (loc, log_std, entropy, every step finite)."""
    n = 64
    g = torch.Generator().manual_seed(0)
    raw = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=0.05)

    def policy(r: torch.Tensor) -> BoundedNormal:
        loc, raw_std = r[0:1].expand(n, 1), r[1:2].expand(n, 1)
        if bounded:
            return BoundedNormal.from_raw(loc, raw_std)
        return BoundedNormal(torch.tanh(loc), math.sqrt(0.1) * raw_std.exp())  # same start, log-std unbounded

    prior = policy(raw.detach())
    finite = True
    for _ in range(steps):
        pi = policy(raw)
        action = pi.sample(g)
        reward = -((action[:, 0] - target) ** 2)
        loss, metrics = pmpo_loss(
            pi.log_prob(action), reward - reward.mean(), reverse_kl(pi, prior), beta=beta,
            entropy=pi.entropy(), entropy_floor=entropy_floor,
        )  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
        finite = finite and bool(torch.isfinite(raw).all()) and all(bool(torch.isfinite(m)) for m in metrics.values())
    pi = policy(raw.detach())
    return pi.loc[0, 0].item(), pi.std[0, 0].log().item(), pi.entropy()[0].item(), finite


def test_continuous_pmpo_with_bounded_log_std_is_stable_and_moves_to_positive_actions() -> None:
    loc, log_std, entropy, finite = _bandit(bounded=True, beta=0.0)
    assert finite
    assert abs(loc - 0.6) < 0.1  # moved from 0 to the rewarded action
    assert math.log(0.1) - 1e-5 <= log_std <= 0.0  # inside the documented bound
    assert entropy >= bounded_normal_min_entropy(0.1) - 1e-5


def test_without_the_bound_pmpo_drives_log_std_past_it() -> None:
    # The failure the bound guards against: sign-split PMPO keeps shrinking the std on this bandit.
    _, log_std, _, _ = _bandit(bounded=False, beta=0.0)
    assert log_std < math.log(0.1) - 1.0


def test_entropy_floor_keeps_continuous_policy_entropy_up() -> None:
    loc, _, entropy, finite = _bandit(bounded=True, beta=0.3, entropy_floor=-0.3)
    assert finite
    assert entropy >= -0.3 - 0.05  # without the floor this bandit ends near -0.87 nats (std at its 0.1 bound)
    assert abs(loc - 0.6) < 0.15


# --- stopped gradients and detached metrics ------------------------------------------------------------------------


def test_value_loss_treats_returns_and_the_slow_target_as_constants() -> None:
    """The gradient of the value loss reaches the value logits only: the lambda-returns and the slow value's
    prediction are targets (sg in DreamerV3), even when the caller hands them in with gradients attached."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 255, generator=g, requires_grad=True)
    returns = (torch.randn(2, 5, generator=g) * 4).requires_grad_()
    slow = torch.randn(2, 5, 255, generator=g, requires_grad=True)
    loss, metrics = value_loss(logits, returns, BINS, slow_value_logits=slow, slow_reg=0.7)
    g_logits, g_returns, g_slow = torch.autograd.grad(loss, (logits, returns, slow), allow_unused=True)
    assert g_logits is not None and g_logits.abs().sum() > 0
    assert g_returns is None or not g_returns.any()
    assert g_slow is None or not g_slow.any()
    assert not any(v.requires_grad for v in metrics.values())


def test_imagination_loss_metrics_are_detached_and_the_imagined_return_is_r0() -> None:
    """Every metric of the phase-3 loss is a detached scalar (a metric that kept the value head's graph would mean
    the returns were built from undetached values), and `imagined_return` is the mean lambda-return of the first
    imagined step R_0, not the mean over all steps."""
    from d4func.functional import apply, init, template
    from d4func.heads import AgentHeads, HeadsConfig
    from d4func.imagination import ImaginationConfig, Rollout, imagination_loss

    heads_cfg = HeadsConfig(d_model=8, n_agent_tokens=1, hidden=16, mtp=2, n_actions=3, n_bins=33, bins_low=-3.0,
                            bins_high=3.0)
    heads = template(AgentHeads, heads_cfg)
    params = init(heads, 0)
    g = torch.Generator().manual_seed(1)
    w = params["value", "out", "weight"]
    params["value", "out", "weight"] = 0.5 * torch.randn(w.shape, generator=g)  # values that vary with the state
    params = params.apply(lambda x: x.detach().requires_grad_())  # as under grad_and_value
    batch, horizon = 4, 3
    features = torch.randn(batch, horizon + 1, 1, 8, generator=g)
    rollout = Rollout(features=features, actions=torch.randint(0, 3, (batch, horizon), generator=g),
                      rewards=torch.randn(batch, horizon, generator=g), continues=torch.ones(batch, horizon),
                      latents=torch.zeros(batch, horizon, 1, 1))
    cfg = ImaginationConfig(horizon=horizon, gamma=0.9, lam=0.7)
    loss, metrics = imagination_loss(params, rollout, heads=heads, prior_policy=params["policy"].clone(),
                                     slow_value=params["value"].clone(), cfg=cfg)
    assert loss.requires_grad
    leaking = [name for name, v in metrics.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    assert not leaking, leaking
    values = twohot_mean(apply(heads.value, params["value"], features), heads_cfg.bins()).detach()
    returns = lambda_returns(rollout.rewards, values, rollout.continues, cfg.gamma, cfg.lam)
    assert not torch.allclose(returns[:, 0].mean(), returns.mean())  # the two readings differ here
    torch.testing.assert_close(metrics["imagined_return"], returns[:, 0].mean())


def test_imagined_rewards_are_read_at_the_frame_each_action_leads_into() -> None:
    """Rollout.rewards[:, t] is the reward head's mean at features[:, t + 1], the agent token of the imagined frame
    that a_t leads into (which reads a_t and that frame), not at features[:, t], where a_t has had no effect yet."""
    from tensordict import TensorDict

    from d4func.config import TransformerConfig
    from d4func.dynamics import Dynamics, DynamicsConfig
    from d4func.functional import init, template
    from d4func.heads import AgentHeads, HeadsConfig, reward_dist
    from d4func.imagination import imagine

    dyn_cfg = DynamicsConfig(
        transformer=TransformerConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, time_every=2),
        latent_tokens=4, latent_dim=4, pack=2, n_registers=1, n_agent_tokens=1, action_dim=0, n_actions=3, k_max=4,
        sampling_steps=1,
    )
    model = template(Dynamics, dyn_cfg)
    heads = template(AgentHeads, HeadsConfig.for_dynamics(dyn_cfg, hidden=16, mtp=2, n_bins=33, bins_low=-3.0,
                                                          bins_high=3.0))
    params = TensorDict({"dynamics": init(model, 0), "heads": init(heads, 1)})
    g = torch.Generator().manual_seed(2)
    w = params["heads", "reward", "out", "weight"]
    params["heads", "reward", "out", "weight"] = torch.randn(w.shape, generator=g)  # rewards that vary with h
    context = torch.randn(2, 2, 4, 4, generator=g).tanh()
    rollout = imagine(model, heads, params, context, None, torch.Generator().manual_seed(3), horizon=3)
    at_next = reward_dist(heads, params["heads", "reward"], rollout.features[:, 1:]).mean()
    at_same = reward_dist(heads, params["heads", "reward"], rollout.features[:, :-1]).mean()
    assert not torch.allclose(at_next, at_same, atol=1e-4)
    torch.testing.assert_close(rollout.rewards, at_next)
