"""Local latent attention for the tokenizer: each latent token owns one rectangular block of the patch grid.

The paper's tokenizer (Section 3.1) lets every latent token read every patch ("global"). On frames where a small
object moves over a static background (DMControl cartpole at 64x64: cart and pole cover about 3% of the pixels), a
freshly initialised latent is a near-uniform attention average over all patches, so different frames give almost the
same latents; the decoder then learns to ignore its latents and outputs the mean frame, a saddle that 2,000 updates
did not leave (docs/results.md, section 2). With "local" attention latent j reads only the patches of its block in
the encoder and the patch queries of block j read only latent j in the decoder, so a moving object changes its
block's latent directly. With one space layer per transformer (as in the shipped 64x64 configs) the tokenizer is
then a set of per-block autoencoders sharing weights; with more space layers, patches (encoder) and patch queries
(decoder) mix information across blocks before the latents read them and after.

The latents form an `lh x lw` grid with `lh * lw = n_latents`, `lh` dividing the patch grid's rows and `lw` its
columns; of the factorisations that fit, the one whose aspect ratio is closest to the patch grid's is used.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from einops import rearrange, repeat
from torch import Tensor

from d4func.transformer import TokenLayout

LATENT_ATTENTION = ("global", "local")
PARTS = ("encoder", "decoder")


def latent_grid(grid_h: int, grid_w: int, n_latents: int) -> tuple[int, int]:
    """`(lh, lw)`: how `n_latents` latents tile a `grid_h x grid_w` patch grid in equal rectangular blocks."""
    fits = [
        (rows, n_latents // rows)
        for rows in range(1, n_latents + 1)
        if n_latents % rows == 0 and grid_h % rows == 0 and grid_w % (n_latents // rows) == 0
    ]
    if not fits:
        counts = sorted({rows * cols for rows in _divisors(grid_h) for cols in _divisors(grid_w)})
        raise ValueError(
            f"n_latents={n_latents} cannot tile the {grid_h}x{grid_w} patch grid in equal blocks for "
            f"latent_attention='local': it must factor as rows x cols with rows dividing {grid_h} and cols "
            f"dividing {grid_w} (counts that fit: {counts}), or use latent_attention='global'"
        )
    aspect = math.log(grid_h / grid_w)
    return min(fits, key=lambda rows_cols: abs(math.log(rows_cols[0] / rows_cols[1]) - aspect))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def patch_regions(grid_h: int, grid_w: int, n_latents: int) -> Tensor:
    """`[grid_h * grid_w]` long: the latent that owns each patch (patches in raster order, as `patchify`)."""
    rows, cols = latent_grid(grid_h, grid_w, n_latents)
    block_h, block_w = grid_h // rows, grid_w // cols
    owner = rearrange(torch.arange(n_latents), "(r c) -> r c", r=rows)
    owner = repeat(owner, "r c -> (r bh) (c bw)", bh=block_h, bw=block_w)
    return rearrange(owner, "h w -> (h w)")


def local_patch_latent_mask(grid_h: int, grid_w: int, n_latents: int) -> Tensor:
    """Boolean `[P, n_latents]`, True where patch p lies in latent s's block."""
    regions = patch_regions(grid_h, grid_w, n_latents)
    return regions[:, None] == torch.arange(n_latents)[None, :]


@lru_cache(maxsize=64)
def local_space_mask(layout: TokenLayout, part: str, grid_h: int, grid_w: int) -> Tensor:
    """The tokenizer's `[N, N]` space mask for `part` ("encoder" or "decoder", which `TokenizerConfig.space_mask`
    checks) under local latent attention: the layout's mask with the latent-patch reads cut down to each latent's
    block. Built once per shape (CPU)."""
    owns = local_patch_latent_mask(grid_h, grid_w, dict(layout.modalities)["latents"])
    mask = layout.space_mask(part).clone()
    patches, latents = layout.slice("patches"), layout.slice("latents")
    if part == "encoder":
        mask[latents, patches] = owns.T  # latent j reads only its block's patches
    else:
        mask[patches, latents] = owns  # block j's patch queries read only latent j
    return mask
