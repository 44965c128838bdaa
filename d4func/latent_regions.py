"""Local latent attention for the tokenizer: each latent token owns one rectangular block of the patch grid.

The paper's tokenizer (Section 3.1) lets every latent token read every patch ("global"). On frames where a small
object moves over a static background (DMControl cartpole at 64x64: cart and pole cover 2.7% of the pixels), a
freshly initialised latent is a near-uniform attention average over all patches, so different frames give almost the
same latents (spread 1.8e-4); the decoder then learns to ignore its latents and outputs the mean frame, a saddle
that 2,000 updates did not leave (docs/results.md, section 2). With "local" attention latent j reads only the patches
of its block in the encoder and the patch queries of block j read only latent j in the decoder, so a moving object
changes its block's latent directly. Patches still read all patches (encoder) and patch queries all patch queries
(decoder), so information still travels across the image.

The latents form an `lh x lw` grid with `lh * lw = n_latents`, `lh` dividing the patch grid's rows and `lw` its
columns; of the factorisations that fit, the one whose aspect ratio is closest to the patch grid's is used.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from einops import rearrange, repeat
from torch import Tensor

LATENT_ATTENTION = ("global", "local")


def latent_grid(grid_h: int, grid_w: int, n_latents: int) -> tuple[int, int]:
    """`(lh, lw)`: how `n_latents` latents tile a `grid_h x grid_w` patch grid in equal rectangular blocks."""
    fits = [
        (rows, n_latents // rows)
        for rows in range(1, n_latents + 1)
        if n_latents % rows == 0 and grid_h % rows == 0 and grid_w % (n_latents // rows) == 0
    ]
    if not fits:
        raise ValueError(
            f"n_latents={n_latents} cannot tile the {grid_h}x{grid_w} patch grid in equal blocks for "
            "latent_attention='local': it must factor as rows x cols with rows dividing "
            f"{grid_h} and cols dividing {grid_w} (e.g. n_latents={grid_h * grid_w // 4} with 2x2 patches per "
            "latent), or use latent_attention='global'"
        )
    aspect = math.log(grid_h / grid_w)
    return min(fits, key=lambda rows_cols: abs(math.log(rows_cols[0] / rows_cols[1]) - aspect))


def patch_regions(grid_h: int, grid_w: int, n_latents: int) -> Tensor:
    """`[grid_h * grid_w]` long: the latent that owns each patch (patches in raster order, as `patchify`)."""
    rows, cols = latent_grid(grid_h, grid_w, n_latents)
    block_h, block_w = grid_h // rows, grid_w // cols
    owner = rearrange(torch.arange(n_latents), "(r c) -> r c", r=rows)
    owner = repeat(owner, "r c -> (r bh) (c bw)", bh=block_h, bw=block_w)
    return rearrange(owner, "h w -> (h w)")


@lru_cache(maxsize=64)
def local_patch_latent_mask(grid_h: int, grid_w: int, n_latents: int) -> Tensor:
    """Boolean `[P, n_latents]`, True where patch p lies in latent s's block."""
    regions = patch_regions(grid_h, grid_w, n_latents)
    return regions[:, None] == torch.arange(n_latents)[None, :]
