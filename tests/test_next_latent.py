"""`d4func.next_latent.next_latent_errors`: its baselines by hand, causality, and clear errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d4func.config import TransformerConfig
from d4func.dynamics import Dynamics, DynamicsConfig, actions_into_frames
from d4func.functional import apply, init, template
from d4func.next_latent import next_latent_errors, predict_next_latent


def _model():
    cfg = DynamicsConfig(transformer=TransformerConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                                       time_every=2),
                         latent_tokens=4, latent_dim=4, pack=2, n_registers=1, action_dim=2, k_max=8)
    model = template(Dynamics, cfg)
    return model, init(model, 0)


@settings(max_examples=15, deadline=None)
@given(steps=st.integers(2, 7), data=st.data(), seed=st.integers(0, 2**16))
def test_baselines_by_hand_and_future_frames_do_not_count(steps, data, seed):
    model, params = _model()
    target = data.draw(st.integers(1, steps - 1))
    gen = torch.Generator().manual_seed(seed)
    latents = torch.rand(3, steps, 4, 4, generator=gen) * 2 - 1
    actions_in, mask = actions_into_frames(torch.rand(3, steps, 2, generator=gen) * 2 - 1)
    errors = next_latent_errors(model, params, latents, actions_in, mask, target, torch.Generator().manual_seed(1))
    truth = latents[:, target]
    assert errors["copy_last_mse"] == pytest.approx(float((latents[:, target - 1] - truth).square().mean()))
    assert errors["context_mean_mse"] == pytest.approx(float((latents[:, :target].mean(1) - truth).square().mean()))
    # The noisy copy: the last context frame at tau_ctx with the same noise draw (the first of the generator).
    noise = torch.randn(latents[:, :target + 1].shape, generator=torch.Generator().manual_seed(1))
    signal = model.cfg.context_signal
    seen = signal * latents[:, target - 1] + (1 - signal) * noise[:, target - 1]
    assert errors["copy_noisy_last_mse"] == pytest.approx(float((seen / signal - truth).square().mean()), rel=1e-5)
    # Frames and actions after the target never enter (the dynamics is causal and they are cut off).
    later = latents.clone()
    later[:, target + 1:] = 0.5
    later_actions = actions_in.clone()
    later_actions[:, target + 1:] = -1.0
    assert next_latent_errors(model, params, later, later_actions, mask, target,
                              torch.Generator().manual_seed(1)) == errors
    # The target frame is what the prediction is scored against.
    moved = latents.clone()
    moved[:, target] += 0.3
    assert next_latent_errors(model, params, moved, actions_in, mask, target,
                              torch.Generator().manual_seed(1))["model_mse"] != errors["model_mse"]


def test_target_must_have_history():
    model, params = _model()
    latents = torch.zeros(1, 4, 4, 4)
    actions_in = torch.zeros(1, 4, 2)
    for bad in (0, 4):
        with pytest.raises(ValueError, match=f"1 <= target < 4, got {bad}"):
            next_latent_errors(model, params, latents, actions_in, None, bad)


def test_next_latent_prediction_never_sees_the_target_frame():
    """The target enters at tau = 0 (pure noise): its value cannot change the prediction."""
    model, params = _model()
    latents = torch.rand(2, 4, 4, 4) * 2 - 1
    actions = torch.zeros(2, 4, 2)
    moved = latents.clone()
    moved[:, 2] += 0.5
    a = predict_next_latent(model, params, latents, actions, None, 2, torch.Generator().manual_seed(0))[0]
    b = predict_next_latent(model, params, moved, actions, None, 2, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(a, b)


def test_the_prediction_is_the_finest_step_flow_output_at_the_documented_noise_levels():
    # The module's contract: target at tau = 0, history at tau_ctx, every frame at step d_min (the flow
    # prediction, the model's conditional mean). A larger step asks the model a different question (a shortcut).
    model, params = _model()
    cfg = model.cfg
    gen = torch.Generator().manual_seed(3)
    latents = torch.rand(2, 5, 4, 4, generator=gen) * 2 - 1
    actions_in, mask = actions_into_frames(torch.rand(2, 5, 2, generator=gen) * 2 - 1)
    target = 3
    predicted, noisy = predict_next_latent(model, params, latents, actions_in, mask, target,
                                           torch.Generator().manual_seed(0))
    assert noisy.shape == (2, target + 1, 4, 4)
    tau = torch.full((2, target + 1), cfg.context_signal)
    tau[:, target] = 0.0
    by_hand = apply(model, params, noisy, tau, torch.full_like(tau, cfg.d_min), actions_in[:, : target + 1],
                    mask[:, : target + 1], None, None)[0][:, target]
    torch.testing.assert_close(predicted, by_hand, rtol=0, atol=0)
    coarse = apply(model, params, noisy, tau, torch.full_like(tau, 0.5), actions_in[:, : target + 1],
                   mask[:, : target + 1], None, None)[0][:, target]
    assert not torch.allclose(predicted, coarse)  # the step size reaches the output: the check above has teeth
