"""Patchify / unpatchify: exact round trip, raster order, clear errors for sizes that do not tile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d4func.patches import check_patch_size, num_patches, patchify, unpatchify


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    channels=st.integers(1, 4),
    grid_h=st.integers(1, 5),
    grid_w=st.integers(1, 5),
    patch=st.integers(1, 6),
    seed=st.integers(0, 10_000),
)
def test_round_trip_over_sizes(lead, channels, grid_h, grid_w, patch, seed):
    height, width = grid_h * patch, grid_w * patch
    images = torch.rand(*lead, channels, height, width, generator=torch.Generator().manual_seed(seed))
    patches = patchify(images, patch)
    assert patches.shape == (*lead, grid_h * grid_w, patch * patch * channels)
    assert patches.shape[-2] == num_patches(height, width, patch)
    assert torch.equal(unpatchify(patches, patch, height, width), images)


def test_patches_are_raster_ordered_blocks():
    images = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)  # C=2, H=4, W=6
    patches = patchify(images, 2)  # 2 x 3 grid of 2x2 patches
    # Patch 4 is row 1, column 1: pixels rows 2-3, columns 2-3, flattened as (row, column, channel).
    block = images[:, 2:4, 2:4]
    assert torch.equal(patches[4], block.permute(1, 2, 0).reshape(-1))


@pytest.mark.parametrize(("height", "width", "patch"), [(64, 64, 6), (30, 32, 4), (16, 12, 8)])
def test_sizes_that_do_not_tile_fail_with_the_bad_value(height, width, patch):
    with pytest.raises(ValueError, match=rf"patch_size={patch} does not tile.*height={height}.*width={width}"):
        check_patch_size(height, width, patch)
    with pytest.raises(ValueError, match=rf"patch_size={patch}"):
        patchify(torch.zeros(3, height, width), patch)


def test_unpatchify_rejects_the_wrong_patch_count():
    with pytest.raises(ValueError, match="got 3 patches.*has 4"):
        unpatchify(torch.zeros(3, 12), 2, 4, 4)


def test_non_positive_patch_size_is_rejected():
    with pytest.raises(ValueError, match="patch_size must be >= 1, got 0"):
        check_patch_size(8, 8, 0)


@pytest.mark.parametrize(("height", "width"), [(0, 8), (8, 0), (-4, 8)])
def test_empty_images_are_rejected_naming_the_size(height, width):
    # 0 is divisible by every patch size: without its own check an empty image would "tile" with 0 patches.
    with pytest.raises(ValueError, match=rf"image size must be positive, got height={height}, width={width}"):
        num_patches(height, width, 4)


def test_inputs_of_the_wrong_rank_or_patch_dim_are_rejected_with_their_shape():
    with pytest.raises(ValueError, match=r"patchify expects images \[..., C, H, W\], got shape \(8, 8\)"):
        patchify(torch.zeros(8, 8), 4)
    with pytest.raises(ValueError, match=r"got shape \(12,\)"):
        unpatchify(torch.zeros(12), 2, 4, 4)
    with pytest.raises(ValueError, match=r"patch dim 10, which is not a multiple of patch_size\*\*2=4"):
        unpatchify(torch.zeros(4, 10), 2, 4, 4)
