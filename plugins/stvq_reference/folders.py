"""The ``folder`` and ``photos`` data sets: every readable image under a folder, and crops of the photos
scikit-image ships (no download)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from stvq.errors import StvqError
from stvq.images import IMAGE_FORMATS, IMAGE_SUFFIXES, codec_message, from_pil, load_image, open_image
from stvq.interfaces import ImageDataset

_WARNED: set[tuple[Path, tuple[Path, ...]]] = set()  # folders whose unreadable files were already reported


class ImageFolderDataset(ImageDataset):
    """Every readable image under ``root`` (recursive; the suffixes of :data:`~stvq.images.IMAGE_SUFFIXES`,
    decoded only as :data:`~stvq.images.IMAGE_FORMATS`). Unreadable files are
    skipped and counted with one warning; every 20th file (sorted) forms the validation split, and
    ``split="all"`` keeps every file."""

    def __init__(self, location: str | Path, image_size: int, split: str = "train", seed: int = 0) -> None:
        root = Path(location)
        if not root.is_dir():
            raise StvqError(f"data folder {root} does not exist; pass --data shapes or an existing folder of images")
        candidates = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        readable, broken = [], []
        for path in candidates:
            try:
                with open_image(path) as img:
                    img.verify()
                readable.append(path)
            except Exception:
                broken.append(path)
        shown = ", ".join(str(p) for p in broken[:3]) + (" ..." if len(broken) > 3 else "")
        if not readable:  # one line: the error names the unreadable files the warning would have
            found = f" ({len(broken)} unreadable: {shown})" if broken else ""
            raise StvqError(f"no readable image ({', '.join(IMAGE_FORMATS)}) under {root}{found}; point --data at a folder of images")
        if broken and (root, tuple(broken)) not in _WARNED:  # once per folder: eval scans it for two splits
            _WARNED.add((root, tuple(broken)))
            warnings.warn(f"skipped {len(broken)} unreadable image file(s) in {root}: {shown}", stacklevel=2)
        val = set(readable[::20])
        train = [p for p in readable if p not in val] or readable
        self.paths = {"val": sorted(val), "train": train, "all": readable}[split]
        self.root, self.image_size, self.broken, self.split = root, image_size, broken, split

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """sha256 over the files' paths (relative to the root) and sizes: another folder, or a changed file
        list, gives another string."""
        import hashlib

        listing = "\n".join(f"{p.relative_to(self.root)}\t{p.stat().st_size}" for p in self.paths)
        return hashlib.sha256(listing.encode()).hexdigest()

    def __getitem__(self, index: int) -> torch.Tensor:
        """The image at ``index``; a file that passed the scan but fails to decode (a truncated JPEG: PIL's
        verify() reads no pixels) is skipped with one warning and counted, and the next file stands in. In
        split ``all`` (what ``stvq tokenize`` reads, a row per file) it is one error naming the file instead,
        since a stand-in would give that file's row another file's ids."""
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            try:
                return load_image(path, self.image_size)
            except Exception as err:  # PIL and the codecs raise many types: OSError, SyntaxError, ValueError
                if self.split == "all":
                    raise StvqError(f"cannot decode {path} ({codec_message(err)}): fix or remove it and run the same command again (finished shards are kept)") from None
                if path not in self.broken:
                    self.broken.append(path)
                    warnings.warn(f"skipped unreadable image file {path} ({err}); the next file stands in", stacklevel=2)
        raise StvqError(f"no image under the data folder can be decoded ({len(self.broken)} unreadable files)")


#: Real photographs that scikit-image ships as files (no download): colour and grey, objects and textures.
PHOTO_FILES = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "ihc.png",
    "camera.png",
    "moon.png",
    "coins.png",
    "page.png",
    "text.png",
    "grass.png",
    "gravel.png",
    "brick.png",
    "horse.png",
    "cell.png",
)


def photo_paths() -> list[Path]:
    """The photo files of the installed scikit-image."""
    from importlib.util import find_spec

    spec = find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise StvqError("the 'photos' data comes from scikit-image: pip install scikit-image, or use --data shapes")
    root = Path(next(iter(spec.submodule_search_locations))) / "data"
    paths = [root / name for name in PHOTO_FILES if (root / name).is_file()]
    if not paths:
        raise StvqError(f"no photo files found in {root}; reinstall scikit-image")
    return paths


class PhotosDataset(ImageDataset):
    """Crops of the photos scikit-image ships: for training, crops deterministic from (seed, index) at a
    random scale (30-100% of the shorter side), position and flip; for validation, each photo's centre."""

    endless = True

    def __init__(self, image_size: int, split: str = "train", seed: int = 0, length: int = 100_000) -> None:
        if split not in ("train", "val", "all"):
            raise StvqError(f"unknown split {split!r}; use 'train', 'val' or 'all'")
        self.image_size, self.split, self.seed = image_size, "train" if split == "all" else split, seed
        self.photos = []
        for path in photo_paths():
            with open_image(path) as img:
                self.photos.append(ImageOps.exif_transpose(img).convert("RGB"))
        self.length = len(self.photos) if split == "val" else length

    def __len__(self) -> int:
        return self.length

    def fingerprint(self) -> str:
        return f"photos:{self.split}:seed{self.seed}"

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.split == "val":
            img = ImageOps.fit(self.photos[index], (self.image_size, self.image_size), Image.Resampling.BICUBIC)
        else:
            rng = np.random.default_rng([self.seed, index])
            photo = self.photos[int(rng.integers(len(self.photos)))]
            side = int(min(photo.size) * rng.uniform(0.3, 1.0))
            left, top = int(rng.integers(photo.width - side + 1)), int(rng.integers(photo.height - side + 1))
            img = photo.crop((left, top, left + side, top + side)).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            if rng.random() < 0.5:
                img = ImageOps.mirror(img)
        return from_pil(img)
