"""Dynamics model, shortcut-forcing math and the sampler."""

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from einops import rearrange
from helpers.frozen_target import frozen_target_loss
from hypothesis import given, settings
from hypothesis import strategies as st

from d4func.config import TransformerConfig
from d4func.dynamics import Dynamics, DynamicsConfig, actions_into_frames
from d4func.functional import apply, init, template
from d4func.objectives import (
    add_noise,
    bootstrap_velocity,
    bootstrap_velocity_vmapped,
    clean_context_levels,
    frame_weight,
    ramp_weight,
    sample_signal_levels,
    sample_step_sizes,
    sample_training_frames,
    sample_training_levels,
    shortcut_forcing_loss,
    shortcut_targets,
    teacher_forcing_levels,
    velocity_from_x,
    x_from_velocity,
)
from d4func.sampler import Frames, generate
from d4func.train.dynamics_step import denoiser, dynamics_loss
from d4func.train.run_config import load_run_config


def make(discrete=False, agent=0, logit_cap=30.0, k_max=8, seed=0, steps=4, skip=False, film=False, positions=False):
    """A small dynamics model. `film` turns on `action_film` with random FiLM weights (it starts at zero, where it
    would be inert and every test of it would pass trivially)."""
    cfg = DynamicsConfig(
        transformer=TransformerConfig(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, time_every=2,
                                      logit_cap=logit_cap),
        latent_tokens=6, latent_dim=4, pack=2, n_registers=2, n_agent_tokens=agent,
        action_dim=0 if discrete else 3, n_actions=5 if discrete else 0, k_max=k_max, sampling_steps=steps,
        previous_frame_skip=skip, action_film=film, latent_positions=positions,
    )
    model = template(Dynamics, cfg)
    params = init(model, seed)
    if film:
        gen = torch.Generator().manual_seed(seed + 1)
        for name in ("weight", "bias"):
            shape = params["action_film", name].shape
            params["action_film", name] = 0.3 * torch.randn(shape, generator=gen)
    return cfg, model, params


def inputs(cfg, batch=2, steps=5, seed=0, discrete=False):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, steps, cfg.latent_tokens, cfg.latent_dim, generator=gen).tanh()
    d = sample_step_sizes((batch, steps), cfg.k_max, gen)
    tau = sample_signal_levels(d, gen)
    if discrete:
        actions = torch.randint(0, cfg.n_actions, (batch, steps), generator=gen)
    else:
        actions = torch.rand(batch, steps, cfg.action_dim, generator=gen) * 2 - 1
    return z, tau, d, actions


@settings(max_examples=10, deadline=None)
@given(discrete=st.booleans(), agent=st.sampled_from([0, 2]), seed=st.integers(0, 999), skip=st.booleans(),
       film=st.booleans(), positions=st.booleans(), data=st.data())
