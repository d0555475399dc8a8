"""Finite scalar quantization: Mentzer, Minnen, Agustsson, Tschannen, "Finite Scalar Quantization:
VQ-VAE Made Simple", 2023 (arXiv:2309.15505).

Each of ``len(levels)`` channels is bounded and rounded to one of ``levels[i]`` values; the codebook is
the fixed grid, of size prod(levels), with no learned codewords and no auxiliary loss. Channel i is
bounded by ``tanh(z + shift) * half_l - offset`` as in the paper's reference code, so that an even number
of levels gives the integers -L/2 .. L/2 - 1 and an odd one -(L-1)/2 .. (L-1)/2, then scaled to [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from stvq.codebook_stats import codebook_stats
from stvq.errors import ConfigError
from stvq.interfaces import Quantizer, QuantizerOutput


def round_ste(z: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (a plain, exact round when no gradient is needed)."""
    return z + (z.round() - z).detach() if z.requires_grad else z.round()


class FSQ(Quantizer):
    """FSQ over ``dim``-wide codes; a linear projection to and from ``len(levels)`` channels is added when
    ``dim != len(levels)``."""

    levels: torch.Tensor  # a buffer
    basis: torch.Tensor  # a buffer
    half_width: torch.Tensor  # a buffer

    def __init__(self, levels: Sequence[int] = (8, 8, 8, 5, 5, 5), dim: int | None = None, eps: float = 1e-3) -> None:
        super().__init__()
        levels = [int(level) for level in levels]
        if not levels or min(levels) < 2:
            raise ConfigError(f"FSQ levels must be integers >= 2, got {levels}")
        self.levels_list = levels
        self.dim = dim or len(levels)
        self.codebook_size = math.prod(levels)
        self.eps = eps
        # Derived constants: non-persistent buffers (only learned state goes in checkpoints).
        lv = torch.tensor(levels, dtype=torch.float32)
        self.register_buffer("levels", lv, persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.tensor([1] + levels[:-1]), 0), persistent=False)
        self.register_buffer("half_width", (lv // 2), persistent=False)
        needs_projection = self.dim != len(levels)
        self.project_in = nn.Linear(self.dim, len(levels)) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(len(levels), self.dim) if needs_projection else nn.Identity()

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash z (..., C) so that rounding gives the levels' integer range."""
        half_l = (self.levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def grid_to_ids(self, grid: torch.Tensor) -> torch.Tensor:
        """Grid codes (..., C) in [-1, 1] -> ids (...)."""
        digits = (grid * self.half_width + self.half_width).round().long()
        return (digits * self.basis).sum(-1)

    def ids_to_grid(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> grid codes (..., C) in [-1, 1]."""
        digits = (ids.unsqueeze(-1) // self.basis) % self.levels.long()
        return (digits - self.half_width) / self.half_width

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (..., dim) -> codes (..., dim), ids (...); C = len(levels) channels."""
        shape = z.shape
        flat = rearrange(z, "... d -> (...) d")
        grid = round_ste(self.bound(self.project_in(flat.float()))) / self.half_width  # (M, C)
        codes = self.project_out(grid).to(z.dtype)
        ids = self.grid_to_ids(grid.detach())
        out_codes, out_ids = codes.reshape(shape), ids.reshape(shape[:-1])
        stats = codebook_stats(out_ids, self.codebook_size, z, out_codes)
        return QuantizerOutput(out_codes, out_ids, z.new_zeros(()), stats)

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.ids_to_grid(ids))

    def extra_repr(self) -> str:
        return f"levels={self.levels_list}, dim={self.dim}, codebook_size={self.codebook_size}"
