"""Typed, frozen configs. A bad value fails at construction with a message that names the field.

The configs are plain frozen dataclasses so that OmegaConf can merge YAML files and `key=value` command-line
overrides into them (`load_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf

C = TypeVar("C")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class TransformerConfig:
    """Block-causal transformer (paper Section 3.4)."""

    d_model: int = 256
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 8  # GQA: n_kv_heads divides n_heads; n_kv_heads == n_heads is plain multi-head attention
    mlp_ratio: float = 4.0
    time_every: int = 4  # every Nth layer attends across time (paper: once every 4 layers)
    qk_norm: bool = True
    logit_cap: float | None = 50.0  # attention-logit soft-cap; None disables it (and enables fused SDPA)
    rope_base: float = 10_000.0
    # Initial gain of the q and k RMS norms (qk_norm only). With unit gains a logit is sqrt(head_dim) * cos(q, k),
    # at most 4.9 for head_dim 24, and the gains grow slowly (cartpole: +0.05 in 3.6k steps). 1.0 is the usual
    # initialisation; 2.0 did not help the cartpole dynamics carry its last frame forward (docs/results.md, Sec. 2).
    qk_norm_gain: float = 1.0
    # Not in the paper: start every block's two residual branches at zero (the attention's output projection and the
    # MLP's down projection), so that each block begins as the identity and the stack as a shallow net whose depth
    # training opens (Fixup, Zhang et al. 2019, zeroes each residual branch's last layer; DiT's adaLN-Zero does the
    # same through its conditioning). The other weights are drawn as without it, so the same seed gives the same model
    # but for those. Measured on synthetic latents (`experiments/reward_readout_probe.py`, reward term alone): the
    # reward head of a 4-layer dynamics leaves the best constant on every seed of 4 within 2,000 updates (R^2
    # 0.33-0.69 there, mean 0.51; two seeds by 500), where with the default start one seed of 4 did (mean 0.06).
    # Beside the dynamics and BC terms (the full phase-2 objective) it did not: 2 seeds of 2 still at the constant
    # after 2,000 updates, as with the default start (docs/results.md, Sec. 2). Next-frame learning is unchanged
    # (`dynamics_copy_probe.py`).
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        _require(self.qk_norm_gain > 0, f"TransformerConfig.qk_norm_gain must be > 0, got {self.qk_norm_gain}")
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "time_every"):
            _require(getattr(self, name) >= 1, f"TransformerConfig.{name} must be >= 1, got {getattr(self, name)}")
        _require(
            self.d_model % self.n_heads == 0,
            f"TransformerConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}",
        )
        _require(
            self.n_heads % self.n_kv_heads == 0,
            f"TransformerConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}",
        )
        _require(
            (self.d_model // self.n_heads) % 2 == 0,
            f"TransformerConfig head_dim = d_model / n_heads = {self.d_model // self.n_heads} must be even (RoPE)",
        )
        _require(
            self.n_layers >= self.time_every,
            f"TransformerConfig.n_layers={self.n_layers} < time_every={self.time_every} leaves no layer attending "
            "across time (a model blind to its history): lower time_every or add layers",
        )
        _require(
            self.time_every >= 2,
            f"TransformerConfig.time_every={self.time_every} makes every layer a time layer, so no layer attends "
            "within a frame (latents would never read their patches): use time_every >= 2 (the paper's is 4)",
        )
        _require(self.mlp_ratio > 0, f"TransformerConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        _require(
            self.logit_cap is None or self.logit_cap > 0,
            f"TransformerConfig.logit_cap must be positive or None, got {self.logit_cap}",
        )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.d_model * self.mlp_ratio)

    def is_time_layer(self, index: int) -> bool:
        """Layer `index` (0-based) attends across time: the last layer of every group of `time_every`."""
        return index % self.time_every == self.time_every - 1


BASE_KEY = "base"


def _read_yaml(path: str, _children: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML config file as a mapping; a missing file, a directory, bad YAML or a top level that is not a mapping
    stop with a message naming the file.

    A top-level `base: other.yaml` (a path relative to this file's directory) reads that config first and merges
    this one over it, key by key, so that a variant of a shipped config names only what it changes. Bases chain;
    a cycle is refused."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"config {path!r} is not a file")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise ValueError(f"config {path!r} is not valid YAML: {error}") from error
    if not isinstance(loaded, DictConfig):
        raise ValueError(f"config {path!r} must hold a mapping of sections (env:, replay:, ...), got a "
                         f"{type(loaded).__name__}")
    if BASE_KEY not in loaded:
        return loaded
    base = loaded.pop(BASE_KEY)
    if not isinstance(base, str) or not base:
        raise ValueError(f"config {path!r}: {BASE_KEY} must name a YAML file relative to it, got {base!r}")
    here = Path(path).resolve()
    base_path = here.parent / base
    if base_path.resolve() in (*_children, here):
        chain = " -> ".join(str(p) for p in (*_children, here, base_path.resolve()))
        raise ValueError(f"config {path!r}: {BASE_KEY} {base!r} leads back to a config already read: {chain}")
    if not base_path.is_file():
        raise FileNotFoundError(f"config {path!r}: its {BASE_KEY} {str(base_path)!r} is not a file")
    return OmegaConf.merge(_read_yaml(str(base_path), (*_children, here)), loaded)


def load_config(schema: type[C], yaml_path: str | None = None, overrides: list[str] | None = None) -> C:
    """Merge a YAML file and `a.b=value` overrides into the dataclass `schema`, then validate by constructing it."""
    if not is_dataclass(schema):
        raise TypeError(f"load_config needs a dataclass type, got {schema!r}")
    merged = OmegaConf.structured(schema)
    if yaml_path is not None:
        merged = OmegaConf.merge(merged, _read_yaml(yaml_path))
    if overrides:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    # to_object instantiates the (nested) dataclasses, so each __post_init__ validates its own fields.
    return OmegaConf.to_object(merged)
