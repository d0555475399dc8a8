"""The Styled VQ conditional decoder and its condition block (docs/model.md, "The reference architecture").

The sequence is 36 learned placeholders followed by the learned position tokens; image content enters
only through the codes. Condition layer i adds codes c_{2i}, c_{2i+1} to placeholders 2i, 2i+1, then
modulates attention and MLP with styles read from those placeholders (a per-layer AdaLN, like StyleGAN2's
W+). Because placeholder 2i has already been shaped by codes 0..2i-1, each code is read in the context of
all earlier ones, which pushes the encoder to put high-level attributes first.
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.layers import Attention, Mlp
from torch import nn

from stvq.interfaces import Decoder
from stvq_reference.config import StyledConfig, make_config
from stvq_reference.heads import make_head
from stvq_reference.layers import LayerNorm, Unpatchify, init_weights, learned_tokens, position_tokens, vit_block


class AdaLN(nn.Module):
    """AdaLN(x, s) = LayerNorm(x) * (1 + scale(s)) + shift(s), one projection giving both scale and shift."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = LayerNorm(width, elementwise_affine=False)
        self.modulation = nn.Linear(width, 2 * width)  # rows [0, D): scale, [D, 2D): shift

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), style (B, D) -> (B, L, D)."""
        scale, shift = rearrange(self.modulation(style), "b (two d) -> two b 1 d", two=2)
        return torch.addcmul(shift, self.norm(x), 1 + scale)


class ConditionBlock(nn.Module):
    """Condition layer ``index``: consumes codes c_{2 index}, c_{2 index + 1} (already projected to width).

    Computes the same function as the sequence-first original (docs/model.md), batch-first and without the
    full-size zero tensor: only the two placeholder rows receive the codes.
    """

    def __init__(self, index: int, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.index = index
        self.condition_1 = nn.Linear(width, width)  # W_1
        self.ln_1 = LayerNorm(width)
        self.condition_2 = nn.Linear(width, width)  # W_2
        self.ln_2 = LayerNorm(width)
        self.norm1 = AdaLN(width)
        self.attn = Attention(width, heads, qkv_bias=True, norm_layer=LayerNorm)  # fused QKV, SDPA
        self.norm2 = AdaLN(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, condition: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D) with placeholders first; condition (B, 2, D): the two codes of this layer."""
        p = 2 * self.index
        x = torch.cat([x[:, :p], x[:, p : p + 2] + condition, x[:, p + 2 :]], dim=1)  # placeholder rows only
        s1 = self.ln_1(self.condition_1(x[:, p]) + condition[:, 0])  # (B, D)
        x = x + self.attn(self.norm1(x, s1), attn_mask=attn_mask)
        s2 = self.ln_2(self.condition_2(x[:, p + 1]) + condition[:, 1])  # read after the attention update
        return x + self.mlp(self.norm2(x, s2))


def placeholder_mask(num_tokens: int, seq_len: int) -> torch.Tensor:
    """SDPA boolean mask (True = may attend): placeholder q may not attend to placeholders after q."""
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool)
    allowed[:num_tokens, :num_tokens] = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
    return allowed


class StyledDecoder(Decoder):
    """Placeholders + position tokens, 2N/2 condition layers, plain ViT layers, out_conv (un-patchify)."""

    attn_mask: torch.Tensor | None  # a buffer, where the placeholders attend causally

    config_class = StyledConfig

    def __init__(self, config: StyledConfig | dict | str | None = None, **overrides) -> None:
        super().__init__()
        cfg = self.config = make_config(config, **overrides)
        self.num_tokens, self.code_dim, self.image_size = cfg.num_tokens, cfg.code_dim, cfg.image_size
        self.code_proj = nn.Linear(cfg.code_dim, cfg.width)
        self.placeholders = learned_tokens(cfg.num_tokens, cfg.width)
        self.pos_tokens = position_tokens(cfg.grid_size, cfg.width, "normal")
        self.condition_blocks = nn.ModuleList(self.make_block(i, cfg) for i in range(cfg.condition_layers))
        self.blocks = nn.ModuleList(vit_block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.plain_layers))
        self.norm = LayerNorm(cfg.width)
        out = (cfg.width, cfg.head_channels or 3, cfg.patch_size)
        self.out_conv = Unpatchify(*out)
        self.out_head = make_head(cfg.head, cfg.width, cfg.head_channels)
        mask = placeholder_mask(cfg.num_tokens, cfg.seq_len) if cfg.attn_mask == "causal-placeholders" else None
        self.register_buffer("attn_mask", mask, persistent=False)
        self.apply(init_weights)

    def last_layer(self) -> torch.Tensor:
        last = self.out_conv if self.out_head is None else [m for m in self.out_head.modules() if isinstance(m, nn.Conv2d)][-1]
        return last.weight

    def make_block(self, index: int, cfg: StyledConfig) -> nn.Module:
        return ConditionBlock(index, cfg.width, cfg.heads, cfg.mlp_ratio)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, N, code_dim) -> images (B, 3, H, W); P position tokens, D width."""
        condition = self.code_proj(codes)  # (B, N, D)
        b = len(codes)
        x = torch.cat([self.placeholders.expand(b, -1, -1), self.pos_tokens.expand(b, -1, -1)], dim=1)  # (B, N+P, D)
        for i, block in enumerate(self.condition_blocks):
            x = block(x, condition[:, 2 * i : 2 * i + 2], self.attn_mask)
        return self.render(x)

    def render(self, x: torch.Tensor) -> torch.Tensor:
        """The plain layers and out_conv: state (B, N+P, D) after the condition layers -> images."""
        for block in self.blocks:
            x = block(x, attn_mask=self.attn_mask)
        x = self.norm(x[:, self.num_tokens :])  # (B, P, D)
        grid = rearrange(x, "b (h w) d -> b d h w", h=self.config.grid_size)  # a view, channels-last
        pixels = self.out_conv(grid)  # (B, 3 or C, H, W), channels-last, as the head's convolutions run fastest
        images = pixels if self.out_head is None else self.out_head(pixels, grid)
        return images.contiguous()
