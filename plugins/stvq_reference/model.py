"""Styled VQ as one module: encoder, conditional decoder and (after stage 2) a quantizer. Registered as
the ``styled`` tokenizer: 36 ids per image, from high-level attributes to low-level ones."""

from __future__ import annotations

from typing import Any

import torch

from stvq import registry
from stvq.checkpoint import PretrainedMixin
from stvq.errors import StvqError
from stvq.interfaces import CodeTokenizer, CodeTokenizerOutput, check_ids, check_images, drop_tail
from stvq_reference.config import StyledConfig, make_config


class StyledVQ(PretrainedMixin, CodeTokenizer):
    """The Styled VQ tokenizer. ``quantizer`` is ``{"name": registered quantizer, **options}`` or None
    (a stage-1 model: continuous codes only)."""

    plugin_kind = "tokenizer"
    plugin_name = "styled"
    config_class = StyledConfig

    def __init__(self, config: StyledConfig | dict | str | None = None, quantizer: dict | None = None, **overrides) -> None:
        super().__init__()
        cfg = self.config = make_config(config, **overrides)
        self.num_tokens, self.image_size = cfg.num_tokens, cfg.image_size
        self.encoder = registry.create("encoder", cfg.encoder, config=cfg)
        self.decoder = registry.create("decoder", cfg.decoder, config=cfg)
        self.quantizer = None
        self.quantizer_spec: dict[str, Any] | None = None
        if quantizer is not None:
            self.set_quantizer(quantizer)

    def set_quantizer(self, spec: dict[str, Any]) -> None:
        """Attach a registered quantizer over ``code_dim``-wide codes; ``spec`` = {"name": ..., **options}."""
        options = {k: v for k, v in spec.items() if k != "name"}
        options.setdefault("dim", self.config.code_dim)
        self.quantizer = registry.create("quantizer", spec["name"], **options)
        self.quantizer_spec = {"name": spec["name"], **options}

    @property
    def vocab_size(self) -> int:  # type: ignore[override]  # known once a quantizer is attached
        return self._require_quantizer().codebook_size

    def _require_quantizer(self):
        if self.quantizer is None:
            raise StvqError("this Styled VQ has continuous codes only; run `stvq quantize --run RUN` to give it a codebook")
        return self.quantizer

    def init_options(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "quantizer": self.quantizer_spec}

    def encode_codes(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> continuous codes (B, N, code_dim)."""
        check_images(images, self.image_size)
        return self.encoder(images)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, N, code_dim) -> images (B, 3, H, W), not clamped (training reads the raw output)."""
        return self.decoder(codes)

    def forward(
        self,
        images: torch.Tensor,
        noise_sigma: float = 0.0,
        quantize: bool = False,
        codes: torch.Tensor | None = None,
        tail_drop: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> CodeTokenizerOutput:
        """Reconstruct ``images``; stage 1 adds Gaussian noise of std ``noise_sigma`` to the codes,
        stage 2 passes ``quantize=True``, and ``codes`` (the frozen encoder's, cached) skips the encoder.
        ``tail_drop`` p decodes a share p of the images from a random prefix of their codes (``drop_tail``).
        The noise and the prefixes are drawn from ``generator`` (None: torch's global one)."""
        codes = self.encode_codes(images) if codes is None else codes
        quantized = None
        if quantize:
            quantized = self._require_quantizer()(codes)
            decoder_input = quantized.codes
        else:
            noise = torch.randn(codes.shape, dtype=codes.dtype, device=codes.device, generator=generator) if noise_sigma > 0 else None
            decoder_input = codes if noise is None else codes + noise_sigma * noise
        if tail_drop > 0:
            decoder_input = drop_tail(decoder_input, tail_drop, generator)
        return CodeTokenizerOutput(codes, self.decode_codes(decoder_input), quantized)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> ids (B, N) int64."""
        check_images(images, self.image_size, values=True)
        return self._require_quantizer()(self.encoder(images)).ids

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, N) -> images (B, 3, H, W) in [-1, 1]."""
        quantizer = self._require_quantizer()
        check_ids(ids, self.num_tokens, quantizer.codebook_size)
        return self.decoder(quantizer.ids_to_codes(ids)).clamp(-1, 1)
