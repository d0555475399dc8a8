"""Image metrics on tensors in [-1, 1]."""

from __future__ import annotations

import torch


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, for (B, C, H, W) images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


def mean_image_psnr(train, images: torch.Tensor, count: int = 512) -> float:
    """PSNR of ``images`` against the mean of the first ``count`` items of the data set ``train``: the
    baseline a reconstruction has to beat."""
    mean = torch.stack([train[i] for i in range(min(count, len(train)))]).mean(0, keepdim=True).to(images.device)
    return psnr(mean.expand_as(images), images).mean().item()
