"""Contract tests that every quantizer must pass, written once. A plugin package's tests subclass
:class:`QuantizerContract` and implement ``make_quantizer``; stvq's own suite runs it for every registered
quantizer.

    class TestMyQuantizer(QuantizerContract):
        def make_quantizer(self, dim):
            return MyQuantizer(dim=dim)
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from stvq.interfaces import Quantizer, QuantizerOutput


class QuantizerContract:
    """SPEC section 7: ``q(z)`` on (..., dim) codes -> codes (same shape, straight-through), ids (...)
    int64 in [0, codebook_size), a scalar loss and stats; ``ids_to_codes(ids) == codes`` in eval mode."""

    dim = 6

    def make_quantizer(self, dim: int) -> Quantizer:
        """A ready-to-use quantizer (fitted, if it needs fitting) over ``dim``-wide codes."""
        raise NotImplementedError

    @pytest.fixture
    def quantizer(self) -> Quantizer:
        torch.manual_seed(0)
        return self.make_quantizer(self.dim)

    @pytest.fixture
    def z(self) -> torch.Tensor:
        return torch.randn(4, 36, self.dim, generator=torch.Generator().manual_seed(1))

    def test_output_types_and_shapes(self, quantizer, z):
        out = quantizer(z)
        assert isinstance(out, QuantizerOutput)
        assert out.codes.shape == z.shape and out.codes.dtype == z.dtype
        assert out.ids.shape == z.shape[:-1] and out.ids.dtype == torch.int64
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert 0 <= out.ids.min() and out.ids.max() < quantizer.codebook_size
        assert {"usage", "perplexity", "dead_codes", "mse"} <= set(out.stats)
        assert 0 < out.stats["usage"] <= 1 and 1 <= out.stats["perplexity"] <= quantizer.codebook_size

    def test_ids_to_codes_inverts_ids_in_eval(self, quantizer, z):
        quantizer.train()
        quantizer(z)  # a training step may initialise or update state
        quantizer.eval()
        out = quantizer(z)
        assert torch.equal(quantizer.ids_to_codes(out.ids), out.codes)

    def test_gradient_passes_straight_through(self, quantizer, z):
        quantizer.train()
        z = z.clone().requires_grad_()
        out = quantizer(z)
        (out.codes * torch.arange(z.shape[-1], dtype=z.dtype)).sum().backward()
        assert z.grad is not None and z.grad.abs().sum() > 0

    def test_state_round_trips_through_safetensors(self, quantizer, z, tmp_path):
        quantizer.train()
        quantizer(z)
        quantizer.eval()
        save_file({k: v.contiguous() for k, v in quantizer.state_dict().items()}, str(tmp_path / "q.safetensors"))
        fresh = self.make_quantizer(self.dim)
        fresh.load_state_dict(load_file(str(tmp_path / "q.safetensors")))
        fresh.eval()
        assert torch.equal(fresh(z).ids, quantizer(z).ids)
