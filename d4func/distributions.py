"""Output distributions of the agent heads (paper Sec. 3.3; DreamerV3 for symlog/twohot).

Contents
- `symlog`, `symexp`: the squashing pair that lets one head predict rewards and values of any scale.
- `symexp_bins`, `twohot`, `twohot_mean`, `twohot_log_prob`, `TwoHotDist`: the symexp-twohot head of the reward
  and value heads.
- `BoundedNormal`: continuous actions in [-1, 1]^A, a normal truncated to the box, per-dimension independent.
- `Categorical`: discrete actions, with optional uniform mixing ("unimix").
- `kl_divergence(p, q)`: exact KL for two distributions of the same family.

Twohot convention (one choice, used everywhere): the bins are *values in the raw space*, spaced evenly in symlog
space (`symexp(linspace(low, high, n))`), and a target is twohot-encoded in that raw space: its weight is split
between the two neighbouring bins by linear interpolation of raw values. The prediction is the plain expectation
`sum(softmax(logits) * bins)`. With this choice the expectation of `twohot(x)` is exactly `x` (clipped to the
range), so a head that matches the target's twohot predicts the target without bias; encoding symlog(x) against
linear symlog-space bins instead would predict `symexp(E[symlog x])`, which is biased for spread-out targets.

Bounded continuous actions: `BoundedNormal` is a normal truncated to [-1, 1] (the DESIGN's action range). It was
preferred to a tanh-squashed normal because its log-density is finite on the whole closed box (dataset actions at
+-1 are common), and its entropy, mean and KL divergence have closed forms, so the reverse KL to the BC prior in
PMPO (paper Eq. 11) is exact rather than a sample estimate. `BoundedNormal.from_raw` bounds the location with tanh
and the log-std between `log(min_std)` and `log(max_std)` with a sigmoid (defaults 0.1 and 1.0, as DreamerV3's
policy). That bound is the guard against the continuous PMPO failure mode of issue 5: the negative-advantage term
of PMPO lowers log-likelihoods without limit, which in an unbounded parameterisation drives log-std to -inf (or
+inf) and produces NaNs; with the bound the gradient w.r.t. the raw std vanishes at the edges, and every policy's
per-dimension entropy stays above `bounded_normal_min_entropy(min_std)`.

All sampling takes an explicit `torch.Generator` (DESIGN principle 2); samples carry no gradient (PMPO and BC
train through `log_prob`, never through the sampled action).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from d4func.functional import runs_value_checks

__all__ = [
    "BoundedNormal",
    "Categorical",
    "TwoHotDist",
    "bounded_normal_min_entropy",
    "kl_divergence",
    "symexp",
    "symexp_bins",
    "symlog",
    "twohot",
    "twohot_log_prob",
    "twohot_mean",
]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
ACTION_LOW = -1.0
ACTION_HIGH = 1.0


# ---------------------------------------------------------------------------------------------------------------
# symlog / symexp and twohot
# ---------------------------------------------------------------------------------------------------------------


def symlog(x: Tensor) -> Tensor:
    """sign(x) * log(1 + |x|): compresses large magnitudes, identity-like near 0 (DreamerV3)."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: Tensor) -> Tensor:
    """sign(x) * (exp(|x|) - 1), the inverse of `symlog`."""
    return torch.sign(x) * torch.expm1(torch.abs(x))


