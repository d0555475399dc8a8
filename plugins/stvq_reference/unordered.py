"""The unordered baseline: Styled VQ's decoder without its ordering mechanism, for the ablation of
docs/model.md, "What is measured". Same parameters, same sizes; all 36 codes enter the placeholders at once before the
first layer, and every condition layer reads its styles from the mean of all placeholders and codes
instead of from its own pair (2i, 2i+1). Nothing favours early tokens, so any order found in its codes
is not the method's doing."""

from __future__ import annotations

import torch
from torch import nn

from stvq_reference.config import StyledConfig
from stvq_reference.decoder import ConditionBlock, StyledDecoder


class UnorderedConditionBlock(ConditionBlock):
    def __init__(self, index: int, width: int, heads: int, mlp_ratio: float, num_tokens: int) -> None:
        super().__init__(index, width, heads, mlp_ratio)
        self.num_tokens = num_tokens

    def forward(self, x: torch.Tensor, pooled: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D); pooled (B, D): the mean of all projected codes."""
        s1 = self.ln_1(self.condition_1(x[:, : self.num_tokens].mean(1)) + pooled)
        x = x + self.attn(self.norm1(x, s1), attn_mask=attn_mask)
        s2 = self.ln_2(self.condition_2(x[:, : self.num_tokens].mean(1)) + pooled)
        return x + self.mlp(self.norm2(x, s2))


class UnorderedDecoder(StyledDecoder):
    def make_block(self, index: int, cfg: StyledConfig) -> nn.Module:
        return UnorderedConditionBlock(index, cfg.width, cfg.heads, cfg.mlp_ratio, cfg.num_tokens)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        condition = self.code_proj(codes)  # (B, N, D)
        b = len(codes)
        x = torch.cat([self.placeholders + condition, self.pos_tokens.expand(b, -1, -1)], dim=1)  # all codes at once
        pooled = condition.mean(1)  # (B, D)
        for block in self.condition_blocks:
            x = block(x, pooled, self.attn_mask)
        return self.render(x)
