"""The Styled VQ encoder (docs/model.md, "The reference architecture"): a ViT over image patches with 36 learned special tokens
appended; the special tokens' outputs, projected to ``code_dim``, are the continuous codes c_0..c_35."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from stvq.interfaces import Encoder
from stvq_reference.config import StyledConfig, make_config
from stvq_reference.layers import LayerNorm, init_weights, learned_tokens, lecun_init, position_tokens, vit_block


class StyledEncoder(Encoder):
    """input_conv (patchify) + positions, 36 special tokens appended, ViT layers, projection head."""

    config_class = StyledConfig

    def __init__(self, config: StyledConfig | dict | str | None = None, **overrides) -> None:
        super().__init__()
        cfg = self.config = make_config(config, **overrides)
        self.num_tokens, self.code_dim, self.image_size = cfg.num_tokens, cfg.code_dim, cfg.image_size
        self.input_conv = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        lecun = cfg.encoder_init == "lecun-sincos"
        self.pos_embed = position_tokens(cfg.grid_size, cfg.width, "sincos" if lecun else "normal")
        self.special_tokens = learned_tokens(cfg.num_tokens, cfg.width)
        self.blocks = nn.ModuleList(vit_block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.encoder_layers))
        self.norm = LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.code_dim)
        self.apply(lecun_init if lecun else init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> codes (B, N, code_dim); P = (H / patch)^2 patches, N tokens, D width."""
        x = rearrange(self.input_conv(images), "b d h w -> b (h w) d") + self.pos_embed  # (B, P, D)
        x = torch.cat([x, self.special_tokens.expand(len(x), -1, -1)], dim=1)  # (B, P + N, D)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, -self.num_tokens :]))  # (B, N, code_dim)