def test_future_latents_and_actions_never_change_past_predictions(discrete, agent, seed, skip, film, positions, data):
    cfg, model, params = make(discrete=discrete, agent=agent, seed=seed, skip=skip, film=film, positions=positions)
    z, tau, d, actions = inputs(cfg, seed=seed, discrete=discrete)
    t = data.draw(st.integers(0, 3), label="t")
    z2, actions2, tau2 = z.clone(), actions.clone(), tau.clone()
    z2[:, t + 1 :] = -z2[:, t + 1 :]
    actions2[:, t + 1 :] = (actions2[:, t + 1 :] + 1) % 5 if discrete else -actions2[:, t + 1 :]
    tau2[:, t + 1 :] = 1 - d[:, t + 1 :] - tau2[:, t + 1 :]
    x, agent_out, _ = apply(model, params, z, tau, d, actions)
    x2, agent_out2, _ = apply(model, params, z2, tau2, d, actions2)
    torch.testing.assert_close(x[:, : t + 1], x2[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(x[:, t + 1 :], x2[:, t + 1 :])
    if agent:
        torch.testing.assert_close(agent_out[:, : t + 1], agent_out2[:, : t + 1], atol=1e-5, rtol=1e-5)


def test_agent_tokens_do_not_change_world_model_predictions():
    cfg, model, params = make(agent=2)
    z, tau, d, actions = inputs(cfg)
    x_task0, agent0, _ = apply(model, params, z, tau, d, actions, None, None, torch.tensor([0, 0]))
    params_no_agent = params.clone()
    params_no_agent["agent_tokens", "weight"] = params["agent_tokens", "weight"] * 5
    x_other, agent_other, _ = apply(model, params_no_agent, z, tau, d, actions)
    torch.testing.assert_close(x_task0, x_other, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(agent0, agent_other)


def test_no_action_embedding_and_action_shift():
    cfg, model, params = make()
    z, tau, d, actions = inputs(cfg)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    x_masked, _, _ = apply(model, params, z, tau, d, actions, mask)
    x_none, _, _ = apply(model, params, z, tau, d, None)
    torch.testing.assert_close(x_masked, x_none)
    shifted, first_mask = actions_into_frames(actions)
    torch.testing.assert_close(shifted[:, 1:], actions[:, :-1])
    assert first_mask[:, 0].eq(False).all() and first_mask[:, 1:].all()


def test_bad_inputs_name_the_value():
    cfg, model, params = make(discrete=True)
    z, tau, d, actions = inputs(cfg, discrete=True)
    with pytest.raises(ValueError, match="discrete actions must lie in"):
        apply(model, params, z, tau, d, actions + 5)
    with pytest.raises(ValueError, match=r"latents must be \[B, T, S=6, Dz=4\]"):
        apply(model, params, z[..., :3], tau, d, actions)
    with pytest.raises(ValueError, match="d must be a power of two"):
        apply(model, params, z, tau, torch.full_like(d, 1 / 16), actions)
    with pytest.raises(ValueError, match="pack=4 must divide latent_tokens=6"):
        DynamicsConfig(latent_tokens=6, pack=4, action_dim=2)
    with pytest.raises(ValueError, match="exactly one of action_dim"):
        DynamicsConfig(action_dim=2, n_actions=3)


@settings(max_examples=30, deadline=None)
@given(
    k_max=st.sampled_from([1, 2, 4, 8, 64]),
    fraction=st.sampled_from([None, 0.0, 0.25, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_step_sizes_and_signal_levels_stay_on_the_grid(k_max, fraction, seed):
    gen = torch.Generator().manual_seed(seed)
    d = sample_step_sizes((64,), k_max, gen, bootstrap_fraction=fraction)
    tau = sample_signal_levels(d, gen)
    k = 1.0 / d
    assert torch.equal(k, torch.round(k)) and ((k.long() & (k.long() - 1)) == 0).all()  # powers of two
    assert (d >= 1.0 / k_max).all() and (d <= 1.0).all()
    index = tau / d
    assert torch.allclose(index, torch.round(index))  # tau on the grid of its own d
    assert (tau >= 0).all() and (tau <= 1 - d + 1e-7).all()


@pytest.mark.parametrize("k", [2, 4, 16])
def test_signal_levels_are_uniform_over_their_grid(k):
    """tau ~ U{0, d, ..., 1 - d} (paper Sec. 3.2): each of the k levels is drawn with probability 1/k. 40,000
    draws put each count within 5 standard deviations of 40,000 / k; a skewed draw (e.g. rand^2 before the floor)
    puts the lowest level near 40,000 / sqrt(k) instead."""
    draws = 40_000
    tau = sample_signal_levels(torch.full((draws,), 1.0 / k), torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.round(tau * k).long(), minlength=k)
    assert counts.numel() == k
    std = (draws * (1 / k) * (1 - 1 / k)) ** 0.5
    assert (counts - draws / k).abs().max() < 5 * std, counts.tolist()


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 12),
    steps=st.integers(1, 9),
    fraction=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_clean_context_rows_hold_a_strict_prefix_at_the_context_level(batch, steps, fraction, seed):
    k_max, signal = 16, DynamicsConfig(action_dim=1, k_max=16).context_signal
    gen = torch.Generator().manual_seed(seed)
    d0, tau0 = sample_training_levels((batch, steps), k_max, gen, bootstrap_fraction=0.25)
    before = gen.get_state()
    d, tau = clean_context_levels(d0, tau0, fraction, signal, 1 / k_max, gen)
    if fraction == 0.0 or steps == 1:  # the paper's recipe: nothing changes and no random numbers are drawn
        assert torch.equal(d, d0) and torch.equal(tau, tau0) and torch.equal(gen.get_state(), before)
        return
    changed = (d != d0) | (tau != tau0)
    at_context = (d == 1 / k_max) & (tau == signal)
    for row in range(batch):
        # The changed frames lie in a prefix whose frames all sit at (tau_ctx, d_min); the last frame is never
        # part of it, so every row keeps a frame to predict. (A frame may have drawn tau_ctx, d_min by itself.)
        split = int(changed[row].nonzero().max()) + 1 if changed[row].any() else 0
        assert at_context[row, :split].all() and split <= steps - 1
        assert d[row, -1] == d0[row, -1] and tau[row, -1] == tau0[row, -1]
        if fraction == 1.0:
            assert at_context[row, 0]
    with pytest.raises(ValueError, match="got 1.5"):
        clean_context_levels(d0, tau0, 1.5, signal, 1 / k_max, gen)


def test_clean_context_share_and_split_distribution():
    gen = torch.Generator().manual_seed(0)
    d0 = torch.full((20_000, 5), 1 / 16)
    tau0 = torch.zeros(20_000, 5)
    d, tau = clean_context_levels(d0, tau0, 0.5, 0.875, 1 / 16, gen)
    prefix = (tau == 0.875).long().cumprod(1).sum(1)
    assert abs((prefix > 0).float().mean().item() - 0.5) < 0.02  # half the rows get a clean history
    lengths = prefix[prefix > 0].bincount(minlength=5)[1:].float() / (prefix > 0).sum()
    torch.testing.assert_close(lengths, torch.full((4,), 0.25), atol=0.02, rtol=0)  # split uniform on 1..T-1
    assert torch.equal(d, d0)  # flow frames stay at d_min
    with pytest.raises(ValueError, match="clean_context_fraction must lie in \\[0, 1\\], got -0.1"):
        DynamicsConfig(action_dim=1, clean_context_fraction=-0.1)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 12), steps=st.integers(1, 9), k_exp=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_teacher_forcing_counts_one_frame_per_row_behind_a_context_level_history(batch, steps, k_exp, seed):
    k_max = 2**k_exp
    signal = DynamicsConfig(action_dim=1, k_max=k_max, sampling_steps=1).context_signal
    gen = torch.Generator().manual_seed(seed)
    d0, tau0 = sample_training_levels((batch, steps), k_max, gen, bootstrap_fraction=0.25)
    d, tau, counted = teacher_forcing_levels(d0, tau0, signal, 1 / k_max, gen)
    if steps == 1:  # no history to hold: the one frame is the target, unchanged
        assert counted.all() and torch.equal(d, d0) and torch.equal(tau, tau0)
        return
    assert torch.equal(counted.sum(1), torch.ones(batch, dtype=torch.long))
    split = counted.long().argmax(1)
    assert (split >= 1).all()  # every target has a history
    for row in range(batch):
        c = int(split[row])
        assert (tau[row, :c] == signal).all() and (d[row, :c] == 1 / k_max).all()
        # The target and the frames after it keep their own draws.
        assert torch.equal(d[row, c:], d0[row, c:]) and torch.equal(tau[row, c:], tau0[row, c:])


def test_teacher_forcing_split_is_uniform_and_diffusion_draws_stay_the_papers():
    gen = torch.Generator().manual_seed(0)
    d0, tau0 = torch.full((20_000, 5), 1 / 16), torch.zeros(20_000, 5)
    _, _, counted = teacher_forcing_levels(d0, tau0, 0.875, 1 / 16, gen)
    share = counted.float().mean(0)
    torch.testing.assert_close(share, torch.tensor([0.0, 0.25, 0.25, 0.25, 0.25]), atol=0.02, rtol=0)
    # forcing="diffusion" is sample_training_levels itself: same draws, every frame counted, no extra numbers drawn.
    first, second = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    d, tau, counted = sample_training_frames((4, 6), 16, first, None, 0.25, 0.5, 0.875, "diffusion")
    d_ref, tau_ref = sample_training_levels((4, 6), 16, second, None, 0.25, 0.5, 0.875)
    assert counted is None and torch.equal(d, d_ref) and torch.equal(tau, tau_ref)
    assert torch.equal(first.get_state(), second.get_state())
    with pytest.raises(ValueError, match="forcing must be one of .*got 'noisy'"):
        sample_training_frames((2, 3), 16, forcing="noisy")
    with pytest.raises(ValueError, match="clean_context_fraction=0.5 applies to forcing='diffusion' only"):
        sample_training_frames((2, 3), 16, clean_context_fraction=0.5, forcing="teacher")


@pytest.mark.parametrize("loss_weight", ["ramp", "uniform"])
def test_teacher_forced_loss_sees_only_the_target_frame(loss_weight):
    """Under forcing="teacher" the gradient of the loss reaches the prediction of each row's target frame only,
    weighted by frame_weight at that frame's level; the loss is their mean."""
    gen_state = torch.Generator().manual_seed(11).get_state()
    z = torch.randn(3, 6, 4, 2, generator=torch.Generator().manual_seed(1)).tanh()
    offset = torch.zeros(3, 6, requires_grad=True)

    def denoise(z_tau, tau, d):  # a per-frame constant prediction: its gradient marks the frames the loss reads
        return torch.zeros_like(z_tau) + offset[:, :, None, None]

    gen = torch.Generator().set_state(gen_state)
    loss, metrics, _ = shortcut_forcing_loss(denoise, denoise, z, 8, gen, 0.0, 0.0, 0.875, 1.0, "teacher",
                                             loss_weight)
    (grad,) = torch.autograd.grad(loss, offset)
    d, tau, counted = sample_training_frames((3, 6), 8, torch.Generator().set_state(gen_state), None, 0.0, 0.0,
                                             0.875, "teacher")
    assert torch.equal(grad != 0, counted)
    expected = (frame_weight(tau, loss_weight) * z.square().mean(dim=(-2, -1)) * counted).sum() / 3
    torch.testing.assert_close(loss, expected)
    assert metrics["flow_fraction"] == 1.0  # bootstrap_fraction 0: every target is a flow frame
    # The prediction is 0 everywhere, so clean_mse is the counted frames' mean square of z, not all frames'.
    torch.testing.assert_close(metrics["clean_mse"], (z.square().mean(dim=(-2, -1)) * counted).sum() / 3)
    with pytest.raises(ValueError, match="loss_weight must be one of .*got 'ramped'"):
        frame_weight(tau, "ramped")
    torch.testing.assert_close(frame_weight(tau, "ramp"), ramp_weight(tau))


def test_forcing_and_loss_weight_options_are_checked():
    with pytest.raises(ValueError, match="DynamicsConfig.forcing must be one of .*got 'teach'"):
        DynamicsConfig(action_dim=1, forcing="teach")
    with pytest.raises(ValueError, match="DynamicsConfig.loss_weight must be one of .*got 'flat'"):
        DynamicsConfig(action_dim=1, loss_weight="flat")
    with pytest.raises(ValueError, match="clean_context_fraction=0.5 applies to forcing='diffusion' only"):
        DynamicsConfig(action_dim=1, forcing="teacher", clean_context_fraction=0.5)
    # Teacher forcing trains every history at the context level, so a clean context (tau = 1) is trained too.
    assert DynamicsConfig(action_dim=1, forcing="teacher", context_noise=0.0).context_signal == 1.0


def test_bootstrap_fraction_sets_the_share_of_coarse_steps():
    gen = torch.Generator().manual_seed(0)
    d = sample_step_sizes((20_000,), 16, gen, bootstrap_fraction=0.25)
    coarse = d > 1 / 16
    assert abs(coarse.float().mean().item() - 0.25) < 0.02
    assert set(d[coarse].unique().tolist()) == {1.0, 0.5, 0.25, 0.125}  # every larger size appears
    uniform = sample_step_sizes((20_000,), 16, gen)
    assert abs((uniform == 1 / 16).float().mean().item() - 0.2) < 0.02  # 1 of 5 sizes
    with pytest.raises(ValueError, match="1.5"):
        sample_step_sizes((4,), 16, gen, bootstrap_fraction=1.5)


@pytest.mark.parametrize("discrete", [False, True])
def test_action_film_starts_as_the_token_only_model_and_then_conditions_on_the_action(discrete):
    """`action_film` is zero at init, so the same parameters give the token-only model's predictions exactly. Once
    its weights move, what it adds depends on the action (not just a fixed change to every prediction)."""
    cfg, model, params = make(discrete=discrete, agent=2)
    _, film_model, film_params = make(discrete=discrete, agent=2, film=True)
    fresh = init(film_model, 0)
    assert all(bool((w == 0).all()) for w in fresh["action_film"].values())
    torch.testing.assert_close(fresh.exclude("action_film"), params)
    z, tau, d, actions = inputs(cfg, discrete=discrete)
    x, agent_out, _ = apply(model, params, z, tau, d, actions)
    x_fresh, agent_fresh, _ = apply(film_model, fresh, z, tau, d, actions)
    assert torch.equal(x, x_fresh) and torch.equal(agent_out, agent_fresh)

    other = (actions + 1) % cfg.n_actions if discrete else -actions
    added = [apply(film_model, film_params, z, tau, d, acts)[0]
             - apply(model, film_params.exclude("action_film"), z, tau, d, acts)[0] for acts in (actions, other)]
    assert not torch.allclose(added[0], torch.zeros_like(added[0]), atol=1e-4)
    assert not torch.allclose(added[0], added[1], atol=1e-4)


def _silenced(params):
    """Params whose every attention and MLP output projection is zero: the blocks add nothing, tokens do not mix."""
    params = params.clone()
    for key in list(params.keys(include_nested=True, leaves_only=True)):
        if key[-2:] in (("out_proj", "weight"), ("down", "weight")):
            params[key] = torch.zeros_like(params[key])
    return params


def test_latent_positions_tell_apart_tokens_that_show_the_same_thing():
    """`latent_positions` adds one learned vector per latent token. Zero, it is the model without the option (the
    other parameters are the same draws); learned, it gives two tokens of equal content different predictions even
    where the tokens do not mix (silenced blocks), which without it only RoPE's offsets inside attention can."""
    cfg, model, params = make()
    pos_cfg, pos_model, pos_params = make(positions=True)
    assert pos_params["latent_positions", "weight"].shape == (cfg.latent_tokens // cfg.pack, cfg.transformer.d_model)
    torch.testing.assert_close(pos_params.exclude("latent_positions"), params)
    z, tau, d, actions = inputs(cfg)
    zeroed = pos_params.clone()
    zeroed["latent_positions", "weight"].zero_()
    x = apply(model, params, z, tau, d, actions)[0]
    assert torch.equal(apply(pos_model, zeroed, z, tau, d, actions)[0], x)
    assert not torch.allclose(apply(pos_model, pos_params, z, tau, d, actions)[0], x, atol=1e-4)

    same = z[:, :, :1].expand_as(z).clone()  # every latent of a frame shows the same thing
    for model_, params_, apart in ((model, params, False), (pos_model, pos_params, True)):
        out = rearrange(apply(model_, _silenced(params_), same, tau, d, actions)[0], "b t (s p) z -> b t s (p z)",
                        p=cfg.pack)  # one row per token: a token's latents come from different output weights
        differs = not torch.allclose(out, out[:, :, :1].expand_as(out), atol=1e-6)
        assert differs == apart


def test_past_frames_and_actions_reach_later_predictions():
    """The time layers carry information forward: a model that ignored the past would pass the causality test."""
    cfg, model, params = make()
    z, tau, d, actions = inputs(cfg)
    x, _, _ = apply(model, params, z, tau, d, actions)
    z2, actions2 = z.clone(), actions.clone()
    z2[:, 0] = -z2[:, 0]
    actions2[:, 1] = -actions2[:, 1]
    x_z, _, _ = apply(model, params, z2, tau, d, actions)
    x_a, _, _ = apply(model, params, z, tau, d, actions2)
    assert not torch.allclose(x[:, 4], x_z[:, 4], atol=1e-4)
    assert not torch.allclose(x[:, 4], x_a[:, 4], atol=1e-4)


def test_each_output_latent_comes_from_its_own_packed_token():
    """Latents are packed `pack` to a token on the way in and unpacked in the same order on the way out: with the
    transformer blocks silenced (every attention and MLP output projection zero, so tokens do not mix), changing
    input latent j changes exactly the outputs of j's pack group. Unpacking `(p s)` against packing `(s p)` would
    move them to other positions."""
    cfg, model, params = make()
    params = _silenced(params)
    z, tau, d, actions = inputs(cfg)
    x, _, _ = apply(model, params, z, tau, d, actions)
    for j in range(cfg.latent_tokens):
        changed = z.clone()
        changed[:, :, j] += 1.0
        moved = (apply(model, params, changed, tau, d, actions)[0] - x).abs().amax(dim=(0, 1, 3)) > 1e-5
        group = torch.arange(cfg.latent_tokens) // cfg.pack == j // cfg.pack
        assert moved.tolist() == group.tolist(), (j, moved.tolist())


def test_ramp_weight_values():
    torch.testing.assert_close(ramp_weight(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.1, 0.55, 1.0]))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_x_and_velocity_conversions_round_trip(seed):
    gen = torch.Generator().manual_seed(seed)
    z_clean, noise = torch.randn(2, 2, 3, 5, 4, generator=gen).unbind(0)
    tau = torch.rand(2, 3, generator=gen) * 0.95
    z_tau = add_noise(z_clean, tau, noise)
    v = velocity_from_x(z_clean, z_tau, tau)
    torch.testing.assert_close(x_from_velocity(v, z_tau, tau), z_clean, atol=1e-4, rtol=1e-4)
    # The implied velocity of the true clean latents is the flow-matching velocity z_clean - noise.
    torch.testing.assert_close(v, z_clean - noise, atol=1e-4, rtol=1e-4)


def test_bootstrap_target_equals_two_explicit_half_steps_per_sample():
    cfg, model, params = make(k_max=8)
    z, tau, d, actions = inputs(cfg, batch=3, steps=4, seed=3)
    boot = d > cfg.d_min
    folded = bootstrap_velocity(denoiser(model, params, actions), add_noise(z, tau, torch.zeros_like(z)), tau, d,
                                boot)
    z_tau = add_noise(z, tau, torch.zeros_like(z))
    vmapped = bootstrap_velocity_vmapped(lambda *a: apply(model, params, *a)[0], z_tau, tau, d, boot, actions)
    torch.testing.assert_close(vmapped, folded, atol=1e-5, rtol=1e-4)
    for b in range(3):  # written out by hand, one sequence at a time
        act = actions[b : b + 1]
        fn = denoiser(model, params, act)
        zb, tb, db, mb = z_tau[b : b + 1], tau[b : b + 1], d[b : b + 1], boot[b : b + 1]
        half = torch.where(mb, db / 2, db)
        b1 = (fn(zb, tb, half) - zb) / (1 - tb)[..., None, None]
        z_mid = torch.where(mb[..., None, None], zb + half[..., None, None] * b1, zb)
        t_mid = torch.where(mb, tb + half, tb)
        b2 = (fn(z_mid, t_mid, half) - z_mid) / (1 - t_mid)[..., None, None]
        torch.testing.assert_close(folded[b : b + 1], (b1 + b2) / 2, atol=1e-5, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), k_max=st.sampled_from([2, 4, 8, 64]))
def test_the_bootstrap_target_of_a_denoiser_that_always_predicts_c_is_c(seed, k_max):
    """Two straight half steps towards a fixed prediction c land where one full step does, so the x-space target
    z_tau + (1 - tau) (b' + b'') / 2 is c itself. Catches a target without the (1 - tau) factor, a midpoint at
    tau + d instead of tau + d / 2, or half steps of the wrong size."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(3, 5, 4, 2, generator=gen)
    c = torch.randn(4, 2, generator=gen)
    d = sample_step_sizes((3, 5), k_max, gen)
    tau = sample_signal_levels(d, gen)
    z_tau = add_noise(z, tau, torch.randn(z.shape, generator=gen))
    target, is_flow = shortcut_targets(lambda zt, t, dd: c.expand_as(zt), z, z_tau, tau, d, 1.0 / k_max)
    torch.testing.assert_close(target[~is_flow], c.expand_as(target)[~is_flow], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(target[is_flow], z[is_flow])


def test_bootstrap_targets_are_stopped_and_the_loss_gradient_ignores_them():
    """The paper's sg(.) on the bootstrap target: gradients of the dynamics loss flow only through the student's
    prediction, as if the target came from a frozen copy of the params."""
    cfg, model, params = make(k_max=8)
    z, _, _, actions = inputs(cfg, batch=3, steps=5, seed=4)
    d, tau = torch.full((3, 5), 0.25), torch.full((3, 5), 0.25)
    z_tau = add_noise(z, tau, torch.randn_like(z))
    scale = torch.tensor(1.5, requires_grad=True)  # a parameter of the denoiser
    target, is_flow = shortcut_targets(lambda *a: scale * denoiser(model, params, actions)(*a), z, z_tau, tau, d,
                                       cfg.d_min)
    assert not is_flow.any() and not target.requires_grad

    frozen = params.clone()  # a constant for grad: what the stopped target must behave like

    def loss(p):
        return dynamics_loss(p, z, actions, torch.Generator().manual_seed(9), model=model)[0]

    grads = torch.func.grad(loss)(params)
    reference = torch.func.grad(frozen_target_loss)(params, model, frozen, z, actions, None, 9)
    for key, grad in grads.items(include_nested=True, leaves_only=True):
        torch.testing.assert_close(grad, reference[key], atol=1e-6, rtol=1e-5, msg=str(key))


def test_flow_frames_regress_to_clean_latents():
    cfg, model, params = make(k_max=4)
    z, _, _, actions = inputs(cfg)
    d = torch.tensor([[0.25, 1.0, 0.5, 0.25, 0.25]] * 2)
    tau = torch.tensor([[0.5, 0.0, 0.5, 0.75, 0.0]] * 2)
    z_tau = add_noise(z, tau, torch.randn_like(z))
    target, is_flow = shortcut_targets(denoiser(model, params, actions), z, z_tau, tau, d, cfg.d_min)
    assert is_flow.tolist() == [[True, False, False, True, True]] * 2
    torch.testing.assert_close(target[is_flow], z[is_flow])
    assert not torch.allclose(target[~is_flow], z[~is_flow])


@pytest.mark.parametrize("all_flow", [True, False])
def test_targets_traced_for_compile_equal_the_eager_ones(monkeypatch, all_flow):
    """A compiled loss cannot read the flow mask back to skip the half steps: under `torch.compile` it runs them on
    every batch, and the targets must be the eager ones, also when every frame is a flow frame (z_clean, no NaN)."""
    cfg, model, params = make(k_max=4)
    z, _, _, actions = inputs(cfg)
    d = torch.full((2, 5), cfg.d_min) if all_flow else torch.tensor([[0.25, 1.0, 0.5, 0.25, 0.25]] * 2)
    tau = torch.tensor([[0.5, 0.0, 0.5, 0.75, 0.0]] * 2)
    z_tau = add_noise(z, tau, torch.randn_like(z))
    calls = []

    def counting(*args):
        calls.append(1)
        return denoiser(model, params, actions)(*args)

    eager, eager_flow = shortcut_targets(counting, z, z_tau, tau, d, cfg.d_min)
    assert len(calls) == (0 if all_flow else 2)  # eager skips the half steps when no frame needs them
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced, traced_flow = shortcut_targets(counting, z, z_tau, tau, d, cfg.d_min)
    assert len(calls) == (2 if all_flow else 4)
    assert torch.equal(traced_flow, eager_flow) and torch.isfinite(traced).all()
    torch.testing.assert_close(traced, eager, atol=0, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("discrete, skip, film, positions", [(False, False, False, False), (True, False, False, False),
                                                             (False, True, False, True), (True, False, True, False)])
def test_cached_generation_equals_uncached(steps, discrete, skip, film, positions):
    cfg, model, params = make(discrete=discrete, agent=2, steps=steps, skip=skip, film=film, positions=positions)
    z, _, _, actions = inputs(cfg, steps=7, discrete=discrete)
    fn = functools.partial(apply, model, params)
    cached = generate(fn, z[:, :3], actions, 4, torch.Generator().manual_seed(5), cfg)
    uncached = generate(fn, z[:, :3], actions, 4, torch.Generator().manual_seed(5), cfg, use_cache=False)
    assert cached.shape == (2, 4, cfg.latent_tokens, cfg.latent_dim)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-4)
    other_seed = generate(fn, z[:, :3], actions, 4, torch.Generator().manual_seed(6), cfg)
    assert not torch.allclose(cached, other_seed)


def _scaled(fn, scale: float):
    """`fn` seen through latents scaled by `scale`: reads z / scale, returns its clean prediction times scale."""
    def wrapped(z, *args, **kwargs):
        out = fn(z / scale, *args, **kwargs)
        return (out[0] * scale, *out[1:]) if isinstance(out, tuple) else out * scale

    return wrapped


@settings(max_examples=8, deadline=None)
@given(scale=st.floats(0.1, 3.0), seed=st.integers(0, 999), use_cache=st.booleans())
def test_noise_scale_is_the_latent_scale_seen_from_the_other_side(scale, seed, use_cache):
    """noise_scale = s on latents s * z is the paper's unit noise on z, scaled by s: the sampler applies s to the
    flow's source and to both context re-noisings, and generation commutes with scaling the latents."""
    cfg, model, params = make(seed=seed % 7)
    z, _, _, actions = inputs(cfg, steps=6, seed=seed)
    fn = functools.partial(apply, model, params)
    scaled_cfg = dataclasses.replace(cfg, noise_scale=scale)
    unit = generate(fn, z[:, :3], actions, 3, torch.Generator().manual_seed(seed), cfg, use_cache=use_cache)
    scaled = generate(_scaled(fn, scale), scale * z[:, :3], actions, 3, torch.Generator().manual_seed(seed),
                      scaled_cfg, use_cache=use_cache)
    torch.testing.assert_close(scaled, scale * unit, atol=1e-4, rtol=1e-4)


@settings(max_examples=8, deadline=None)
@given(scale=st.floats(0.1, 3.0), seed=st.integers(0, 999))
def test_noise_scale_scales_the_shortcut_forcing_loss_covariantly(scale, seed):
    """The same draw of levels and noise: training on s * z with noise s * eps is training on z with eps, the loss
    (flow and bootstrap terms alike) times s^2."""
    cfg, model, params = make(seed=seed % 7)
    z, _, _, actions = inputs(cfg, steps=5, seed=seed)
    fn = denoiser(model, params, actions)

    def loss(denoise, latents, noise_scale):
        return shortcut_forcing_loss(denoise, denoise, latents, cfg.k_max, torch.Generator().manual_seed(seed), 0.5,
                                     0.0, cfg.context_signal, noise_scale)[:2]

    unit_loss, unit_metrics = loss(fn, z, 1.0)
    scaled_loss, scaled_metrics = loss(_scaled(fn, scale), scale * z, scale)
    torch.testing.assert_close(scaled_loss, scale**2 * unit_loss, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(scaled_metrics["bootstrap_mse"], scale**2 * unit_metrics["bootstrap_mse"],
                               atol=1e-6, rtol=1e-4)


def test_noise_scale_must_be_positive():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="noise_scale"):
            DynamicsConfig(action_dim=2, noise_scale=bad)


def _without_output_layer(params):
    """The dynamics' params with its latent output layer zeroed: predictions are then the skip alone."""
    params = params.clone()
    params["latent_out"] = params["latent_out"].apply(torch.zeros_like)
    return params


def test_previous_frame_skip_adds_the_previous_frame_as_the_model_sees_it():
    cfg, model, params = make(skip=True)
    z, tau, d, actions = inputs(cfg, steps=5)
    z_tau = add_noise(z, tau, torch.randn_like(z))
    x, _, _ = apply(model, _without_output_layer(params), z_tau, tau, d, actions)
    torch.testing.assert_close(x[:, 0], torch.zeros_like(x[:, 0]))  # no previous frame
    torch.testing.assert_close(x[:, 1:], tau[:, :-1, None, None] * z_tau[:, :-1])
    plain = apply(template(Dynamics, dataclasses.replace(cfg, previous_frame_skip=False)), params, z_tau, tau, d,
                  actions)[0]
    with_skip = apply(model, params, z_tau, tau, d, actions)[0]
    torch.testing.assert_close(with_skip - plain, x)  # the same network, plus the skip


def test_previous_frame_skip_in_the_cache_follows_resets_and_windows():
    """Frame by frame through the KV cache equals one pass; after `reset_cache` an entry's next frame has no
    previous frame (as the first frame of a pass), the other entry keeps its own."""
    from d4func.transformer import empty_cache, keep_last_steps, reset_cache

    cfg, model, params = make(skip=True)
    z, tau, d, actions = inputs(cfg, steps=6)
    z_tau = add_noise(z, tau, torch.randn_like(z))
    zeroed = _without_output_layer(params)
    full, _, _ = apply(model, params, z_tau, tau, d, actions)
    cache = empty_cache(2)
    for t in range(6):
        step, _, cache = apply(model, params, z_tau[:, t:t + 1], tau[:, t:t + 1], d[:, t:t + 1],
                               actions[:, t:t + 1], None, cache)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-4)
    assert cache["previous_frame_skip"].shape == (2, 1, 6, cfg.latent_tokens * cfg.latent_dim)
    windowed = keep_last_steps(cache, 2)
    assert windowed["previous_frame_skip"].shape[2] == 2
    reset = reset_cache(windowed, torch.tensor([True, False]))
    x, _, _ = apply(model, zeroed, z_tau[:, :1], tau[:, :1], d[:, :1], actions[:, :1], None, reset)
    torch.testing.assert_close(x[0], torch.zeros_like(x[0]))
    torch.testing.assert_close(x[1, 0], tau[1, 5] * z_tau[1, 5])


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("flipped", [3, 4, 5])
def test_a_generated_frame_sees_the_action_leading_into_it_and_no_later_one(use_cache, flipped):
    """`generate`'s actions lead into frames (index t drives frame t): changing the action at context + j changes
    generated frame j and every later one, never an earlier one. An off-by-one here would train the policy on
    imagined frames that answer the previous action."""
    cfg, model, params = make()
    z, _, _, actions = inputs(cfg, steps=6)
    fn = functools.partial(apply, model, params)
    changed = actions.clone()
    changed[:, flipped] = -changed[:, flipped]
    base = generate(fn, z[:, :3], actions, 3, torch.Generator().manual_seed(0), cfg, use_cache=use_cache)
    other = generate(fn, z[:, :3], changed, 3, torch.Generator().manual_seed(0), cfg, use_cache=use_cache)
    first_changed = flipped - 3
    torch.testing.assert_close(base[:, :first_changed], other[:, :first_changed])
    for frame in range(first_changed, 3):
        assert not torch.allclose(base[:, frame], other[:, frame], atol=1e-4), frame


def test_one_step_sampler_makes_one_model_call_per_frame():
    cfg, model, params = make(k_max=2, steps=1)
    z, _, _, actions = inputs(cfg, steps=6)
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape[1])  # timesteps processed by the call
        return apply(model, params, *args, **kwargs)

    generate(counting, z[:, :2], actions, 4, torch.Generator().manual_seed(0), cfg)
    assert len(calls) == 4
    assert calls == [3, 2, 2, 2]  # first: context + new frame; then: previous frame (committed) + new frame


def test_generation_rejects_bad_arguments():
    cfg, model, params = make()
    z, _, _, actions = inputs(cfg, steps=5)
    fn = functools.partial(apply, model, params)
    with pytest.raises(ValueError, match="cover context"):
        generate(fn, z[:, :2], actions, 4, None, cfg)
    with pytest.raises(ValueError, match="steps must be a power of two"):
        generate(fn, z[:, :2], actions, 3, None, cfg, steps=3)


@settings(max_examples=30, deadline=None)
@given(k_exp=st.integers(0, 7), noise=st.floats(1e-4, 0.99))
def test_the_context_level_is_one_that_training_samples(k_exp, noise):
    # A nonzero context noise never rounds to tau = 1 (which flow training never draws: tau <= 1 - d_min), and
    # stays on the d_min grid, the levels whose signal embeddings training reaches.
    k_max = 2**k_exp
    expected = 1 - max(1, round(noise * k_max)) / k_max
    if expected <= 0:  # no signal left in the context: refused (test_a_context_with_no_signal_left_is_refused)
        with pytest.raises(ValueError, match="pure noise"):
            DynamicsConfig(k_max=k_max, sampling_steps=1, context_noise=noise, action_dim=1)
        return
    cfg = DynamicsConfig(k_max=k_max, sampling_steps=1, context_noise=noise, action_dim=1)
    levels = {i / k_max for i in range(k_max)}  # sample_signal_levels at d = d_min: {0, ..., 1 - d_min}
    assert cfg.context_signal in levels
    assert cfg.context_signal == pytest.approx(expected)


def test_reach_and_debug_configs_keep_their_context_on_the_trained_grid():
    for name in ("reach", "debug"):
        cfg = load_run_config(str(Path(__file__).resolve().parents[1] / f"experiments/configs/{name}.yaml")).dynamics
        assert cfg.context_signal <= 1 - cfg.d_min, name


def test_a_clean_context_needs_clean_history_rows():
    with pytest.raises(ValueError, match="context_noise=0.0 puts the context at tau = 1.*clean_context_fraction=0.0"):
        DynamicsConfig(context_noise=0.0, action_dim=1)
    cfg = DynamicsConfig(context_noise=0.0, clean_context_fraction=0.5, action_dim=1)
    assert cfg.context_signal == 1.0  # trained in the clean-history rows


def test_a_context_with_no_signal_left_is_refused():
    # k_max = 1: the only signal level is 0, so tau_ctx's one grid step leaves the context pure noise.
    with pytest.raises(ValueError, match="context_noise=0.1 on the signal grid of k_max=1 .*signal 0.0"):
        DynamicsConfig(k_max=1, sampling_steps=1, action_dim=1)
    assert DynamicsConfig(k_max=2, sampling_steps=1, action_dim=1).context_signal == 0.5


def test_joining_frames_with_and_without_actions_is_refused():
    with_actions = Frames(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1, 1),
                          torch.ones(1, 1, dtype=torch.bool))
    without = Frames(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1), torch.zeros(1, 1), None, None)
    assert with_actions.cat(with_actions).count == 2 and without.cat(without).count == 2
    with pytest.raises(ValueError, match="Frames.cat: one side has actions"):
        with_actions.cat(without)


