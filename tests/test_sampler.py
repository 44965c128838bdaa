"""The sampler's schedule, pinned by hand against a stub world model: the levels and step sizes each call sees,
how context frames are re-noised, the update rule, and how a generated frame joins the history. A cached vs
uncached comparison cannot catch these: both paths share the schedule code."""

import pytest
import torch

from d4func.config import TransformerConfig
from d4func.dynamics import DynamicsConfig
from d4func.sampler import generate


def _cfg(steps=4, **kw):
    return DynamicsConfig(transformer=TransformerConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, time_every=2),
                          latent_tokens=4, latent_dim=2, pack=2, n_registers=1, action_dim=2, k_max=8,
                          sampling_steps=steps, **kw)


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("use_cache", [True, False])
def test_sampler_schedule_by_hand(steps, use_cache):
    """A stub world model x_hat = c + 0.5 z: the calls see tau = k / K, d = 1 / K on the new frame and
    (tau_ctx, d_min) on context frames re-noised with the generator's first draws; the frame follows
    z <- z + (1/K) (x_hat - z) / (1 - tau) from the generator's next draw."""
    cfg = _cfg(steps)
    gen = torch.Generator().manual_seed(0)
    context = torch.rand(2, 2, 4, 2, generator=gen)
    c = torch.randn(4, 2, generator=gen)
    calls = []

    def stub(z, tau, d, actions=None, mask=None, cache=None):
        calls.append((z.clone(), tau.clone(), d.clone()))
        return c + 0.5 * z, None, cache

    out = generate(stub, context, None, 1, torch.Generator().manual_seed(1), cfg, use_cache=use_cache)
    draw = torch.Generator().manual_seed(1)
    ctx_noise = torch.randn(context.shape, generator=draw)
    z = torch.randn(2, 4, 2, generator=draw)
    sig = cfg.context_signal
    torch.testing.assert_close(calls[0][0][:, :2], sig * context + (1 - sig) * ctx_noise)
    assert len(calls) == steps
    for k, (_, tau, d) in enumerate(calls):
        torch.testing.assert_close(tau[:, -1], torch.full((2,), k / steps))
        torch.testing.assert_close(d[:, -1], torch.full((2,), 1 / steps))
        if tau.shape[1] > 1:
            torch.testing.assert_close(tau[:, :-1], torch.full_like(tau[:, :-1], sig))
            torch.testing.assert_close(d[:, :-1], torch.full_like(d[:, :-1], cfg.d_min))
        z = z + (1 / steps) * (c + 0.5 * z - z) / (1 - k / steps)
    torch.testing.assert_close(out[:, 0], z)


def test_sampler_commits_generated_frames_at_the_context_level():
    """The second frame's calls see the first generated frame re-noised to tau_ctx (signal and noise)."""
    cfg = _cfg(1)
    context = torch.rand(1, 1, 4, 2)
    c = torch.randn(4, 2)
    calls = []

    def stub(z, tau, d, actions=None, mask=None, cache=None):
        calls.append((z.clone(), tau.clone()))
        return c.expand_as(z).clone(), None, cache

    generate(stub, context, None, 2, torch.Generator().manual_seed(1), cfg, use_cache=False)
    draw = torch.Generator().manual_seed(1)
    torch.randn(context.shape, generator=draw), torch.randn(1, 1, 4, 2, generator=draw)
    renoise = torch.randn(1, 1, 4, 2, generator=draw)
    sig = cfg.context_signal
    torch.testing.assert_close(calls[1][0][:, 1:2], sig * c + (1 - sig) * renoise)
    torch.testing.assert_close(calls[1][1][:, 1], torch.tensor([sig]))
