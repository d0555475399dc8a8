"""The PatchGAN discriminator (Isola, Zhu, Zhou and Efros, 2017, "Image-to-Image Translation with
Conditional Adversarial Networks", arXiv:1611.07004), in the shape taming-transformers' VQGAN trains with
(``NLayerDiscriminator``: 4x4 convolutions, ``layers`` of them with stride 2 and channels doubling up to
8x, one more with stride 1, then a 4x4 convolution to one logit per patch; LeakyReLU 0.2; normal(0, 0.02)
weights). Registered as the ``patchgan`` discriminator.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur

from stvq.errors import ConfigError
from stvq.interfaces import Discriminator

NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":  # per image: no running statistics, the same under any batch split
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    return nn.Identity()


class PatchDiscriminator(Discriminator):
    """images (B, 3, S, S) -> logits (B, 1, h, w), one per overlapping patch; with ``layers`` = 3 each
    logit sees a 70 x 70 patch (taming's default); ``norm`` is "batch" (taming), "group" or "none".
    ``blur_sigma`` > 0 blurs what it sees (a Gaussian of that std in pixels), so that pixel noise, which a
    reconstruction lacks, cannot tell real from reconstructed (docs/experiments/sharp-reconstructions.md)."""

    def __init__(self, image_size: int = 256, channels: int = 64, layers: int = 3, norm: str = "batch", blur_sigma: float = 0.0) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"patchgan norm {norm!r} is not one of {', '.join(NORMS)}")
        if layers < 1 or image_size < 2 ** (layers + 2):
            raise ConfigError(f"patchgan with {layers} layers needs images of at least {2 ** (layers + 2)} px and layers >= 1; got {image_size} px")
        if not blur_sigma >= 0:
            raise ConfigError(f"patchgan blur_sigma must be 0 or more, got {blur_sigma}")
        self.image_size, self.blur_sigma = image_size, float(blur_sigma)
        bias = norm == "none"
        widths = [channels * min(2**n, 8) for n in range(layers + 1)]  # after each conv but the last
        blocks: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for n in range(1, layers + 1):
            stride = 2 if n < layers else 1
            blocks += [nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=bias), _norm(norm, widths[n]), nn.LeakyReLU(0.2)]
        blocks.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*blocks)
        self.apply(_init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) in [-1, 1] -> logits (B, 1, h, w)."""
        if self.blur_sigma > 0:
            radius = max(1, math.ceil(2 * self.blur_sigma))
            images = gaussian_blur(images, [2 * radius + 1] * 2, [self.blur_sigma] * 2)
        return self.main(images)


def _init(module: nn.Module) -> None:
    """taming's ``weights_init``: convolutions normal(0, 0.02); norms' scales normal(1, 0.02), shifts 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