def symexp_bins(
    n: int = 255,
    low: float = -20.0,
    high: float = 20.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """`n` bin values `symexp(linspace(low, high, n))`: even in symlog space, so they are dense near zero and
    reach +-symexp(20) ~ 4.9e8 with the defaults (DreamerV3's 255 bins over symlog range +-20).

    For a symmetric range the bins are made exactly antisymmetric (an odd `n` then has an exact 0 bin), so that
    uniform logits, e.g. a zero-initialised output layer, predict exactly 0 in `twohot_mean`.
    """
    if n < 2:
        raise ValueError(f"symexp_bins needs n >= 2 bins, got n={n}")
    if not low < high:
        raise ValueError(f"symexp_bins needs low < high, got low={low}, high={high}")
    grid = torch.linspace(low, high, n, dtype=torch.float64, device=device)
    if low == -high:
        grid = 0.5 * (grid - grid.flip(0))
    return symexp(grid).to(dtype)


def _check_bins(bins: Tensor) -> None:
    if bins.dim() != 1 or bins.numel() < 2:
        raise ValueError(f"bins must be a 1-D tensor with at least 2 entries, got shape {tuple(bins.shape)}")
    # A value check: eager calls only (under torch.compile it would break the graph at every twohot call).
    if runs_value_checks(bins) and not bool((bins[1:] > bins[:-1]).all()):
        raise ValueError("bins must be strictly increasing")


def twohot(x: Tensor, bins: Tensor) -> Tensor:
    """Twohot encoding of `x` [...] over increasing `bins` [K] -> weights [..., K].

    `x` is clipped to [bins[0], bins[-1]]; its weight goes to the two adjacent bins around it, split by linear
    interpolation, so the weights sum to 1 and `(weights * bins).sum(-1)` equals the clipped `x`. A value that
    falls exactly on a bin puts all its weight there. No gradient flows into `x` through the bin choice; targets
    are meant to be constants (stop-gradient).
    """
    _check_bins(bins)
    k = bins.numel()
    x = x.to(bins.dtype)
    x = torch.minimum(torch.maximum(x, bins[0]), bins[-1])
    # Index of the first bin strictly above x, kept in [1, K-1] so that (hi - 1, hi) is always a valid pair; the
    # top bin itself then lands on the pair (K-2, K-1) with all weight on K-1.
    hi = torch.searchsorted(bins, x.detach().contiguous(), right=True).clamp(1, k - 1)
    lo = hi - 1
    b_lo, b_hi = bins[lo], bins[hi]
    w_hi = ((x - b_lo) / (b_hi - b_lo)).clamp(0.0, 1.0)
    w_lo = 1.0 - w_hi
    return F.one_hot(lo, k).to(bins.dtype) * w_lo.unsqueeze(-1) + F.one_hot(hi, k).to(bins.dtype) * w_hi.unsqueeze(-1)


def _symmetric_expectation(probs: Tensor, bins: Tensor) -> Tensor:
    """sum(probs * bins) over the last axis, adding mirrored bins pairwise from the centre outwards.

    A left-to-right float32 sum of terms as large as 4.9e8 leaves a rounding residue of order 0.1 even when the
    terms cancel exactly (uniform probabilities over antisymmetric bins); pairing bin i with bin K-1-i first makes
    that cancellation exact, so a freshly initialised head predicts 0 (the same observation as DreamerV3's code).
    """
    terms = probs * bins
    k = bins.numel()
    half = k // 2
    left = terms[..., :half].flip(-1)
    right = terms[..., k - half :]
    centre = terms[..., half : k - half].sum(-1)
    return centre + (left + right).sum(-1)


def twohot_mean(logits: Tensor, bins: Tensor) -> Tensor:
    """Prediction of a twohot head: E[bins] under softmax(logits). logits [..., K], bins [K] -> [...]."""
    _check_bins(bins)
    if logits.shape[-1] != bins.numel():
        raise ValueError(f"logits have {logits.shape[-1]} classes but there are {bins.numel()} bins")
    probs = torch.softmax(logits.float(), dim=-1)
    return _symmetric_expectation(probs, bins.float())


def twohot_log_prob(logits: Tensor, bins: Tensor, target: Tensor) -> Tensor:
    """Log-likelihood of `target` [...] under the head: sum(twohot(target) * log_softmax(logits)) -> [...].

    The target is twohot-encoded in the raw space of the (symexp-spaced) bins and treated as a constant; the
    negative of this is the cross-entropy loss of the reward and value heads.
    """
    _check_bins(bins)
    if logits.shape[-1] != bins.numel():
        raise ValueError(f"logits have {logits.shape[-1]} classes but there are {bins.numel()} bins")
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the logits' batch shape {tuple(logits.shape[:-1])}"
        )
    weights = twohot(target.detach(), bins.float())
    log_p = torch.log_softmax(logits.float(), dim=-1)
    # Bins without target weight contribute 0 even where the head gives them probability 0 (0 * -inf = NaN).
    return torch.where(weights > 0, weights * log_p, torch.zeros_like(log_p)).sum(-1)


