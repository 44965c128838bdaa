"""Causal tokenizer (paper Section 3.1): MAE masking, causality, bottleneck, multi-camera, loss normalisation,
LPIPS mechanics without network, the moving-shapes data, learning, and the training script."""

import importlib.util
import json
import math
import socket
import sys
from functools import partial
from pathlib import Path

import lpips
import pytest
import torch
from helpers.scripts import load_experiment_script
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from d4func.config import TransformerConfig, load_config
from d4func.data.moving_shapes import (
    BACKGROUND,
    MovingShapesConfig,
    moving_shapes_batch,
    moving_shapes_video,
    random_actions,
)
from d4func.functional import apply, grad_and_value, init, template
from d4func.loss_rms import init_loss_rms, loss_rms_value, update_loss_rms
from d4func.lpips_loss import (
    BACKBONE_FILES,
    LPIPSWeightsMissing,
    find_backbone_weights,
    lpips_linear_weights_path,
    make_lpips,
)
from d4func.optim import AdamWConfig
from d4func.tokenizer import (
    Tokenizer,
    TokenizerConfig,
    autoencode,
    decode,
    encode,
    encode_step,
    encode_windowed,
    encode_with_mask,
    mae_drop_mask,
)
from d4func.tokenizer_loss import (
    LOSS_TERMS,
    TokenizerLossConfig,
    latent_spread,
    new_tokenizer_train_state,
    psnr,
    reconstruction_metrics,
    tokenizer_loss,
    tokenizer_train_step,
)

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(**overrides) -> TokenizerConfig:
    block = TransformerConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, time_every=2, logit_cap=None)
    base = dict(height=16, width=16, channels=3, patch_size=4, n_latents=4, latent_dim=6, encoder=block, decoder=block)
    return TokenizerConfig(**{**base, **overrides})


def build(cfg: TokenizerConfig, seed: int = 0):
    model = template(Tokenizer, cfg)
    return model, init(model, seed)


