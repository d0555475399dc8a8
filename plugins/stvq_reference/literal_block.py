"""The original condition layer (docs/model.md), written literally (sequence-first, a full zero tensor per layer,
``nn.MultiheadAttention``, separate scale and shift projections). It is the yardstick: tests check that
``stvq_reference.decoder.ConditionBlock`` computes the same function, and benchmarks time ours against it.
Do not optimise it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LiteralAdaLN(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.scale = nn.Linear(width, width)
        self.shift = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # x (L, B, D), s (B, D)
        return self.norm(x) * (1 + self.scale(s)) + self.shift(s)


class LiteralConditionBlock(nn.Module):
    def __init__(self, index: int, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.index = index
        self.condition_1 = nn.Linear(width, width)
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.condition_2 = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.norm1 = LiteralAdaLN(width)
        self.norm2 = LiteralAdaLN(width)
        self.attn1 = nn.MultiheadAttention(width, heads)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, condition: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (L, B, D), condition (2, B, D); attn_mask: nn.MultiheadAttention's (True = may NOT attend)."""
        index = self.index
        zeros_like_x = torch.zeros_like(x)  # (36+256, bs, dim)
        zeros_like_x[index * 2 : (index + 1) * 2] += condition  # condition: (2, bs, dim)
        x = x + zeros_like_x
        h = self.norm1(x, self.ln_1(self.condition_1(x[index * 2]) + condition[0]))
        x = x + self.attn1(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        x = x + self.mlp(self.norm2(x, self.ln_2(self.condition_2(x[index * 2 + 1]) + condition[1])))
        return x

    @classmethod
    def from_block(cls, block: Any) -> LiteralConditionBlock:  # a stvq_reference.decoder.ConditionBlock
        """A literal block holding the same weights as a ``ConditionBlock``."""
        width = block.condition_1.in_features
        literal = cls(block.index, width, block.attn.num_heads, block.mlp.fc1.out_features / width)
        literal = literal.to(dtype=block.condition_1.weight.dtype, device=block.condition_1.weight.device)
        state = {}
        for name in ("condition_1", "ln_1", "condition_2", "ln_2"):
            for key, value in getattr(block, name).state_dict().items():
                state[f"{name}.{key}"] = value
        for norm in ("norm1", "norm2"):
            weight, bias = getattr(block, norm).modulation.weight, getattr(block, norm).modulation.bias
            state[f"{norm}.scale.weight"], state[f"{norm}.shift.weight"] = weight.chunk(2)
            state[f"{norm}.scale.bias"], state[f"{norm}.shift.bias"] = bias.chunk(2)
        state["attn1.in_proj_weight"] = block.attn.qkv.weight
        state["attn1.in_proj_bias"] = block.attn.qkv.bias
        state["attn1.out_proj.weight"] = block.attn.proj.weight
        state["attn1.out_proj.bias"] = block.attn.proj.bias
        state["mlp.0.weight"], state["mlp.0.bias"] = block.mlp.fc1.weight, block.mlp.fc1.bias
        state["mlp.2.weight"], state["mlp.2.bias"] = block.mlp.fc2.weight, block.mlp.fc2.bias
        literal.load_state_dict({k: v.detach().clone() for k, v in state.items()})
        return literal