@pytest.mark.parametrize("skip", [False, True])
def test_windowed_generation_forgets_frames_beyond_the_window(skip):
    cfg, model, params = make(skip=skip)
    z, _, _, actions = inputs(cfg, steps=9)
    fn = functools.partial(apply, model, params)

    def roll(context, window):
        return generate(fn, context, actions, 5, torch.Generator().manual_seed(5), cfg, window=window)

    unbounded = roll(z[:, :4], None)
    torch.testing.assert_close(roll(z[:, :4], 9), unbounded)  # a window wider than everything changes nothing
    changed = z[:, :4].clone()
    changed[:, :2] += 1.0
    assert not torch.allclose(roll(changed, None), unbounded)
    # A window of 3: every frame is generated beside at most 2 others, so context frames 0 and 1 never enter.
    narrow = roll(z[:, :4], 3)
    torch.testing.assert_close(roll(changed, 3), narrow)
    assert not torch.allclose(narrow, unbounded)
    calls = []

    def counting(*args, **kwargs):
        calls.append((args[0].shape[1], 0 if kwargs["cache"] is None else kwargs["cache"]["valid"].shape[1]))
        return apply(model, params, *args, **kwargs)

    generate(counting, z[:, :4], actions, 5, torch.Generator().manual_seed(5), cfg, steps=1, window=3)
    assert all(new + cached <= 3 for new, cached in calls), calls
    with pytest.raises(ValueError, match="window must be >= 2"):
        roll(z[:, :4], 1)
    with pytest.raises(ValueError, match="window needs use_cache=True"):
        generate(fn, z[:, :4], actions, 5, None, cfg, use_cache=False, window=3)
    with pytest.raises(ValueError, match=r"at least one frame to continue from, got shape \[2, 0, "):
        generate(fn, z[:, :0], actions[:, 4:], 5, None, cfg)  # it used to drop every frame it made


