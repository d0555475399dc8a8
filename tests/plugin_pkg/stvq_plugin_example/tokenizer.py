"""A whole tokenizer from a third party: its own encoder and decoder (a patchify convolution and its
transpose around one linear map to and from the codes), trained, quantized and evaluated by the stock
`stvq train --tokenizer example-conv`, `stvq quantize` and `stvq eval`, which reach it only through
:class:`stvq.interfaces.CodeTokenizer`. Its options are its own (:class:`ConvConfig`): `--preset` and
`--set KEY=VALUE` reach them through the class's ``config_class``."""

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from stvq.checkpoint import PretrainedMixin
from stvq.config import PluginConfig
from stvq.interfaces import CodeTokenizer, CodeTokenizerOutput, Decoder, Encoder, check_ids, drop_tail
from stvq.registry import create


@dataclass(frozen=True)
class ConvConfig(PluginConfig):
    image_size: int = 64
    patch_size: int = 16
    width: int = 16  # channels of the patch grid
    num_tokens: int = 36
    code_dim: int = 16

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


ConvConfig.PRESETS = {"tiny": ConvConfig(), "wide": ConvConfig(width=64)}
ConvConfig.DEFAULT_PRESET = "tiny"


class ConvEncoder(Encoder):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.num_tokens, self.code_dim, self.image_size, self.grid = cfg.num_tokens, cfg.code_dim, cfg.image_size, cfg.grid_size
        self.patchify = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.to_codes = nn.Linear(cfg.width * cfg.grid_size**2, cfg.num_tokens * cfg.code_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> codes (B, N, code_dim)."""
        x = torch.relu(self.patchify(images)).flatten(1)  # (B, D h w)
        return rearrange(self.to_codes(x), "b (n d) -> b n d", n=self.num_tokens)


class ConvDecoder(Decoder):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.num_tokens, self.code_dim, self.image_size, self.grid = cfg.num_tokens, cfg.code_dim, cfg.image_size, cfg.grid_size
        self.from_codes = nn.Linear(cfg.num_tokens * cfg.code_dim, cfg.width * cfg.grid_size**2)
        self.unpatchify = nn.ConvTranspose2d(cfg.width, 3, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, N, code_dim) -> images (B, 3, H, W)."""
        x = torch.relu(self.from_codes(codes.flatten(1)))
        return self.unpatchify(rearrange(x, "b (d h w) -> b d h w", h=self.grid, w=self.grid))


class ConvTokenizer(PretrainedMixin, CodeTokenizer):
    plugin_kind, plugin_name = "tokenizer", "example-conv"
    config_class = ConvConfig

    def __init__(self, config=None, quantizer: dict | None = None, **overrides) -> None:
        super().__init__()
        self.config = ConvConfig.make(config, **overrides)
        self.num_tokens, self.image_size = self.config.num_tokens, self.config.image_size
        self.encoder, self.decoder = ConvEncoder(self.config), ConvDecoder(self.config)
        self.quantizer, self.quantizer_spec = None, None
        if quantizer:
            self.set_quantizer(quantizer)

    @property
    def vocab_size(self) -> int:
        return self.quantizer.codebook_size

    def init_options(self) -> dict:
        return {"config": self.config.to_dict(), "quantizer": self.quantizer_spec}

    def set_quantizer(self, spec: dict) -> None:
        options = {"dim": self.config.code_dim, **{k: v for k, v in spec.items() if k != "name"}}
        self.quantizer, self.quantizer_spec = create("quantizer", spec["name"], **options), {"name": spec["name"], **options}

    def encode_codes(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(codes)

    def forward(self, images, noise_sigma=0.0, quantize=False, codes=None, tail_drop=0.0) -> CodeTokenizerOutput:
        codes = self.encode_codes(images) if codes is None else codes
        quantized = self.quantizer(codes) if quantize else None
        z = quantized.codes if quantized is not None else codes + noise_sigma * torch.randn_like(codes)
        if tail_drop > 0:
            z = drop_tail(z, tail_drop)
        return CodeTokenizerOutput(codes, self.decode_codes(z), quantized)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantizer(self.encode_codes(images)).ids

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        check_ids(ids, self.num_tokens, self.vocab_size)
        return self.decode_codes(self.quantizer.ids_to_codes(ids)).clamp(-1, 1)
