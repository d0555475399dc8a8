"""Small layers shared by the reference encoder and decoder."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import trunc_normal_
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

LayerNorm: Any = partial(nn.LayerNorm, eps=1e-6)  # a norm layer class, as timm takes it


def vit_block(width: int, heads: int, mlp_ratio: float) -> Block:
    """A standard pre-norm ViT block (timm): x + Attn(LN(x)), x + MLP(LN(x)); attention through SDPA."""
    return Block(width, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)


def init_weights(module: nn.Module) -> None:
    """ViT initialisation: truncated normal (std 0.02) for linear and embedding weights, zero biases."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def lecun_init(module: nn.Module) -> None:
    """As :func:`init_weights`, with linear weights at std 1/sqrt(fan_in): at small widths std 0.02 leaves
    every MLP nearly linear, and a nearly linear ViT pools its patches without regard to where they are."""
    init_weights(module)
    if isinstance(module, nn.Linear):
        std = module.in_features**-0.5
        trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)


def learned_tokens(count: int, width: int) -> nn.Parameter:
    """A (1, count, width) parameter, e.g. position embeddings or special tokens."""
    param = nn.Parameter(torch.empty(1, count, width))
    trunc_normal_(param, std=0.02)
    return param


def position_tokens(grid: int, width: int, init: str) -> nn.Parameter:
    """Learned (1, grid * grid, width) position tokens, row-major. ``init="sincos"`` starts them as 2D
    sin-cos features (MAE) whose frequencies span the grid, from about one cycle per patch down to about
    one radian across the whole grid, so each token knows its place before the first step; "normal"
    starts them as ViT does (std 0.02)."""
    if init == "normal":
        return learned_tokens(grid * grid, width)
    return nn.Parameter(build_sincos2d_pos_embed([grid, grid], width, temperature=float(grid)).unsqueeze(0))


class Unpatchify(nn.ConvTranspose2d):
    """The inverse patchify (the decoder's ``out_conv``): a ConvTranspose2d whose kernel is its stride, so
    one linear map per token to its patch. Computed as that matrix product: forward and backward 2.6x faster
    than the convolution's on CPU at ``tiny`` (8.8 against 23.3 ms for a batch of 24). Same parameters,
    same function; the output is in channels-last memory, as the convolution gave it for the decoder's
    token grid, the layout in which the pixel head's convolutions run fastest."""

    def __init__(self, width: int, channels: int, patch: int) -> None:
        super().__init__(width, channels, patch, stride=patch)

    bias: torch.Tensor  # always built with one

    def forward(self, grid: torch.Tensor) -> torch.Tensor:  # type: ignore[override]  # no output_size: the grid decides
        """grid (B, D, h, w) -> (B, C, h * patch, w * patch), channels-last."""
        p = self.stride[0]
        patches = F.linear(rearrange(grid, "b d h w -> b h w d"), self.weight.flatten(1).T, self.bias.repeat_interleave(p * p))
        return rearrange(patches, "b h w (c p q) -> b (h p) (w q) c", p=p, q=p).permute(0, 3, 1, 2)
