"""Transformer building blocks: RMSNorm, RoPE, SwiGLU, attention with GQA, QK-norm and logit soft-capping, and a
zero-initialised linear layer for conditioning that starts as a no-op.

Paper Section 3.4: pre-layer RMSNorm, RoPE, SwiGLU, QK-norm and attention-logit soft-capping; grouped-query
attention (GQA) in the dynamics model so that the time layers' KV cache is small.

The math (RoPE rotation, soft-capping, attention) is written as pure functions; the modules only own weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn


class RMSNorm(nn.RMSNorm):
    """Root-mean-square layer norm with a learned gain (`init_gain`, default ones, at init)."""

    def __init__(self, dim: int, eps: float = 1e-6, init_gain: float = 1.0) -> None:
        self.init_gain = init_gain
        super().__init__(dim, eps=eps, elementwise_affine=True)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.weight is not None:
            nn.init.constant_(self.weight, self.init_gain)

    def forward(self, x: Tensor) -> Tensor:
        # Under bf16 autocast `x` arrives in bfloat16 while the gain stays float32; rms_norm's fused kernel wants
        # one dtype and otherwise falls back, with a warning, to a slower composite of elementwise ops.
        weight = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


class ZeroLinear(nn.Linear):
    """A linear layer whose weight and bias start at zero, so that whatever it conditions (a FiLM scale and shift,
    as in DiT's adaLN-Zero, Peebles & Xie 2023) starts as the identity and training moves it away."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class ZeroAfterInitLinear(nn.Linear):
    """A linear layer initialised as `nn.Linear` is (drawing the same random numbers) and then set to zero: a residual
    branch that starts closed (`TransformerConfig.zero_init_residual`) while every later layer's draws, and so its
    initial weights, stay those of the default start for the same seed."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.weight.zero_()
            if self.bias is not None:
                self.bias.zero_()


def modulate(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """FiLM: `x * (1 + scale) + shift`, zero scale and shift leaving `x` unchanged."""
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------------------------


def rope_angles(positions: Tensor, head_dim: int, base: float = 10_000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of the RoPE angles for integer (or real) `positions` `[L]` -> each `[L, head_dim // 2]`."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got head_dim={head_dim}")
    # Float64 and reduced modulo 2 pi before the float32 cos / sin: the acting policy's positions count every step
    # of a run, and a float32 product at position 1e6 is off by ~0.06 rad (attention logits drifted by ~1e-2).
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    angles = torch.remainder(positions.to(torch.float64)[:, None] * inv_freq[None, :], 2 * math.pi)
    angles = angles.to(torch.float32)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs of channels of `x` `[..., L, head_dim]` by the angles of their position.

    Channels are paired as (first half, second half), so that q·k depends only on the positions' difference.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Attention math
# ----------------------------------------------------------------------------------------------------------------


def softcap(logits: Tensor, cap: float) -> Tensor:
    """Smoothly bound logits to (-cap, cap): cap · tanh(logits / cap) (Gemma-2 style soft-capping)."""
    return cap * torch.tanh(logits / cap)


def expand_kv_heads(kv: Tensor, n_heads: int) -> Tensor:
    """Repeat grouped K or V `[B, H_kv, L, Dh]` so each of the `n_heads` query heads has its own copy."""
    n_kv = kv.shape[-3]
    if n_heads == n_kv:
        return kv
    return repeat(kv, "b g l d -> b (g r) l d", r=n_heads // n_kv)


def attention_logits(q: Tensor, k: Tensor, logit_cap: float | None = None) -> Tensor:
    """Scaled dot-product logits `[B, H, Lq, Lk]` in float32, soft-capped when `logit_cap` is set; K already
    expanded. Float32 even under bf16 autocast: rounded to bf16 (3 significant digits) before the cap and the
    softmax, logits of size ~10 move by ~0.05, and the attention output erred 3.5x more than the fused kernels', which
    keep their scores in float32 internally."""
    with torch.autocast(q.device.type, enabled=False):
        logits = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if logit_cap is not None:
        logits = softcap(logits, logit_cap)
    return logits


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    logit_cap: float | None = None,
    is_causal: bool = False,
) -> Tensor:
    """Multi-head attention with grouped K/V.

    q `[B, H, Lq, Dh]`, k and v `[B, H_kv, Lk, Dh]` with H_kv dividing H; `mask` is boolean and broadcastable to
    `[B, H, Lq, Lk]` with True where a query may read a key. `is_causal` aligns the causal mask to the *end* of the
    keys (query i sits at key position Lk - Lq + i), which is what a KV cache needs.

    Without soft-capping the call goes through `scaled_dot_product_attention` (flash / memory-efficient kernels on
    GPU); soft-capping needs the logits themselves, so it takes the explicit path.
    """
    n_heads, n_kv = q.shape[-3], k.shape[-3]
    if n_heads % n_kv:
        raise ValueError(f"n_kv_heads={n_kv} must divide n_heads={n_heads}")
    q_len, k_len = q.shape[-2], k.shape[-2]
    if logit_cap is None and mask is None and is_causal and q_len == k_len:
        # The fused kernels' own causal path; same mask as below.
        k, v = expand_kv_heads(k, n_heads), expand_kv_heads(v, n_heads)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if is_causal:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(diagonal=k_len - q_len)
        mask = causal if mask is None else mask & causal
    k, v = expand_kv_heads(k, n_heads), expand_kv_heads(v, n_heads)
    if logit_cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    logits = attention_logits(q, k, logit_cap)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits.float(), dim=-1).to(v.dtype)
    return weights @ v


# ----------------------------------------------------------------------------------------------------------------
# Modules (weights only; the math above does the work)
# ----------------------------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). `zero_out` starts `down` at zero (`ZeroAfterInitLinear`)."""

    def __init__(self, dim: int, hidden: int, zero_out: bool = False) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = (ZeroAfterInitLinear if zero_out else nn.Linear)(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Attention(nn.Module):
    """Self-attention with GQA, optional QK-norm, RoPE and logit soft-capping.

    `forward(x, positions, mask, is_causal, past_kv)` takes tokens `[B, L, D]` and returns the output and the
    (k, v) of this call concatenated after `past_kv` — the caller decides whether to keep it as a cache.
    `zero_out` starts the output projection at zero (`ZeroAfterInitLinear`).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        qk_norm: bool = True,
        logit_cap: float | None = 50.0,
        rope_base: float = 10_000.0,
        qk_norm_gain: float = 1.0,
        zero_out: bool = False,
    ) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"d_model={dim} must be divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.logit_cap = logit_cap
        self.rope_base = rope_base
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * n_kv_heads * self.head_dim, bias=False)
        self.out_proj = (ZeroAfterInitLinear if zero_out else nn.Linear)(n_heads * self.head_dim, dim, bias=False)
        # With QK-norm the logits q.k / sqrt(head_dim) of unit-RMS q and k are at most sqrt(head_dim) until the norm
        # gains grow; `qk_norm_gain` starts both gains higher (logits scaled by its square). See TransformerConfig.
        self.q_norm = RMSNorm(self.head_dim, init_gain=qk_norm_gain) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, init_gain=qk_norm_gain) if qk_norm else nn.Identity()

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        past_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        q = rearrange(self.q_proj(x), "b l (h d) -> b h l d", h=self.n_heads)
        k, v = rearrange(self.kv_proj(x), "b l (two g d) -> two b g l d", two=2, g=self.n_kv_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if positions is not None:
            # RoPE is applied before caching, so cached keys carry their absolute position.
            cos, sin = rope_angles(positions, self.head_dim, self.rope_base)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_kv is not None:
            k = torch.cat((past_kv[0], k), dim=-2)
            v = torch.cat((past_kv[1], v), dim=-2)
        out = attend(q, k, v, mask=mask, logit_cap=self.logit_cap, is_causal=is_causal)
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)")), (k, v)
