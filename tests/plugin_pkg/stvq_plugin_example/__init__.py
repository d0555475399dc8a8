"""An example third-party plugin package: a sign quantizer here, and a whole tokenizer (its own encoder
and decoder) in ``tokenizer.py``.

A sign quantizer: each of ``dim`` channels becomes +1 or -1, so there are 2**dim codewords
(lookup-free quantization, Yu et al., 2023, without its entropy loss)."""

import torch

import stvq
from stvq.codebook_stats import codebook_stats
from stvq.interfaces import Quantizer, QuantizerOutput


class SignQuantizer(Quantizer):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.dim, self.codebook_size = dim, 2**dim
        self.register_buffer("bits", 2 ** torch.arange(dim), persistent=False)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        hard = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
        codes = z + (hard - z).detach()  # straight-through
        ids = ((hard > 0).long() * self.bits).sum(-1)
        return QuantizerOutput(codes, ids, z.new_zeros(()), codebook_stats(ids, self.codebook_size, z, hard))

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.where((ids.unsqueeze(-1) & self.bits) > 0, 1.0, -1.0)


@stvq.hookimpl
def register_quantizers(register):
    register("sign", SignQuantizer)


@stvq.hookimpl
def register_tokenizers(register):
    register("example-conv", "stvq_plugin_example.tokenizer:ConvTokenizer")


@stvq.hookimpl
def register_commands(cli):
    import click

    @cli.command("example-codewords")
    @click.argument("dim", type=click.IntRange(1, 30))
    def codewords(dim: int) -> None:
        """How many codewords the sign quantizer has over DIM channels."""
        click.echo(f"sign quantizer over {dim} channels: {2**dim:,} codewords")