def test_dynamics_reads_both_tau_and_d():
    cfg = _tau_d_cfg()
    model = template(Dynamics, cfg)
    params = init(model, 0)
    z = torch.randn(2, 2, 4, 2)
    tau, d = torch.full((2, 2), 0.5), torch.full((2, 2), 0.25)
    base = apply(model, params, z, tau, d)[0]
    assert not torch.allclose(apply(model, params, z, tau, torch.full_like(d, 0.125))[0], base)
    assert not torch.allclose(apply(model, params, z, torch.full_like(tau, 0.75), d)[0], base)


def _tau_d_cfg() -> DynamicsConfig:
    return DynamicsConfig(transformer=TransformerConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                                        time_every=2),
                          latent_tokens=4, latent_dim=2, pack=2, n_registers=1, action_dim=2, k_max=8)


def test_bad_level_and_mask_shapes_are_named():
    cfg = _tau_d_cfg()
    model = template(Dynamics, cfg)
    params = init(model, 0)
    z = torch.randn(1, 3, 4, 2)
    with pytest.raises(ValueError, match=r"tau must be \[B, T\] = \[1, 3\] like z_noisy, got \[1, 2\]"):
        apply(model, params, z, torch.full((1, 2), 0.5), torch.full((1, 3), 0.25), torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match=r"action_mask must be \[B, context \+ horizon\] = \[1, 5\], got \[1, 3\]"):
        generate(functools.partial(apply, model, params), z, torch.zeros(1, 5, 2), 2, None, cfg,
                 action_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="use context_noise < 0.9921875"):
        dataclasses.replace(cfg, k_max=64, context_noise=0.995)



