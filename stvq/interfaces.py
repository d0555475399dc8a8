"""The base classes of the five plugin kinds and their output types. Small and stable: plugins subclass
them, and the core talks to plugins only through them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from stvq.errors import StvqError


@dataclass
class QuantizerOutput:
    """What a quantizer returns for codes z of shape (..., dim)."""

    codes: torch.Tensor  # (..., dim) quantized codes; straight-through gradient to z in training
    ids: torch.Tensor  # (...,) int64 codeword ids
    loss: torch.Tensor  # scalar auxiliary loss (commitment etc.), zero where the method has none
    stats: dict[str, float] = field(default_factory=dict)  # usage, perplexity, dead codes, error


class Encoder(nn.Module, ABC):
    """Images (B, 3, H, W) in [-1, 1] -> continuous codes (B, num_tokens, code_dim)."""

    num_tokens: int
    code_dim: int
    image_size: int

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor: ...


class Decoder(nn.Module, ABC):
    """Continuous or quantized codes (B, num_tokens, code_dim) -> images (B, 3, H, W)."""

    num_tokens: int
    code_dim: int
    image_size: int

    @abstractmethod
    def forward(self, codes: torch.Tensor) -> torch.Tensor: ...


class Quantizer(nn.Module, ABC):
    """Codes (..., dim) -> :class:`QuantizerOutput`; ``ids_to_codes`` inverts the ids (eval mode)."""

    dim: int
    codebook_size: int

    @abstractmethod
    def forward(self, z: torch.Tensor) -> QuantizerOutput: ...

    @abstractmethod
    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor: ...


class Tokenizer(nn.Module, ABC):
    """Images (B, 3, H, W) in [-1, 1] <-> int64 ids (B, num_tokens) in [0, vocab_size)."""

    num_tokens: int
    vocab_size: int
    image_size: int

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, ids: torch.Tensor) -> torch.Tensor: ...


class Composer(ABC):
    """Several tokenizers -> one tokenizer over one sequence and one vocabulary."""

    @abstractmethod
    def compose(self, tokenizers: Sequence[Tokenizer], **options) -> Tokenizer: ...


def check_ids(ids: torch.Tensor, num_tokens: int, vocab_size: int, what: str = "ids") -> None:
    """Raise a clear :class:`StvqError` unless ``ids`` is a non-empty integer (B, num_tokens) tensor with
    values in [0, vocab_size)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        kind = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise StvqError(f"{what} must be an integer tensor (int64), got {kind}; token ids are whole numbers")
    if ids.ndim != 2 or ids.shape[1] != num_tokens:
        raise StvqError(f"expected {what} of shape (B, {num_tokens}), got {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise StvqError(f"no {what} to decode: the batch is empty")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise StvqError(f"{what} must lie in [0, {vocab_size}); got [{int(ids.min())}, {int(ids.max())}]")


def check_images(images: torch.Tensor, image_size: int) -> None:
    """Raise a clear :class:`StvqError` unless ``images`` is (B, 3, image_size, image_size)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (3, image_size, image_size):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise StvqError(f"expected images of shape (B, 3, {image_size}, {image_size}), got {shape}; resize or pick a preset of that size")


def check_pixel_values(images: torch.Tensor) -> None:
    """Raise a clear :class:`StvqError` unless every pixel is finite and in [-1, 1] (a little slack for
    resampling): 0-255 or 0-1 pixels would encode without a word, and wrongly."""
    if not torch.isfinite(images).all():
        raise StvqError("images hold NaN or infinite values; check the data that produced them")
    low, high = images.aminmax()
    if low < -1.05 or high > 1.05:
        raise StvqError(f"images must lie in [-1, 1], got values in [{low.item():.3g}, {high.item():.3g}]; scale 0-255 pixels with x / 127.5 - 1")
