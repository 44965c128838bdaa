"""Attention building blocks: GQA, RoPE, soft-capping, the SDPA and explicit paths."""

import math

import pytest
import torch
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from d4func.config import TransformerConfig
from d4func.functional import apply, init, template
from d4func.layers import Attention, apply_rope, attend, attention_logits, rope_angles, softcap


def reference_attention(q, k, v, mask=None):
    """One head at a time, query head h reading K/V group h // (H / H_kv): written without expand_kv_heads."""
    n_heads, n_kv = q.shape[1], k.shape[1]
    outs = []
    for h in range(n_heads):
        g = h // (n_heads // n_kv)
        logits = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        outs.append(torch.softmax(logits, -1) @ v[:, g])
    return torch.stack(outs, dim=1)


@settings(max_examples=20, deadline=None)
@given(
    groups=st.sampled_from([(4, 1), (4, 2), (4, 4), (6, 3), (8, 2)]),
    q_len=st.integers(1, 7),
    extra_keys=st.integers(0, 5),
    causal=st.booleans(),
    cap=st.sampled_from([None, 1e6]),
    seed=st.integers(0, 2**16),
)
def test_grouped_attention_equals_per_head_reference(groups, q_len, extra_keys, causal, cap, seed):
    n_heads, n_kv = groups
    gen = torch.Generator().manual_seed(seed)
    k_len = q_len + extra_keys
    q = torch.randn(2, n_heads, q_len, 8, generator=gen)
    k = torch.randn(2, n_kv, k_len, 8, generator=gen)
    v = torch.randn(2, n_kv, k_len, 8, generator=gen)
    mask = None
    if causal:
        mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    # cap=1e6 takes the explicit soft-capped path, numerically the same as no cap.
    out = attend(q, k, v, is_causal=causal, logit_cap=cap)
    torch.testing.assert_close(out, reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-4)