# ---------------------------------------------------------------------------------------------------------------
# Mutation audit (audit_f): input checks, task embedding, and the training step's plumbing
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1.25, -0.25])
def test_signal_levels_outside_zero_one_are_refused_naming_their_range(bad):
    # The tau embedding has k_max + 1 rows (tau = 0 .. 1, paper Sec. 3.2): a level off that range must be named,
    # not surface as an embedding IndexError. tau = 1 (a clean frame) is a valid level.
    cfg, model, params = make()
    z, _, d, actions = inputs(cfg)
    tau = torch.full((2, 5), 0.5)
    tau[1, 3] = bad
    with pytest.raises(ValueError, match=rf"tau must lie in \[0, 1\], got range \[{min(bad, 0.5)}, {max(bad, 0.5)}\]"):
        apply(model, params, z, tau, d, actions)
    assert apply(model, params, z, torch.ones(2, 5), d, actions)[0].isfinite().all()


def test_actions_the_mask_marks_unknown_are_not_range_checked_and_never_read():
    # A padded or pre-episode step's action is only a placeholder (NaN, or any value) behind action_mask = False:
    # it must neither trip the [-1, 1] check nor reach the prediction. A known NaN is still refused.
    cfg, model, params = make()
    z, tau, d, actions = inputs(cfg)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 2] = mask[1, 0] = False
    padded = actions.clone()
    padded[~mask] = float("nan")
    x_padded = apply(model, params, z, tau, d, padded, mask)[0]
    x_plain = apply(model, params, z, tau, d, actions, mask)[0]
    torch.testing.assert_close(x_padded, x_plain)
    with pytest.raises(ValueError, match="must lie in \\[-1, 1\\] \\(NaN is not allowed\\), got e.g. nan"):
        apply(model, params, z, tau, d, padded, torch.ones_like(mask))


