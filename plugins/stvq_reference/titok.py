"""A TiTok-style 1D tokenizer (Yu et al. 2024, "An Image is Worth 32 Tokens"): the comparison users make.

Its encoder is Styled VQ's (a ViT over the patches with 36 latent tokens appended, whose outputs are the
codes). Its decoder puts the codes in context: each projected code plus a learned latent position, then a
learned token at every patch position (TiTok's mask token plus its position embedding, as one learned
vector per position), and plain ViT layers over the whole sequence (as many as Styled's condition and
plain layers together), then the same pixel path (``out_conv`` and the head). Nothing ties a code to a
layer, so only the training recipe (the nested dropout of the tail, ``tail_drop``) can order the tokens:
the comparison is about the token mechanism, with the same widths, depths, head, losses and recipe.

``stvq train --tokenizer titok`` trains it, and every stock command (quantize, stage 2, tokenize, eval)
takes its runs.
"""

from __future__ import annotations

import torch
from torch import nn

from stvq_reference.config import StyledConfig, make_config
from stvq_reference.decoder import StyledDecoder
from stvq_reference.layers import vit_block
from stvq_reference.model import StyledVQ


class TiTokDecoder(StyledDecoder):
    """Codes in context, then plain ViT layers; ``condition_layers`` + ``plain_layers`` of them."""

    def make_block(self, index: int, cfg: StyledConfig) -> nn.Module:
        return vit_block(cfg.width, cfg.heads, cfg.mlp_ratio)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, N, code_dim) -> images (B, 3, H, W)."""
        latent = self.placeholders + self.code_proj(codes)  # (B, N, D): each code at its learned latent position
        x = torch.cat([latent, self.pos_tokens.expand(len(codes), -1, -1)], dim=1)  # (B, N + P, D)
        for block in self.condition_blocks:
            x = block(x, attn_mask=self.attn_mask)
        return self.render(x)


class TiTokVQ(StyledVQ):
    """The ``titok`` tokenizer: Styled VQ's encoder, quantizers and sizes (a preset, default ``tiny``) with
    the TiTok decoder."""

    plugin_name = "titok"

    def __init__(self, config: StyledConfig | dict | str | None = None, quantizer: dict | None = None, **overrides) -> None:
        if config is None:
            overrides.setdefault("preset", "tiny")
        super().__init__(make_config(config, **{**overrides, "decoder": "titok"}), quantizer)
