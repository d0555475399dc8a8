"""The training objective, on images in [-1, 1]: the weighted reconstruction loss that ``stvq train``
minimises (L1, MSE, a perceptual term: EfficientNet-Lite0's of :mod:`stvq.features` or LPIPS), the adversarial
losses trained beside it (hinge, taming's adaptive weight, LeCam), and :class:`ImageObjective`, which
puts them together for stage 1, stage 2 and the decoder oracle."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import reduce

import torch
import torch.nn.functional as F
from torch import nn

from stvq.config import TrainConfig
from stvq.features import feature_extractor
from stvq.field_metrics import lpips_network
from stvq.interfaces import Decoder, Discriminator, QuantizerOutput
from stvq.registry import create, require_subclass


def perceptual_loss(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """LPIPS-style (Zhang et al. 2018, without the learned channel weights): at each of the frozen
    EfficientNet-Lite0's five stages, at the images' own resolution, the squared distance between
    channel-normalised feature maps, averaged over positions and summed over stages; differentiable in
    ``reconstructions``. The early stages see edges: on shapes images a Gaussian blur of 4 px scores
    1.8x one of 2 px at the last stage, where the final features at 224 px told them apart by 5 %
    (docs/experiments/sharp-reconstructions.md), at a twelfth of the cost."""
    net = feature_extractor().to(images.device)

    def stages(x: torch.Tensor) -> list[torch.Tensor]:
        return [f / f.pow(2).sum(1, keepdim=True).add(1e-10).sqrt() for f in net.forward_intermediates(x.float(), indices=5, intermediates_only=True)]

    with torch.no_grad():
        target = stages(images)
    return reduce(operator.add, ((a - b).pow(2).sum(1).mean() for a, b in zip(stages(reconstructions), target)))


def lpips_loss(reconstructions: torch.Tensor, images: torch.Tensor, net: str = "vgg") -> torch.Tensor:
    """LPIPS (the ``lpips`` package: VGG16, as taming-transformers and LlamaGen train, or AlexNet) averaged
    over the images; differentiable in ``reconstructions``, the network frozen."""
    metric = lpips_network(net).to(images.device)
    return metric(reconstructions.float(), images.float()).mean()


@dataclass
class ReconstructionLoss:
    """``l1_weight`` * L1 + ``mse_weight`` * MSE + ``perceptual_weight`` * the ``perceptual`` term
    (:func:`perceptual_loss` on EfficientNet-Lite0, or :func:`lpips_loss`), plus the quantizer's own loss
    where the codes were quantized. An LPIPS network is loaded when the loss is made, so missing weights
    stop a run before its first step."""

    l1_weight: float = 0.0
    mse_weight: float = 1.0
    perceptual_weight: float = 0.0
    perceptual: str = "efficientnet"

    def __post_init__(self) -> None:
        if self.perceptual_weight > 0 and self.perceptual != "efficientnet":
            lpips_network(self._lpips_net)

    @property
    def _lpips_net(self) -> str:
        return "alex" if self.perceptual == "lpips-alex" else "vgg"

    @classmethod
    def from_config(cls, cfg) -> ReconstructionLoss:
        """The weights of a :class:`stvq.config.TrainConfig`."""
        return cls(cfg.l1_weight, cfg.mse_weight, cfg.perceptual_weight, cfg.perceptual)

    def __call__(self, reconstruction: torch.Tensor, images: torch.Tensor, quantized: QuantizerOutput | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, its terms by name: l1, mse, and perceptual where weighted)."""
        recon = reconstruction.float()
        terms = {"l1": F.l1_loss(recon, images), "mse": F.mse_loss(recon, images)}
        if self.perceptual_weight > 0:
            terms["perceptual"] = perceptual_loss(recon, images) if self.perceptual == "efficientnet" else lpips_loss(recon, images, self._lpips_net)
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

    ema_real: torch.Tensor  # buffers: the logits' moving averages, for LeCam
    ema_fake: torch.Tensor

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


class ImageObjective:
    """What a decoder learns from, the same in stage 1, stage 2 and the decoder oracle (so that a recipe
    found in the oracle carries over): :class:`ReconstructionLoss`, and where ``cfg.adversarial_weight`` >
    0 a registered discriminator (an :class:`AdversarialLoss` companion, trained beside the model with its
    own optimizer) whose term joins the model's loss from ``cfg.disc_start`` on."""

    def __init__(self, cfg: TrainConfig, image_size: int) -> None:
        self.reconstruction = ReconstructionLoss.from_config(cfg)
        self.adversarial = None
        if cfg.adversarial_weight > 0:
            require_subclass("discriminator", cfg.discriminator, Discriminator, "adversarial training needs images -> realness logits")
            critic = create("discriminator", cfg.discriminator, image_size=image_size, **cfg.discriminator_options)
            self.adversarial = AdversarialLoss(critic, cfg.adversarial_weight, cfg.disc_start, cfg.adaptive_weight, cfg.lecam_weight)

    def companions(self) -> dict[str, torch.nn.Module]:
        """The modules trained beside the model, by name (saved in the checkpoint, not in model.safetensors)."""
        return {"discriminator": self.adversarial} if self.adversarial is not None else {}

    def __call__(
        self,
        reconstruction: torch.Tensor,
        images: torch.Tensor,
        quantized,
        step: int,
        decoder: Decoder,
        critic: torch.nn.Module | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """({part: loss} for :func:`update`, the terms by name); ``decoder`` is the one that drew the
        reconstruction (its last layer weighs the adversarial term); ``critic`` is the companion as the loop
        runs it (wrapped for DDP), by default the companion itself."""
        loss, terms = self.reconstruction(reconstruction, images)
        losses = {"model": loss}
        adversarial = self.adversarial
        if adversarial is not None and adversarial.active(step):
            g_loss, g_terms = adversarial.generator_loss(reconstruction, loss, decoder.last_layer())
            d_loss, d_terms = (critic or adversarial)(images, reconstruction)
            losses = {"model": loss + g_loss, "discriminator": d_loss}
            terms = {**terms, **g_terms, **d_terms}
        if quantized is not None:
            losses["model"] = losses["model"] + quantized.loss
        return losses, terms
