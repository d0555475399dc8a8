"""Built-in data: shapes (deterministic, with the factors it claims), photos, and data specs."""

import numpy as np
import pytest
import torch

from stvq.data import make_dataset
from stvq.errors import StvqError
from stvq_reference.folders import PhotosDataset
from stvq_reference.shapes import FACTORS, PALETTE, SHAPES, TEXTURES, DrawnScenes, ShapesDataset


def test_shapes_is_deterministic_and_splits_differ():
    a, b = ShapesDataset(64, seed=3), ShapesDataset(64, seed=3)
    assert torch.equal(a[7], b[7]) and a.factors(7) == b.factors(7)
    assert not torch.equal(a[7], ShapesDataset(64, seed=4)[7])
    val = ShapesDataset(64, split="val", seed=3)
    assert len(val) == 512 and not torch.equal(val[7], a[7])


def test_shapes_images_show_their_factors():
    ds = ShapesDataset(96, noise=0.0)
    for i in range(20):
        f, image = ds.factors(i), ds[i]
        assert image.shape == (3, 96, 96) and image.min() >= -1 and image.max() <= 1
        corner = image[:, 0, 0].numpy()
        np.testing.assert_allclose(corner, PALETTE[f["background"]], atol=1e-6)  # background colour
        cx, cy = int(f["x"] * 96), int(f["y"] * 96)
        centre = image[:, cy, cx].numpy()
        assert np.abs(centre - PALETTE[f["background"]]).max() > 0.1  # the object covers its centre
        assert f["color"] != f["background"]
        assert f["size"] <= f["x"] <= 1 - f["size"] and 0 <= f["rotation"] < 90


def test_upright_shapes_are_the_shapes_images_turned_to_rotation_zero():
    shapes, upright = make_dataset("shapes", 64, "val"), make_dataset("shapes-upright", 64, "val")
    assert upright.fingerprint() == "shapes-upright:val:seed0" != shapes.fingerprint()
    turned = [i for i in range(20) if shapes.factors(i)["rotation"] > 1]
    assert len(turned) >= 15
    for i in turned:
        f, g = shapes.factors(i), upright.factors(i)
        assert g["rotation"] == 0.0 and {**f, "rotation": 0.0} == g  # every other factor the same
        assert upright.noise_seed(i) == shapes.noise_seed(i)
        assert torch.equal(upright[i], shapes.render(g, noise_seed=shapes.noise_seed(i)))
        if SHAPES[f["shape"]] != "circle":
            assert not torch.equal(upright[i], shapes[i])


def test_drawn_scenes_are_one_object_in_its_mask_on_a_plain_background():
    scenes = DrawnScenes(64, seed=0)
    assert len(scenes) == 512 and torch.equal(scenes[3][0], DrawnScenes(64, seed=0)[3][0])
    palette = torch.from_numpy(PALETTE)
    for i in range(30):
        image, mask = scenes[i]
        assert image.shape == (3, 64, 64) and mask.shape == (1, 64, 64) and mask.dtype == torch.bool
        assert 0.02 < mask.float().mean() < 0.4  # one object, a few per cent of the image to a third
        inside, outside = image[:, mask[0]], image[:, ~mask[0]]
        assert (inside == inside[:, :1]).all() and (outside == outside[:, :1]).all()  # two flat colours
        assert not torch.equal(inside[:, 0], outside[:, 0])
        assert any(torch.equal(inside[:, 0], c) for c in palette) and any(torch.equal(outside[:, 0], c) for c in palette)
        assert not torch.equal(image, ShapesDataset(64, split="val")[i])


def test_shapes_factor_table_covers_every_factor_and_class():
    table = ShapesDataset(64).factor_table(400)
    assert list(table) == list(FACTORS)
    assert set(table["shape"]) == set(range(len(SHAPES)))
    assert set(table["texture"]) == set(range(len(TEXTURES)))
    assert set(table["background"]) == set(range(len(PALETTE)))


def test_photos_are_real_images_with_fixed_validation_centres():
    train, val = PhotosDataset(64), PhotosDataset(64, split="val")
    assert len(val) >= 15
    assert torch.equal(train[5], PhotosDataset(64)[5])
    batch = torch.stack([train[i] for i in range(16)])
    assert batch.shape == (16, 3, 64, 64) and batch.std() > 0.2
    assert torch.equal(val[0], PhotosDataset(64, split="val")[0])


def test_make_dataset_errors():
    with pytest.raises(StvqError, match="does not exist"):
        make_dataset("/nope", 64)
    with pytest.raises(StvqError, match="unknown split"):
        ShapesDataset(64, split="test")


