"""Causal tokenizer: video frames to continuous latents and back (paper Section 3.1; plan Module 2).

Encoder: patchify -> linear patch embedding (+ learned patch position and camera embeddings) -> MAE masking
(each image draws a drop probability p ~ U(0, max_mask_prob), 0.9 in the paper, and each of its patches is replaced
by a learned mask token with probability p; no masking at inference) -> learned latent tokens appended -> block-causal
transformer in "encoder" space mode (latents read every patch, patches never read latents) -> linear projection to
the bottleneck width -> tanh, so every latent lies in [-1, 1].

Decoder: latents projected up (+ learned latent position embedding) -> learned patch queries (+ camera embedding)
appended -> block-causal transformer in "decoder" space mode (latents read only latents, so the queries never leak
into them; queries read everything) -> linear to patch pixels -> unpatchify.

Time layers are causal, so the latents of frame t depend on frames <= t only: the tokenizer can encode a live
stream frame by frame.

`latent_attention="local"` (not the paper's default) gives each latent one block of the patch grid: it reads only
those patches in the encoder, and only that block's patch queries read it in the decoder (`d4func.latent_regions`).
Latents still read each other, and with more than one space layer patches mix across blocks, so only with one space
layer per transformer (every shipped config) is each latent strictly its own block's.

Multi-camera: every camera runs through the same weights as its own stream (cameras are folded into the batch), told
apart by a learned camera embedding added to its patch tokens and its decoder queries. The per-camera latents are
concatenated along the spatial token axis, camera-major, for the dynamics model: `[B, T, n_cams * S, Dz]`.

Shapes: frames `[B, T, C, H, W]` float in [0, 1] (`[B, T, n_cams, C, H, W]` when `n_cameras > 1`); latents
`[B, T, S_total, Dz]` with `S_total = n_cameras * n_latents`. Call through `d4func.functional.apply` or the functions
`encode`, `decode`, `autoencode` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange, repeat
from tensordict import TensorDict, TensorDictBase
from torch import Tensor, nn

from d4func.config import TransformerConfig
from d4func.functional import apply, runs_value_checks
from d4func.latent_regions import LATENT_ATTENTION, PARTS, latent_grid, local_space_mask
from d4func.patches import check_patch_size, num_patches, patch_dim, patchify, unpatchify
from d4func.transformer import BlockCausalTransformer, TokenLayout, empty_cache, keep_last_steps

_EMBED_STD = 0.02  # learned embeddings start small so they do not swamp the patch embedding


def _default_transformer() -> TransformerConfig:
    return TransformerConfig(d_model=256, n_layers=8, n_heads=8, n_kv_heads=8, time_every=4)


@dataclass(frozen=True)
class TokenizerConfig:
    """Causal tokenizer. Per camera: `n_latents` bottleneck tokens of width `latent_dim`."""

    height: int = 64
    width: int = 64
    channels: int = 3
    patch_size: int = 8  # paper: 16 for 224x224; 8 or 4 for 64x64
    n_latents: int = 16
    latent_dim: int = 16
    n_cameras: int = 1
    max_mask_prob: float = 0.9  # MAE: per image p ~ U(0, max_mask_prob) (paper: 0.9)
    # "global": every latent reads every patch (paper). "local": latent j reads only its block of patches and the
    # decoder's patch queries of block j read only latent j (d4func.latent_regions explains when this matters).
    latent_attention: str = "global"
    encoder: TransformerConfig = field(default_factory=_default_transformer)
    decoder: TransformerConfig = field(default_factory=_default_transformer)

    def __post_init__(self) -> None:
        for name in ("height", "width", "channels", "patch_size", "n_latents", "latent_dim", "n_cameras"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TokenizerConfig.{name} must be an integer >= 1, got {value!r}")
        try:
            check_patch_size(self.height, self.width, self.patch_size)
        except ValueError as error:
            raise ValueError(f"TokenizerConfig: {error}") from None
        if not 0.0 <= self.max_mask_prob < 1.0:
            raise ValueError(f"TokenizerConfig.max_mask_prob must lie in [0, 1), got {self.max_mask_prob}")
        if self.latent_attention not in LATENT_ATTENTION:
            raise ValueError(
                f"TokenizerConfig.latent_attention must be one of {LATENT_ATTENTION}, got {self.latent_attention!r}"
            )
        if self.latent_attention == "local":
            try:
                latent_grid(*self.patch_grid, self.n_latents)
            except ValueError as error:
                raise ValueError(f"TokenizerConfig: {error}") from None

    @property
    def n_patches(self) -> int:
        return num_patches(self.height, self.width, self.patch_size)

    @property
    def patch_dim(self) -> int:
        return patch_dim(self.channels, self.patch_size)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patch rows and columns of one image."""
        return self.height // self.patch_size, self.width // self.patch_size

    @property
    def latent_tokens(self) -> int:
        """Spatial latent tokens per timestep handed to the dynamics model (all cameras)."""
        return self.n_cameras * self.n_latents

    @property
    def compression_ratio(self) -> float:
        """Input floats / latent floats (per timestep; the same per camera)."""
        return (self.channels * self.height * self.width) / (self.n_latents * self.latent_dim)

    @property
    def layout(self) -> TokenLayout:
        """Tokens of one camera at one timestep, in both encoder and decoder."""
        return TokenLayout.of(patches=self.n_patches, latents=self.n_latents)

    def space_mask(self, part: str, device: torch.device | str | None = None) -> Tensor:
        """Boolean `[N, N]` space mask of the `part` ("encoder" or "decoder"), True where a query may read a key.

        "global": the layout's mask (latents read every patch in the encoder; patch queries read every latent in
        the decoder). "local" further restricts those latent-patch reads to each latent's own block.
        """
        if part not in PARTS:
            raise ValueError(f"TokenizerConfig.space_mask part must be one of {PARTS}, got {part!r}")
        if self.latent_attention == "global":
            return self.layout.space_mask(part, device=device)
        return local_space_mask(self.layout, part, *self.patch_grid).to(device)


