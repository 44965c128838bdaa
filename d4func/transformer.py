"""Block-causal transformer (paper Section 3.4) and the token layout of one timestep.

Tokens are `[B, T, N, D]`: T timesteps, N tokens per timestep drawn from several modalities (patches, latents,
actions, registers, agent tokens...). Two kinds of layer alternate:

* space layers attend within one timestep, over its N tokens, under a modality-aware mask (`TokenLayout`);
* time layers attend causally across timesteps at the same token position, once every `time_every` layers, with
  RoPE over time. Their keys and values can be cached so that step-by-step decoding equals one full pass.

Together they are block-causal: a token at timestep t reads only timesteps <= t.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from einops import rearrange, repeat
from tensordict import TensorDict
from torch import Tensor, nn

from d4func.config import TransformerConfig
from d4func.layers import Attention, RMSNorm, SwiGLU, modulate

# Space-mask modes. In each, the named modality is the special one:
#   "full"        every token reads every token of its timestep;
#   "encoder"     tokenizer encoder: "latents" read every modality, no other modality reads "latents";
#   "decoder"     tokenizer decoder: "latents" read only "latents", every other modality reads everything;
#   "world_model" dynamics: "agent" tokens read every modality, no other modality reads "agent" (paper Sec. 3.3).
SPACE_MODES = ("full", "encoder", "decoder", "world_model")


@dataclass(frozen=True)
class TokenLayout:
    """The ordered modalities of one timestep: `((name, count), ...)`."""

    modalities: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"TokenLayout modality names must be unique, got {names}")
        for name, count in self.modalities:
            if count < 1:
                raise ValueError(f"TokenLayout modality {name!r} needs a count >= 1, got {count}")

    @classmethod
    def of(cls, **counts: int) -> TokenLayout:
        """`TokenLayout.of(patches=64, latents=16)`; keyword order is token order."""
        return cls(tuple(counts.items()))

    @property
    def n_tokens(self) -> int:
        return sum(count for _, count in self.modalities)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.modalities)

    def slice(self, name: str) -> slice:
        """Positions of modality `name` within the timestep."""
        start = 0
        for other, count in self.modalities:
            if other == name:
                return slice(start, start + count)
            start += count
        raise KeyError(f"modality {name!r} is not in the layout {self.names}")

    def modality_index(self) -> Tensor:
        """`[N]` long: which modality (by order) each token belongs to."""
        return torch.cat([torch.full((count,), i) for i, (_, count) in enumerate(self.modalities)])

    def space_mask(self, mode: str, device: torch.device | str | None = None) -> Tensor:
        """Boolean `[N, N]` mask, True where the query token (row) may read the key token (column)."""
        return _space_mask(self, mode).to(device)


@lru_cache(maxsize=256)
def _space_mask(layout: TokenLayout, mode: str) -> Tensor:
    if mode not in SPACE_MODES:
        raise ValueError(f"unknown space mode {mode!r}; expected one of {SPACE_MODES}")
    special = {"full": None, "encoder": "latents", "decoder": "latents", "world_model": "agent"}[mode]
    n = layout.n_tokens
    if special is None or special not in layout.names:
        return torch.ones(n, n, dtype=torch.bool)
    is_special = torch.zeros(n, dtype=torch.bool)
    is_special[layout.slice(special)] = True
    query_special, key_special = is_special[:, None], is_special[None, :]
    if mode == "decoder":
        # latents read only latents (queries never leak into them); everything else reads everything.
        return ~query_special | key_special
    # encoder / world_model: the special tokens read everything; the others never read them.
    return query_special | ~key_special


def empty_cache(batch: int, device: torch.device | str | None = None) -> TensorDict:
    """A KV cache holding no timesteps yet: the next time position (0) and an empty validity mask."""
    return TensorDict(
        {"next_pos": torch.zeros(batch, dtype=torch.long), "valid": torch.zeros(batch, 0, dtype=torch.bool)},
        batch_size=[batch],
        device=device,
    )


def _map_steps(cache: TensorDict, index: slice) -> TensorDict:
    """Apply a slice along the time axis of every cached K/V (`[B, N, H_kv, T, Dh]`) and of `valid` (`[B, T]`)."""
    out = cache.exclude("next_pos", "valid").apply(lambda kv: kv[..., index, :])
    out["valid"] = cache["valid"][:, index]
    out["next_pos"] = cache["next_pos"]
    return out


def drop_last_steps(cache: TensorDict, n: int) -> TensorDict:
    """The cache without its last `n` timesteps (e.g. a frame that was only being denoised, not committed)."""
    if n == 0:
        return cache
    kept = _map_steps(cache, slice(None, -n))
    kept["next_pos"] = cache["next_pos"] - n
    return kept


def keep_last_steps(cache: TensorDict, n: int) -> TensorDict:
    """A sliding window: keep only the newest `n` cached timesteps (positions stay absolute; RoPE is relative).

    Every time attention then spans at most `n` steps plus those the next call brings (one per generated frame;
    the sampler's commit call brings two), so no query meets a time distance longer than the
    training rows showed. It is not a fresh encoding of those steps: with more than one time layer, a deeper
    layer's cached keys and values were computed when their step was new, from a window that reached further
    back, so older steps still reach the output through them (as in Transformer-XL), up to (time layers) x
    window steps back, and the first steps of a window carry more history than a training row's first steps.
    With one time layer (the tokenizers of the shipped `d4func train` configs) it is exact; the default
    `TokenizerConfig` (8 layers, time_every=4) has two."""
    if n < 0:
        raise ValueError(f"keep_last_steps needs n >= 0, got {n}")
    length = cache["valid"].shape[1]
    if length <= n:
        return cache
    return _map_steps(cache, slice(length - n, None))


def reset_cache(cache: TensorDict, reset: Tensor) -> TensorDict:
    """Forget every cached timestep of the batch entries where `reset` `[B]` is True (a new episode begins there):
    their keys are masked out of all later time attention."""
    out = cache.clone(recurse=False)
    out["valid"] = cache["valid"] & ~reset[:, None]
    return out


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    `modulation` (optional, `[4, ..., D]` broadcasting against `x`): FiLM scale and shift of the attention input
    and of the MLP input, `norm(x) * (1 + scale) + shift`, in that order."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(
            cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.qk_norm, cfg.logit_cap, cfg.rope_base, cfg.qk_norm_gain,
            zero_out=cfg.zero_init_residual,
        )
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, zero_out=cfg.zero_init_residual)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
        past_kv: tuple[Tensor, Tensor] | None = None,
        modulation: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        attn_in = self.attn_norm(x)
        if modulation is not None:
            attn_in = modulate(attn_in, modulation[0], modulation[1])
        attended, kv = self.attn(attn_in, positions, mask, is_causal, past_kv)
        x = x + attended
        mlp_in = self.mlp_norm(x)
        if modulation is not None:
            mlp_in = modulate(mlp_in, modulation[2], modulation[3])
        return x + self.mlp(mlp_in), kv


class BlockCausalTransformer(nn.Module):
    """Factorised space/time transformer over `[B, T, N, D]` tokens.

    `forward(x, space_mask, cache, modulation)` returns `(y, new_cache)`. `cache` is a TensorDict with batch size `[B]`
    holding, for every time layer, keys and values `[B, N, H_kv, T_past, head_dim]`, a `valid` mask `[B, T_past]`
    (False for steps forgotten by `reset_cache`) and the absolute time position `next_pos` of the next step;
    `empty_cache(batch)` makes one. With a cache, `x` holds only the new timesteps and the returned cache has them
    appended; without one, `new_cache` is None. `keep_last_steps` bounds the cache to a sliding window.
    `modulation` (optional, `[n_layers, 4, B, T, D]`) conditions every block on its timestep (`Block`): each token
    of step t gets step t's FiLM scales and shifts, so a per-step condition stays block-causal.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model)

    @property
    def time_layers(self) -> list[int]:
        return [i for i in range(self.cfg.n_layers) if self.cfg.is_time_layer(i)]

    def empty_cache(self, batch: int, device: torch.device | str | None = None) -> TensorDict:
        return empty_cache(batch, device)

    def forward(
        self,
        x: Tensor,
        space_mask: Tensor | None = None,
        cache: TensorDict | None = None,
        modulation: Tensor | None = None,
    ) -> tuple[Tensor, TensorDict | None]:
        if x.ndim != 4:
            raise ValueError(f"BlockCausalTransformer expects tokens [B, T, N, D], got shape {tuple(x.shape)}")
        batch, steps, n_tokens, _ = x.shape
        if space_mask is not None and space_mask.shape != (n_tokens, n_tokens):
            raise ValueError(
                f"space_mask shape {tuple(space_mask.shape)} does not match N={n_tokens} tokens per step"
            )
        expected = (self.cfg.n_layers, 4, batch, steps, x.shape[-1])
        if modulation is not None and tuple(modulation.shape) != expected:
            raise ValueError(f"modulation must be [n_layers, 4, B, T, D] = {list(expected)}, got "
                             f"{list(modulation.shape)}")
        start = 0 if cache is None else int(cache["next_pos"][0])
        time_pos = torch.arange(start, start + steps, device=x.device)
        space_pos = torch.arange(n_tokens, device=x.device)
        time_mask, causal = None, True
        if cache is not None:
            new_valid = torch.ones(batch, steps, dtype=torch.bool, device=x.device)
            valid = torch.cat([cache["valid"].to(x.device), new_valid], dim=1)
            if not bool(valid.all()):
                # Some batch entries forgot earlier steps (episode reset): causal mask and per-entry key validity.
                past = valid.shape[1] - steps
                causal_mask = torch.ones(steps, past + steps, dtype=torch.bool, device=x.device).tril(past)
                time_mask = repeat(causal_mask[None] & valid[:, None, :], "b q k -> (b n) 1 q k", n=n_tokens)
                causal = False
        new_entries = {}
        for index, layer in enumerate(self.layers):
            film = None if modulation is None else modulation[index]
            if not self.cfg.is_time_layer(index):
                flat = rearrange(x, "b t n d -> (b t) n d")
                if film is not None:
                    film = rearrange(film, "k b t d -> k (b t) 1 d")
                flat, _ = layer(flat, space_pos, mask=space_mask, modulation=film)
                x = rearrange(flat, "(b t) n d -> b t n d", b=batch)
                continue
            past_kv = None
            key = f"layer_{index}"
            if cache is not None and key in cache.keys():
                past_kv = tuple(rearrange(cache[key, name], "b n g t d -> (b n) g t d") for name in ("k", "v"))
            flat = rearrange(x, "b t n d -> (b n) t d")
            if film is not None:
                film = repeat(film, "k b t d -> k (b n) t d", n=n_tokens)
            flat, (k, v) = layer(flat, time_pos, mask=time_mask, is_causal=causal, past_kv=past_kv,
                                 modulation=film)
            x = rearrange(flat, "(b n) t d -> b t n d", b=batch)
            if cache is not None:
                new_entries[key] = {
                    "k": rearrange(k, "(b n) g t d -> b n g t d", b=batch),
                    "v": rearrange(v, "(b n) g t d -> b n g t d", b=batch),
                }
        y = self.final_norm(x)
        if cache is None:
            return y, None
        new_cache = TensorDict(
            {"next_pos": cache["next_pos"] + steps, "valid": valid, **new_entries}, batch_size=[batch],
            device=x.device,
        )
        return y, new_cache
