"""The spatial broadcast decoder (Watters, Matthey, Burgess and Lerchner, 2019, "Spatial Broadcast Decoder:
A Simple Architecture for Learning Disentangled Representations in VAEs", arXiv:1901.07017).

The codes go through an MLP to one latent vector, which is tiled over the image grid beside two coordinate
channels; stride-1 3x3 convolutions render the image. No patches, so no seams; every pixel sees the whole
latent and where it is. Registered as the ``broadcast`` decoder: the anchor of the decoder oracle (how fast
a small convolutional renderer learns the ``shapes`` factors) and a baseline decoder for the Styled VQ
tokenizer (``--set decoder=broadcast``), whose config gives it the image size, token count and code width.
Its own fields are :class:`BroadcastConfig`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import nn

from stvq.config import PluginConfig
from stvq.interfaces import Decoder
from stvq_reference.config import StyledConfig


@dataclass(frozen=True)
class BroadcastConfig(PluginConfig):
    """What the broadcast decoder reads and draws, and its renderer. Defaults are the ``tiny`` preset."""

    image_size: int = 64  # square output resolution
    num_tokens: int = 36  # codes per image
    code_dim: int = 16  # width of each code
    latent: int = 64  # the MLP's latent vector, tiled over the grid
    channels: int = 32  # the 3x3 convolutions' channels
    convs: int = 4  # how many 3x3 convolutions render the image

    DEFAULT_PRESET = "tiny"

    @classmethod
    def reading(cls, styled: StyledConfig) -> BroadcastConfig:
        """The sizes a Styled VQ tokenizer's config gives its decoder (``--set decoder=broadcast``)."""
        return cls(image_size=styled.image_size, num_tokens=styled.num_tokens, code_dim=styled.code_dim)


# The Styled VQ presets' sizes.
BroadcastConfig.PRESETS = {name: BroadcastConfig.reading(StyledConfig.make(name)) for name in ("tiny", "small", "reference")}


class BroadcastDecoder(Decoder):
    """codes (B, N, code_dim) -> MLP -> latent (B, L), tiled over (H, W) with x, y in [-1, 1] -> ``convs``
    3x3 convolutions of ``channels`` -> a 1x1 convolution to RGB."""

    coords: torch.Tensor  # a buffer

    config_class = BroadcastConfig

    def __init__(self, config: BroadcastConfig | StyledConfig | dict | str | None = None, **overrides) -> None:
        super().__init__()
        if isinstance(config, StyledConfig):  # built by a Styled VQ tokenizer, which says the sizes
            config = BroadcastConfig.reading(config)
        cfg = self.config = BroadcastConfig.make(config, **overrides)
        self.num_tokens, self.code_dim, self.image_size = cfg.num_tokens, cfg.code_dim, cfg.image_size
        self.mlp = nn.Sequential(nn.Linear(cfg.num_tokens * cfg.code_dim, cfg.latent), nn.GELU(), nn.Linear(cfg.latent, cfg.latent))
        layers: list[nn.Module] = []
        for i in range(cfg.convs):
            layers += [nn.Conv2d(cfg.latent + 2 if i == 0 else cfg.channels, cfg.channels, 3, padding=1), nn.GELU()]
        self.convs = nn.Sequential(*layers, nn.Conv2d(cfg.channels, 3, 1))
        axis = torch.linspace(-1, 1, cfg.image_size)
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1)  # (H, W, 2): x then y
        self.register_buffer("coords", grid.unsqueeze(0), persistent=False)  # derived, not learned

    def last_layer(self) -> torch.Tensor:
        return self.convs[-1].weight  # type: ignore[return-value]  # a Conv2d's weight

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, N, code_dim) -> images (B, 3, H, W)."""
        latent = self.mlp(rearrange(codes, "b n c -> b (n c)"))  # (B, L)
        s = self.image_size
        tiled = repeat(latent, "b l -> b h w l", h=s, w=s)
        x = torch.cat([tiled, self.coords.expand(len(codes), -1, -1, -1)], dim=-1).permute(0, 3, 1, 2)  # channels-last:
        return self.convs(x).contiguous()  # the training step 1.34x faster on CPU than in NCHW