def test_the_task_embedding_reaches_the_agent_tokens_and_not_the_latents():
    # Agent tokens carry a task embedding (paper Sec. 3.3): two tasks on the same frames give different agent
    # outputs, while the world model's predictions, which never read agent tokens, stay the same.
    cfg = dataclasses.replace(make(agent=2)[0], n_tasks=3)
    model = template(Dynamics, cfg)
    params = init(model, 0)
    z, tau, d, actions = inputs(cfg)
    x0, agent0, _ = apply(model, params, z, tau, d, actions, None, None, torch.tensor([0, 0]))
    x2, agent2, _ = apply(model, params, z, tau, d, actions, None, None, torch.tensor([0, 2]))
    torch.testing.assert_close(x0, x2)
    torch.testing.assert_close(agent0[0], agent2[0])
    assert not torch.allclose(agent0[1], agent2[1])


@settings(max_examples=20, deadline=None)
@given(k_exp=st.integers(0, 6), extra=st.integers(1, 3))
def test_sampling_steps_finer_than_the_finest_trained_step_are_refused(k_exp, extra):
    # Training reaches step sizes down to d_min = 1 / k_max only: K > k_max would feed the signal embedding a
    # step size it has no row for, so the config refuses it up front, naming K and k_max.
    k_max, steps = 2**k_exp, 2 ** (k_exp + extra)
    with pytest.raises(ValueError, match=rf"power of two in \[1, k_max={k_max}\], got {steps}"):
        DynamicsConfig(k_max=k_max, sampling_steps=steps, action_dim=1, context_noise=0.0,
                       clean_context_fraction=0.5)
    assert DynamicsConfig(k_max=k_max, sampling_steps=k_max, action_dim=1, context_noise=0.0,
                          clean_context_fraction=0.5).sampling_steps == k_max