def mae_drop_mask(
    shape: tuple[int, ...], max_prob: float, generator: torch.Generator, device: torch.device | str | None = None
) -> Tensor:
    """MAE patch dropping (paper Section 3.1): bool `shape` = `[..., P]`, True where a patch is dropped.

    Each image (all leading axes) draws its own drop probability p ~ U(0, max_prob); each of its P patches is then
    dropped independently with probability p. All randomness comes from `generator`.
    """
    if not 0.0 <= max_prob < 1.0:
        raise ValueError(f"max_prob must lie in [0, 1), got {max_prob}")
    if len(shape) < 1:
        raise ValueError(f"mae_drop_mask needs a shape [..., P], got {shape}")
    probs = torch.rand(shape[:-1], generator=generator, device=generator.device) * max_prob
    uniform = torch.rand(shape, generator=generator, device=generator.device)
    return (uniform < probs[..., None]).to(device if device is not None else generator.device)


class TokenizerEncoder(nn.Module):
    """Patches (+ mask tokens) and learned latent tokens -> transformer ("encoder" mode) -> tanh bottleneck."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.encoder.d_model
        self.patch_embed = nn.Linear(cfg.patch_dim, dim)
        self.patch_pos = nn.Parameter(torch.empty(cfg.n_patches, dim))
        self.camera_embed = nn.Parameter(torch.empty(cfg.n_cameras, dim))
        self.mask_token = nn.Parameter(torch.empty(dim))
        self.latent_tokens = nn.Parameter(torch.empty(cfg.n_latents, dim))
        self.transformer = BlockCausalTransformer(cfg.encoder)
        self.to_bottleneck = nn.Linear(dim, cfg.latent_dim)

    def reset_parameters(self) -> None:
        # Only this module's own parameters; the Linear children reset themselves (functional.init visits each).
        for param in (self.patch_pos, self.camera_embed, self.mask_token, self.latent_tokens):
            nn.init.normal_(param, std=_EMBED_STD)

    def forward(self, frames: Tensor, drop: Tensor | None = None) -> Tensor:
        """frames `[B, T, K, C, H, W]`, drop bool `[B, T, K, P]` or None -> latents `[B, T, K, S, Dz]`."""
        return self.encode_cached(frames, drop, None)[0]

    def encode_cached(
        self, frames: Tensor, drop: Tensor | None, cache: TensorDict | None
    ) -> tuple[Tensor, TensorDict | None]:
        """As `forward`, continuing from the time layers' KV `cache` (batch `[B * K]`) when one is given: frames
        then hold only the new timesteps (frame-by-frame encoding while acting)."""
        cfg = self.cfg
        batch = frames.shape[0]
        tokens = self.patch_embed(patchify(frames, cfg.patch_size).to(self.patch_embed.weight.dtype))
        if drop is not None:
            # MAE: dropped patches are replaced by the learned mask token before position/camera embeddings, so
            # the encoder still knows where (and on which camera) the missing patch was.
            tokens = torch.where(drop[..., None], self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + self.patch_pos + self.camera_embed[:, None, :]
        latents = repeat(self.latent_tokens, "s d -> b t k s d", b=batch, t=frames.shape[1], k=cfg.n_cameras)
        latents = latents + self.camera_embed[:, None, :]
        x = rearrange(torch.cat((tokens, latents), dim=-2), "b t k n d -> (b k) t n d")
        y, cache = self.transformer(x, space_mask=cfg.space_mask("encoder", device=x.device), cache=cache)
        z = torch.tanh(self.to_bottleneck(y[:, :, cfg.layout.slice("latents")]))
        return rearrange(z, "(b k) t s z -> b t k s z", b=batch), cache


class TokenizerDecoder(nn.Module):
    """Latents projected up and learned patch queries -> transformer ("decoder" mode) -> patch pixels."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.decoder.d_model
        self.latent_proj = nn.Linear(cfg.latent_dim, dim)
        self.latent_pos = nn.Parameter(torch.empty(cfg.n_latents, dim))
        self.patch_queries = nn.Parameter(torch.empty(cfg.n_patches, dim))
        self.camera_embed = nn.Parameter(torch.empty(cfg.n_cameras, dim))
        self.transformer = BlockCausalTransformer(cfg.decoder)
        self.to_pixels = nn.Linear(dim, cfg.patch_dim)

    def reset_parameters(self) -> None:
        for param in (self.latent_pos, self.patch_queries, self.camera_embed):
            nn.init.normal_(param, std=_EMBED_STD)

    def forward(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """latents `[B, T, K, S, Dz]` -> (patch pixels `[B, T, K, P, p*p*C]`, hidden tokens `[B, T, K, N, D]`)."""
        cfg = self.cfg
        batch, steps = latents.shape[:2]
        lat = self.latent_proj(latents.to(self.latent_proj.weight.dtype)) + self.latent_pos
        lat = lat + self.camera_embed[:, None, :]
        queries = repeat(self.patch_queries, "p d -> b t k p d", b=batch, t=steps, k=cfg.n_cameras)
        queries = queries + self.camera_embed[:, None, :]
        x = rearrange(torch.cat((queries, lat), dim=-2), "b t k n d -> (b k) t n d")
        y, _ = self.transformer(x, space_mask=cfg.space_mask("decoder", device=x.device))
        pixels = self.to_pixels(y[:, :, cfg.layout.slice("patches")])
        return (
            rearrange(pixels, "(b k) t p c -> b t k p c", b=batch),
            rearrange(y, "(b k) t n d -> b t k n d", b=batch),
        )


class Tokenizer(nn.Module):
    """Encoder + decoder sharing one config. `forward(x, mode=...)`:

    * `"encode"`: frames -> `(latents [B, T, S_total, Dz], drop)`, drop bool `[B, T, n_cams, P]` or None;
    * `"decode"`: latents -> `(frames, hidden)`, hidden the decoder's final tokens `[B, T, n_cams, N, D]`;
    * `"autoencode"`: frames -> `(reconstruction, latents, drop)`.

    `mask=True` turns on MAE patch dropping, drawn from `generator` (required then).
    """

    MODES = ("encode", "decode", "autoencode", "encode_step")

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = TokenizerEncoder(cfg)
        self.decoder = TokenizerDecoder(cfg)

    def forward(
        self,
        x: Tensor,
        mode: str = "autoencode",
        generator: torch.Generator | None = None,
        mask: bool = False,
        cache: TensorDict | None = None,
    ) -> tuple[Tensor, ...]:
        if mode not in self.MODES:
            raise ValueError(f"unknown Tokenizer mode {mode!r}; expected one of {self.MODES}")
        if mode == "decode":
            return self._decode(x)
        if mode == "encode_step":
            return self._encode_step(x, cache)
        latents, drop = self._encode(x, generator, mask)
        if mode == "encode":
            return latents, drop
        recon, _ = self._decode(latents)
        return recon, latents, drop

    def _encode(self, frames: Tensor, generator: torch.Generator | None, mask: bool) -> tuple[Tensor, Tensor | None]:
        cams = self._frames_to_cams(frames)
        drop = None
        if mask:
            if generator is None:
                raise ValueError("mask=True needs an explicit torch.Generator for the MAE drop pattern")
            shape = (*cams.shape[:3], self.cfg.n_patches)
            drop = mae_drop_mask(shape, self.cfg.max_mask_prob, generator, device=cams.device)
        z = self.encoder(cams, drop)
        return rearrange(z, "b t k s z -> b t (k s) z"), drop

    def _encode_step(self, frames: Tensor, cache: TensorDict | None) -> tuple[Tensor, TensorDict]:
        cams = self._frames_to_cams(frames)
        if cache is None:
            cache = empty_cache(cams.shape[0] * self.cfg.n_cameras, cams.device)
        z, cache = self.encoder.encode_cached(cams, None, cache)
        return rearrange(z, "b t k s z -> b t (k s) z"), cache

    def _decode(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        if latents.ndim != 4 or latents.shape[-2:] != (cfg.latent_tokens, cfg.latent_dim):
            raise ValueError(
                f"latents must be [B, T, {cfg.latent_tokens}, {cfg.latent_dim}] (n_cameras * n_latents tokens of "
                f"latent_dim), got shape {tuple(latents.shape)}"
            )
        z = rearrange(latents, "b t (k s) z -> b t k s z", k=cfg.n_cameras)
        pixels, hidden = self.decoder(z)
        frames = unpatchify(pixels, cfg.patch_size, cfg.height, cfg.width)
        if cfg.n_cameras == 1:
            frames = frames[:, :, 0]
        return frames, hidden

    def _frames_to_cams(self, frames: Tensor) -> Tensor:
        """Validate and return `[B, T, K, C, H, W]`."""
        cfg = self.cfg
        image = (cfg.channels, cfg.height, cfg.width)
        if cfg.n_cameras == 1:
            if frames.ndim != 5 or tuple(frames.shape[2:]) != image:
                raise ValueError(f"frames must be [B, T, {', '.join(map(str, image))}], got {tuple(frames.shape)}")
            frames = frames[:, :, None]
        elif frames.ndim != 6 or tuple(frames.shape[2:]) != (cfg.n_cameras, *image):
            raise ValueError(
                f"frames must be [B, T, n_cams={cfg.n_cameras}, {', '.join(map(str, image))}], "
                f"got {tuple(frames.shape)}"
            )
        if not frames.is_floating_point():
            raise TypeError(f"frames must be a float tensor in [0, 1], got dtype {frames.dtype}")
        if not runs_value_checks(frames):
            return frames
        in_range = (frames >= 0.0) & (frames <= 1.0)  # False for NaN too
        if not bool(in_range.all()):
            bad = frames[~in_range].flatten()[0].item()
            raise ValueError(f"frames must lie in [0, 1] (uint8 images need / 255), got a value {bad}")
        return frames


# --------------------------------------------------------------------------------------------------------------
# Functional entry points
# --------------------------------------------------------------------------------------------------------------


def encode(
    template: Tokenizer,
    params: TensorDictBase,
    frames: Tensor,
    generator: torch.Generator | None = None,
    mask: bool = False,
) -> Tensor:
    """frames -> latents `[B, T, n_cameras * n_latents, latent_dim]` in [-1, 1]."""
    latents, _ = apply(template, params, frames, mode="encode", generator=generator, mask=mask)
    return latents


def encode_with_mask(
    template: Tokenizer, params: TensorDictBase, frames: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Masked encoding that also returns the MAE drop pattern, bool `[B, T, n_cams, P]`."""
    return apply(template, params, frames, mode="encode", generator=generator, mask=True)


def encode_step(
    template: Tokenizer, params: TensorDictBase, frames: Tensor, cache: TensorDict | None = None
) -> tuple[Tensor, TensorDict]:
    """Encode new frames `[B, t, ...]` after those already in `cache` (None: start afresh) -> (latents, cache).

    The tokenizer is causal in time, so encoding a video frame by frame with the cache equals encoding it at once;
    the cache's batch is `B * n_cameras` (use `d4func.transformer.reset_cache` / `keep_last_steps` on it).
    """
    return apply(template, params, frames, mode="encode_step", cache=cache)


def encode_windowed(template: Tokenizer, params: TensorDictBase, frames: Tensor, window: int | None) -> Tensor:
    """frames -> latents as the acting policy encodes them: frame by frame, each beside at most `window - 1`
    earlier ones (the KV cache cut with `keep_last_steps`), so clips longer than a training row are read as the
    policy reads them. `window=None`, or a clip no longer than `window`, encodes at once (the same latents)."""
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 frame or None, got {window}")
    if window is None or frames.shape[1] <= window:
        return encode(template, params, frames)
    cache, latents = None, []
    for t in range(frames.shape[1]):
        step_latents, cache = encode_step(template, params, frames[:, t:t + 1], cache)
        cache = keep_last_steps(cache, window - 1)
        latents.append(step_latents)
    return torch.cat(latents, dim=1)


def decode(template: Tokenizer, params: TensorDictBase, latents: Tensor) -> Tensor:
    """latents `[B, T, S_total, Dz]` -> frames `[B, T, C, H, W]` (`[B, T, n_cams, C, H, W]` for several cameras)."""
    frames, _ = apply(template, params, latents, mode="decode")
    return frames


def autoencode(
    template: Tokenizer,
    params: TensorDictBase,
    frames: Tensor,
    generator: torch.Generator | None = None,
    mask: bool = False,
) -> tuple[Tensor, Tensor]:
    """frames -> (reconstruction, latents); `mask=True` (training) applies MAE dropping drawn from `generator`."""
    recon, latents, _ = apply(template, params, frames, mode="autoencode", generator=generator, mask=mask)
    return recon, latents
