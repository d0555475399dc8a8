"""The built-in ``shapes`` data set: procedural one-object scenes with known factors (a
:class:`stvq.interfaces.FactorDataset`), and the held-out scenes of another generator that ``stvq eval``
measures object pixels on."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from stvq.errors import StvqError
from stvq.interfaces import FactorDataset

# Eight well-separated colours shared by the background and the object.
PALETTE = (
    np.array(
        [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240], [250, 250, 250]],
        dtype=np.float32,
    )
    / 127.5
    - 1.0
)
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
#: Length of :meth:`ShapesDataset.factor_vector`: a one-hot per class factor, size, x, y, and two for rotation.
FACTOR_DIM = sum(FACTORS.values()) + 3 + 2
SPLITS = {"train": 0, "val": 1, "all": 0}  # "all": the endless training stream (tokenize reads its start)
VAL_SIZE = 512


@functools.lru_cache(maxsize=4)
def _pixel_centres(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the centres of an n x n grid of pixels in [0, 1], each (n, n) float32 (read-only)."""
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    xs.flags.writeable = ys.flags.writeable = False
    return xs, ys


def _object_window(f: dict[str, float], n: int) -> tuple[slice, slice]:
    """The rows and columns of an n x n grid of pixel centres (n even) that the object of factors ``f``
    may cover, each from an even index to an even one (whole 2x2 blocks): every shape lies within 1.14 r
    of its centre (a square's corners, 0.8 r sqrt 2), so a box of half-width 1.2 r, a pixel wider on each
    side, holds it at any rotation."""
    reach = 1.2 * f["size"]

    def span(centre: float) -> slice:
        start = max(0, math.floor((centre - reach) * n - 0.5) - 1)
        stop = min(n, math.ceil((centre + reach) * n - 0.5) + 2)
        return slice(start - start % 2, stop + stop % 2)

    return span(f["y"]), span(f["x"])


def _means(x: np.ndarray) -> np.ndarray:
    """(2h, 2w, 3) -> (h, w, 3): the mean of each 2x2 block, summed in one order everywhere."""
    return (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]) * np.float32(0.25)


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
    name, rotates = "shapes", True

    def __init__(self, image_size: int = 64, split: str = "train", seed: int = 0, length: int = 1_000_000, noise: float = 0.02) -> None:
        if split not in SPLITS:
            raise StvqError(f"unknown split {split!r}; use 'train', 'val' or 'all'")
        self.image_size, self.split, self.seed, self.noise = image_size, "train" if split == "all" else split, seed, noise
        self.length = VAL_SIZE if split == "val" else length

    def __len__(self) -> int:
        return self.length

    def fingerprint(self) -> str:
        return f"{self.name}:{self.split}:seed{self.seed}"

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
            "rotation": float(rng.uniform(0, 90)) * self.rotates,  # drawn either way: upright, the same other factors
            "texture": int(rng.integers(len(TEXTURES))),
        }

    def render(self, f: dict[str, float], noise_seed: int | None = None) -> torch.Tensor:
        """The image (3, H, W) in [-1, 1] for factors ``f``; 2x supersampled for smooth edges. Only the
        object's window (:func:`_object_window`) is drawn and averaged; the rest is the background's
        average, computed once: the same image to the bit as drawing the whole grid, in half the time."""
        n = 2 * self.image_size
        xs, ys = _pixel_centres(n)
        rows, cols = window = _object_window(f, n)
        angle = math.radians(f["rotation"])
        dx, dy = xs[window] - np.float32(f["x"]), ys[window] - np.float32(f["y"])
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
        background = PALETTE[int(f["background"])]
        image = np.empty((self.image_size, self.image_size, 3), dtype=np.float32)
        image[...] = _means(np.broadcast_to(background, (2, 2, 3)))  # the background's, computed as every mean is
        image[rows.start // 2 : rows.stop // 2, cols.start // 2 : cols.stop // 2] = _means(np.where(mask, color, background))
        if self.noise and noise_seed is not None:
            image = image + self.noise * np.random.default_rng(noise_seed).standard_normal(image.shape, dtype=np.float32)
        return torch.from_numpy(np.clip(image, -1, 1)).permute(2, 0, 1).contiguous()

    def noise_seed(self, index: int) -> int:
        """The seed of item ``index``'s pixel noise (one stream per seed, split and index)."""
        return self.seed * 1_000_003 + 2 * index + SPLITS[self.split]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.render(self.factors(index), noise_seed=self.noise_seed(index))

    def factor_table(self, count: int | None = None) -> dict[str, np.ndarray]:
        """Factors of the first ``count`` items as arrays, for probes."""
        rows = [self.factors(i) for i in range(count or len(self))]
        return {name: np.array([row[name] for row in rows]) for name in FACTORS}

    def recogniser(self):
        """The factor recogniser (:func:`stvq_reference.shapes.recogniser.trained_recogniser`: trained once, then cached)."""
        from stvq_reference.shapes.recogniser import trained_recogniser

        return trained_recogniser(self.image_size)

    def heldout_scenes(self) -> DrawnScenes:
        return DrawnScenes(self.image_size, self.seed)

    def factor_vector(self, index: int) -> torch.Tensor:
        """One-hots of background, shape, colour and texture, then size, x, y and the sine and cosine of
        4x the rotation (the shapes repeat every 90 degrees): :data:`FACTOR_DIM` values."""
        f = self.factors(index)
        out = torch.zeros(FACTOR_DIM)
        offset = 0
        for name, classes in FACTORS.items():
            if classes:
                out[offset + int(f[name])] = 1.0
                offset += classes
        angle = math.radians(4 * f["rotation"])
        out[offset:] = torch.tensor([f["size"], f["x"], f["y"], math.sin(angle), math.cos(angle)])
        return out


class UprightShapesDataset(ShapesDataset):
    """``shapes-upright``: the ``shapes`` images with every rotation 0 (the other factors and the noise the
    same images'), to ask how much of what a decoder has to learn is the rotation."""

    name, rotates = "shapes-upright", False


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
