"""Where does the decoder lose the shape? Train the decoder oracle (true factors in), then probe it.

    python benchmarks/shape_probe.py --steps 1400            # about 15 minutes on one CPU thread

Three linear readings on held-out ``shapes`` images (ridge regression, fitted on one set of images and
scored on another): the shape class from the codes (the oracle's factor map: near 100 % by construction),
from the position tokens after the transformer (all of them, concatenated), and the object's outline
(which pixels differ from the background) from the pixel head's per-pixel features, beside the outline of
the rendering itself. A decoder that knows the shape in its tokens but whose pixel features tell the
outline no better than its rendering does loses the shape between the tokens and the pixels (README,
"Sharp reconstructions", issue 21).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from stvq.oracle import FactorItems, run_oracle


def ridge(train: np.ndarray, target: np.ndarray, test: np.ndarray, lam: float = 10.0) -> np.ndarray:
    """Standardised ridge regression with a bias: fitted on (train, target), predictions for ``test``."""
    mu, sd = train.mean(0), train.std(0) + 1e-6
    a, b = ((x - mu) / sd for x in (train, test))
    a, b = np.c_[a, np.ones(len(a))], np.c_[b, np.ones(len(b))]
    return b @ np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ target)


@torch.no_grad()
def readings(model: torch.nn.Module, data, start: int, count: int) -> dict[str, torch.Tensor]:
    """Codes, position tokens, the head's pixel features, renderings, outlines and shape classes of
    ``count`` images from index ``start``."""
    decoder, grabbed = model.decoder, {}
    hooks = [decoder.norm.register_forward_hook(lambda m, i, o: grabbed.__setitem__("tokens", o.flatten(1)))]  # (B, P D)
    features = getattr(decoder.out_head, "features", None)
    if features is not None:  # the pixel head: what its per-pixel MLP reads
        decoder.out_head.features = lambda pixels, grid: grabbed.setdefault("pixels", features(pixels, grid))
    out: dict[str, list] = {k: [] for k in ("codes", "tokens", "pixels", "renders", "outline", "shape")}
    try:
        for s in range(start, start + count, 128):
            idx = range(s, min(s + 128, start + count))
            factors, images = torch.stack([data.factor_vector(i) for i in idx]), torch.stack([data[i] for i in idx])
            grabbed.pop("pixels", None)
            renders = model(factors).clamp(-1, 1)
            out["codes"].append(model.codes(factors))
            out["tokens"].append(grabbed["tokens"])
            out["pixels"].append(grabbed.get("pixels", torch.zeros(len(idx), 0, 1, 1)))
            out["renders"].append(renders)
            out["outline"].append(outline(images))
            out["shape"].append(torch.tensor([data.factors(i)["shape"] for i in idx]))
    finally:
        for hook in hooks:
            hook.remove()
        if features is not None:
            del decoder.out_head.features
    return {k: torch.cat(v) for k, v in out.items()}


def outline(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: the pixels that differ from the background colour (read in the top-left corner)."""
    background = images[:, :, :2, :2].mean((2, 3), keepdim=True)
    return (images - background).abs().sum(1) > 0.3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="a field of the decoder's config")
    parser.add_argument("--fit", type=int, default=4096, help="images the probes are fitted on")
    parser.add_argument("--test", type=int, default=1024, help="images they are scored on")
    parser.add_argument("--pixels", type=int, default=400_000, help="pixels the outline probe is fitted on")
    args = parser.parse_args(argv)
    from stvq.cli.options import parse_overrides

    result = run_oracle("styled", "tiny", parse_overrides(tuple(args.overrides), "decoder", "styled"), {"steps": args.steps}, eval_every=args.steps)
    data = FactorItems(result.model.decoder.image_size, "train").data
    fit, test = readings(result.model, data, 100_000, args.fit), readings(result.model, data, 200_000, args.test)
    classes = np.eye(5)[fit["shape"].numpy()]
    report = {"steps": args.steps, "val_psnr": round(result.final_psnr, 2)}
    for name in ("codes", "tokens"):
        guess = ridge(fit[name].flatten(1).numpy(), classes, test[name].flatten(1).numpy()).argmax(1)
        report[f"shape_from_{name}"] = round(float((guess == test["shape"].numpy()).mean()), 3)
    if fit["pixels"].shape[1]:
        per_pixel = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).numpy()  # noqa: E731
        chosen = np.random.default_rng(0).choice(fit["outline"].numel(), min(args.pixels, fit["outline"].numel()), replace=False)
        target = fit["outline"].flatten().numpy()[chosen, None].astype(np.float64)
        guess = ridge(per_pixel(fit["pixels"])[chosen], target, per_pixel(test["pixels"]))[:, 0] > 0.5
        report["outline_error_from_features"] = round(float((guess != test["outline"].flatten().numpy()).mean()), 4)
    report["outline_error_of_rendering"] = round(float((outline(test["renders"]) != test["outline"]).float().mean()), 4)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
