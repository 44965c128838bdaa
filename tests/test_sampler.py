"""The sampler's schedule, pinned by hand against a stub world model: the levels and step sizes each call sees,
how context frames are re-noised, the update rule, and how a generated frame joins the history. A cached vs
uncached comparison cannot catch these: both paths share the schedule code."""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d4func.config import TransformerConfig
from d4func.dynamics import Dynamics, DynamicsConfig
from d4func.functional import apply, init, template
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


def _model(steps=2):
    cfg = _cfg(steps)
    model = template(Dynamics, cfg)
    return cfg, functools.partial(apply, model, init(model, 0))


@settings(max_examples=8, deadline=None)
@given(masked=st.integers(0, 5), use_cache=st.booleans(), seed=st.integers(0, 99))
def test_an_action_the_mask_marks_unknown_never_reaches_generation(masked, use_cache, seed):
    # action_mask covers context and horizon alike: a step marked unknown (an episode boundary, a padded step)
    # reads the "no action" embedding both while its frame is denoised and once it is committed as context, so
    # its placeholder value cannot change any generated frame. Reading the mask one step off, or only for the
    # frame being denoised, lets it through.
    cfg, fn = _model()
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(2, 3, 4, 2, generator=gen).tanh()
    actions = torch.rand(2, 6, 2, generator=gen) * 2 - 1
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, masked] = False
    other = actions.clone()
    other[:, masked] = -other[:, masked].sign()  # a different placeholder, still a valid action
    base = generate(fn, context, actions, 3, torch.Generator().manual_seed(1), cfg, action_mask=mask,
                    use_cache=use_cache)
    moved = generate(fn, context, other, 3, torch.Generator().manual_seed(1), cfg, action_mask=mask,
                     use_cache=use_cache)
    torch.testing.assert_close(base, moved)
    unmasked = generate(fn, context, actions, 3, torch.Generator().manual_seed(1), cfg, use_cache=use_cache)
    first_reached = max(masked - 3, 0)  # the masked action leads into frame `masked`; earlier frames never see it
    assert not torch.allclose(base[:, first_reached:], unmasked[:, first_reached:])


@settings(max_examples=8, deadline=None)
@given(context_len=st.integers(1, 5), window=st.integers(2, 5))
def test_a_window_bounds_every_call_whatever_the_context_length(context_len, window):
    # The sliding window keeps window - 1 frames beside the one being generated, including the edge case of a
    # context exactly as long as the window: no call may attend to more than `window` frames (cached + new).
    cfg, fn = _model(steps=1)
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape[1] + kwargs["cache"]["valid"].shape[1])
        return fn(*args, **kwargs)

    context = torch.randn(1, context_len, 4, 2).tanh()
    out = generate(counting, context, None, 3, torch.Generator().manual_seed(0), cfg, window=window)
    assert out.shape == (1, 3, 4, 2)
    assert max(calls) <= window, calls


def test_generation_needs_a_positive_horizon():
    cfg, fn = _model()
    with pytest.raises(ValueError, match="horizon must be >= 1, got 0"):
        generate(fn, torch.zeros(1, 2, 4, 2), None, 0, None, cfg)
