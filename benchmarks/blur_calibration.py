"""How sharp a reconstruction must be for the factor recogniser to read its shape
(docs/experiments/sharp-reconstructions.md): the validation originals of ``shapes``, blurred by a Gaussian of sigma px, their PSNR
against the originals, and the share of shapes, colours and textures the recogniser reads right.

    python benchmarks/blur_calibration.py [--images 512]

The recogniser is trained once (about 6 CPU-minutes) and cached (``stvq_reference.shapes.recogniser.trained_recogniser``).
"""

from __future__ import annotations

import argparse

from torchvision.transforms.functional import gaussian_blur

from stvq.data import first_images
from stvq.metrics import psnr
from stvq_reference.shapes import ShapesDataset
from stvq_reference.shapes.recogniser import trained_recogniser

SIGMAS = (0.0, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)


def calibrate(images: int = 512, sigmas: tuple[float, ...] = SIGMAS) -> list[dict[str, float]]:
    """One row per sigma: {"sigma", "psnr" (inf for 0), "shape", "color", "texture"}."""
    val = ShapesDataset(64, "val")
    originals, truth = first_images(val, images), val.factor_table(images)
    reader = trained_recogniser(64)
    rows = []
    for sigma in sigmas:
        blurred = originals if sigma == 0 else gaussian_blur(originals, int(6 * sigma) | 1, sigma)
        read = reader.reading_accuracy(blurred, truth)
        value = float("inf") if sigma == 0 else psnr(blurred, originals).mean().item()
        rows.append({"sigma": sigma, "psnr": value, **{name: read[f"{name}_accuracy"] for name in ("shape", "color", "texture")}})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    args = parser.parse_args(argv)
    print("| blur sigma (px) | PSNR (dB) | shape read | colour read | texture read |\n|---|---|---|---|---|")
    for row in calibrate(args.images):
        print(f"| {row['sigma']:g} | {row['psnr']:.2f} | {row['shape']:.1%} | {row['color']:.1%} | {row['texture']:.1%} |")


if __name__ == "__main__":
    main()
