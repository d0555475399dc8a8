"""A VQGAN tokenizer compatible with taming-transformers' ``VQModel`` checkpoints (Esser, Rombach, Ommer,
"Taming Transformers for High-Resolution Image Synthesis", CVPR 2021).

The module tree and parameter names follow taming's Encoder/Decoder (from its ``ddconfig``), quant_conv,
post_quant_conv and the VectorQuantizer2 codebook (``quantize.embedding.weight``), so a public ``.ckpt``
loads key for key; the checkpoint's ``loss.*`` keys (LPIPS and discriminator) are skipped. Tokens are the
nearest-codeword indices of the latent grid, flattened row-major in (b, h, w) order.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stvq.checkpoint import PretrainedMixin, check_state_dict
from stvq.errors import CheckpointError, ConfigError, first_line
from stvq.interfaces import Tokenizer, check_ids, check_images
from stvq_reference.codebook import nearest


def normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, 1x1 convolutions for q, k, v and output."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = normalize(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q, k, v = (rearrange(conv(h), "b c h w -> b 1 (h w) c") for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale c^-1/2, as taming's
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=hh))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as taming's


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    return level


def _run_level(level: Any, h: torch.Tensor, resample: str) -> torch.Tensor:
    """A level's ResNet blocks (each followed by its attention block, where the level has them), then
    its ``downsample`` or ``upsample`` if it has one."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return getattr(level, resample)(h) if hasattr(level, resample) else h


def _middle(channels: int) -> Any:
    mid: Any = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    def __init__(
        self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int], in_channels: int, resolution: int, z_channels: int, double_z: bool = False, **unused: Any
    ) -> None:  # the rest of a taming ddconfig
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, block_in = resolution, ch
        for i, mult in enumerate(ch_mult):
            blocks: list[nn.Module] = []
            attns: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid: Any = _middle(block_in)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h, "downsample")
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int], resolution: int, z_channels: int, **unused: Any
    ) -> None:  # the rest of a taming ddconfig
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid: Any = _middle(block_in)
        levels: list[nn.Module] = []
        for i in reversed(range(len(ch_mult))):
            blocks: list[nn.Module] = []
            attns: list[nn.Module] = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[i]))
                block_in = ch * ch_mult[i]
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)  # stored by level (0 = full resolution), run from the coarsest
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = _run_level(level, h, "upsample")
        return self.conv_out(F.silu(self.norm_out(h)))


class Codebook(nn.Module):
    """VectorQuantizer2's state: ``embedding.weight`` (n_embed, embed_dim)."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)


#: Bounds on a ddconfig (taming's hold about ten entries; ``ch_mult`` and ``attn_resolutions`` a few numbers):
#: YAML aliases can make a file of a few hundred bytes expand to gigabytes (a "billion laughs").
MAX_DDCONFIG_ENTRIES, MAX_DDCONFIG_LIST = 32, 16


def check_ddconfig(ddconfig: Any, origin: str) -> dict[str, Any]:
    """``ddconfig`` as a plain dict of at most 32 scalars or short lists of numbers, or a one-line
    ConfigError naming ``origin``: what a taming config holds, and nothing that expands without bound."""
    scalar = (bool, int, float, str, type(None))
    if not isinstance(ddconfig, dict) or len(ddconfig) > MAX_DDCONFIG_ENTRIES:
        raise ConfigError(f"{origin}: ddconfig must be a mapping of at most {MAX_DDCONFIG_ENTRIES} entries, as in taming-transformers' configs")
    for key, value in ddconfig.items():
        numbers = isinstance(value, (list, tuple)) and len(value) <= MAX_DDCONFIG_LIST and all(isinstance(v, (int, float)) for v in value)
        if not isinstance(key, str) or not (numbers or isinstance(value, scalar) and len(str(value)) <= 64):
            raise ConfigError(
                f"{origin}: ddconfig[{str(key)[:40]!r}] is not a number, a short string or a list of at most {MAX_DDCONFIG_LIST} numbers "
                "(nested YAML aliases?); a taming-transformers ddconfig holds only such values"
            )
    return {key: list(value) if isinstance(value, (list, tuple)) else value for key, value in ddconfig.items()}


def read_taming_config(path: str | Path) -> dict[str, Any]:
    """``model.params`` of a taming YAML config: ddconfig, embed_dim, n_embed."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"VQGAN config {path} does not exist; pass the .yaml that came with the checkpoint")
    try:
        params = yaml.safe_load(path.read_text())["model"]["params"]
        return {"ddconfig": check_ddconfig(params["ddconfig"], str(path)), "embed_dim": int(params["embed_dim"]), "n_embed": int(params["n_embed"])}
    except (KeyError, TypeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path} is not a taming-transformers VQModel config (model.params with ddconfig, embed_dim, n_embed): {' '.join(str(err).split())}") from None


