"""Data: the built-in ``shapes`` data set (procedural, with known factors), real ``photos`` shipped by
scikit-image, image folders (the ``dataset`` plugins the reference package registers for them), and the
``--data`` strings the CLI accepts (:func:`make_dataset`)."""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import Dataset

from stvq.errors import StvqError
from stvq.interfaces import FactorDataset, ImageDataset, ImageStream

# Eight well-separated colours shared by the background and the object.
PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240], [250, 250, 250]],
    dtype=np.float32,
) / 127.5 - 1.0
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
TEXTURES = ("plain", "stripes", "dots")

#: Factors of ``shapes``, ordered from global to local on purpose: name -> number of classes (0: continuous).
FACTORS = {
    "background": len(PALETTE),
    "shape": len(SHAPES),
    "color": len(PALETTE),
    "size": 0,
    "x": 0,
    "y": 0,
    "rotation": 0,
    "texture": len(TEXTURES),
}
SPLITS = {"train": 0, "val": 1, "all": 0}  # "all": the endless training stream (tokenize reads its start)
VAL_SIZE = 512


@functools.lru_cache(maxsize=4)
def _pixel_centres(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the centres of an n x n grid of pixels in [0, 1], each (n, n) float32 (read-only)."""
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    xs.flags.writeable = ys.flags.writeable = False
    return xs, ys


def _inside(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` with radius r, in coordinates (u, v) already rotated about its centre."""
    if shape == "circle":
        return u**2 + v**2 <= r**2
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8 * r
    if shape == "diamond":
        return abs(u) + abs(v) <= r
    if shape == "cross":
        return ((abs(u) <= r / 3) & (abs(v) <= r)) | ((abs(v) <= r / 3) & (abs(u) <= r))
    # equilateral triangle pointing up, inscribed in the circle of radius r
    return (v <= r / 2) & (math.sqrt(3) * u - v <= r) & (-math.sqrt(3) * u - v <= r)  # image v points down


class ShapesDataset(FactorDataset):
    """Procedural RGB images of one object on a plain background, deterministic from (seed, split, index).

    Factors (see :data:`FACTORS`): background colour, object shape, object colour, size, position (x, y),
    rotation, a fine texture (plain, stripes or dots), plus small pixel noise. ``split="val"`` is a fixed
    set of :data:`VAL_SIZE` images drawn from a separate stream.
    """

    endless = True  # a pass over it names a count (--max-images)
    factor_classes = FACTORS

    def __init__(self, image_size: int = 64, split: str = "train", seed: int = 0, length: int = 1_000_000, noise: float = 0.02) -> None:
        if split not in SPLITS:
            raise StvqError(f"unknown split {split!r}; use 'train', 'val' or 'all'")
        self.image_size, self.split, self.seed, self.noise = image_size, "train" if split == "all" else split, seed, noise
        self.length = VAL_SIZE if split == "val" else length

    def __len__(self) -> int:
        return self.length

    def fingerprint(self) -> str:
        return f"shapes:{self.split}:seed{self.seed}"

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS[self.split], index])

    def factors(self, index: int) -> dict[str, float]:
        rng = self._rng(index)
        background = int(rng.integers(len(PALETTE)))
        color = int((background + rng.integers(1, len(PALETTE))) % len(PALETTE))  # never the background
        size = float(rng.uniform(0.16, 0.32))
        return {
            "background": background,
            "shape": int(rng.integers(len(SHAPES))),
            "color": color,
            "size": size,
            "x": float(rng.uniform(size, 1 - size)),
            "y": float(rng.uniform(size, 1 - size)),
            "rotation": float(rng.uniform(0, 90)),
            "texture": int(rng.integers(len(TEXTURES))),
        }

    def render(self, f: dict[str, float], noise_seed: int | None = None) -> torch.Tensor:
        """The image (3, H, W) in [-1, 1] for factors ``f``; 2x supersampled for smooth edges."""
        xs, ys = _pixel_centres(2 * self.image_size)
        angle = math.radians(f["rotation"])
        dx, dy = xs - np.float32(f["x"]), ys - np.float32(f["y"])
        cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
        u, v = cos * dx + sin * dy, cos * dy - sin * dx
        mask = _inside(SHAPES[int(f["shape"])], u, v, f["size"])[..., None]
        color = PALETTE[int(f["color"])]
        period = f["size"] / 2.5  # a fine pattern, a few repeats across the object
        texture = TEXTURES[int(f["texture"])]
        if texture == "stripes":
            color = color * np.where(np.sin(2 * math.pi * u / period) > 0, np.float32(1.0), np.float32(0.35))[..., None]
        elif texture == "dots":
            du, dv = (u / period) % 1 - 0.5, (v / period) % 1 - 0.5
            color = np.where((du**2 + dv**2 < 0.06)[..., None], -color, color)
        image = np.where(mask, color, PALETTE[int(f["background"])])  # (2H, 2W, 3)
        image = (image[0::2, 0::2] + image[1::2, 0::2] + image[0::2, 1::2] + image[1::2, 1::2]) * np.float32(0.25)  # 2x2 means
        if self.noise and noise_seed is not None:
            image = image + self.noise * np.random.default_rng(noise_seed).standard_normal(image.shape, dtype=np.float32)
        return torch.from_numpy(np.clip(image, -1, 1).astype(np.float32)).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.render(self.factors(index), noise_seed=self.seed * 1_000_003 + 2 * index + SPLITS[self.split])

    def factor_table(self, count: int | None = None) -> dict[str, np.ndarray]:
        """Factors of the first ``count`` items as arrays, for probes."""
        rows = [self.factors(i) for i in range(count or len(self))]
        return {name: np.array([row[name] for row in rows]) for name in FACTORS}

    def recogniser(self):
        """The factor recogniser (:func:`stvq.judge.recogniser`: trained once, then cached)."""
        from stvq.judge import recogniser

        return recogniser(self.image_size)[0]

    def heldout_scenes(self) -> DrawnScenes:
        return DrawnScenes(self.image_size, self.seed)