def rand_frames(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


def test_bad_patch_size_fails_at_config_time_with_the_value():
    with pytest.raises(ValueError, match=r"TokenizerConfig: patch_size=6 does not tile.*height=64.*width=64"):
        TokenizerConfig(height=64, width=64, patch_size=6)
    with pytest.raises(ValueError, match="patch_size=5 does not tile"):
        load_config(TokenizerConfig, None, ["height=32", "width=32", "patch_size=5"])


def test_compression_ratio_is_input_floats_over_latent_floats():
    cfg = TokenizerConfig(height=64, width=64, channels=3, patch_size=8, n_latents=16, latent_dim=16)
    assert cfg.compression_ratio == 3 * 64 * 64 / (16 * 16)
    assert cfg.n_patches == 64 and cfg.patch_dim == 192
    # Several cameras: latents and pixels grow together, so the ratio is per camera.
    assert tiny_cfg(n_cameras=3).compression_ratio == tiny_cfg().compression_ratio == 3 * 16 * 16 / (4 * 6)


# ---------------------------------------------------------------------------------------------------------------
# MAE masking
# ---------------------------------------------------------------------------------------------------------------


def test_mae_drop_rate_per_image_follows_uniform_0_to_0_9():
    gen = torch.Generator().manual_seed(0)
    drop = mae_drop_mask((4000, 256), 0.9, gen)
    rates = drop.float().mean(-1)  # one drop rate per image
    assert abs(rates.mean().item() - 0.45) < 0.015
    assert rates.min().item() < 0.02 and rates.max().item() > 0.85
    assert rates.max().item() < 0.97  # p <= 0.9 plus binomial noise of 256 patches, never near 1
    # Empirical CDF of the per-image rates matches U(0, 0.9) away from the edges (binomial noise ~0.03).
    for q in (0.15, 0.3, 0.45, 0.6, 0.75):
        assert abs((rates < q).float().mean().item() - q / 0.9) < 0.03, q
    # Patches within one image are dropped independently: rate varies between images, not just between patches.
    assert rates.std().item() > 0.2


def test_encoder_masks_with_the_explicit_generator_and_not_at_eval():
    cfg = tiny_cfg()
    model, params = build(cfg)
    frames = rand_frames(8, 6, 3, 16, 16)
    z_a, drop_a = encode_with_mask(model, params, frames, torch.Generator().manual_seed(1))
    z_b, drop_b = encode_with_mask(model, params, frames, torch.Generator().manual_seed(1))
    _, drop_c = encode_with_mask(model, params, frames, torch.Generator().manual_seed(2))
    assert drop_a.shape == (8, 6, 1, cfg.n_patches) and drop_a.dtype == torch.bool
    assert torch.equal(drop_a, drop_b) and torch.equal(z_a, z_b)  # reproducible from the generator
    assert not torch.equal(drop_a, drop_c)
    assert 0.3 < drop_a.float().mean().item() < 0.6  # mean of U(0, 0.9) is 0.45 (48 images x 16 patches)
    # Eval: no masking, so the generator is irrelevant and the latents differ from the masked ones.
    z_eval = encode(model, params, frames)
    z_eval_other_gen = encode(model, params, frames, generator=torch.Generator().manual_seed(5))
    assert torch.equal(z_eval, z_eval_other_gen)
    assert not torch.allclose(z_eval, z_a)
    _, _, drop = apply(model, params, frames, mode="autoencode")
    assert drop is None
    with pytest.raises(ValueError, match="mask=True needs an explicit torch.Generator"):
        encode(model, params, frames, mask=True)


def test_dropped_patches_are_invisible_to_the_encoder():
    cfg = tiny_cfg()
    model, params = build(cfg)
    frames = rand_frames(2, 3, 3, 16, 16)
    z, drop = encode_with_mask(model, params, frames, torch.Generator().manual_seed(3))
    assert drop.any() and (~drop).any()
    pixel_drop = _patch_mask_to_pixels(drop[:, :, 0], cfg)  # [B, T, 1, H, W]
    noise = rand_frames(2, 3, 3, 16, 16, seed=9)
    hidden_changed = torch.where(pixel_drop, noise, frames)
    visible_changed = torch.where(pixel_drop, frames, noise)
    z_hidden, _ = encode_with_mask(model, params, hidden_changed, torch.Generator().manual_seed(3))
    z_visible, _ = encode_with_mask(model, params, visible_changed, torch.Generator().manual_seed(3))
    torch.testing.assert_close(z_hidden, z, atol=1e-6, rtol=0)
    assert (z_visible - z).abs().max() > 1e-3


def test_a_dropped_patch_keeps_its_position():
    """The mask token replaces a dropped patch's content before the position embedding is added (paper Sec. 3.1,
    MAE): with every patch dropped the frames no longer matter, but where each patch was still does."""
    cfg = tiny_cfg()
    model, params = build(cfg)
    drop = torch.ones(2, 3, 1, cfg.n_patches, dtype=torch.bool)
    frames, other_frames = rand_frames(2, 3, 1, 3, 16, 16), rand_frames(2, 3, 1, 3, 16, 16, seed=1)
    z = apply(model.encoder, params["encoder"], frames, drop)
    torch.testing.assert_close(apply(model.encoder, params["encoder"], other_frames, drop), z)
    moved = params["encoder"].clone()
    moved["patch_pos"][0] += 0.5  # the first patch's position embedding
    assert (apply(model.encoder, moved, frames, drop) - z).abs().max() > 1e-4


def _patch_mask_to_pixels(drop, cfg):
    """bool [B, T, P] -> [B, T, 1, H, W]."""
    grid = cfg.height // cfg.patch_size
    blocks = drop.reshape(*drop.shape[:2], grid, grid)
    pixels = blocks.repeat_interleave(cfg.patch_size, -2).repeat_interleave(cfg.patch_size, -1)
    return pixels[:, :, None]


# ---------------------------------------------------------------------------------------------------------------
# Causality, bottleneck, decoder isolation, multi-camera
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), steps=st.integers(2, 5), masked=st.booleans(), data=st.data())
def test_changing_future_frames_never_changes_past_latents(seed, steps, masked, data):
    cfg = tiny_cfg(encoder=TransformerConfig(d_model=32, n_layers=4, n_heads=2, n_kv_heads=2, time_every=2))
    model, params = build(cfg, seed)
    t = data.draw(st.integers(0, steps - 2), label="t")
    frames = rand_frames(2, steps, 3, 16, 16, seed=seed)
    changed = frames.clone()
    changed[:, t + 1 :] = rand_frames(2, steps - t - 1, 3, 16, 16, seed=seed + 1)

    def run(x):
        gen = torch.Generator().manual_seed(seed) if masked else None
        return encode(model, params, x, generator=gen, mask=masked)

    z, z_changed = run(frames), run(changed)
    torch.testing.assert_close(z[:, : t + 1], z_changed[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(z[:, t + 1 :], z_changed[:, t + 1 :])
    # The decoder is causal too: frames <= t come only from latents <= t.
    recon, recon_changed = decode(model, params, z), decode(model, params, z_changed)
    torch.testing.assert_close(recon[:, : t + 1], recon_changed[:, : t + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("n_cameras", "latent_attention"), [(1, "global"), (2, "global"), (2, "local")])
def test_frame_by_frame_cached_encoding_equals_encoding_the_clip(n_cameras, latent_attention):
    block = TransformerConfig(d_model=32, n_layers=4, n_heads=2, n_kv_heads=2, time_every=2, logit_cap=None)
    cfg = tiny_cfg(n_cameras=n_cameras, encoder=block, latent_attention=latent_attention)
    model, params = build(cfg)
    shape = (2, 4, n_cameras, 3, 16, 16) if n_cameras > 1 else (2, 4, 3, 16, 16)
    frames = rand_frames(*shape)
    full = encode(model, params, frames)
    cache, steps = None, []
    for t in range(4):
        z, cache = encode_step(model, params, frames[:, t : t + 1], cache)
        steps.append(z)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_windowed_encoding_reads_at_most_a_window_of_frames():
    """`encode_windowed` as the acting policy encodes: a clip no longer than the window is encoded at once; in a
    longer one, frame t's latents never see frames before t - (window - 1). With one time layer (tiny_cfg) its
    cached keys and values depend on their own frame only, so frame t equals encoding its window alone."""
    cfg = tiny_cfg()
    model, params = build(cfg)
    frames = rand_frames(2, 7, 3, 16, 16)
    torch.testing.assert_close(encode_windowed(model, params, frames[:, :3], 3), encode(model, params, frames[:, :3]))
    torch.testing.assert_close(encode_windowed(model, params, frames, None), encode(model, params, frames))
    windowed = encode_windowed(model, params, frames, 3)
    for t in range(7):
        alone = encode(model, params, frames[:, max(0, t - 2):t + 1])[:, -1]
        torch.testing.assert_close(windowed[:, t], alone, atol=1e-5, rtol=1e-4)
    # The whole clip at once differs from frame 3 on: it reads beyond the window.
    assert (encode(model, params, frames)[:, 3:] - windowed[:, 3:]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="window must be >= 1 frame or None, got 0"):
        encode_windowed(model, params, frames, 0)


def test_latents_are_tanh_bounded_and_shaped():
    cfg = tiny_cfg()
    model, params = build(cfg)
    z = encode(model, params, rand_frames(2, 3, 3, 16, 16))
    assert z.shape == (2, 3, cfg.latent_tokens, cfg.latent_dim)
    assert z.abs().max() <= 1.0
    # Blow up the bottleneck projection: pre-tanh values are huge, the latents still stay in [-1, 1].
    params["encoder", "to_bottleneck", "weight"] = params["encoder", "to_bottleneck", "weight"] * 1e6
    z = encode(model, params, rand_frames(2, 3, 3, 16, 16))
    assert z.abs().max() <= 1.0
    assert (z.abs() > 0.999).float().mean() > 0.5  # saturated: the bound is the tanh's, not the data's


def test_decoder_patch_queries_never_leak_into_latent_tokens():
    cfg = tiny_cfg()
    model, params = build(cfg)
    z = encode(model, params, rand_frames(2, 3, 3, 16, 16))
    perturbed = params.clone()
    perturbed["decoder", "patch_queries"] = torch.randn_like(params["decoder", "patch_queries"]) * 5
    _, hidden = apply(model, params, z, mode="decode")
    _, hidden_perturbed = apply(model, perturbed, z, mode="decode")
    latents, patches = cfg.layout.slice("latents"), cfg.layout.slice("patches")
    torch.testing.assert_close(hidden[..., latents, :], hidden_perturbed[..., latents, :], atol=1e-6, rtol=0)
    assert (hidden[..., patches, :] - hidden_perturbed[..., patches, :]).abs().max() > 1e-2


def test_multi_camera_shapes_shared_weights_and_camera_identity():
    cfg = tiny_cfg(n_cameras=3)
    model, params = build(cfg)
    frames = rand_frames(2, 3, 3, 3, 16, 16)  # [B, T, n_cams, C, H, W]
    z = encode(model, params, frames)
    assert z.shape == (2, 3, 3 * cfg.n_latents, cfg.latent_dim)  # concatenated along the token axis
    recon, _ = autoencode(model, params, frames)
    assert recon.shape == frames.shape
    # Camera k's latents are tokens [k*S, (k+1)*S): changing camera 1 changes only those.
    changed = frames.clone()
    changed[:, :, 1] = rand_frames(2, 3, 3, 16, 16, seed=4)
    z_changed = encode(model, params, changed)
    s = cfg.n_latents
    torch.testing.assert_close(z_changed[:, :, :s], z[:, :, :s])
    torch.testing.assert_close(z_changed[:, :, 2 * s :], z[:, :, 2 * s :])
    assert not torch.allclose(z_changed[:, :, s : 2 * s], z[:, :, s : 2 * s])
    # Shared weights, yet the learned camera embedding tells cameras apart: one image, three different codes.
    same = frames[:, :, :1].expand_as(frames).contiguous()
    z_same = encode(model, params, same).reshape(2, 3, 3, s, cfg.latent_dim)
    assert not torch.allclose(z_same[:, :, 0], z_same[:, :, 1])
    assert "camera_embed" in params["encoder"].keys() and params["encoder", "camera_embed"].shape[0] == 3


def test_bad_frame_shapes_are_rejected_with_the_shape():
    model, params = build(tiny_cfg(n_cameras=2))
    with pytest.raises(ValueError, match=r"n_cams=2.*got \(2, 3, 3, 16, 16\)"):
        encode(model, params, torch.rand(2, 3, 3, 16, 16))
    model, params = build(tiny_cfg())
    with pytest.raises(ValueError, match=r"frames must be \[B, T, 3, 16, 16\], got \(2, 3, 3, 8, 8\)"):
        encode(model, params, torch.rand(2, 3, 3, 8, 8))
    with pytest.raises(ValueError, match="latents must be"):
        decode(model, params, torch.rand(2, 3, 5, 6))


# ---------------------------------------------------------------------------------------------------------------
# Loss normalisation
# ---------------------------------------------------------------------------------------------------------------


def test_running_rms_is_the_debiased_ema_of_squares():
    decay = 0.9
    rms = init_loss_rms(LOSS_TERMS)
    values = [2.0, 0.5, 1.5, 3.0]
    ema = 0.0
    for n, v in enumerate(values, start=1):
        rms = update_loss_rms(rms, {"mse": torch.tensor(v)}, decay)
        ema = decay * ema + (1 - decay) * v * v
        expected = math.sqrt(ema / (1 - decay**n))
        assert loss_rms_value(rms, "mse", decay).item() == pytest.approx(expected, rel=1e-6)
    assert rms["lpips", "count"].item() == 0  # terms not observed are left alone
    # A constant term has RMS equal to itself from the first update on (the debiasing is exact).
    rms = init_loss_rms(LOSS_TERMS)
    for _ in range(3):
        rms = update_loss_rms(rms, {"lpips": torch.tensor(0.25)}, 0.99)
        assert loss_rms_value(rms, "lpips", 0.99).item() == pytest.approx(0.25, rel=1e-6)


def fake_lpips(x, y):
    """A stand-in perceptual distance (per-image mean absolute error); the real one is tested below."""
    return (x - y).abs().mean(dim=(1, 2, 3))


def test_each_term_is_divided_by_its_running_rms():
    cfg = tiny_cfg()
    model, params = build(cfg)
    frames = rand_frames(2, 2, 3, 16, 16)
    loss_cfg = TokenizerLossConfig(lpips_weight=0.2, mask=False, rms_decay=0.9)
    # First step: the statistics hold only this batch, so each normalised term is exactly 1.
    loss, metrics = tokenizer_loss(
        params, frames, None, template=model, cfg=loss_cfg, loss_rms=init_loss_rms(LOSS_TERMS), lpips_fn=fake_lpips
    )
    assert loss.item() == pytest.approx(1.0 + 0.2, rel=1e-5)
    assert metrics["loss_rms"]["mse", "count"].item() == 1
    # Later: with history, loss = mse / rms_mse + 0.2 lpips / rms_lpips, and the gradient is the raw term's
    # gradient over a stop-gradient RMS.
    history = update_loss_rms(init_loss_rms(LOSS_TERMS), {"mse": torch.tensor(0.5), "lpips": torch.tensor(0.1)}, 0.9)
    loss_fn = partial(tokenizer_loss, template=model, cfg=loss_cfg, loss_rms=history, lpips_fn=fake_lpips)
    grads, (loss, metrics) = grad_and_value(loss_fn, has_aux=True)(params, frames, None)
    rms_mse = loss_rms_value(metrics["loss_rms"], "mse", 0.9)
    rms_lp = loss_rms_value(metrics["loss_rms"], "lpips", 0.9)
    assert loss.item() == pytest.approx((metrics["mse"] / rms_mse + 0.2 * metrics["lpips"] / rms_lp).item(), rel=1e-5)

    def raw(p):
        recon, _ = autoencode(model, p, frames)
        images = recon.flatten(0, 1), frames.flatten(0, 1)
        return (recon - frames).square().mean() / rms_mse + 0.2 * fake_lpips(*images).mean() / rms_lp

    raw_grads, _ = grad_and_value(raw)(params)
    for key in [("decoder", "to_pixels", "weight"), ("encoder", "patch_embed", "weight")]:
        torch.testing.assert_close(grads[key], raw_grads[key], atol=1e-6, rtol=1e-4)


def test_lpips_weight_needs_an_lpips_fn():
    model, params = build(tiny_cfg())
    with pytest.raises(ValueError, match="lpips_weight=0.2 needs an lpips_fn"):
        tokenizer_loss(
            params,
            rand_frames(1, 2, 3, 16, 16),
            None,
            template=model,
            cfg=TokenizerLossConfig(),
            loss_rms=init_loss_rms(LOSS_TERMS),
        )


def test_train_step_carries_loss_statistics_in_the_state():
    model, params = build(tiny_cfg())
    state = new_tokenizer_train_state(params)
    loss_cfg = TokenizerLossConfig(lpips_weight=0.0)
    frames = rand_frames(2, 2, 3, 16, 16)
    gen = torch.Generator().manual_seed(0)
    new_state, metrics = tokenizer_train_step(
        state, frames, gen, template=model, cfg=loss_cfg, optim=AdamWConfig(lr=1e-3), ema_decay=0.9
    )
    assert new_state["step"].item() == 1 and state["step"].item() == 0  # input state untouched
    assert new_state["loss_rms", "mse", "count"].item() == 1 and state["loss_rms", "mse", "count"].item() == 0
    assert new_state["loss_rms", "lpips", "count"].item() == 0
    key = ("decoder", "to_pixels", "weight")
    assert not torch.equal(new_state["params"][key], params[key])
    assert set(metrics) >= {"loss", "mse", "psnr", "mask_rate", "grad_norm"}
    assert "loss_rms" not in metrics


def test_tokenizer_loss_masks_patches_when_configured():
    """`TokenizerLossConfig.mask` (on by default, paper Sec. 3.1) reaches the autoencoder: the masked loss drops
    patches from the generator's draws and reconstructs from the rest, so its MSE is that of the masked
    autoencoding, not of the plain one."""
    model, params = build(tiny_cfg())
    frames = rand_frames(4, 3, 3, 16, 16)
    assert TokenizerLossConfig().mask

    def loss_terms(mask: bool):
        cfg = TokenizerLossConfig(lpips_weight=0.0, mask=mask)
        return tokenizer_loss(params, frames, torch.Generator().manual_seed(5), template=model, cfg=cfg,
                              loss_rms=init_loss_rms(LOSS_TERMS))[1]

    masked, plain = loss_terms(True), loss_terms(False)
    assert masked["mask_rate"] > 0.1 and plain["mask_rate"] == 0
    recon, _, drop = apply(model, params, frames, mode="autoencode", generator=torch.Generator().manual_seed(5),
                           mask=True)
    torch.testing.assert_close(masked["mse"], (recon - frames).square().mean())
    torch.testing.assert_close(masked["mask_rate"], drop.float().mean())
    torch.testing.assert_close(plain["mse"], (autoencode(model, params, frames)[0] - frames).square().mean())
    assert not torch.allclose(masked["mse"], plain["mse"])


def test_the_stored_statistics_are_the_ema_over_steps():
    """Two train steps leave EMA(mse^2) = lerp(lerp(0, m1^2, 1 - d), m2^2, 1 - d), with m1, m2 the reported terms
    (not only the last step's square)."""
    model, params = build(tiny_cfg())
    state = new_tokenizer_train_state(params, with_ema=False)
    loss_cfg = TokenizerLossConfig(lpips_weight=0.0, rms_decay=0.8)
    reported = []
    for seed in (0, 1):
        state, metrics = tokenizer_train_step(state, rand_frames(2, 2, 3, 16, 16, seed=seed),
                                              torch.Generator().manual_seed(seed), template=model, cfg=loss_cfg,
                                              optim=AdamWConfig(lr=1e-3))
        reported.append(float(metrics["mse"]))
    expected = 0.8 * (0.2 * reported[0] ** 2) + 0.2 * reported[1] ** 2
    assert state["loss_rms", "mse", "mean_sq"].item() == pytest.approx(expected, rel=1e-5)
    assert state["loss_rms", "mse", "count"].item() == 2


def test_latent_spread_is_zero_for_identical_frames_and_positive_for_distinct_ones():
    """The collapse detector: the same frame everywhere gives one latent (spread 0, also through the causal time
    layers, which then average equal values); distinct frames give distinct latents at init."""
    model, params = build(tiny_cfg())
    one_frame = rand_frames(1, 1, 3, 16, 16)
    same = one_frame.expand(2, 3, 3, 16, 16)
    distinct = rand_frames(2, 3, 3, 16, 16)
    assert latent_spread(encode(model, params, same)) < 1e-5
    assert latent_spread(encode(model, params, distinct)) > 1e-3
    assert latent_spread(torch.randn(1, 1, 4, 8)) == 0  # one frame in all
    # reconstruction_metrics (the unmasked evaluation) reports the same detector
    assert reconstruction_metrics(model, params, same)[0]["latent_spread"] < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# LPIPS without network
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to download (or open a socket) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def random_alexnet_file(tmp_path_factory):
    """An AlexNet trunk the project makes itself: random weights in torchvision's checkpoint layout."""
    gen = torch.Generator().manual_seed(0)
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    state = {}
    for index, shape in shapes.items():
        fan_in = math.prod(shape[1:])
        state[f"features.{index}.weight"] = torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_in)
        state[f"features.{index}.bias"] = torch.randn(shape[0], generator=gen) * 0.01
    path = tmp_path_factory.mktemp("backbone") / "random_alexnet.pth"
    torch.save(state, path)
    return path, state


def test_lpips_loads_backbone_from_a_file_and_linear_layers_from_the_package(no_network, random_alexnet_file):
    path, state = random_alexnet_file
    distance = make_lpips("alex", backbone_path=path)
    trunk = dict(distance.lpips.net.named_parameters())  # lpips keeps torchvision's layer index in the name
    for index, slice_index in [(0, 1), (3, 2), (6, 3), (8, 4), (10, 5)]:
        for leaf in ("weight", "bias"):
            assert torch.equal(trunk[f"slice{slice_index}.{index}.{leaf}"], state[f"features.{index}.{leaf}"])
    shipped = torch.load(lpips_linear_weights_path("alex"), map_location="cpu", weights_only=True)
    assert Path(lpips_linear_weights_path("alex")).parent.parent.parent == Path(lpips.__file__).parent
    for key, value in shipped.items():
        assert torch.equal(distance.lpips.state_dict()[key], value)
    assert not any(p.requires_grad for p in distance.parameters())
    x = rand_frames(2, 3, 32, 32).requires_grad_(True)
    y = rand_frames(2, 3, 32, 32, seed=1)
    d_xy, d_xx = distance(x, y), distance(x, x)
    assert d_xy.shape == (2,) and (d_xy > 0).all()
    torch.testing.assert_close(d_xx, torch.zeros(2), atol=1e-7, rtol=0)
    d_xy.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="side >= 31"):
        distance(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))


