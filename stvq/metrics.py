"""Image metrics on tensors in [-1, 1]."""

from __future__ import annotations

import torch


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, for (B, C, H, W) images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


def masked_psnr(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PSNR per image over the pixels where ``mask`` (B, 1, H, W) is true, e.g. an object's own pixels."""
    weight = mask.float().expand_as(x)
    mse = ((x.float() - y.float()).pow(2) * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


def mean_image_psnr(train, images: torch.Tensor, count: int = 512) -> float:
    """PSNR of ``images`` against the mean of the first ``count`` items of the data set ``train``: the
    baseline a reconstruction has to beat."""
    mean = torch.stack([train[i] for i in range(min(count, len(train)))]).mean(0, keepdim=True).to(images.device)
    return psnr(mean.expand_as(images), images).mean().item()