@settings(max_examples=6, deadline=None)
@given(noise_scale=st.sampled_from([1.0, 0.3]), forcing=st.sampled_from(["diffusion", "teacher"]),
       loss_weight=st.sampled_from(["ramp", "uniform"]), bootstrap=st.sampled_from([0.25, 0.75, None]),
       seed=st.integers(0, 99))
def test_dynamics_loss_trains_with_every_setting_of_its_config(noise_scale, forcing, loss_weight, bootstrap, seed):
    # The training step is shortcut forcing (paper Sec. 3.2) with the model's own settings: its loss equals
    # shortcut_forcing_loss given each config field explicitly, for the same draws. A field dropped on the way
    # (e.g. noise_scale) would train at the default while generation samples with the configured one.
    base, model, params = make(seed=seed % 3)
    cfg = dataclasses.replace(base, noise_scale=noise_scale, forcing=forcing, loss_weight=loss_weight,
                              bootstrap_fraction=bootstrap, context_noise=0.25)
    model = template(Dynamics, cfg)
    z, _, _, actions = inputs(cfg, seed=seed)
    loss, metrics = dynamics_loss(params, z, actions, torch.Generator().manual_seed(seed), model=model)
    fn = denoiser(model, params, actions)
    expected, _, _ = shortcut_forcing_loss(fn, fn, z, cfg.k_max, torch.Generator().manual_seed(seed),
                                           bootstrap, 0.0, cfg.context_signal, noise_scale, forcing, loss_weight)
    torch.testing.assert_close(loss, expected)