class DrawnScenes(Dataset):
    """Held-out one-object scenes from another generator than :class:`ShapesDataset`: PIL's ImageDraw
    rasterises a circle, square, triangle or diamond (no supersampling, texture or noise) in a palette
    colour on a plain palette background, at a size, place and rotation drawn from a separate stream.
    Item i is (image (3, S, S) in [-1, 1], object mask (1, S, S) bool), for object-pixel PSNR."""

    SIDES = {"circle": 0, "square": 4, "triangle": 3, "diamond": 4}

    def __init__(self, image_size: int = 64, seed: int = 0, length: int = VAL_SIZE) -> None:
        self.image_size, self.seed, self.length = image_size, seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 7, index])  # 7: a stream the shapes splits never use
        s = self.image_size
        background = int(rng.integers(len(PALETTE)))
        color = (background + int(rng.integers(1, len(PALETTE)))) % len(PALETTE)
        shape = list(self.SIDES)[int(rng.integers(len(self.SIDES)))]
        radius = rng.uniform(0.16, 0.32)
        centre = (rng.uniform(radius, 1 - radius) * s, rng.uniform(radius, 1 - radius) * s)
        mask = Image.new("L", (s, s))
        draw = ImageDraw.Draw(mask)
        if shape == "circle":
            draw.ellipse([centre[0] - radius * s, centre[1] - radius * s, centre[0] + radius * s, centre[1] + radius * s], fill=255)
        else:
            rotation = rng.uniform(0, 90) + (45 if shape == "diamond" else 0)
            draw.regular_polygon((*centre, radius * s), self.SIDES[shape], rotation=rotation, fill=255)
        inside = torch.from_numpy(np.asarray(mask) > 127)[None]  # (1, S, S)
        palette = torch.from_numpy(PALETTE)
        image = torch.where(inside, palette[color].view(3, 1, 1), palette[background].view(3, 1, 1))
        return image, inside


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


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
    with Image.open(path) as img:
        return fit_image(img, image_size)