def test_lpips_takes_zero_to_one_images_as_the_package_takes_minus_one_to_one(no_network, random_alexnet_file):
    """The package's LPIPS is calibrated on [-1, 1] images; d4func's frames are [0, 1]. The distance must be the
    package's on 2x - 1, and must stay in eval mode (dropout off) whatever a caller's .train() says."""
    distance = make_lpips("alex", backbone_path=random_alexnet_file[0])
    x, y = rand_frames(2, 3, 32, 32), rand_frames(2, 3, 32, 32, seed=1)
    package = distance.lpips
    torch.testing.assert_close(distance(x, y), package(2 * x - 1, 2 * y - 1).flatten())
    distance.train()
    assert not distance.training and not package.training


def test_lpips_finds_weights_in_the_hub_cache(no_network, random_alexnet_file, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert find_backbone_weights("alex") is None
    cached = tmp_path / "hub" / "checkpoints" / BACKBONE_FILES["alex"]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(random_alexnet_file[0].read_bytes())
    assert find_backbone_weights("alex") == cached
    distance = make_lpips("alex")
    trunk = dict(distance.lpips.net.named_parameters())
    assert torch.equal(trunk["slice1.0.weight"], random_alexnet_file[1]["features.0.weight"])


def test_missing_lpips_weights_say_how_to_provide_them(no_network, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(LPIPSWeightsMissing, match=r"alexnet-owt-7be5be79\.pth.*lpips_backbone_path.*weight to 0"):
        make_lpips("alex")
    with pytest.raises(LPIPSWeightsMissing, match="lpips_backbone_path="):
        make_lpips("alex", backbone_path=tmp_path / "nope.pth")


def test_tokenizer_loss_with_real_lpips_module(no_network, random_alexnet_file):
    distance = make_lpips("alex", backbone_path=random_alexnet_file[0])
    cfg = tiny_cfg(height=32, width=32, patch_size=8)
    model, params = build(cfg)
    frames = rand_frames(1, 2, 3, 32, 32)
    loss_fn = partial(
        tokenizer_loss, template=model, cfg=TokenizerLossConfig(), loss_rms=init_loss_rms(LOSS_TERMS), lpips_fn=distance
    )
    grads, (loss, metrics) = grad_and_value(loss_fn, has_aux=True)(params, frames, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(1.2, rel=1e-5)
    assert metrics["lpips"] > 0 and metrics["loss_rms"]["lpips", "count"].item() == 1
    assert grads["decoder", "to_pixels", "weight"].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# Moving shapes
# ---------------------------------------------------------------------------------------------------------------


def test_moving_shapes_are_deterministic_per_seed_and_in_range():
    cfg = MovingShapesConfig(image_size=32, action_mode="continuous")
    frames, actions = moving_shapes_video(cfg, 6, 7)
    again, again_actions = moving_shapes_video(cfg, 6, torch.Generator().manual_seed(7))
    other, _ = moving_shapes_video(cfg, 6, 8)
    assert frames.shape == (6, 3, 32, 32) and actions.shape == (6, 2)
    assert torch.equal(frames, again) and torch.equal(actions, again_actions)
    assert not torch.equal(frames, other)
    assert frames.min() >= 0 and frames.max() <= 1 and actions.abs().max() <= 1
    assert not torch.equal(frames[0], frames[-1])  # things move
    batch, batch_actions = moving_shapes_batch(MovingShapesConfig(image_size=16, action_mode="discrete"), 3, 4, 0)
    assert batch.shape == (3, 4, 3, 16, 16) and batch_actions.shape == (3, 4, 5)
    assert torch.equal(batch_actions.sum(-1), torch.ones(3, 4))  # one-hot


def _controlled_centre(frames):
    """Centroid (x, y) per frame of the controlled shape's red core (alone in the frame), weighted by redness so
    that the anti-aliased edge makes it sub-pixel accurate."""
    red = (frames[:, 0] - frames[:, 1]).clamp_min(0.0)  # core R-G = 0.75; white ring and grey background: 0
    ys, xs = torch.meshgrid(torch.arange(frames.shape[-2]), torch.arange(frames.shape[-1]), indexing="ij")
    mass = red.sum((1, 2))
    return torch.stack(((red * xs).sum((1, 2)) / mass, (red * ys).sum((1, 2)) / mass), -1)


@pytest.mark.parametrize("mode", ["continuous", "discrete"])
def test_the_controlled_shape_follows_the_actions(mode):
    cfg = MovingShapesConfig(image_size=48, n_shapes=0, action_mode=mode, control_speed=0.05)
    step = cfg.control_speed * cfg.image_size
    right = torch.tensor([1.0, 0.0]) if mode == "continuous" else torch.eye(5)[4]
    up = torch.tensor([0.0, -1.0]) if mode == "continuous" else torch.eye(5)[1]
    still = torch.zeros(2) if mode == "continuous" else torch.eye(5)[0]
    actions = torch.stack([right, right, up, still, still])
    checked = 0
    for seed in range(3):
        frames, used = moving_shapes_video(cfg, 5, seed, actions=actions)
        assert torch.equal(used, actions)
        centre = _controlled_centre(frames)
        moves = centre[1:] - centre[:-1]  # moves[t] is the effect of actions[t]
        radius = 0.5 * (cfg.min_radius + cfg.max_radius) * cfg.image_size
        for t, (dx, dy) in enumerate([(step, 0.0), (step, 0.0), (0.0, -step), (0.0, 0.0)]):
            # Stopping at a wall shortens a move; away from the walls it is exact up to pixel rounding.
            clear = radius + step < centre[t, 0] < cfg.image_size - radius - step and centre[t, 1] > radius + step
            if clear:
                torch.testing.assert_close(moves[t], torch.tensor([dx, dy]), atol=0.05, rtol=0)
                checked += 1
    assert checked >= 6  # most moves happen away from the walls


def test_bouncing_shapes_never_leave_the_frame():
    cfg = MovingShapesConfig(image_size=32, n_shapes=1, max_speed=0.2)
    for seed in range(4):
        frames, _ = moving_shapes_video(cfg, 40, seed)
        mass = (frames - BACKGROUND).abs().sum((1, 2, 3))
        assert (mass.max() - mass.min()) / mass.mean() < 0.05  # the whole shape stays visible while bouncing
    random = random_actions(MovingShapesConfig(action_mode="continuous", action_repeat_prob=0.9), 50, 0)
    assert (random[1:] == random[:-1]).all(-1).float().mean() > 0.7  # sticky random policy


# ---------------------------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_overfits_moving_shapes_far_beyond_chance():
    """Threshold: PSNR >= 27 dB on its 4 training frames, and >= 10 dB above predicting their mean frame (16.9 dB).

    A constant guess (the mean frame) scores 16.9 dB and bicubic upsampling from the same 128 floats ~20 dB on such
    frames, so 27 dB needs the latents to carry where and what each shape is (measured: ~30.5 dB after 250 steps).
    """
    block = TransformerConfig(
        d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, mlp_ratio=2.0, time_every=2, logit_cap=None
    )
    cfg = TokenizerConfig(height=32, width=32, patch_size=4, n_latents=16, latent_dim=8, encoder=block, decoder=block)
    model, params = build(cfg)
    frames, _ = moving_shapes_batch(MovingShapesConfig(image_size=32), 2, 2, 0)
    mean_frame_psnr = psnr(frames.mean((0, 1), keepdim=True).expand_as(frames), frames).item()
    state = new_tokenizer_train_state(params, with_ema=False)
    loss_cfg = TokenizerLossConfig(lpips_weight=0.0, mask=False)
    for _ in range(250):
        state, _ = tokenizer_train_step(state, frames, None, template=model, cfg=loss_cfg, optim=AdamWConfig(lr=1e-3))
    metrics, _ = reconstruction_metrics(model, state["params"], frames)
    assert mean_frame_psnr < 18.0
    assert metrics["psnr"].item() >= 27.0
    assert metrics["psnr"].item() >= mean_frame_psnr + 10.0


# ---------------------------------------------------------------------------------------------------------------
# Training script
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_lpips", [False, True])
def test_train_script_runs_the_debug_config_and_writes_outputs(
    tmp_path, monkeypatch, no_network, random_alexnet_file, with_lpips
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no LPIPS weights in the cache
    script = load_experiment_script("train_tokenizer")
    lpips_args = ["loss.lpips_weight=0.2", f"loss.lpips_backbone_path={random_alexnet_file[0]}"] if with_lpips else []
    final = script.main(
        [
            "--config",
            str(ROOT / "experiments" / "configs" / "tokenizer_debug.yaml"),
            "steps=3",
            "log_every=2",
            "eval_clips=2",
            f"run_dir={tmp_path}",
            "run_name=smoke",
            *lpips_args,
        ]
    )
    run = tmp_path / "smoke"
    assert (run / "reconstructions.png").is_file() and (run / "checkpoint.pt").is_file()
    assert (run / "config.yaml").is_file()
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert int(checkpoint["step"]) == 3 and "loss_rms" in checkpoint
    assert int(checkpoint["loss_rms"]["lpips"]["count"]) == (3 if with_lpips else 0)
    scalars = {p.stem for p in (run / "scalars").glob("*.csv")}
    assert {"train_mse", "train_psnr", "eval_psnr"} <= scalars
    expected = {"eval_mse", "eval_psnr", "eval_latent_spread"} | ({"eval_lpips"} if with_lpips else set())
    assert set(final) == expected and ("train_lpips" in scalars) == with_lpips


def test_train_script_stops_with_instructions_when_lpips_weights_are_missing(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    script = load_experiment_script("train_tokenizer")
    config = str(ROOT / "experiments" / "configs" / "tokenizer_debug.yaml")
    with pytest.raises(SystemExit, match="alexnet-owt-7be5be79.pth.*loss.lpips_weight=0"):
        script.main(["--config", config, "loss.lpips_weight=0.2", f"run_dir={tmp_path}"])


def test_train_script_config_mismatch_is_reported():
    script = load_experiment_script("train_tokenizer")
    with pytest.raises(ValueError, match="moving shapes are 3x64x64"):
        load_config(
            script.TrainTokenizerConfig,
            str(ROOT / "experiments" / "configs" / "tokenizer_debug.yaml"),
            ["data.shapes.image_size=64"],
        )


def test_train_script_evaluates_the_ema_params_when_it_keeps_them(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    script = load_experiment_script("train_tokenizer")
    evaluated = []
    real_metrics = script.reconstruction_metrics

    def recording_metrics(model, params, *args, **kwargs):
        evaluated.append(params.clone())
        return real_metrics(model, params, *args, **kwargs)

    monkeypatch.setattr(script, "reconstruction_metrics", recording_metrics)
    script.main(["--config", str(ROOT / "experiments" / "configs" / "tokenizer_debug.yaml"), "steps=2", "log_every=2",
                 "eval_clips=2", "ema_decay=0.5", f"run_dir={tmp_path}", "run_name=ema"])
    saved = TensorDict(torch.load(tmp_path / "ema" / "checkpoint.pt", weights_only=True))
    final = evaluated[-1].flatten_keys()
    ema, params = saved["ema"].flatten_keys(), saved["params"].flatten_keys()
    assert all(torch.equal(final[key], ema[key]) for key in ema.keys())
    assert not all(torch.equal(ema[key], params[key]) for key in ema.keys())  # else the check above is void


def test_train_script_holds_out_the_last_dmc_episode(monkeypatch):
    script = load_experiment_script("train_tokenizer")
    cfg = load_config(script.TrainTokenizerConfig, str(ROOT / "experiments" / "configs" / "tokenizer_debug.yaml"),
                      ["data.source=dmc", "data.dmc_episodes=3", "data.dmc_episode_steps=6", "eval_clips=16"])
    # Episode e's frame t holds the value 100 e + t everywhere, so a clip tells where it came from.
    values = 100 * torch.arange(3.0)[:, None] + torch.arange(6.0)[None]
    monkeypatch.setattr(script, "record_dmc_episodes",
                        lambda _: values[:, :, None, None, None].expand(3, 6, 3, 32, 32).clone())
    sample, held_out = script.dmc_data(cfg)
    gen = torch.Generator().manual_seed(0)
    trained = torch.cat([sample(gen)[:, :, 0, 0, 0] for _ in range(20)])
    assert (trained // 100).unique().tolist() == [0, 1]
    assert (held_out[:, :, 0, 0, 0] // 100).unique().tolist() == [2]
    assert torch.all(trained[:, 1] - trained[:, 0] == 1)  # consecutive frames of one episode
    with pytest.raises(ValueError, match="dmc_episodes must be >= 2"):
        load_config(script.TrainTokenizerConfig, str(ROOT / "experiments" / "configs" / "tokenizer_debug.yaml"),
                    ["data.source=dmc", "data.dmc_episodes=1"])


def test_benchmark_smoke_writes_the_json_keys(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_tokenizer", ROOT / "benchmarks" / "tokenizer.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_tokenizer"] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "tokenizer.json"
    result = bench.main(["--steps", "2", "--held-out-clips", "2", "--threads", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert {"psnr_tokenizer", "psnr_bicubic_same_floats", "frames_per_s"} <= set(saved)
    assert saved == json.loads(json.dumps(result))
    # The baseline never gets more floats than the latents.
    assert saved["bicubic_floats_per_frame"] <= saved["latent_floats_per_frame"]
    assert bench.same_floats_size(64, 3, 64, 64) == (4, 5)


# ---------------------------------------------------------------------------------------------------------------
# Mutation audit (audit_k): bottleneck, masking symmetry, metrics' clamping, stored LPIPS statistics
# ---------------------------------------------------------------------------------------------------------------


def test_the_bottleneck_is_tanh_in_eval_and_in_masked_training():
    """With a zero bottleneck weight every latent is tanh(bias), hand-computed, in inference encoding and in masked
    (training) encoding alike: the tanh is part of the model, not a clamp and not a training-only squash."""
    cfg = tiny_cfg()
    model, params = build(cfg)
    params["encoder", "to_bottleneck", "weight"] = torch.zeros_like(params["encoder", "to_bottleneck", "weight"])
    bias = torch.linspace(-2.0, 2.0, cfg.latent_dim)
    params["encoder", "to_bottleneck", "bias"] = bias
    frames = rand_frames(2, 2, 3, 16, 16)
    expected = torch.tanh(bias).expand(2, 2, cfg.latent_tokens, cfg.latent_dim)
    torch.testing.assert_close(encode(model, params, frames), expected)
    masked, drop = encode_with_mask(model, params, frames, torch.Generator().manual_seed(0))
    assert drop.any()
    torch.testing.assert_close(masked, expected)


def test_a_mask_that_drops_nothing_changes_nothing():
    """MAE masking with max_mask_prob 0 draws p = 0 for every image, so no patch is dropped: the masked encoding
    (training path) must then equal the unmasked one (inference path) exactly, so training and inference differ
    only in the dropped patches (not, e.g., in a position or camera embedding or a squash applied on one path)."""
    for n_cameras in (1, 2):
        cfg = tiny_cfg(max_mask_prob=0.0, n_cameras=n_cameras)
        model, params = build(cfg, seed=2)
        shape = (2, 3, 3, 16, 16) if n_cameras == 1 else (2, 3, n_cameras, 3, 16, 16)
        frames = rand_frames(*shape, seed=4)
        masked, drop = encode_with_mask(model, params, frames, torch.Generator().manual_seed(1))
        assert not drop.any()
        torch.testing.assert_close(masked, encode(model, params, frames), atol=0.0, rtol=0.0)


def test_psnr_clamps_the_reconstruction_to_the_image_range():
    """PSNR (peak 1) of a reconstruction at 2.0 against a target at 0.5 is that of 1.0 against 0.5, i.e.
    10 log10(1 / 0.25) = 6.02 dB, not 10 log10(1 / 2.25) = -3.52 dB."""
    target = torch.full((2, 1, 3, 4, 4), 0.5)
    assert psnr(torch.full_like(target, 2.0), target).item() == pytest.approx(10 * math.log10(4.0), rel=1e-6)
    assert psnr(torch.full_like(target, -1.0), target).item() == pytest.approx(10 * math.log10(4.0), rel=1e-6)


def test_reconstruction_metrics_give_lpips_a_clamped_reconstruction():
    """LPIPS is defined on images in [0, 1]: the evaluation clamps the reconstruction before scoring it (while its
    MSE is that of the raw reconstruction)."""
    model, params = build(tiny_cfg())
    params["decoder", "to_pixels", "bias"] = torch.full_like(params["decoder", "to_pixels", "bias"], 3.0)
    frames = rand_frames(2, 2, 3, 16, 16)
    seen = []

    def fake_lpips(x, y):
        seen.append(x)
        return (x - y).abs().mean(dim=(1, 2, 3))

    metrics, recon = reconstruction_metrics(model, params, frames, lpips_fn=fake_lpips)
    assert recon.max() > 1.0  # the raw reconstruction leaves the range
    assert seen[0].min() >= 0.0 and seen[0].max() <= 1.0
    torch.testing.assert_close(metrics["lpips"], (recon.clamp(0, 1) - frames).abs().mean())
    torch.testing.assert_close(metrics["mse"], (recon - frames).square().mean())


def test_train_step_stores_the_lpips_statistics_too():
    """With LPIPS on, the train step's stored statistics advance for both terms: after one step each holds
    (1 - decay) L^2 with L the reported term and a count of 1 (a step that stored only the MSE statistics would
    leave the LPIPS normaliser at a single batch forever)."""
    model, params = build(tiny_cfg())
    state = new_tokenizer_train_state(params, with_ema=False)
    loss_cfg = TokenizerLossConfig(lpips_weight=0.2, rms_decay=0.9)

    def fake_lpips(x, y):
        return (x - y).abs().mean(dim=(1, 2, 3))

    state, metrics = tokenizer_train_step(state, rand_frames(2, 2, 3, 16, 16), torch.Generator().manual_seed(0),
                                          template=model, cfg=loss_cfg, optim=AdamWConfig(lr=1e-3),
                                          lpips_fn=fake_lpips)
    for name in ("mse", "lpips"):
        assert state["loss_rms", name, "count"].item() == 1, name
        assert state["loss_rms", name, "mean_sq"].item() == pytest.approx(0.1 * float(metrics[name]) ** 2, rel=1e-5)