def test_dynamics_loss_reads_the_action_mask():
    # A frame whose action is unknown (mask False) is trained with the "no action" embedding, so a fully masked
    # batch trains exactly as action-free video (same draws), whatever the placeholder actions hold.
    cfg, model, params = make()
    z, _, _, actions = inputs(cfg)
    masked = dynamics_loss(params, z, -actions, torch.Generator().manual_seed(3), model=model,
                           action_mask=torch.zeros(2, 5, dtype=torch.bool))[0]
    free = dynamics_loss(params, z, None, torch.Generator().manual_seed(3), model=model)[0]
    torch.testing.assert_close(masked, free)


def test_the_dynamics_train_step_updates_the_ema_at_the_decay_it_is_given():
    # ema <- decay * ema + (1 - decay) * new params after the update: with decay 0 the EMA is the new params,
    # with decay 1 it stays where it was.
    from d4func.optim import AdamWConfig
    from d4func.train.dynamics_step import dynamics_train_step
    from d4func.train.state import new_train_state

    cfg, model, params = make()
    z, _, _, actions = inputs(cfg)
    state = new_train_state(params)
    for decay in (0.0, 1.0):
        new, _ = dynamics_train_step(state, z, actions, torch.Generator().manual_seed(0), model=model,
                                     opt=AdamWConfig(lr=1e-2), ema_decay=decay)
        expected = new["params"] if decay == 0.0 else state["ema"]
        assert not (new["params"] == state["params"]).all()
        assert (new["ema"] == expected).all(), decay