class TwoHotDist:
    """A twohot head's distribution: `logits` [..., K] over `bins` [K] (symexp-spaced raw values)."""

    def __init__(self, logits: Tensor, bins: Tensor) -> None:
        _check_bins(bins)
        if logits.shape[-1] != bins.numel():
            raise ValueError(f"logits have {logits.shape[-1]} classes but there are {bins.numel()} bins")
        self.logits = logits
        self.bins = bins

    def mean(self) -> Tensor:
        return twohot_mean(self.logits, self.bins)

    def log_prob(self, target: Tensor) -> Tensor:
        return twohot_log_prob(self.logits, self.bins, target)

    def detach(self) -> TwoHotDist:
        return TwoHotDist(self.logits.detach(), self.bins)


# ---------------------------------------------------------------------------------------------------------------
# Bounded continuous actions: normal truncated to [-1, 1], independent dimensions
# ---------------------------------------------------------------------------------------------------------------


def _std_normal_pdf(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x * x - _LOG_SQRT_2PI)


class BoundedNormal:
    """Normal(loc, std) truncated to [-1, 1], independent over the last (action) axis.

    `loc`, `std`: [..., A]. `log_prob`, `entropy` and `kl` sum over A and return [...]. The closed forms are those
    of the truncated normal with a = (-1 - loc) / std, b = (1 - loc) / std and Z = Phi(b) - Phi(a). They are well
    conditioned when loc lies in [-1, 1] (then a <= 0 <= b and Z >= ~0.48 for std <= 1), which `from_raw`
    guarantees; build it through `from_raw` unless you know the parameters are in that range.
    """

    def __init__(self, loc: Tensor, std: Tensor) -> None:
        if loc.shape != std.shape:
            raise ValueError(f"loc shape {tuple(loc.shape)} and std shape {tuple(std.shape)} must match")
        if loc.dim() < 1:
            raise ValueError("BoundedNormal needs an action axis: loc and std must be at least 1-D")
        self.loc = loc
        self.std = std

    @classmethod
    def from_raw(cls, raw_loc: Tensor, raw_std: Tensor, min_std: float = 0.1, max_std: float = 1.0) -> BoundedNormal:
        """Head outputs -> distribution: loc = tanh(raw_loc) in (-1, 1), and the log-std bounded as
        log std = log(min_std) + (log(max_std) - log(min_std)) * sigmoid(raw_std).

        The bound is the stability guard for continuous PMPO (see the module docstring): log-std can neither run
        to -inf/NaN nor grow without limit, and its gradient fades at the bounds. raw_std = 0 gives the geometric
        mean of the bounds (0.316 with the defaults).
        """
        if not 0.0 < min_std < max_std:
            raise ValueError(f"need 0 < min_std < max_std, got min_std={min_std}, max_std={max_std}")
        lo, hi = math.log(min_std), math.log(max_std)
        log_std = lo + (hi - lo) * torch.sigmoid(raw_std.float())
        return cls(torch.tanh(raw_loc.float()), torch.exp(log_std))

    def _standardised_bounds(self) -> tuple[Tensor, Tensor, Tensor]:
        a = (ACTION_LOW - self.loc) / self.std
        b = (ACTION_HIGH - self.loc) / self.std
        z = (torch.special.ndtr(b) - torch.special.ndtr(a)).clamp_min(torch.finfo(self.loc.dtype).tiny)
        return a, b, z

    def log_prob(self, action: Tensor) -> Tensor:
        """Log-density of `action` [..., A] summed over A. Actions are clipped to the closed box [-1, 1] first
        (stored actions sit on the bounds up to rounding); the density is finite everywhere on the box."""
        if action.shape[-1] != self.loc.shape[-1]:
            raise ValueError(f"action has {action.shape[-1]} dimensions, the distribution has {self.loc.shape[-1]}")
        action = action.to(self.loc.dtype).clamp(ACTION_LOW, ACTION_HIGH)
        _, _, z = self._standardised_bounds()
        xi = (action - self.loc) / self.std
        return (-0.5 * xi * xi - _LOG_SQRT_2PI - torch.log(self.std) - torch.log(z)).sum(-1)

    def _moments(self) -> tuple[Tensor, Tensor, Tensor]:
        """E[xi], E[xi^2] of the standardised truncated variable xi = (x - loc) / std, and Z."""
        a, b, z = self._standardised_bounds()
        pa, pb = _std_normal_pdf(a), _std_normal_pdf(b)
        m1 = (pa - pb) / z
        m2 = 1.0 + (a * pa - b * pb) / z
        return m1, m2, z

    def entropy(self) -> Tensor:
        """Exact entropy, summed over A: log(sqrt(2 pi e) std Z) + (a phi(a) - b phi(b)) / (2 Z) per dimension."""
        _, m2, z = self._moments()
        return (_LOG_SQRT_2PI + torch.log(self.std) + torch.log(z) + 0.5 * m2).sum(-1)

    def mean(self) -> Tensor:
        m1, _, _ = self._moments()
        return self.loc + self.std * m1

    def mode(self) -> Tensor:
        """Most likely action: loc clipped to the box."""
        return self.loc.clamp(ACTION_LOW, ACTION_HIGH)

    def sample(self, generator: torch.Generator) -> Tensor:
        """One action per batch element, [..., A], by inverse-CDF sampling (no gradient)."""
        with torch.no_grad():
            u = torch.rand(self.loc.shape, generator=generator, device=self.loc.device, dtype=torch.float64)
            return self.quantile(u)

    def quantile(self, u: Tensor) -> Tensor:
        """The action at cumulative probability `u` in [0, 1] ([..., A], as loc): the inverse CDF that `sample`
        feeds uniform draws.

        Float64 throughout, and the standardised draw kept inside its bounds [a, b]: in float32 the CDF at a bound
        more than ~5.3 std from loc rounds to exactly 1 (or 0), so the largest uniform draws mapped to +-inf and the
        clip put the action on the opposite bound, ~19 std from loc with the smallest std (a density of e^-180),
        once in 2^24 draws.
        """
        wide = BoundedNormal(self.loc.double(), self.std.double())
        a, b, _ = wide._standardised_bounds()
        cdf_a, cdf_b = torch.special.ndtr(a), torch.special.ndtr(b)
        # Below 1 by one float64 ulp at most: Phi^-1 stays finite (~8.2 std), the mass beyond is ~1e-16.
        cdf = (cdf_a + u.double() * (cdf_b - cdf_a)).clamp(max=1.0 - torch.finfo(torch.float64).eps / 2)
        xi = torch.special.ndtri(cdf).clamp(a, b)
        return (wide.loc + wide.std * xi).clamp(ACTION_LOW, ACTION_HIGH).to(self.loc.dtype)

    def detach(self) -> BoundedNormal:
        return BoundedNormal(self.loc.detach(), self.std.detach())

    def kl(self, other: BoundedNormal) -> Tensor:
        """KL(self || other), exact, summed over A.

        Both live on the same box, so KL = E_self[log p - log q] has the closed form
        log(std_q Z_q) - log(std_p Z_p) + E_p[(x - loc_q)^2] / (2 std_q^2) - E_p[xi_p^2] / 2,
        with E_p[(x - loc_q)^2] = std_p^2 m2 + 2 (loc_p - loc_q) std_p m1 + (loc_p - loc_q)^2.
        """
        if not isinstance(other, BoundedNormal):
            raise TypeError(f"KL(BoundedNormal || {type(other).__name__}) is not defined")
        m1, m2, zp = self._moments()
        _, _, zq = other._standardised_bounds()
        d = self.loc - other.loc
        second = self.std**2 * m2 + 2.0 * d * self.std * m1 + d * d
        kl = (
            torch.log(other.std)
            + torch.log(zq)
            - torch.log(self.std)
            - torch.log(zp)
            + second / (2.0 * other.std**2)
            - 0.5 * m2
        )
        # Exact KL is >= 0; the clamp only removes float rounding below zero when the two are (nearly) equal.
        return kl.clamp_min(0.0).sum(-1)


