"""LlamaGen's VQ tokenizer (Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image
Generation", 2024): the ``VQ-16`` and ``VQ-8`` models of FoundationVision/LlamaGen, whose checkpoints
(``vq_ds16_c2i.pt`` and others) load key for key.

The architecture is a taming-style convolutional encoder and decoder (base width 128, GroupNorm, a
single-head attention block after every ResNet block of the coarsest level and in the middle) around a
codebook of ``codebook_size`` x ``codebook_embed_dim`` codes, l2-normalised with the latents where
``codebook_l2_norm``. Its parameter names differ from taming's: ``conv_blocks.{i}.res / attn /
downsample | upsample``, ``mid.{0,1,2}``, the decoder's levels stored coarsest first, and the quantizer's
``codebook_used`` buffer. A checkpoint carries no config: the architecture is the named preset and
LlamaGen's ``ModelArgs`` fields given by name. Tokens are the nearest codes of the latent grid, row-major.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stvq.checkpoint import PretrainedMixin, check_state_dict
from stvq.errors import CheckpointError, ConfigError
from stvq.interfaces import Tokenizer, check_ids, check_images
from stvq_reference.vqgan import AttnBlock, Downsample, ResnetBlock, Upsample, load_weights_only, normalize

#: LlamaGen's named models: the channel multipliers of their encoder and decoder levels.
PRESETS = {"VQ-16": [1, 1, 2, 2, 4], "VQ-8": [1, 2, 2, 4]}
#: LlamaGen's ``ModelArgs`` fields that shape the weights, at its defaults (the ch_mult fields from the preset).
MODEL_ARGS = {"codebook_size": 16384, "codebook_embed_dim": 8, "codebook_l2_norm": True, "z_channels": 256}
#: The length of the quantizer's ``codebook_used`` buffer (the ids of the last training batches).
USAGE_WINDOW = 65536


def _levels(ch: int, ch_mult: Sequence[int], blocks: int, attn_level: int, resample: str, first: int) -> tuple[nn.ModuleList, int]:
    """LlamaGen's ``conv_blocks``: per level, ``blocks`` ResNet blocks (``res``), an attention block after each
    at ``attn_level`` (``attn``, empty elsewhere), then ``resample`` except at the last level run."""
    levels, block_in = nn.ModuleList(), first
    order = range(len(ch_mult)) if resample == "downsample" else reversed(range(len(ch_mult)))
    for position, i in enumerate(order):
        level = nn.Module()
        res, attn = nn.ModuleList(), nn.ModuleList()
        for _ in range(blocks):
            res.append(ResnetBlock(block_in, ch * ch_mult[i]))
            block_in = ch * ch_mult[i]
            if i == attn_level:
                attn.append(AttnBlock(block_in))
        level.res, level.attn = res, attn
        if position != len(ch_mult) - 1:
            setattr(level, resample, Downsample(block_in) if resample == "downsample" else Upsample(block_in))
        levels.append(level)
    return levels, block_in


def _middle(channels: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)])


def _run(levels: nn.ModuleList, h: torch.Tensor, resample: str) -> torch.Tensor:
    level: Any
    for level in levels:
        for i, block in enumerate(level.res):
            h = block(h)
            if len(level.attn):
                h = level.attn[i](h)
        if hasattr(level, resample):
            h = getattr(level, resample)(h)
    return h


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], z_channels: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks, block_in = _levels(ch, ch_mult, 2, len(ch_mult) - 1, "downsample", ch)
        self.mid = _middle(block_in)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _run(self.conv_blocks, self.conv_in(x), "downsample")
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], z_channels: int) -> None:
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _middle(block_in)
        self.conv_blocks, block_in = _levels(ch, ch_mult, 3, len(ch_mult) - 1, "upsample", block_in)  # coarsest first
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(_run(self.conv_blocks, h, "upsample"))))


class Quantize(nn.Module):
    """The state of LlamaGen's ``VectorQuantizer``: ``embedding.weight`` and the ``codebook_used`` buffer."""

    def __init__(self, size: int, dim: int, l2_norm: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(size, dim)
        self.l2_norm = l2_norm
        self.register_buffer("codebook_used", torch.zeros(USAGE_WINDOW))

    def codes(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1) if self.l2_norm else self.embedding.weight

    def ids(self, z: torch.Tensor) -> torch.Tensor:
        """(M, D) latents -> (M,) ids: the argmin of |z|^2 + |e|^2 - 2 z.e, as LlamaGen computes it."""
        codes = self.codes()
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        distance = z.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * z @ codes.T
        return distance.argmin(1)


def read_llamagen_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a LlamaGen checkpoint: its ``ema``, else ``model``, else ``state_dict`` entry (the
    order LlamaGen's own loader tries), or a bare state dict; never unpickles code."""
    raw = load_weights_only(path, "a LlamaGen VQ checkpoint")
    state = next((raw[k] for k in ("ema", "model", "state_dict") if isinstance(raw, dict) and k in raw), raw)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} holds no state dict of tensors under 'ema', 'model' or 'state_dict'; pass a checkpoint that LlamaGen's train_vq.py wrote")
    return state


class LlamaGenVQTokenizer(PretrainedMixin, Tokenizer):
    """``stvq.load_tokenizer("llamagen-vq", checkpoint="vq_ds16_c2i.pt", preset="VQ-16")``: LlamaGen's VQ
    model, any ``ModelArgs`` field overridden by name (``codebook_size=...``, ``encoder_ch_mult=[...]``);
    ``ch`` is LlamaGen's fixed base width (128) and ``image_size`` the images it reads (256)."""

    plugin_kind = "tokenizer"
    plugin_name = "llamagen-vq"

    def __init__(
        self,
        checkpoint: str | None = None,
        preset: str = "VQ-16",
        image_size: int = 256,
        ch: int = 128,
        encoder_ch_mult: Sequence[int] | None = None,
        decoder_ch_mult: Sequence[int] | None = None,
        **model_args: Any,
    ) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ConfigError(f"LlamaGen preset {preset!r} is not one of {', '.join(PRESETS)}")
        unknown = sorted(set(model_args) - set(MODEL_ARGS))
        if unknown:
            raise ConfigError(f"{', '.join(unknown)}: not a LlamaGen ModelArgs field that shapes the weights; known: {', '.join([*MODEL_ARGS, 'encoder_ch_mult', 'decoder_ch_mult'])}")
        args = {**MODEL_ARGS, **model_args}
        enc, dec = list(encoder_ch_mult or PRESETS[preset]), list(decoder_ch_mult or PRESETS[preset])
        if not (enc and dec and all(isinstance(m, int) and m > 0 for m in enc + dec) and ch % 32 == 0 and ch > 0):
            raise ConfigError(f"channel multipliers must be positive integers and ch a multiple of 32 (GroupNorm's groups); got {enc}, {dec}, ch={ch}")
        if len(enc) != len(dec) or image_size % 2 ** (len(enc) - 1):
            raise ConfigError(f"encoder_ch_mult {enc} and decoder_ch_mult {dec} must have one length, and image_size {image_size} divide by {2 ** (len(enc) - 1)}")
        self.options = {"preset": preset, "image_size": image_size, "ch": ch, "encoder_ch_mult": enc, "decoder_ch_mult": dec, **args}
        self.encoder = Encoder(ch, enc, args["z_channels"])
        self.decoder = Decoder(ch, dec, args["z_channels"])
        self.quantize = Quantize(args["codebook_size"], args["codebook_embed_dim"], bool(args["codebook_l2_norm"]))
        self.quant_conv = nn.Conv2d(args["z_channels"], args["codebook_embed_dim"], 1)
        self.post_quant_conv = nn.Conv2d(args["codebook_embed_dim"], args["z_channels"], 1)
        self.image_size, self.grid = image_size, image_size // 2 ** (len(enc) - 1)
        self.num_tokens, self.vocab_size = self.grid**2, args["codebook_size"]
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    def load_checkpoint(self, path: str | Path) -> None:
        """Weights from a LlamaGen checkpoint (:func:`read_llamagen_state`); one without the usage buffer (a
        model trained with ``codebook_show_usage`` off) keeps zeros. Another model's weights name the first
        mismatched key and the preset that has the checkpoint's number of levels."""
        state = read_llamagen_state(path)
        expected = self.state_dict()
        if "quantize.codebook_used" not in state:
            state = {**state, "quantize.codebook_used": expected["quantize.codebook_used"]}
        try:
            check_state_dict(expected, state, str(path))
        except CheckpointError as err:
            levels = len({k.split(".")[2] for k in state if k.startswith("encoder.conv_blocks.")})
            hint = next((f"; its encoder has {levels} levels, as {name}: pass preset={name!r}" for name, mult in PRESETS.items() if len(mult) == levels and name != self.options["preset"]), "")
            raise CheckpointError(f"{err}{hint}") from None
        self.load_state_dict(state)
        self.eval()

    def init_options(self) -> dict[str, Any]:
        return dict(self.options)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> ids (B, h * w), row-major over the latent grid."""
        check_images(images, self.image_size, values=True)
        z = self.quant_conv(self.encoder(images))
        return self.quantize.ids(rearrange(z, "b e h w -> (b h w) e")).reshape(len(images), -1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, h * w) -> images (B, 3, H, W) in [-1, 1]."""
        check_ids(ids, self.num_tokens, self.vocab_size, "LlamaGen VQ ids")
        z = rearrange(self.quantize.codes()[ids], "b (h w) e -> b e h w", h=self.grid)
        return self.decoder(self.post_quant_conv(z)).clamp(-1, 1)
