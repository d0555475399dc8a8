"""Where does the decoder lose the shape? Train the decoder oracle (true factors in), then probe it.

    python benchmarks/shape_probe.py --steps 1400            # about 15 minutes on one CPU thread

Linear probes on held-out ``shapes`` images, fitted on one set of images and scored on another as ``stvq
eval`` scores its probes (:func:`stvq.evaluate._probe_score`: 1 is a perfect reading, 0 the majority
class's rate): the shape class from the codes (the oracle's factor map: 1 by construction) and from the
position tokens after the transformer (all of them, concatenated), and the object's outline (which
pixels differ from the background) from the pixel head's per-pixel features, beside the same score for
the outline of the rendering itself. A decoder that knows the shape in its tokens but whose pixel
features tell the outline no better than its rendering does has not learned where the outline runs
(docs/experiments/sharp-reconstructions.md).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from stvq.metrics import _probe_score
from stvq_reference.shapes.oracle import FactorItems, run_oracle


@torch.no_grad()
def readings(model: torch.nn.Module, data, start: int, count: int) -> dict[str, torch.Tensor]:
    """Codes, position tokens, the head's pixel features, renderings, outlines and shape classes of
    ``count`` images from index ``start``."""
    decoder, grabbed = model.decoder, {}
    hooks = [decoder.norm.register_forward_hook(lambda m, i, o: grabbed.__setitem__("tokens", o.flatten(1)))]  # (B, P D)
    # the pixel head's features: the input of its per-pixel MLP
    reader = getattr(decoder.out_head, "mlp", None)
    if reader is not None:
        hooks.append(reader.register_forward_pre_hook(lambda m, args: grabbed.__setitem__("pixels", args[0])))
    out: dict[str, list] = {k: [] for k in ("codes", "tokens", "pixels", "renders", "outline", "shape")}
    try:
        for s in range(start, start + count, 128):
            idx = range(s, min(s + 128, start + count))
            factors, images = torch.stack([data.factor_vector(i) for i in idx]), torch.stack([data[i] for i in idx])
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
    return {k: torch.cat(v) for k, v in out.items()}


def outline(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: the pixels that differ from the background colour (read in the top-left corner)."""
    background = images[:, :, :2, :2].mean((2, 3), keepdim=True)
    return (images - background).abs().sum(1) > 0.3


def probe(model: torch.nn.Module, fit_count: int, test_count: int, pixels: int) -> dict[str, float]:
    """The probes' scores for a trained :class:`stvq.oracle.OracleModel`: fitted on ``fit_count`` training
    images (``pixels`` of their pixels for the outline), scored on ``test_count`` others."""
    data = FactorItems(model.decoder.image_size, "train").data
    fit, test = readings(model, data, 100_000, fit_count), readings(model, data, 200_000, test_count)
    report = {}
    for name in ("codes", "tokens"):
        report[f"shape_from_{name}"] = _probe_score(fit[name].flatten(1).numpy(), fit["shape"].numpy(), test[name].flatten(1).numpy(), test["shape"].numpy(), classes=5)
    truth = test["outline"].flatten().numpy()
    if fit["pixels"].shape[1]:
        per_pixel = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).numpy()  # noqa: E731
        chosen = np.random.default_rng(0).choice(fit["outline"].numel(), min(pixels, fit["outline"].numel()), replace=False)
        report["outline_from_features"] = _probe_score(per_pixel(fit["pixels"])[chosen], fit["outline"].flatten().numpy()[chosen], per_pixel(test["pixels"]), truth, classes=2)
    majority = max(truth.mean(), 1 - truth.mean())
    report["outline_of_rendering"] = float(((outline(test["renders"]).flatten().numpy() == truth).mean() - majority) / (1 - majority))
    return {k: round(v, 3) for k, v in report.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="a field of the decoder's config")
    parser.add_argument("--fit", type=int, default=4096, help="images the probes are fitted on")
    parser.add_argument("--test", type=int, default=1024, help="images they are scored on")
    parser.add_argument("--pixels", type=int, default=400_000, help="pixels the outline probe is fitted on")
    args = parser.parse_args(argv)
    from stvq.registry import parse_overrides

    result = run_oracle("styled", "tiny", parse_overrides(tuple(args.overrides), "decoder", "styled"), {"steps": args.steps}, eval_every=args.steps)
    report = {"steps": args.steps, "val_psnr": round(result.final_psnr, 2), **probe(result.model, args.fit, args.test, args.pixels)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
