"""Image metrics on tensors in [-1, 1]."""

from __future__ import annotations

import torch


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, for (B, C, H, W) images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))
