"""The moving-shapes videos the small world model trains on (`d4func.data.moving_shapes`) and its phase-1 driver
(`d4func.train.shapes_world_model`): walls, action clipping, bouncing, actions shifted into frames."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from d4func.config import TransformerConfig
from d4func.dynamics import DynamicsConfig


def _shape_centre(frames):
    """Centroid (x, y) per frame, in pixel coordinates (pixel centres at i + 0.5, as the renderer's), of everything
    that differs from the background."""
    from d4func.data.moving_shapes import BACKGROUND

    mass = (frames - BACKGROUND).abs().sum(1)
    ys, xs = torch.meshgrid(torch.arange(frames.shape[-2]) + 0.5, torch.arange(frames.shape[-1]) + 0.5, indexing="ij")
    total = mass.sum((1, 2))
    return torch.stack(((mass * xs).sum((1, 2)) / total, (mass * ys).sum((1, 2)) / total), -1), total


@pytest.mark.parametrize("mode", ["continuous", "discrete"])
def test_the_controlled_shape_stops_at_the_wall_it_is_pushed_into(mode):
    # The controlled shape's motion is a function of the actions alone: pushed right for many steps, it stops
    # with its edge at the wall and stays whole (a frame's painted mass stays constant), never leaving the frame.
    from d4func.data.moving_shapes import MovingShapesConfig, moving_shapes_video

    cfg = MovingShapesConfig(image_size=32, n_shapes=0, action_mode=mode, control_speed=0.2)
    right = torch.tensor([1.0, 0.0]) if mode == "continuous" else torch.eye(5)[4]
    frames, _ = moving_shapes_video(cfg, 12, 0, actions=right.expand(12, -1))
    centre, mass = _shape_centre(frames)
    radius = 0.5 * (cfg.min_radius + cfg.max_radius) * cfg.image_size
    assert (mass.max() - mass.min()) / mass.mean() < 0.02
    torch.testing.assert_close(centre[-1, 0], torch.tensor(cfg.image_size - radius), atol=0.3, rtol=0)
    torch.testing.assert_close(centre[-2:, 1], centre[:2, 1], atol=0.05, rtol=0)


def test_continuous_actions_are_clipped_to_the_unit_box_before_they_move_the_shape():
    # Given actions beyond [-1, 1] are clipped (the returned actions are the ones that acted): 3.0 moves the shape
    # exactly as 1.0 does.
    from d4func.data.moving_shapes import MovingShapesConfig, moving_shapes_video

    cfg = MovingShapesConfig(image_size=48, n_shapes=0, action_mode="continuous", control_speed=0.02)
    big = torch.tensor([[3.0, -3.0]] * 4)
    frames, used = moving_shapes_video(cfg, 4, 1, actions=big)
    unit, _ = moving_shapes_video(cfg, 4, 1, actions=big.clamp(-1, 1))
    assert torch.equal(used, big.clamp(-1, 1))
    torch.testing.assert_close(frames, unit)


def test_actions_for_a_clip_without_control_are_refused():
    from d4func.data.moving_shapes import MovingShapesConfig, moving_shapes_video

    with pytest.raises(ValueError, match="action_mode is 'none'"):
        moving_shapes_video(MovingShapesConfig(image_size=16), 3, 0, actions=torch.zeros(3, 2))


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 999))
@example(seed=184)  # one slow axis (0.43 px a step)
def test_a_bouncing_shape_keeps_crossing_the_frame(seed):
    # Free shapes bounce off all four walls (their speed is kept): late in a long clip a shape still travels
    # across the frame instead of sticking to the wall it met first.
    from d4func.data.moving_shapes import MovingShapesConfig, moving_shapes_video

    cfg = MovingShapesConfig(image_size=24, n_shapes=1, max_speed=0.25, min_radius=0.1, max_radius=0.12)
    frames, _ = moving_shapes_video(cfg, 80, seed)
    centre, _ = _shape_centre(frames[40:])
    free = cfg.image_size * (1 - 2 * cfg.max_radius)
    # An axis counts as moving at a median of half a pixel a step or more: 40 steps then travel more than the free
    # range, so even with a bounce inside the window it covers half of it. (By the largest step, an axis at 0.43 px a
    # step counted, from the centre estimate's jitter, and had covered 8.4 px of the 9.1 asked when it bounced.)
    moving = [axis for axis in range(2) if (centre[1:, axis] - centre[:-1, axis]).abs().median() > 0.5]
    assert moving, "the shape stopped"
    for axis in moving:
        assert centre[:, axis].max() - centre[:, axis].min() > 0.5 * free, axis


def test_pretraining_feeds_the_dynamics_actions_shifted_into_frames(monkeypatch):
    # Phase 1 (paper Sec. 3.2) gets actions in TorchRL's convention (actions[t] after frame t); the dynamics model
    # must see them leading into frames, with the first frame's action unknown (masked), as generation does.
    import d4func.train.shapes_world_model as swm
    from d4func.tokenizer import TokenizerConfig

    small = TransformerConfig(d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, time_every=2)
    tok = TokenizerConfig(height=8, width=8, patch_size=4, n_latents=2, latent_dim=4, encoder=small, decoder=small)
    dyn = DynamicsConfig(transformer=small, latent_tokens=2, latent_dim=4, pack=1, n_registers=1, action_dim=2,
                         k_max=4, sampling_steps=2)
    actions = torch.rand(2, 4, 2) * 2 - 1
    seen = []

    def spy(state, latents, actions, generator, *, action_mask=None, **kwargs):
        seen.append((actions, action_mask))
        return state, {"loss": torch.tensor(0.0)}

    monkeypatch.setattr(swm, "dynamics_train_step", spy)
    swm.pretrain_world_model(tok, dyn, lambda gen: (torch.rand(2, 4, 3, 8, 8, generator=gen), actions),
                             tokenizer_steps=0, dynamics_steps=1)
    (into, mask), = seen
    torch.testing.assert_close(into[:, 1:], actions[:, :-1])
    assert mask is not None and mask.tolist() == [[False, True, True, True]] * 2


def test_the_shapes_world_model_config_refuses_latents_the_tokenizer_does_not_make():
    from d4func.train.shapes_world_model import ShapesWorldModelConfig

    base = ShapesWorldModelConfig.quick()
    with pytest.raises(ValueError, match="dynamics.latent_dim=4 must equal tokenizer.latent_dim=8"):
        dataclasses.replace(base, dynamics=dataclasses.replace(base.dynamics, latent_dim=4))
    with pytest.raises(ValueError, match="dynamics.latent_tokens=8 must equal the tokenizer's latent tokens 16"):
        dataclasses.replace(base, dynamics=dataclasses.replace(base.dynamics, latent_tokens=8))
