"""``stvq eval``: everything a tokenizer is measured by, written into its directory: reconstruction
metrics (:mod:`stvq.metrics`), the prefix-decoding curve, codebook health and, on data with known factors
(a :class:`stvq.interfaces.FactorDataset`), per-token factor probes, the recogniser's reading of the
reconstructions and held-out scenes; and side-by-side comparison of runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from stvq.checkpoint import run_lock, staged, write_json
from stvq.codebook_stats import position_health
from stvq.data import first_images, make_dataset
from stvq.distributed import device_of, in_batches, is_main
from stvq.errors import StvqError
from stvq.field_metrics import field_scores
from stvq.interfaces import CodeTokenizer, FactorDataset
from stvq.metrics import masked_psnr, mean_image_psnr, probe_scores, psnr, reconstruction_metrics
from stvq.plots import plot_positions, plot_prefix, plot_probe
from stvq.pretrained import load_tokenizer
from stvq.run import RunDir


@torch.no_grad()
def reconstruct(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict | None, torch.Tensor]:
    """(continuous codes, the codes the decoder gets, codebook stats or None, reconstructions) of ``images``,
    through the model's quantizer where it has one (its stats then hold each position's code health)."""
    device = device_of(model)
    codes = in_batches(model.encode_codes, images, device=device)  # (B, N, D) continuous
    if model.quantizer is None:
        return codes, codes, None, in_batches(model.decode_codes, codes, device=device)
    q = model.quantizer(codes.to(device))
    quantized = q.codes.to(images.device)
    stats = {**q.stats, "positions": position_health(q.ids.reshape(len(images), -1), model.quantizer.codebook_size)}
    return codes, quantized, stats, in_batches(model.decode_codes, quantized, device=device)


@torch.no_grad()
def prefix_curve(model, images: torch.Tensor, codes: torch.Tensor, fill: torch.Tensor, batch_size: int = 64) -> dict[str, list[float]]:
    """PSNR when only the first n codes are known (the rest set to ``fill``), n = 0..N, and the reverse
    (only the last n known); and the marginal gain of each token, what token k adds to the first k - 1
    (``marginal_psnr``: dB, ``marginal_mse``: squared error removed), k = 1..N. All 2 (N + 1) variants of
    every image go through the decoder in batches."""
    b, n, _ = codes.shape
    known = torch.arange(n + 1).view(-1, 1) > torch.arange(n).view(1, -1)  # (N+1, N): row k keeps the first k
    masks = torch.cat([known, known.flip(-1)])  # prefix rows, then suffix rows
    variants = torch.where(masks[:, None, :, None], codes[None], fill[None, None])  # (2(N+1), B, N, D)
    recon = in_batches(model.decode_codes, variants.flatten(0, 1), batch_size, device_of(model)).clamp(-1, 1)
    truth = images.repeat(2 * (n + 1), 1, 1, 1)
    scores = psnr(recon, truth).view(2 * (n + 1), b).mean(1)
    mse = (recon.float() - truth.float()).pow(2).flatten(1).mean(1)[: (n + 1) * b].view(n + 1, b).mean(1)
    return {
        "n": list(range(n + 1)),
        "prefix_psnr": scores[: n + 1].tolist(),
        "suffix_psnr": scores[n + 1 :].tolist(),
        "marginal_psnr": scores[1 : n + 1].sub(scores[:n]).tolist(),
        "marginal_mse": mse[:n].sub(mse[1 : n + 1]).tolist(),
    }


# ------------------------------------------------------------------------------------------ the driver


def measured(name: str, data: str, originals: torch.Tensor, recon: torch.Tensor, train_ds: Any, perceptual: bool, field: tuple[str, ...] | None) -> dict[str, Any]:
    """What every evaluation reports: the reconstruction metrics (rFID and LPIPS where asked for or cached:
    :func:`stvq.field_metrics.field_scores`) and the PSNR of the data's mean image, the level to beat."""
    return {
        "name": name,
        "data": data,
        "images": len(originals),
        "reconstruction": {**reconstruction_metrics(originals, recon, perceptual), **field_scores(originals, recon.clamp(-1, 1), field)},
        "mean_image_psnr": mean_image_psnr(train_ds, originals),
    }