def load_weights_only(path: str | Path, what: str) -> Any:
    """A torch pickle loaded with ``weights_only=True``, which never runs code: tensors, numbers and
    containers; anything else (a ``__reduce__`` payload) is one line, never executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about legacy pickles before refusing them: the error says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} is not a checkpoint torch can load with weights_only=True, which never runs code ({type(err).__name__}: {first_line(err)})") from None


def read_taming_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model tensors of a Lightning ``.ckpt`` (``state_dict``), without ``loss.*``; never unpickles code."""
    raw = load_weights_only(path, "VQGAN checkpoint")
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state_dict")
    odd = next((k for k, v in state.items() if not k.startswith("loss.") and not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise CheckpointError(f"{path}: state_dict[{str(odd)[:60]!r}] is a {type(state[odd]).__name__}, not a tensor; pass the .ckpt that taming-transformers wrote")
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


class VQGANTokenizer(PretrainedMixin, Tokenizer):
    """``stvq.load_tokenizer("vqgan", checkpoint="x.ckpt", config="x.yaml")``; or built from ``ddconfig``,
    ``embed_dim`` and ``n_embed`` (random weights)."""

    plugin_kind = "tokenizer"
    plugin_name = "vqgan"

    def __init__(self, checkpoint: str | None = None, config: str | None = None, ddconfig: dict | None = None, embed_dim: int | None = None, n_embed: int | None = None) -> None:
        super().__init__()
        if config is not None:
            params = read_taming_config(config)
            ddconfig, embed_dim, n_embed = params["ddconfig"], params["embed_dim"], params["n_embed"]
        if ddconfig is None or embed_dim is None or n_embed is None:
            raise ConfigError("a taming checkpoint also needs --vqgan-config model.yaml (config= in Python), or give ddconfig, embed_dim and n_embed")
        ddconfig = check_ddconfig(ddconfig, "the vqgan tokenizer's options")
        self.ddconfig, self.embed_dim, self.n_embed = ddconfig, int(embed_dim), int(n_embed)
        try:  # a ddconfig with a key missing or of the wrong type fails somewhere inside the networks
            self.encoder = Encoder(**ddconfig)
            self.decoder = Decoder(**ddconfig)
            self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
            self.quantize = Codebook(n_embed, embed_dim)
            self.image_size = int(ddconfig["resolution"])
            self.grid = self.image_size // 2 ** (len(ddconfig["ch_mult"]) - 1)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ConfigError(f"ddconfig {self.ddconfig} is not a taming-transformers VQGAN ddconfig ({type(err).__name__}: {err})") from None
        self.num_tokens, self.vocab_size = self.grid**2, self.n_embed
        if checkpoint is not None:
            state = read_taming_state(checkpoint)
            check_state_dict(self.state_dict(), state, str(checkpoint))
            self.load_state_dict(state)
            self.eval()

    def init_options(self) -> dict[str, Any]:
        return {"ddconfig": self.ddconfig, "embed_dim": self.embed_dim, "n_embed": self.n_embed}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> ids (B, h * w), row-major over the latent grid."""
        check_images(images, self.image_size, values=True)
        z = self.quant_conv(self.encoder(images))  # (B, e, h, w)
        flat = rearrange(z, "b e h w -> (b h w) e")
        return nearest(flat, self.quantize.embedding.weight).reshape(len(images), -1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, h * w) -> images (B, 3, H, W) in [-1, 1]."""
        check_ids(ids, self.num_tokens, self.n_embed, "VQGAN ids")
        z = rearrange(self.quantize.embedding(ids), "b (h w) e -> b e h w", h=self.grid)
        return self.decoder(self.post_quant_conv(z)).clamp(-1, 1)