def fit_image(img: Image.Image, image_size: int) -> torch.Tensor:
    """A PIL image of any mode -> upright (EXIF orientation, applied to ``img`` in place) RGB, shorter side
    resized to ``image_size`` and centre-cropped; (3, S, S) in [-1, 1]."""
    ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of the full-size image (8 % of the time)
    if img.mode in ("I", "I;16", "I;16L", "I;16B"):  # 16-bit grey: convert("RGB") would clip it at 255, all white
        img = Image.fromarray(np.round(np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return from_pil(ImageOps.fit(img, (image_size, image_size), Image.Resampling.BICUBIC))


_WARNED: set[tuple[Path, tuple[Path, ...]]] = set()  # folders whose unreadable files were already reported


class ImageFolderDataset(ImageDataset):
    """Every readable image under ``root`` (recursive; jpg, png, webp, bmp). Unreadable files are
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
                with Image.open(path) as img:
                    img.verify()
                readable.append(path)
            except Exception:
                broken.append(path)
        if broken and (root, tuple(broken)) not in _WARNED:  # once per folder: eval scans it for two splits
            _WARNED.add((root, tuple(broken)))
            shown = ", ".join(str(p) for p in broken[:3])
            warnings.warn(f"skipped {len(broken)} unreadable image file(s) in {root}: {shown}{' ...' if len(broken) > 3 else ''}", stacklevel=2)
        if not readable:
            raise StvqError(f"no readable image (jpg, png, webp, bmp) under {root}; point --data at a folder of images")
        val = set(readable[::20])
        train = [p for p in readable if p not in val] or readable
        self.paths = {"val": sorted(val), "train": train, "all": readable}[split]
        self.root, self.image_size, self.broken = root, image_size, broken

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
        verify() reads no pixels) is skipped with one warning and counted, and the next file stands in."""
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            try:
                return load_image(path, self.image_size)
            except Exception as err:  # PIL and the codecs raise many types: OSError, SyntaxError, ValueError
                if path not in self.broken:
                    self.broken.append(path)
                    warnings.warn(f"skipped unreadable image file {path} ({err}); the next file stands in", stacklevel=2)
        raise StvqError(f"no image under the data folder can be decoded ({len(self.broken)} unreadable files)")


#: Real photographs that scikit-image ships as files (no download): colour and grey, objects and textures.
PHOTO_FILES = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "motorcycle_left.png",
    "motorcycle_right.png", "retina.jpg", "ihc.png", "camera.png", "moon.png", "coins.png", "page.png",
    "text.png", "grass.png", "gravel.png", "brick.png", "horse.png", "cell.png",
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
        if split not in SPLITS:
            raise StvqError(f"unknown split {split!r}; use 'train', 'val' or 'all'")
        self.image_size, self.split, self.seed = image_size, "train" if split == "all" else split, seed
        self.photos = []
        for path in photo_paths():
            with Image.open(path) as img:
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


class FileSpec(str):
    """A ``--data`` spec read back from a file (a run's ``train.json``), not typed by the user.

    Run directories are shared and downloaded, so what they say may only name local files:
    :func:`make_dataset` refuses a spec of this type that would run a command (webdataset's ``pipe:``) or
    open a URL. Typed on one's own command line, the same spec is read as given."""

    origin: str

    def __new__(cls, value: str, origin: str) -> "FileSpec":
        spec = super().__new__(cls, value)
        spec.origin = origin
        return spec

    def __reduce__(self):  # copies (dataclasses.asdict) and pickles (DataLoader workers) keep the origin
        return FileSpec, (str(self), self.origin)


def check_spec(spec: str) -> None:
    """Refuse a :class:`FileSpec` that names a command or a URL: the one place that decides what a data
    spec read from a file may be."""
    if isinstance(spec, FileSpec) and ("pipe:" in spec or "://" in spec):
        raise StvqError(
            f"{spec.origin} names the data {str(spec)!r}, which runs a command or opens a URL; stvq reads only local files from what a run directory says: "
            f"if you trust it, pass --data {str(spec)!r} yourself"
        )


def parse_data(spec: str) -> tuple[str, str | None]:
    """``--data`` -> (dataset plugin, location): ``NAME`` (or ``NAME:``), ``NAME:LOCATION`` for a registered
    ``NAME`` (``wds:train-{000..099}.tar``, ``hf:DIR:split``), or a folder path (the ``folder`` source). A
    bare ``NAME`` that is also an existing path is refused as ambiguous."""
    from stvq.plugins import plugin_table

    known = plugin_table()["dataset"]
    name, sep, location = spec.partition(":")
    if sep and name in known:
        return name, location or None  # "photos:": the registered data set, whatever folders are about
    if spec in known:
        if Path(spec).exists():
            raise StvqError(f"--data {spec} names both the registered data set and the path ./{spec}; write ./{spec} for the path, or {spec}: for the data set")
        return spec, None
    return "folder", spec


def make_dataset(spec: str, image_size: int, split: str = "train", seed: int = 0):
    """The images ``--data spec`` names (:func:`parse_data`), ``split`` being ``train``, ``val`` or
    ``all``: an :class:`stvq.interfaces.ImageDataset`, or an :class:`stvq.interfaces.ImageStream` for a
    source read in order (not for ``val``)."""
    from stvq.registry import create

    check_spec(spec)
    name, location = parse_data(spec)
    options = {"image_size": image_size, "split": split, "seed": seed}
    if location is not None:
        options["location"] = location
    dataset = create("dataset", name, **options)
    if split == "val" and not isinstance(dataset, ImageDataset):  # create() checked it is one of the two
        raise StvqError(f"dataset plugin {name!r} returned a {type(dataset).__name__} for the validation split, not an stvq.interfaces.ImageDataset; fix the plugin")
    return dataset


def is_stream(dataset) -> bool:
    return isinstance(dataset, ImageStream)


def first_images(dataset, count: int, num_workers: int = 0) -> torch.Tensor:
    """The first ``count`` images of a data set or stream (fewer where it holds fewer), (B, 3, S, S); an
    indexed data set is read by ``num_workers`` DataLoader workers."""
    from itertools import islice

    from stvq.streams import index_batches

    if is_stream(dataset):
        images = list(islice(iter(dataset), count))
        if not images:
            raise StvqError("read no image from the stream (every shard empty or unreadable: the warnings say why); check --data")
        return torch.stack(images)
    rows = range(min(count, len(dataset)))
    return torch.cat(list(index_batches(dataset, [list(rows[i : i + 64]) for i in range(0, len(rows), 64)], num_workers)))


def tokenize_source(spec: str, image_size: int, max_images: int | None = None):
    """The images ``stvq tokenize`` reads (split ``all``), and their fingerprint for the shards' manifest:
    a folder (every image, sorted), a stream (every readable member of every shard), or the first
    ``max_images`` of a built-in source (endless, so the count is required)."""
    from torch.utils.data import Subset

    dataset = make_dataset(spec, image_size, "all")
    if isinstance(dataset, ImageDataset) and dataset.endless and max_images is None:
        raise StvqError(f"--data {spec} is endless; give --max-images N")
    fingerprint = dataset.fingerprint()
    if max_images is not None:
        if is_stream(dataset):
            raise StvqError(f"--max-images applies to sources read by index; --data {spec} is a stream and is tokenized whole (name fewer shards in the pattern)")
        dataset = Subset(dataset, range(min(max_images, len(dataset))))
    return dataset, fingerprint