def bounded_normal_min_entropy(min_std: float = 0.1, action_dims: int = 1) -> float:
    """Lowest entropy any `BoundedNormal.from_raw(..., min_std=min_std)` can reach: the truncated normal with the
    smallest std sitting on a bound (loc -> +-1, keeping half its mass). The entropy floor implied by the bounded
    log-std, in nats, for `action_dims` dimensions."""
    if min_std <= 0:
        raise ValueError(f"min_std must be > 0, got {min_std}")
    if action_dims < 1:
        raise ValueError(f"action_dims must be >= 1, got {action_dims}")
    loc = torch.tensor([1.0], dtype=torch.float64)
    std = torch.tensor([min_std], dtype=torch.float64)
    return float(BoundedNormal(loc, std).entropy()) * action_dims


# ---------------------------------------------------------------------------------------------------------------
# Discrete actions
# ---------------------------------------------------------------------------------------------------------------


class Categorical:
    """Categorical over the last axis of `logits` [..., K]; with `unimix` > 0 the probabilities are mixed with the
    uniform distribution, p = (1 - unimix) softmax(logits) + unimix / K (DreamerV3 uses 0.01), which keeps every
    log-probability finite and bounds the KL to a prior. `self.logits` holds the normalised log-probabilities."""

    def __init__(self, logits: Tensor, unimix: float = 0.0) -> None:
        if logits.dim() < 1 or logits.shape[-1] < 2:
            raise ValueError(f"Categorical needs at least 2 classes on the last axis, got shape {tuple(logits.shape)}")
        if not 0.0 <= unimix < 1.0:
            raise ValueError(f"unimix must lie in [0, 1), got {unimix}")
        log_p = torch.log_softmax(logits.float(), dim=-1)
        if unimix > 0.0:
            k = logits.shape[-1]
            log_p = torch.logaddexp(log_p + math.log1p(-unimix), torch.full_like(log_p, math.log(unimix / k)))
        self.logits = log_p

    @property
    def probs(self) -> Tensor:
        return self.logits.exp()

    @property
    def num_classes(self) -> int:
        return self.logits.shape[-1]

    def log_prob(self, action: Tensor) -> Tensor:
        """Log-probability of integer `action` [...] -> [...]."""
        if action.shape != self.logits.shape[:-1]:
            raise ValueError(
                f"action shape {tuple(action.shape)} must equal the batch shape {tuple(self.logits.shape[:-1])}"
            )
        if action.dtype.is_floating_point:
            raise TypeError(f"discrete actions must be integer class indices, got dtype {action.dtype}")
        return torch.gather(self.logits, -1, action.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self) -> Tensor:
        # xlogy-style: a class with probability 0 contributes 0, not 0 * -inf = NaN.
        p = self.probs
        return -torch.where(p > 0, p * self.logits, torch.zeros_like(p)).sum(-1)

    def mode(self) -> Tensor:
        return self.logits.argmax(-1)

    def sample(self, generator: torch.Generator) -> Tensor:
        """One class index per batch element, [...] int64 (no gradient)."""
        with torch.no_grad():
            flat = self.probs.reshape(-1, self.num_classes)
            draws = torch.multinomial(flat, 1, generator=generator)
            return draws.reshape(self.logits.shape[:-1])

    def detach(self) -> Categorical:
        return Categorical(self.logits.detach())

    def kl(self, other: Categorical) -> Tensor:
        """KL(self || other) = sum p (log p - log q), exact."""
        if not isinstance(other, Categorical):
            raise TypeError(f"KL(Categorical || {type(other).__name__}) is not defined")
        if other.logits.shape != self.logits.shape:
            raise ValueError(f"shapes differ: {tuple(self.logits.shape)} vs {tuple(other.logits.shape)}")
        p = self.probs
        return torch.where(p > 0, p * (self.logits - other.logits), torch.zeros_like(p)).sum(-1)


def kl_divergence(p: BoundedNormal | Categorical, q: BoundedNormal | Categorical) -> Tensor:
    """KL(p || q) for two action distributions of the same family (exact in both cases)."""
    if type(p) is not type(q):
        raise TypeError(f"KL between different families: {type(p).__name__} and {type(q).__name__}")
    return p.kl(q)  # type: ignore[arg-type]