@torch.no_grad()
def evaluate(
    model,
    out: Path,
    data: str = "shapes",
    images: int = 256,
    prefix_images: int = 64,
    probe_images: int = 2000,
    perceptual: bool = True,
    seed: int = 0,
    name: str = "model",
    num_workers: int = 0,
    recognise: bool = True,
    field: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Every measure of a tokenizer, written to ``out`` (eval.json, prefix_curve.png and, on
    data with known factors, factor_probe.png); returns the results. ``num_workers`` DataLoader workers
    read the images. On a :class:`stvq.interfaces.FactorDataset` (``shapes``) the codes are probed for its
    factors, ``recognise`` reads originals and reconstructions with its recogniser (shapes': the factor
    recogniser, trained once, about 6 CPU-minutes, then cached), and its held-out
    scenes are reconstructed."""
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    size = model.config.image_size
    val, train_ds = make_dataset(data, size, "val", seed), make_dataset(data, size, "train", seed)
    count = min(images, len(val))
    originals = first_images(val, count, num_workers)
    if isinstance(val, FactorDataset):  # read first, so that a probe set too large is refused before minutes of work
        train_imgs = first_images(train_ds, probe_images, num_workers)
    codes, codes_used, stats, recon = reconstruct(model, originals)
    quantized = model.quantizer is not None
    result: dict[str, Any] = {**measured(name, data, originals, recon, train_ds, perceptual, field), "quantized": quantized, "codebook": stats}
    if stats is not None:
        result["positions"] = stats.pop("positions")
    # Fill value: each position's mean code over the evaluated images, the best constant guess under
    # squared error; it needs no training and is the same for every n.
    fill = codes_used.mean(0)
    k = min(prefix_images, count)
    result["prefix"] = prefix_curve(model, originals[:k], codes_used[:k], fill)
    result["prefix"]["fill"] = "per-position mean code over the evaluated images"
    if is_main():  # under torchrun the ranks share the encoding and decoding; rank 0 writes
        plot_prefix({name: result["prefix"]}, out / "prefix_curve.png", result["mean_image_psnr"])
        plot_positions(result, out / "positions.png")
    if isinstance(val, FactorDataset):  # what the data declares decides what is measured
        train_codes = in_batches(model.encode_codes, train_imgs, device=device_of(model)).numpy()
        truth = val.factor_table(count)
        probe = probe_scores(train_codes, train_ds.factor_table(probe_images), codes.numpy(), truth, val.factor_classes)
        result["probe"] = probe
        if is_main():
            plot_probe(probe, out / "factor_probe.png", name)
        reader = val.recogniser() if recognise else None
        if reader is not None:
            result["recognised"] = {"originals": reader.reading_accuracy(originals, truth), "reconstructions": reader.reading_accuracy(recon.clamp(-1, 1), truth)}
        heldout = val.heldout_scenes()
        if heldout is not None:
            scenes = [heldout[i] for i in range(min(count, len(heldout)))]
            drawn, masks = torch.stack([image for image, _ in scenes]), torch.stack([mask for _, mask in scenes])
            drawn_recon = reconstruct(model, drawn)[3].clamp(-1, 1)
            result["heldout"] = {
                "generator": type(heldout).__name__,
                "images": len(scenes),
                "psnr": psnr(drawn_recon, drawn).mean().item(),
                "object_psnr": masked_psnr(drawn_recon, drawn, masks).mean().item(),
            }
    if is_main():
        write_json(out / "eval.json", result)
    return result


@torch.no_grad()
def evaluate_ids(
    model, out: Path, data: str = "shapes", images: int = 256, perceptual: bool = True, seed: int = 0, name: str = "model", num_workers: int = 0, field: tuple[str, ...] | None = None, **unused: Any
) -> dict[str, Any]:
    """What can be measured of any tokenizer through its ids alone (a composed one, a VQ-VAE): the
    reconstruction metrics of ``decode(encode(images))`` and each token position's code health
    (:func:`stvq.codebook_stats.position_health`), written to ``out/eval.json``. The prefix curves and
    probes need continuous codes (:func:`evaluate`)."""
    model.eval()
    val, train_ds = make_dataset(data, model.image_size, "val", seed), make_dataset(data, model.image_size, "train", seed)
    count = min(images, len(val))
    originals = first_images(val, count, num_workers)
    ids = in_batches(model.encode, originals, device=device_of(model))
    recon = in_batches(model.decode, ids, device=device_of(model))
    result = {**measured(name, data, originals, recon, train_ds, perceptual, field), "quantized": True, "positions": position_health(ids, model.vocab_size)}
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval.json", result)
        plot_positions(result, out / "positions.png")
    return result


def evaluate_path(target: str | Path, data: str | None = None, device: torch.device | str = "cpu", name: str | None = None, **options: Any) -> dict[str, Any]:
    """:func:`evaluate` on the tokenizer in the directory ``target`` (a run, or one written by ``stvq
    compose``) computing on ``device``, on ``data`` or the run's own training data; writes into ``target``.
    ``name`` (default: the directory's) labels it in tables and plots."""
    path = Path(target)
    if not path.is_dir():
        raise StvqError(f"{target} is not a directory; pass a run or a Styled VQ directory")
    model = load_tokenizer(path).to(device)
    run = RunDir(path)
    source = data or (run.read_train_config().data if run.is_run() else "shapes")
    measure = evaluate if isinstance(model, CodeTokenizer) else evaluate_ids  # ids alone: a composed tokenizer, a VQ-VAE
    return measure(model, path, source, name=name or path.name, **options)


def unique_names(targets: list[str]) -> list[str]:
    """Labels for directories compared side by side: each one's name, or as many of its last path parts as
    tell it apart (``a/run`` and ``b/run``); the same directory twice is refused."""
    paths = [Path(t).resolve() for t in targets]
    if len(set(paths)) < len(paths):
        twice = next(t for t, p in zip(targets, paths) if paths.count(p) > 1)
        raise StvqError(f"{twice} is named twice; compare different runs")
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def write_comparison(results: list[dict[str, Any]], out: str | Path) -> list[Path]:
    """compare.json (every result by name) and prefix_compare.png (every prefix curve) in ``out``."""
    out = Path(out)
    curves = {r["name"]: r["prefix"] for r in results if "prefix" in r}  # a tokenizer measured by its ids has none
    with run_lock(out, tree=False), staged(out) as tmp:  # one writer; the two files replace the old ones together
        if curves:
            plot_prefix(curves, tmp / "prefix_compare.png", results[0]["mean_image_psnr"])
        write_json(tmp / "compare.json", {r["name"]: r for r in results})
    return [out / "compare.json", *([out / "prefix_compare.png"] if curves else [])]


def summary_rows(result: dict[str, Any]) -> dict[str, str]:
    """The numbers a table shows for one evaluated model."""
    r, p = result["reconstruction"], result.get("prefix")
    rows = {
        "PSNR (dB)": f"{r['psnr']:.2f}",
        "SSIM": f"{r['ssim']:.3f}",
        "MAE": f"{r['mae']:.4f}",
        "mean-image PSNR (dB)": f"{result['mean_image_psnr']:.2f}",
    }
    for key, label in (("rfid", "rFID (Inception-V3, pytorch-fid)"), ("lpips_alex", "LPIPS (AlexNet)"), ("lpips_vgg", "LPIPS (VGG)")):
        if key in r:
            rows[label] = f"{r[key]:.4f}" if key != "rfid" else f"{r[key]:.2f}"
    if "fd_effnet_lite0" in r:
        rows["Frechet dist. (EffNet-Lite0)"] = f"{r['fd_effnet_lite0']:.2f}"
        rows["cosine dist. (EffNet-Lite0)"] = f"{r['cos_effnet_lite0']:.4f}"
    if p is not None:
        last = len(p["n"]) - 1
        for n in sorted({0, 2, 4, 8, 18, last}):
            rows[f"PSNR first {n} known"] = f"{p['prefix_psnr'][n]:.2f}"
        for n in (4, 18):
            rows[f"PSNR last {n} known"] = f"{p['suffix_psnr'][n]:.2f}"
    if p is not None and "marginal_psnr" in p:
        gains = p["marginal_psnr"]
        rows["marginal gain, tokens 1 / 2 / 3 / last (dB)"] = f"{gains[0]:+.2f} / {gains[1]:+.2f} / {gains[2]:+.2f} / {gains[-1]:+.2f}"
    if "positions" in result:
        health = result["positions"]
        rows["ids used per position (mean / min)"] = f"{np.mean(health['used']):,.1f} / {min(health['used']):,}"
        rows["entropy per position, bits (mean / min)"] = f"{np.mean(health['entropy_bits']):.2f} / {min(health['entropy_bits']):.2f}"
    if result.get("codebook"):
        c = result["codebook"]
        rows.update({"codebook usage": f"{c['usage']:.1%}", "perplexity": f"{c['perplexity']:.1f}", "dead codes": f"{c['dead_codes']:,}", "quantization MSE": f"{c['mse']:.5f}"})
    if "heldout" in result:
        rows["held-out drawn scenes: PSNR / object pixels (dB)"] = f"{result['heldout']['psnr']:.2f} / {result['heldout']['object_psnr']:.2f}"
    if "recognised" in result:
        seen = result["recognised"]
        rows["recogniser on reconstructions (originals)"] = " ".join(
            f"{k.removesuffix('_accuracy')[:5]}:{v:.2f}({seen['originals'][k]:.2f})" for k, v in seen["reconstructions"].items() if k.endswith("_accuracy")
        )
    if "probe" in result:
        probe = result["probe"]
        rows["ordering score"] = f"{probe['ordering_score']:+.2f} ({sum(probe['encoded'])} encoded factors)"
        rows["cumulative probe, all tokens"] = " ".join(f"{f[:3]}:{row[-1]:.2f}" for f, row in zip(probe["factors"], probe["cumulative"]))
        rows["cumulative probe, first 8"] = " ".join(f"{f[:3]}:{row[7]:.2f}" for f, row in zip(probe["factors"], probe["cumulative"]) if len(row) > 7)
        best = np.array(probe["scores"]).max(1)
        rows["first readable token"] = " ".join(f"{f[:3]}:{j}({b:.2f})" for f, j, b, e in zip(probe["factors"], probe["first_readable"], best, probe["encoded"]) if e) or "none"
    return rows
