"""diffusers' ``VQModel`` as an stvq tokenizer (``diffusers-vq``): the VQGANs of aMUSEd, the LDM VQ-f4/f8
autoencoders and others stored as a diffusers directory (``config.json`` + ``diffusion_pytorch_model.safetensors``).

The model is diffusers' own, read by the diffusers library (an optional extra: ``pip install
"stvq[diffusers]"``), never re-implemented: ids are the indices its quantizer picks, in raster order over
the latent grid, and decoding looks them up in its codebook and runs its decoder. Weights load from
safetensors only, so nothing in a directory executes code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from stvq.checkpoint import PretrainedMixin
from stvq.errors import CheckpointError, StvqError, first_line
from stvq.interfaces import Tokenizer, check_ids, check_images


def _vq_model_class() -> Any:
    try:
        from diffusers import VQModel
    except ImportError:
        raise StvqError('the diffusers-vq tokenizer reads diffusers\' VQModel with the diffusers library: pip install "stvq[diffusers]"') from None
    return VQModel


def _load(path: str) -> Any:
    """A VQModel from a local directory (or a hub id, where diffusers can download it), safetensors only."""
    config = Path(path) / "config.json"
    if config.is_file():
        try:
            kind = json.loads(config.read_text()).get("_class_name")
        except (ValueError, AttributeError):
            raise CheckpointError(f"{config} is not a diffusers config (not a JSON object); pass a directory that VQModel.save_pretrained wrote") from None
        if kind != "VQModel":
            raise CheckpointError(
                f"{path} holds a diffusers {kind or 'model of no named class'}, not a VQModel: the diffusers-vq tokenizer reads VQModel directories (an AutoencoderKL has no codebook)"
            )
    try:
        return _vq_model_class().from_pretrained(path, use_safetensors=True, low_cpu_mem_usage=False).eval()
    except StvqError:
        raise
    except Exception as err:  # diffusers and huggingface_hub raise many types: a missing file, no network, a bad tensor
        raise CheckpointError(f"{path}: not a readable diffusers VQModel with diffusion_pytorch_model.safetensors ({type(err).__name__}: {first_line(err)})") from None


class DiffusersVQTokenizer(PretrainedMixin, Tokenizer):
    """``stvq.load_tokenizer("diffusers-vq", path="DIR")``: a diffusers ``VQModel`` directory (or hub id);
    ``checkpoint`` is the same, as ``stvq compose --part diffusers-vq=DIR`` passes it; ``config`` (a
    VQModel config dict, what ``save_pretrained`` stores) builds one with random weights."""

    plugin_kind = "tokenizer"
    plugin_name = "diffusers-vq"

    def __init__(self, path: str | None = None, checkpoint: str | None = None, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.vq: Any  # a diffusers VQModel (typed by diffusers, not here)
        source = path or checkpoint
        if source is not None:
            self.vq = _load(str(source))
        elif config is not None:
            self.vq = _vq_model_class().from_config(config)
        else:
            raise StvqError("the diffusers-vq tokenizer needs a VQModel directory: path=DIR (--part diffusers-vq=DIR)")
        cfg = self.vq.config
        self.image_size = int(cfg.sample_size)
        self.grid = self.image_size // 2 ** (len(cfg.block_out_channels) - 1)  # one downsampling per block but the last
        self.num_tokens, self.vocab_size = self.grid**2, int(cfg.num_vq_embeddings)
        self.code_dim = int(cfg.vq_embed_dim or cfg.latent_channels)

    def init_options(self) -> dict[str, Any]:
        return {"config": {k: v for k, v in self.vq.config.items() if not k.startswith("_")}}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> ids (B, h * w), row-major over the latent grid."""
        check_images(images, self.image_size, values=True)
        latents = self.vq.encode(images).latents  # (B, C, h, w), after quant_conv
        _, _, (_, _, indices) = self.vq.quantize(latents)
        return indices.reshape(len(images), -1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, h * w) -> images (B, 3, H, W) in [-1, 1]."""
        check_ids(ids, self.num_tokens, self.vocab_size, "diffusers VQModel ids")
        shape = (len(ids), self.grid, self.grid, self.code_dim)
        if self.vq.config.lookup_from_codebook:  # the model looks the ids up itself
            out = self.vq.decode(ids.reshape(-1), force_not_quantize=True, shape=shape)
        else:
            out = self.vq.decode(self.vq.quantize.get_codebook_entry(ids.reshape(-1), shape), force_not_quantize=True)
        return out.sample.clamp(-1, 1)
