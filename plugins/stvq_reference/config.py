"""The Styled VQ family's architecture options and presets (the ``styled`` tokenizer, encoder and decoder,
and the ``titok``, ``unordered`` and ``broadcast`` plugins built on them): a plugin's own config dataclass
(:class:`stvq.config.PluginConfig`), which ``--preset``, ``--set KEY=VALUE``, ``stvq info`` and
``config.json`` reach through the registry (``config_class``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from stvq.config import PluginConfig
from stvq.errors import ConfigError

ATTN_MASKS = ("none", "causal-placeholders")
ENCODER_INITS = ("vit", "lecun-sincos")
HEADS = ("linear", "pixel")  # what follows out_conv (stvq_reference.heads)


@dataclass(frozen=True)
class StyledConfig(PluginConfig):
    """The Styled VQ architecture (docs/model.md, "The reference architecture"). Defaults are the ``reference`` preset."""

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
    # What follows out_conv: "linear" (none: out_conv un-patchifies straight to RGB, the reference architecture's) or
    # "pixel" (out_conv to head_channels C, plus the token grid upsampled bilinearly, a 3x3 conv and a
    # per-pixel MLP): no patch seams, +1.5 dB over "linear" in the decoder oracle at 1,400 steps (docs/experiments/sharp-reconstructions.md,
    # "Sharp reconstructions", table H). The other heads and seam-free out_convs tried there were dropped.
    head: str = "linear"
    head_channels: int = 0
    # How the encoder starts: "vit" (std 0.02 weights and positions, as ViT) or "lecun-sincos" (weights std
    # 1/sqrt(fan_in), 2D sin-cos positions): a fresh encoder whose codes already tell where the object is
    # (docs/experiments/background-plateau.md).
    encoder_init: str = "vit"
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
        for name in ("image_size", "patch_size", "width", "heads", "code_dim"):  # sizes that divide or allocate
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name} must be at least 1, got {getattr(self, name)}")
        if not (isinstance(self.mlp_ratio, (int, float)) and math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0):
            raise ConfigError(f"config field mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}; pick sizes that divide")
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.condition_layers < 1:
            raise ConfigError("condition_layers must be at least 1 (it sets the number of tokens)")
        if self.attn_mask not in ATTN_MASKS:
            raise ConfigError(f"attn_mask {self.attn_mask!r} is not one of {', '.join(ATTN_MASKS)}")
        if self.head not in HEADS:
            raise ConfigError(f"head {self.head!r} is not one of {', '.join(HEADS)}")
        if self.head == "linear" and self.head_channels:
            raise ConfigError(f"head 'linear' writes RGB from out_conv and takes no head_channels (got {self.head_channels}); use head=pixel or head_channels=0")
        if self.head != "linear" and not self.head_channels:
            raise ConfigError(f"head {self.head!r} needs head_channels > 0 (the channels out_conv writes), e.g. --set head_channels=16")
        if self.encoder_init not in ENCODER_INITS:
            raise ConfigError(f"encoder_init {self.encoder_init!r} is not one of {', '.join(ENCODER_INITS)}")

    def describe(self) -> list[tuple[str, str]]:
        """The sizes in words (``stvq info``)."""
        return [
            ("image", f"3 x {self.image_size} x {self.image_size}, patch {self.patch_size}"),
            ("tokens", f"{self.num_tokens} (2 x {self.condition_layers} condition layers)"),
            ("code_dim", str(self.code_dim)),
            ("encoder sequence", f"{self.seq_len} = {self.num_patches} patches + {self.num_tokens} special tokens"),
            ("decoder sequence", f"{self.seq_len} = {self.num_tokens} placeholders + {self.num_patches} positions"),
            ("width / heads", f"{self.width} / {self.heads}"),
            ("layers", f"encoder {self.encoder_layers}, decoder {self.condition_layers} condition + {self.plain_layers} plain"),
        ]


StyledConfig.PRESETS = {
    # Exactly docs/model.md, "The reference architecture": 256 px, width 1024, 24 encoder layers, 18 condition + 6 plain decoder layers.
    "reference": StyledConfig(),
    # Between the two: 128 px, width 512; still 36 tokens.
    "small": StyledConfig(image_size=128, width=512, heads=8, encoder_layers=8, plain_layers=2),
    # CPU preset: 64 px, 16 px patches (16 positions), width 64. Chosen by the decoder oracle at equal wall
    # time on 2 cores (docs/experiments/background-plateau.md): 3.6x the images per second of width 128 with
    # 8 px patches, and the better PSNR after 5 minutes. Its encoder starts "lecun-sincos": with ViT's start
    # a narrow encoder's codes carry no position, and stage 1 never leaves the background plateau. Its
    # decoder ends in the pixel head: no patch seams, +1.5 dB in the oracle at 1,400 steps (docs/experiments/sharp-reconstructions.md).
    "tiny": StyledConfig(image_size=64, patch_size=16, width=64, heads=2, encoder_layers=4, plain_layers=2, encoder_init="lecun-sincos", head="pixel", head_channels=16),
    # The ablation of docs/model.md, "What is measured": tiny with the unordered decoder (same size, no per-layer code pairs).
    "tiny-unordered": StyledConfig(
        image_size=64,
        patch_size=16,
        width=64,
        heads=2,
        encoder_layers=4,
        plain_layers=2,
        encoder_init="lecun-sincos",
        head="pixel",
        head_channels=16,
        decoder="unordered",
    ),
}


def make_config(config: StyledConfig | dict | str | None = None, **overrides: Any) -> StyledConfig:
    """:meth:`StyledConfig.make`: from a config, a dict of fields (a ``config.json``'s) or a preset name
    (default ``reference``), with ``overrides`` by field name (``preset=NAME`` among them)."""
    return StyledConfig.make(config, **overrides)
