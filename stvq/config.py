"""Model configuration as a dataclass; presets are named instances of it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, replace
from typing import Any

from stvq.errors import ConfigError

ATTN_MASKS = ("none", "causal-placeholders")


@dataclass(frozen=True)
class ModelConfig:
    """The Styled VQ architecture (SPEC section 3). Defaults are the ``reference`` preset."""

    image_size: int = 256  # square input and output resolution
    patch_size: int = 16  # input_conv kernel and stride; out_conv inverts it
    width: int = 1024  # transformer width D, encoder and decoder
    heads: int = 16  # attention heads; width must divide by it
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width
    encoder_layers: int = 24
    condition_layers: int = 18  # layer i consumes codes 2i and 2i+1: num_tokens = 2 * condition_layers
    plain_layers: int = 6  # plain transformer layers after the condition layers
    code_dim: int = 16  # width of each continuous code c_i (the quantizer's input)
    attn_mask: str = "none"  # decoder attention: "none", or "causal-placeholders" (no peeking at later ones)
    encoder: str = "styled"  # registered encoder plugin
    decoder: str = "styled"  # registered decoder plugin

    @property
    def num_tokens(self) -> int:
        return 2 * self.condition_layers

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def seq_len(self) -> int:
        """Encoder and decoder sequence length: patches + tokens."""
        return self.num_patches + self.num_tokens

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type == "int" and (not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 0):
                raise ConfigError(f"config field {f.name} must be a non-negative integer, got {getattr(self, f.name)!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}; pick sizes that divide"
            )
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.condition_layers < 1:
            raise ConfigError("condition_layers must be at least 1 (it sets the number of tokens)")
        if self.attn_mask not in ATTN_MASKS:
            raise ConfigError(f"attn_mask {self.attn_mask!r} is not one of {', '.join(ATTN_MASKS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # Exactly SPEC section 3: 256 px, width 1024, 24 encoder layers, 18 condition + 6 plain decoder layers.
    "reference": ModelConfig(),
    # Between the two: 128 px, width 512; still 36 tokens.
    "small": ModelConfig(image_size=128, width=512, heads=8, encoder_layers=8, plain_layers=2),
    # CPU preset: 64 px, 8 px patches (64 positions), width 128; trains in minutes on 2 cores.
    "tiny": ModelConfig(image_size=64, patch_size=8, width=128, heads=4, encoder_layers=4, plain_layers=2),
    # The ablation of SPEC section 6: tiny with the unordered decoder (same size, no per-layer code pairs).
    "tiny-unordered": ModelConfig(image_size=64, patch_size=8, width=128, heads=4, encoder_layers=4, plain_layers=2, decoder="unordered"),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def make_config(config: ModelConfig | dict | str | None = None, **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a config, a dict of fields, a preset name (default ``reference``),
    with ``overrides`` applied by field name. ``preset=NAME`` may be given as an override too."""
    preset = overrides.pop("preset", None)
    if isinstance(config, str):
        config, preset = None, config
    if isinstance(config, dict):
        config = dict(config)
        overrides = {**config, **overrides}
        config = None
    base = config if config is not None else get_preset(preset or "reference")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
    return replace(base, **overrides)