def test_gqa_with_one_kv_head_per_query_head_equals_torch_multihead_attention():
    torch.manual_seed(0)
    dim, heads = 32, 4
    ours = Attention(dim, heads, heads, qk_norm=False, logit_cap=None)
    theirs = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)
    with torch.no_grad():
        wq, wk, wv = theirs.in_proj_weight.chunk(3, dim=0)
        ours.q_proj.weight.copy_(wq)
        ours.kv_proj.weight.copy_(torch.cat([wk, wv], dim=0))
        ours.out_proj.weight.copy_(theirs.out_proj.weight)
    x = torch.randn(3, 5, dim)
    mask = torch.rand(5, 5) > 0.3
    mask |= torch.eye(5, dtype=torch.bool)
    expected, _ = theirs(x, x, x, attn_mask=~mask, need_weights=False)  # torch: True = masked out
    got, _ = ours(x, mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        Attention(24, 4, 3)
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        attend(torch.randn(1, 4, 2, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8))


def _rope_score(q, k, pos_q, pos_k):
    """q · k after rotating q to position pos_q and k to pos_k ([1, 16] each)."""
    cq, sq = rope_angles(torch.tensor([pos_q]), 16)
    ck, sk = rope_angles(torch.tensor([pos_k]), 16)
    return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()


@settings(max_examples=30, deadline=None)
@given(
    pos_q=st.integers(0, 500),
    pos_k=st.integers(0, 500),
    shift=st.integers(-200, 2000),
    seed=st.integers(0, 2**16),
)
def test_rope_dot_product_depends_only_on_relative_offset(pos_q, pos_k, shift, seed):
    if min(pos_q, pos_k) + shift < 0:
        shift = -min(pos_q, pos_k)
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, 16, generator=gen, dtype=torch.float64).unbind(0)
    torch.testing.assert_close(_rope_score(q, k, pos_q, pos_k), _rope_score(q, k, pos_q + shift, pos_k + shift),
                               atol=1e-4, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(start=st.integers(10**5, 10**7), offset=st.integers(0, 64), seed=st.integers(0, 2**16))
def test_rope_stays_relative_at_the_positions_of_a_long_run(start, offset, seed):
    """The acting policy's time positions count every step of a run: far along, a query-key score must still be
    the one at the same offset near 0 (float32 angles drifted by ~1e-2 in the score at position 1e6)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, 16, generator=gen).unbind(0)
    torch.testing.assert_close(_rope_score(q, k, start + offset, start), _rope_score(q, k, offset, 0),
                               atol=2e-5, rtol=2e-5)


def test_rope_rotates_and_preserves_norm():
    x = torch.randn(5, 16)
    cos, sin = rope_angles(torch.arange(5), 16)
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotated[0], x[0])  # position 0: identity
    assert not torch.allclose(rotated[1:], x[1:])


@settings(max_examples=30, deadline=None)
@given(cap=st.floats(0.5, 100.0), scale=st.floats(0.1, 1e4), seed=st.integers(0, 2**16))
def test_soft_capped_logits_stay_inside_the_cap(cap, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, 4, 8, generator=gen) * scale
    k = torch.randn(1, 2, 6, 8, generator=gen) * scale
    logits = attention_logits(q, k, logit_cap=cap)
    assert logits.abs().max() <= cap
    # Small logits pass almost unchanged: the cap only bends the tails.
    small = torch.linspace(-0.01 * cap, 0.01 * cap, 11)
    torch.testing.assert_close(softcap(small, cap), small, atol=1e-4 * cap, rtol=1e-3)


def test_fully_masked_keys_get_no_weight():
    q = torch.randn(1, 2, 3, 8)
    k = torch.randn(1, 2, 4, 8)
    v = torch.randn(1, 2, 4, 8)
    mask = torch.tensor([True, True, False, False]).expand(3, 4)
    changed_v = v.clone()
    changed_v[..., 2:, :] += 100.0
    for cap in (None, 30.0):
        torch.testing.assert_close(attend(q, k, v, mask, cap), attend(q, k, changed_v, mask, cap))


def test_attention_returns_cache_that_reproduces_full_pass():
    torch.manual_seed(1)
    attn = Attention(32, 4, 2, logit_cap=20.0)
    x = torch.randn(2, 6, 32)
    full, _ = attn(x, torch.arange(6), is_causal=True)
    first, kv = attn(x[:, :4], torch.arange(4), is_causal=True)
    second, kv = attn(x[:, 4:], torch.arange(4, 6), is_causal=True, past_kv=kv)
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=1e-4)
    assert kv[0].shape == (2, 2, 6, 8)
    assert rearrange(kv[0], "b g t d -> b t (g d)").shape == (2, 6, 16)


def _qk_normed_causal_attention(x, params, heads, logit_scale):
    """Attention by hand, without positions or cap: unit-RMS q and k, logits logit_scale * q.k / sqrt(head_dim),
    causal softmax, output projection."""
    length, dim = x.shape[-2:]
    q = rearrange(x @ params["q_proj", "weight"].T, "b l (h d) -> b h l d", h=heads)
    k, v = rearrange(x @ params["kv_proj", "weight"].T, "b l (two h d) -> two b h l d", two=2, h=heads)
    unit = lambda t: t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    logits = logit_scale * unit(q) @ unit(k).transpose(-1, -2) / math.sqrt(dim // heads)
    logits = logits.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    return rearrange(logits.softmax(-1) @ v, "b h l d -> b l (h d)") @ params["out_proj", "weight"].T


@settings(max_examples=20, deadline=None)
@given(gain=st.sampled_from([0.5, 1.0, 2.0, 3.0]), seed=st.integers(0, 2**16))
def test_qk_norm_gain_scales_the_logits_by_its_square(gain, seed):
    dim, heads, length = 16, 2, 5
    model = template(Attention, dim, heads, heads, qk_norm=True, logit_cap=None, qk_norm_gain=gain)
    params = init(model, seed)
    assert torch.equal(params["q_norm", "weight"], torch.full((dim // heads,), gain))
    assert torch.equal(params["k_norm", "weight"], torch.full((dim // heads,), gain))
    x = torch.randn(1, length, dim, generator=torch.Generator().manual_seed(seed))
    out, _ = apply(model, params, x, None, None, True)
    torch.testing.assert_close(out, _qk_normed_causal_attention(x, params, heads, gain**2), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="qk_norm_gain must be > 0, got 0"):
        TransformerConfig(qk_norm_gain=0)


def test_q_and_k_norms_are_separate_gains():
    """The key's RMSNorm gain scales the logits on its own (the test above sets both gains alike, which would not
    tell q_norm from k_norm): with the key gain doubled and the query gain left at 1, the logits double."""
    dim, heads, length = 16, 2, 4
    model = template(Attention, dim, heads, heads, qk_norm=True, logit_cap=None)
    params = init(model, 0).clone()
    params["k_norm", "weight"] = torch.full((dim // heads,), 2.0)
    x = torch.randn(1, length, dim, generator=torch.Generator().manual_seed(1))
    out, _ = apply(model, params, x, None, None, True)
    torch.testing.assert_close(out, _qk_normed_causal_attention(x, params, heads, 2.0), atol=1e-5, rtol=1e-4)


def test_rope_frequencies_are_the_papers_geometric_sequence():
    """theta_i = base^(-2i / head_dim) (RoFormer, the paper's RoPE): pinned at position 1 and a large one, since
    relative invariance and norm preservation hold for any frequencies."""
    head_dim, base = 8, 10_000.0
    for position in (1.0, 1000.0):
        cos, sin = rope_angles(torch.tensor([position]), head_dim, base)
        angles = torch.tensor([position * base ** (-2 * i / head_dim) for i in range(head_dim // 2)],
                              dtype=torch.float64)
        torch.testing.assert_close(cos[0], angles.cos().float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(sin[0], angles.sin().float(), atol=1e-6, rtol=0)


def test_soft_capped_attention_under_bf16_autocast_errs_no_more_than_the_fused_kernel():
    """Soft-capping takes the explicit path; its logits stay float32 under bf16 autocast, as the fused kernels keep
    their scores, so both paths err alike against a float64 reference (bf16 logits erred 3.5x more)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 32, generator=gen) * 2 for _ in range(3))

    def error(cap: float | None) -> float:
        exact = attend(q.double(), k.double(), v.double(), logit_cap=cap)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = attend(q, k, v, logit_cap=cap)
        return (low.double() - exact).abs().max().item()

    assert error(50.0) <= 1.5 * error(None), (error(50.0), error(None))
