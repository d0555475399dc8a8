"""Image I/O every job shares: files (any mode, EXIF orientation, 16-bit grey) and PIL images to tensors
in [-1, 1] at a size, tensors back to uint8 pixels and PNG grids, and decoder messages without in-memory
reprs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}

#: The formats stvq decodes, whatever a file's name says: PIL's own in-process decoders. Others are never
#: tried: PIL's EPS reader runs the Ghostscript program, and a downloaded folder must never start a program.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def open_image(path) -> Image.Image:
    """``Image.open`` restricted to :data:`IMAGE_FORMATS` (a path or a binary file object); a file of another
    format raises ``PIL.UnidentifiedImageError`` naming the formats read."""
    from PIL import UnidentifiedImageError

    try:
        return Image.open(path, formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"not an image of a format stvq reads ({', '.join(IMAGE_FORMATS)})") from None


def from_pil(img: Image.Image) -> torch.Tensor:
    """An RGB image -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] (clipped) -> (H, W, 3) uint8, ready for ``Image.fromarray``."""
    return ((image.detach().float().clamp(-1, 1) * 0.5 + 0.5).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def save_image_grid(path: Path, images: torch.Tensor, per_row: int = 8) -> None:
    """(B, 3, H, W) in [-1, 1] -> one PNG, ``per_row`` images a row, written atomically."""
    from torchvision.utils import make_grid

    from stvq.checkpoint import atomic_write

    grid = make_grid(images.float().clamp(-1, 1), nrow=per_row, padding=2, pad_value=-1)
    atomic_write(path, lambda tmp: Image.fromarray(to_uint8(grid)).save(tmp, format="PNG"))


def codec_message(err: Exception) -> str:
    """A decoder's error without the in-memory file's repr ("cannot identify image file <_io.BytesIO
    object at 0x7f...>" -> "cannot identify image file")."""
    import re

    return re.sub(r" ?<_io\.\w+ object at 0x[0-9a-f]+>", "", str(err)) or type(err).__name__


def load_image(path, image_size: int) -> torch.Tensor:
    """A file (path or binary file object) of any mode -> (3, S, S) in [-1, 1] (:func:`fit_image`)."""
    with open_image(path) as img:
        return fit_image(img, image_size)


def fit_image(img: Image.Image, image_size: int) -> torch.Tensor:
    """A PIL image of any mode -> upright (EXIF orientation, applied to ``img`` in place) RGB, shorter side
    resized to ``image_size`` and centre-cropped; (3, S, S) in [-1, 1].

    A JPEG not yet decoded is decoded at 1/2, 1/4 or 1/8 scale where its shorter side stays at twice
    ``image_size`` or more (PIL's draft: the inverse DCT of fewer coefficients), then resized as any image:
    a 512-px photo at 64 px 2.8x faster, 47 dB from decoding it whole (docs/experiments/throughput.md)."""
    img.draft(img.mode, (2 * image_size, 2 * image_size))  # nothing for other formats or a decoded image
    ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of the full-size image (8 % of the time)
    if img.mode in ("I", "I;16", "I;16L", "I;16B"):  # 16-bit grey: convert("RGB") would clip it at 255, all white
        img = Image.fromarray(np.round(np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return from_pil(ImageOps.fit(img, (image_size, image_size), Image.Resampling.BICUBIC))
