"""The ``concat`` composer: several tokenizers as one sequence over one vocabulary (docs/model.md, "Composition with another VQ-VAE").

Part i's ids are offset by the vocabulary sizes of the parts before it, so ``styled+vqgan`` gives 36
styled ids in [0, K) followed by 256 VQGAN ids in [K, K + 16384). Optional special ids (a begin id, a
separator between parts) sit after all parts' ids. Each part sees the image resized to its own size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stvq import registry
from stvq.checkpoint import PretrainedMixin, write_json
from stvq.errors import StvqError
from stvq.interfaces import Composer, Tokenizer, check_ids


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


class ComposedTokenizer(PretrainedMixin, Tokenizer):
    """Built from part specs ``[{"name": registered tokenizer, "options": {...}}, ...]`` (as saved), or
    from tokenizer objects through :meth:`ConcatComposer.compose`."""

    plugin_kind = "tokenizer"
    plugin_name = "composed"

    def __init__(self, parts: Sequence[dict[str, Any] | Tokenizer], begin: bool = False, separator: bool = False, decode_with: int = -1) -> None:
        super().__init__()
        if not parts:
            raise StvqError("a composed tokenizer needs at least one part")
        built = [p if isinstance(p, Tokenizer) else registry.create("tokenizer", p["name"], **p["options"]) for p in parts]
        self.parts: Any = nn.ModuleList(built)  # the part tokenizers, in order
        self.begin, self.separator = begin, separator
        self.decode_with = decode_with % len(built)
        self.offsets, total = [], 0
        for part in built:
            self.offsets.append(total)
            total += part.vocab_size
        self.begin_id = total if begin else None
        self.separator_id = total + int(begin) if separator else None
        self.vocab_size = total + int(begin) + int(separator)
        self.image_size = built[self.decode_with].image_size
        # token layout: [begin] part0 [sep] part1 [sep] ... ; starts[i] is where part i's ids begin
        self.starts, position = [], int(begin)
        for i, part in enumerate(built):
            self.starts.append(position)
            position += part.num_tokens + (int(separator) if i < len(built) - 1 else 0)
        self.num_tokens = position

    def init_options(self) -> dict[str, Any]:
        parts = [{"name": p.plugin_name, "options": p.init_options()} for p in self.parts]
        return {"parts": parts, "begin": self.begin, "separator": self.separator, "decode_with": self.decode_with}

    def manifest(self) -> dict[str, Any]:
        """Human-readable layout: parts in order, their id offsets, positions, sizes and resizing."""
        return {
            "vocab_size": self.vocab_size,
            "num_tokens": self.num_tokens,
            "image_size": self.image_size,
            "begin_id": self.begin_id,
            "separator_id": self.separator_id,
            "decodes_pixels_with": self.decode_with,
            "parts": [
                {
                    "name": p.plugin_name,
                    "offset": off,
                    "vocab_size": p.vocab_size,
                    "positions": [start, start + p.num_tokens],
                    "num_tokens": p.num_tokens,
                    "image_size": p.image_size,
                    "resized_from": self.image_size if p.image_size != self.image_size else None,
                }
                for p, off, start in zip(self.parts, self.offsets, self.starts)
            ],
        }

    def save_pretrained(self, directory) -> Path:
        directory = super().save_pretrained(directory)
        write_json(Path(directory) / "manifest.json", self.manifest())
        return directory

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> ids (B, num_tokens) in one vocabulary."""
        pieces = []
        b = len(images)
        if self.begin_id is not None:
            pieces.append(torch.full((b, 1), self.begin_id, dtype=torch.long))
        for i, (part, offset) in enumerate(zip(self.parts, self.offsets)):
            if i and self.separator_id is not None:
                pieces.append(torch.full((b, 1), self.separator_id, dtype=torch.long))
            pieces.append(part.encode(resize(images, part.image_size)).cpu() + offset)
        return torch.cat(pieces, dim=1)

    def split(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """ids (B, num_tokens) -> each part's own ids (offsets removed), checking every range."""
        check_ids(ids, self.num_tokens, self.vocab_size, "composed ids")
        for name, position, value in (("begin", 0, self.begin_id), *(("separator", st - 1, self.separator_id) for st in self.starts[1:])):
            if value is not None and not torch.all(ids[:, position] == value):
                raise StvqError(f"position {position} must hold the {name} id {value}")
        out = []
        for i, (part, offset, start) in enumerate(zip(self.parts, self.offsets, self.starts)):
            piece = ids[:, start : start + part.num_tokens] - offset
            if piece.min() < 0 or piece.max() >= part.vocab_size:
                raise StvqError(f"ids at positions {start}..{start + part.num_tokens - 1} belong to part {i} ({part.plugin_name}) and must lie in [{offset}, {offset + part.vocab_size})")
            out.append(piece)
        return out

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, num_tokens) -> images from the pixel-decoding part (``decode_with``, default the last)."""
        return self.decode_part(ids, self.decode_with)

    @torch.no_grad()
    def decode_part(self, ids: torch.Tensor, index: int) -> torch.Tensor:
        """Images decoded by part ``index`` alone from its slice of ``ids`` (e.g. 0: the styled tokens)."""
        part = self.parts[index]
        return part.decode(self.split(ids)[index].to(next(part.parameters()).device))


class ConcatComposer(Composer):
    def compose(  # type: ignore[override]  # a composer's options are its own keywords
        self, tokenizers: Sequence[Tokenizer], begin: bool = False, separator: bool = False, decode_with: int = -1
    ) -> ComposedTokenizer:
        for t in tokenizers:
            if not isinstance(t, PretrainedMixin):
                raise StvqError(f"{type(t).__name__} cannot be saved inside a composed tokenizer (it lacks save_pretrained)")
        return ComposedTokenizer(list(tokenizers), begin=begin, separator=separator, decode_with=decode_with)
