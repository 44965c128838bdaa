"""Local latent attention (d4func.latent_regions): block tiling of the patch grid, and the locality it gives the
tokenizer, checked against the paper's global attention, where the same perturbation reaches every latent."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d4func.config import TransformerConfig
from d4func.functional import init, template
from d4func.latent_regions import latent_grid, patch_regions
from d4func.tokenizer import Tokenizer, TokenizerConfig, decode, encode

# One space layer then one time layer: a latent depends only on the pixels its space attention reads, so locality
# is exact (masked keys get weight exactly 0).
BLOCK = TransformerConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, time_every=2, logit_cap=None)


def tokenizer(latent_attention: str) -> tuple[Tokenizer, object]:
    # 16x16 frames, 4x4 patches: a 4x4 patch grid; 4 latents in a 2x2 grid, each owning one 8x8-pixel quadrant.
    cfg = TokenizerConfig(
        height=16, width=16, channels=3, patch_size=4, n_latents=4, latent_dim=6,
        encoder=BLOCK, decoder=BLOCK, latent_attention=latent_attention,
    )  # fmt: skip
    model = template(Tokenizer, cfg)
    return model, init(model, 0)


def frames(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=60, deadline=None)
@given(grid_h=st.integers(1, 12), grid_w=st.integers(1, 12), n_latents=st.integers(1, 24))
def test_regions_tile_the_patch_grid_in_equal_rectangles(grid_h, grid_w, n_latents):
    try:
        rows, cols = latent_grid(grid_h, grid_w, n_latents)
    except ValueError as error:
        assert f"n_latents={n_latents}" in str(error) and f"{grid_h}x{grid_w}" in str(error)
        return
    assert rows * cols == n_latents and grid_h % rows == 0 and grid_w % cols == 0
    regions = patch_regions(grid_h, grid_w, n_latents).reshape(grid_h, grid_w)
    block_h, block_w = grid_h // rows, grid_w // cols
    for latent in range(n_latents):
        r, c = divmod(latent, cols)
        block = regions[r * block_h : (r + 1) * block_h, c * block_w : (c + 1) * block_w]
        assert (block == latent).all()
    assert torch.bincount(regions.flatten(), minlength=n_latents).tolist() == [block_h * block_w] * n_latents


def test_the_blocks_follow_the_grid_shape():
    assert latent_grid(8, 8, 16) == (4, 4)
    assert latent_grid(4, 8, 8) == (2, 4)  # wide grid, wide latent grid
    assert latent_grid(8, 8, 8) in {(2, 4), (4, 2)}


def test_config_rejects_latents_that_cannot_tile_and_unknown_modes():
    with pytest.raises(ValueError, match=r"n_latents=3 .*counts that fit: \[1, 2, 4, 8, 16\]"):
        TokenizerConfig(height=16, width=16, patch_size=4, n_latents=3, latent_attention="local")
    with pytest.raises(ValueError, match="'everywhere'"):
        TokenizerConfig(height=16, width=16, patch_size=4, n_latents=4, latent_attention="everywhere")
    TokenizerConfig(height=16, width=16, patch_size=4, n_latents=3)  # global attention takes any count


def changed_latents(latent_attention: str) -> torch.Tensor:
    """Which of the 4 latents move when only the top-left quadrant of the last frame changes: bool `[4]`."""
    model, params = tokenizer(latent_attention)
    clean = frames()
    dirty = clean.clone()
    dirty[:, -1, :, :8, :8] = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    before, after = encode(model, params, clean), encode(model, params, dirty)
    torch.testing.assert_close(before[:, :-1], after[:, :-1], rtol=0, atol=0)  # causal in time either way
    return (before[:, -1] - after[:, -1]).abs().amax(dim=(0, 2)) > 1e-6


def test_local_latents_read_only_their_own_block():
    assert changed_latents("local").tolist() == [True, False, False, False]


def test_global_latents_read_the_whole_frame():
    assert changed_latents("global").all()


@pytest.mark.parametrize("latent_attention", ["local", "global"])
def test_decoder_draws_each_block_from_its_own_latent_when_local(latent_attention):
    model, params = tokenizer(latent_attention)
    latents = encode(model, params, frames())
    moved = latents.clone()
    moved[:, :, 3] = -moved[:, :, 3]  # latent 3 owns the bottom-right quadrant
    change = (decode(model, params, latents) - decode(model, params, moved)).abs().amax(dim=(0, 1, 2))
    outside = change.clone()
    outside[8:, 8:] = 0
    assert change[8:, 8:].max() > 1e-4
    if latent_attention == "local":
        assert outside.max() == 0
    else:
        assert outside.max() > 1e-4


def test_space_mask_names_an_unknown_part():
    cfg = TokenizerConfig(height=16, width=16, patch_size=4, n_latents=4, latent_attention="local")
    with pytest.raises(ValueError, match="'world_model'"):
        cfg.space_mask("world_model")


def test_every_block_maps_to_its_own_latent_on_wide_frames_with_two_cameras():
    """16x32 frames, 4x4 patches: a 4x8 patch grid; 8 latents in a 2x4 grid, each owning a 2x2 block of patches
    (8x8 pixels) on its own camera. Every block, on either camera, moves exactly its latent, and each latent
    redraws exactly its block: this pins the raster order of patches, latents and cameras together."""
    cfg = TokenizerConfig(
        height=16, width=32, channels=3, patch_size=4, n_latents=8, latent_dim=6, n_cameras=2,
        encoder=BLOCK, decoder=BLOCK, latent_attention="local",
    )  # fmt: skip
    model = template(Tokenizer, cfg)
    params = init(model, 0)
    clean = torch.rand(1, 1, 2, 3, 16, 32, generator=torch.Generator().manual_seed(0))
    base = encode(model, params, clean)  # [1, 1, 2 cameras * 8 latents, Dz], camera-major
    base_frames = decode(model, params, base)
    for camera in range(2):
        for latent in range(8):
            row, col = divmod(latent, 4)
            rows, cols = slice(8 * row, 8 * row + 8), slice(8 * col, 8 * col + 8)
            dirty = clean.clone()
            dirty[..., camera, :, rows, cols] = 1.0 - dirty[..., camera, :, rows, cols]
            moved = (encode(model, params, dirty) - base).abs().amax(dim=(0, 1, 3)) > 1e-6
            expected = torch.zeros(16, dtype=torch.bool)
            expected[camera * 8 + latent] = True
            assert moved.tolist() == expected.tolist(), (camera, latent)

            shifted = base.clone()
            shifted[:, :, camera * 8 + latent] = -shifted[:, :, camera * 8 + latent]
            change = (decode(model, params, shifted) - base_frames).abs().amax(dim=(0, 1, 3))  # [cameras, H, W]
            assert change[camera, rows, cols].max() > 1e-4, (camera, latent)
            change[camera, rows, cols] = 0
            assert change.max() == 0, (camera, latent)