def test_load_image_applies_the_exif_orientation_and_reads_every_mode(tmp_path):
    from PIL import Image

    from stvq.images import load_image, to_uint8

    upright = to_uint8(make_dataset("shapes", 32, "train")[0])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the file holds the image turned the other way
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    loaded = load_image(tmp_path / "turned.jpg", 32)
    assert (loaded - load_image_of(upright)).abs().mean() < 0.02  # shown upright
    Image.fromarray(upright).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(upright).convert("P").save(tmp_path / "palette.png")
    for name in ("grey.png", "palette.png"):
        assert load_image(tmp_path / name, 32).shape == (3, 32, 32)


def test_a_large_jpeg_is_decoded_at_the_smallest_scale_that_keeps_twice_the_size_and_looks_the_same(tmp_path):
    from PIL import Image, ImageOps

    from stvq.images import fit_image, from_pil, to_uint8

    photo = to_uint8(PhotosDataset(512, "train", seed=3)[0])
    Image.fromarray(photo).crop((0, 0, 512, 400)).save(tmp_path / "big.jpg", quality=90)
    Image.fromarray(photo).crop((0, 0, 200, 180)).save(tmp_path / "small.jpg", quality=90)
    for name, decoded_size in (("big.jpg", (256, 200)), ("small.jpg", (200, 180))):  # 400 // 128 = 3: 1/2; 180 // 128 = 1: whole
        with Image.open(tmp_path / name) as img:
            got = fit_image(img, 64)
            assert img.size == decoded_size
        with Image.open(tmp_path / name) as img:
            whole = from_pil(ImageOps.fit(img.convert("RGB"), (64, 64), Image.Resampling.BICUBIC))
        if decoded_size == (200, 180):
            assert torch.equal(got, whole)
        else:
            assert 10 * torch.log10(4 / (got - whole).square().mean()) > 40  # dB: JPEG's own error is larger


def load_image_of(array):
    from PIL import Image

    from stvq.images import from_pil

    return from_pil(Image.fromarray(array))


def _literal_render(f: dict, image_size: int, noise: float, noise_seed: int) -> torch.Tensor:
    """The shapes renderer as first written (float64 coordinates, a 5-D mean for the supersampling)."""
    import math

    from stvq_reference.shapes import _inside

    n = 2 * image_size
    coords = (np.arange(n, dtype=np.float64) + 0.5) / n
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    angle = math.radians(f["rotation"])
    dx, dy = xs - f["x"], ys - f["y"]
    u, v = math.cos(angle) * dx + math.sin(angle) * dy, -math.sin(angle) * dx + math.cos(angle) * dy
    mask = _inside(SHAPES[int(f["shape"])], u, v, f["size"]).astype(np.float64)
    color = np.broadcast_to(PALETTE[int(f["color"])], (n, n, 3)).astype(np.float64)
    period, texture = f["size"] / 2.5, TEXTURES[int(f["texture"])]
    if texture == "stripes":
        color = color * np.where(np.sin(2 * math.pi * u / period) > 0, 1.0, 0.35)[..., None]
    elif texture == "dots":
        du, dv = (u / period) % 1 - 0.5, (v / period) % 1 - 0.5
        color = np.where((du**2 + dv**2 < 0.06)[..., None], -color, color)
    image = mask[..., None] * color + (1 - mask[..., None]) * PALETTE[int(f["background"])]
    image = image.reshape(image_size, 2, image_size, 2, 3).mean(axis=(1, 3))
    image = image + noise * np.random.default_rng(noise_seed).standard_normal(image.shape, dtype=np.float32)
    return torch.from_numpy(np.clip(image, -1, 1).astype(np.float32)).permute(2, 0, 1)


@pytest.mark.parametrize("split", ["train", "val"])
def test_the_shapes_renderer_draws_what_the_literal_one_draws(split):
    data = ShapesDataset(64, split)
    for i in range(60):  # every shape and texture, edges at sub-pixel places
        seed = data.seed * 1_000_003 + 2 * i + {"train": 0, "val": 1}[split]
        literal = _literal_render(data.factors(i), 64, data.noise, seed)
        assert (data[i] - literal).abs().max() < 2e-6  # float32 coordinates: an edge pixel may differ by one ulp of a mean


@pytest.mark.parametrize("name", ["shapes", "shapes-upright"])
def test_drawing_in_the_objects_window_gives_the_whole_grids_image_to_the_bit(name, monkeypatch):
    """The object is drawn inside its window only; over the whole grid every shape, texture, size and
    rotation comes out the same, and the window holds the whole object (no pixel outside it differs)."""
    from stvq_reference import shapes as module

    data = make_dataset(name, 64, "train")
    indices = range(0, 40_000, 97)  # 413 images: every shape and texture, sizes, places and turns
    windowed = [data[i] for i in indices]
    monkeypatch.setattr(module, "_object_window", lambda f, n: (slice(0, n), slice(0, n)))
    for i, image in zip(indices, windowed):
        assert torch.equal(image, data[i]), (i, data.factors(i))
    sizes = [data.factors(i)["size"] for i in indices]
    assert min(sizes) < 0.17 and max(sizes) > 0.31
