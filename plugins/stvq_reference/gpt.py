"""A decoder-only transformer over token ids, as easy to read as nanoGPT (Karpathy, 2022): a start token
(or a class token, as LlamaGen's class-conditional GPT, Sun et al., 2024), learned positions, pre-norm
blocks of causal attention (torch's scaled_dot_product_attention) and an MLP, a final norm and a linear
head. Registered as the ``gpt`` prior."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stvq.checkpoint import PretrainedMixin
from stvq.errors import ConfigError
from stvq.interfaces import Prior, check_ids


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 1024
    seq_len: int = 36  # ids per image
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 0  # 0: unconditional (a start token); C: class ids 0..C-1 take its place
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in ("num_classes", "dropout") and not (isinstance(value, (int, float)) and value >= 1):
                raise ConfigError(f"gpt option {f.name} must be at least 1, got {value!r}")
        if self.width % self.heads:
            raise ConfigError(f"gpt width {self.width} must divide by heads {self.heads}")


#: tiny trains on the built-in shapes' shards in minutes on 2 CPU cores; base is about LlamaGen-B (111 M
#: parameters with its 16,384 ids: width 768, 12 layers, 12 heads); small sits between.
PRESETS = {
    "tiny": dict(width=128, layers=4, heads=4),
    "small": dict(width=384, layers=8, heads=6),
    "base": dict(width=768, layers=12, heads=12),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, D)
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.norm1, self.attn = nn.LayerNorm(cfg.width), CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, hidden), nn.GELU(), nn.Linear(hidden, cfg.width), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(PretrainedMixin, Prior):
    """``GPT(vocab_size=K, seq_len=N, preset="tiny", **overrides)``; ``forward(ids, labels)``: ids (B, T)
    -> logits (B, T + 1, K), row t predicting id t."""

    plugin_kind, plugin_name = "prior", "gpt"

    def __init__(self, vocab_size: int = 1024, seq_len: int = 36, preset: str = "tiny", config: dict | None = None, **overrides: Any) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ConfigError(f"unknown gpt preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        options = config if config is not None else {**PRESETS[preset], "vocab_size": vocab_size, "seq_len": seq_len, **overrides}
        cfg = self.config = GPTConfig(**options)
        self.vocab_size, self.seq_len, self.num_classes = cfg.vocab_size, cfg.seq_len, cfg.num_classes
        self.first = nn.Embedding(max(1, cfg.num_classes), cfg.width)  # the start token, or one per class
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positions = nn.Parameter(torch.zeros(1, cfg.seq_len + 1, cfg.width))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.layers))
        nn.init.normal_(self.positions, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def init_options(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.config)}

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        b, t = ids.shape
        if t > self.seq_len:
            raise ConfigError(f"the prior models {self.seq_len} ids per image; got {t}")
        if t:
            check_ids(ids, t, self.vocab_size)
        if self.num_classes and labels is None:
            raise ConfigError(f"this prior is class-conditional ({self.num_classes} classes): pass labels")
        first = self.first(labels if self.num_classes else torch.zeros(b, dtype=torch.long, device=ids.device))  # (B, D)
        x = torch.cat([first[:, None], self.tokens(ids)], 1) + self.positions[:, : t + 1]  # (B, T + 1, D)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # (B, T + 1, K)
