"""Images to non-overlapping square patches and back (paper Section 3.1: the tokenizer reads patch tokens).

Images are `[..., C, H, W]`; patches are `[..., P, p*p*C]` with P = (H/p)·(W/p) in raster order (row by row) and
each patch flattened as (row, column, channel). Any number of leading axes (batch, time, camera) pass through.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor


def check_patch_size(height: int, width: int, patch_size: int) -> None:
    """Raise a ValueError naming the bad value unless `patch_size` tiles a `height` x `width` image exactly."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"patch_size={patch_size} does not tile the image: height={height} and width={width} must both be "
            f"divisible by it (remainders {height % patch_size} and {width % patch_size}); pick a patch size that "
            "divides both, e.g. 8 or 4 for 64x64, 16 for 224x224"
        )


def num_patches(height: int, width: int, patch_size: int) -> int:
    """Patches per image, P = (H/p)·(W/p)."""
    check_patch_size(height, width, patch_size)
    return (height // patch_size) * (width // patch_size)


def patch_dim(channels: int, patch_size: int) -> int:
    """Floats per patch, p·p·C."""
    return patch_size * patch_size * channels


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """`[..., C, H, W]` -> `[..., P, p*p*C]`."""
    if images.ndim < 3:
        raise ValueError(f"patchify expects images [..., C, H, W], got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    check_patch_size(height, width, patch_size)
    return rearrange(images, "... c (gh p) (gw q) -> ... (gh gw) (p q c)", p=patch_size, q=patch_size)


def unpatchify(patches: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """`[..., P, p*p*C]` -> `[..., C, H, W]`, the inverse of `patchify`."""
    check_patch_size(height, width, patch_size)
    if patches.ndim < 2:
        raise ValueError(f"unpatchify expects patches [..., P, p*p*C], got shape {tuple(patches.shape)}")
    expected = num_patches(height, width, patch_size)
    n, dim = patches.shape[-2:]
    if n != expected:
        raise ValueError(
            f"unpatchify got {n} patches but a {height}x{width} image with patch_size={patch_size} has {expected}"
        )
    if dim % (patch_size * patch_size):
        raise ValueError(
            f"unpatchify got patch dim {dim}, which is not a multiple of patch_size**2={patch_size * patch_size}"
        )
    return rearrange(
        patches,
        "... (gh gw) (p q c) -> ... c (gh p) (gw q)",
        gh=height // patch_size,
        p=patch_size,
        q=patch_size,
    )
