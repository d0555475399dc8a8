"""Evaluation (SPEC section 6): reconstruction metrics, the prefix-decoding curve, per-token factor probes
on ``shapes``, codebook health, and side-by-side comparison of runs.

Perceptual score: the Frechet distance and the mean cosine distance between EfficientNet-Lite0 pooled
features (:func:`stvq.losses.features`, the network the perceptual training loss uses) of originals and
reconstructions. It is not FID (no Inception network is available offline) and its values are not
comparable to FID's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stvq.checkpoint import write_json
from stvq.data import first_images, make_dataset
from stvq.distributed import device_of, gather_rows, is_main, slice_of
from stvq.errors import StvqError
from stvq.interfaces import FactorDataset
from stvq.losses import features, masked_psnr, mean_image_psnr, psnr


# ------------------------------------------------------------------------------------ image metrics


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image (scikit-image's, Wang et al. 2004, 7x7 window), images in [-1, 1]."""
    from skimage.metrics import structural_similarity

    xs, ys = x.detach().float().cpu().numpy(), y.detach().float().cpu().numpy()
    return torch.tensor([structural_similarity(a, b, channel_axis=0, data_range=2.0) for a, b in zip(xs, ys)])


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets (N, D).

    Tr((S_a S_b)^1/2) is taken as the sum of square roots of the eigenvalues of S_a^1/2 S_b S_a^1/2, a
    symmetric PSD matrix with the same spectrum: exact, and stable when N < D makes S singular.
    """
    a64, b64 = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    s_a, s_b = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    root_a = _psd_sqrt(s_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def reconstruction_metrics(originals: torch.Tensor, reconstructions: torch.Tensor, perceptual: bool = True) -> dict[str, float]:
    recon = reconstructions.clamp(-1, 1)
    out = {
        "psnr": psnr(recon, originals).mean().item(),
        "ssim": ssim(recon, originals).mean().item(),
        "mae": (recon - originals).abs().mean().item(),
    }
    if perceptual:
        fa, fb = features(originals), features(recon)
        out["fd_effnet_lite0"] = frechet_distance(fa, fb)
        out["cos_effnet_lite0"] = (1 - F.cosine_similarity(fa, fb, dim=1)).mean().item()
    return out


# ------------------------------------------------------------------------------------ prefix decoding


@torch.no_grad()
def in_batches(fn, x: torch.Tensor, batch_size: int = 64, device: torch.device | None = None) -> torch.Tensor:
    """``fn`` over ``x`` in batches of ``batch_size`` along the first axis, concatenated: e.g.
    ``in_batches(model.encode_codes, images)`` or ``in_batches(tokenizer.decode, ids)``. Each batch goes to
    ``device`` (default: x's) and the whole comes back to x's. Under torchrun each rank computes a
    contiguous slice and every rank gets the whole (:func:`stvq.distributed.gather_rows`)."""
    device = device or x.device
    rows = slice_of(len(x))
    mine = x[rows.start : rows.stop]
    parts = [fn(batch.to(device)) for batch in mine.split(batch_size)] or [fn(x[:1].to(device))[:0]]
    return gather_rows(torch.cat(parts)).to(x.device)



@torch.no_grad()
def reconstruct(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict | None, torch.Tensor]:
    """(continuous codes, the codes the decoder gets, codebook stats or None, reconstructions) of ``images``,
    through the model's quantizer where it has one."""
    device = device_of(model)
    codes = in_batches(model.encode_codes, images, device=device)  # (B, N, D) continuous
    if model.quantizer is None:
        return codes, codes, None, in_batches(model.decode_codes, codes, device=device)
    q = model.quantizer(codes.to(device))
    quantized = q.codes.to(images.device)
    return codes, quantized, q.stats, in_batches(model.decode_codes, quantized, device=device)


@torch.no_grad()
def prefix_curve(model, images: torch.Tensor, codes: torch.Tensor, fill: torch.Tensor, batch_size: int = 64) -> dict[str, list[float]]:
    """PSNR when only the first n codes are known (the rest set to ``fill``), n = 0..N, and the reverse
    (only the last n known). All 2 (N + 1) variants of every image go through the decoder in batches."""
    b, n, _ = codes.shape
    known = torch.arange(n + 1).view(-1, 1) > torch.arange(n).view(1, -1)  # (N+1, N): row k keeps the first k
    masks = torch.cat([known, known.flip(-1)])  # prefix rows, then suffix rows
    variants = torch.where(masks[:, None, :, None], codes[None], fill[None, None])  # (2(N+1), B, N, D)
    recon = in_batches(model.decode_codes, variants.flatten(0, 1), batch_size, device_of(model)).clamp(-1, 1)
    scores = psnr(recon, images.repeat(2 * (n + 1), 1, 1, 1)).view(2 * (n + 1), b).mean(1)
    return {"n": list(range(n + 1)), "prefix_psnr": scores[: n + 1].tolist(), "suffix_psnr": scores[n + 1 :].tolist()}


# ------------------------------------------------------------------------------------- factor probes


PROBE_PENALTIES = (1e-3, 1.0, 30.0, 1000.0)  # ridge penalties tried per probe, on standardised features


def _ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """Ridge regression with an unpenalised bias (the last weight row)."""
    x1 = np.hstack([x, np.ones((len(x), 1))])
    penalty = lam * np.eye(x1.shape[1])
    penalty[-1, -1] = 0.0
    return np.linalg.solve(x1.T @ x1 + penalty, x1.T @ y)


def _predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1))]) @ w


def _fit_score(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, classes: int, lam: float) -> float:
    """Categorical factors (``classes`` > 0): a ridge one-vs-rest classifier, scored (accuracy - majority
    rate) / (1 - majority rate); continuous ones: ridge regression, scored held-out R^2."""
    if classes:
        w = _ridge(xtr, np.eye(classes)[ytr.astype(int)], lam)
        accuracy = (_predict(w, xte).argmax(1) == yte).mean()
        majority = np.bincount(yte.astype(int), minlength=classes).max() / len(xte)
        return float((accuracy - majority) / (1 - majority))
    residual = ((_predict(_ridge(xtr, ytr, lam), xte) - yte) ** 2).sum()
    return float(1 - residual / ((yte - yte.mean()) ** 2).sum())


def _probe_score(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, classes: int) -> float:
    """One linear probe on standardised features. The ridge penalty is chosen on the last fifth of the
    training set, so a probe on all 36 codes (576 features) does not fit noise where one code would not."""
    mean, std = xtr.mean(0), xtr.std(0) + 1e-8
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    cut = len(xtr) * 4 // 5
    lam = max(PROBE_PENALTIES, key=lambda lam: _fit_score(xtr[:cut], ytr[:cut], xtr[cut:], ytr[cut:], classes, lam))
    return _fit_score(xtr, ytr, xte, yte, classes, lam)


def probe_scores(
    train_codes: np.ndarray, train_factors: dict[str, np.ndarray], test_codes: np.ndarray, test_factors: dict[str, np.ndarray], classes: dict[str, int],
) -> dict[str, Any]:
    """How well each factor can be read from each token alone, by a linear probe on that token's code,
    and from the first n tokens together (``cumulative``: a factor spread over several tokens is found).

    Scores are clipped to [0, 1] (0 = chance, 1 = perfect); rows = factors (global to local), columns =
    token positions (``scores``) or n - 1 tokens known (``cumulative``). A factor that never varies (the
    rotation of ``shapes-upright``) has nothing to read and no row.
    """
    names = [f for f in classes if f in train_factors and np.ptp(train_factors[f]) > 0 and np.ptp(test_factors[f]) > 0]
    n = train_codes.shape[1]
    scores, cumulative = np.zeros((len(names), n)), np.zeros((len(names), n))
    for i, name in enumerate(names):
        ytr, yte = train_factors[name], test_factors[name]
        for j in range(n):
            scores[i, j] = _probe_score(train_codes[:, j], ytr, test_codes[:, j], yte, classes[name])
        cumulative[i, 0] = scores[i, 0]  # the first token alone: the same probe
        for j in range(1, n):
            cumulative[i, j] = _probe_score(train_codes[:, : j + 1].reshape(len(ytr), -1), ytr, test_codes[:, : j + 1].reshape(len(yte), -1), yte, classes[name])
    scores, cumulative = scores.clip(0, 1), cumulative.clip(0, 1)
    return {"factors": names, "scores": scores.tolist(), "cumulative": cumulative.tolist(), **ordering_score(scores)}


def ordering_score(scores: np.ndarray, min_score: float = 0.1, reach: float = 0.9) -> dict[str, Any]:
    """Spearman correlation between each factor's rank from global to local (row order) and the first
    token position where it becomes readable (the first score >= ``reach`` x its best): +1 when global
    factors are available in earlier tokens than local ones. Factors whose best score is below
    ``min_score`` are not encoded at all and take no part; fewer than 3 encoded factors give NaN."""
    best = scores.max(1)
    encoded = best >= min_score
    first = np.array([int(np.argmax(row >= reach * b)) if e else -1 for row, b, e in zip(scores, best, encoded)])
    out = {"first_readable": first.tolist(), "encoded": encoded.tolist(), "ordering_score": float("nan")}
    if encoded.sum() >= 3:
        from scipy.stats import spearmanr

        order, first_encoded = np.arange(len(scores))[encoded], first[encoded]
        if np.ptp(first_encoded):  # a constant ranking has no correlation
            out["ordering_score"] = float(spearmanr(order, first_encoded).statistic)
    return out


# ---------------------------------------------------------------------------------------------- plots


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display here or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_prefix(curves: dict[str, dict[str, list[float]]], path: Path, baseline: float | None = None) -> None:
    """One line per run for 'first n known' (solid) and 'last n known' (dashed)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for i, (name, curve) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(curve["n"], curve["prefix_psnr"], "-o", ms=3, color=color, label=f"{name}: first n tokens known")
        ax.plot(curve["n"], curve["suffix_psnr"], "--", color=color, alpha=0.7, label=f"{name}: last n tokens known")
        for n in (0, 4, len(curve["n"]) - 1):
            ax.annotate(f"{curve['prefix_psnr'][n]:.1f}", (n, curve["prefix_psnr"][n]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, color=color)
    if baseline is not None:
        ax.axhline(baseline, color="gray", lw=0.8, ls=":", label=f"mean image ({baseline:.1f} dB)")
    ax.set_xlabel("tokens known (n of 36; the others set to their mean code)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("Prefix decoding: reconstruction from the first (or last) n tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_probe(probe: dict[str, Any], path: Path, title: str) -> None:
    """Two heat maps: each token alone (top), and the first n tokens together (bottom)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.6), dpi=120, sharex=True)
    panels = (
        (probe["scores"], "token position", f"{title}: linear probe per token (ordering score {probe['ordering_score']:+.2f}, over {sum(probe['encoded'])} encoded factors)"),
        (probe["cumulative"], "n - 1 (the first n tokens known together)", f"{title}: linear probe on the first n tokens together"),
    )
    for ax, (values, xlabel, heading) in zip(axes, panels):
        scores = np.array(values)
        image = ax.imshow(scores, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(probe["factors"])), probe["factors"])
        ax.set_xticks(range(0, scores.shape[1], 2))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("factor (global to local)")
        for i, row in enumerate(scores):
            j = int(row.argmax())
            ax.text(j, i, f"{row[j]:.2f}", ha="center", va="center", fontsize=6, color="white" if row[j] < 0.6 else "black")
        ax.set_title(heading, fontsize=9)
        fig.colorbar(image, ax=ax, label="score (0 chance, 1 perfect)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the driver


@torch.no_grad()
def evaluate(
    model, out: Path, data: str = "shapes", images: int = 256, prefix_images: int = 64, probe_images: int = 2000, perceptual: bool = True,
    seed: int = 0, name: str = "model", num_workers: int = 0, recognise: bool = True,
) -> dict[str, Any]:
    """Everything SPEC section 6 asks for, written to ``out`` (eval.json, prefix_curve.png and, on
    data with known factors, factor_probe.png); returns the results. ``num_workers`` DataLoader workers
    read the images. On a :class:`stvq.interfaces.FactorDataset` (``shapes``) the codes are probed for its
    factors, ``recognise`` reads originals and reconstructions with its recogniser (shapes': the factor
    recogniser of :mod:`stvq.judge`, trained once, about 6 CPU-minutes, then cached), and its held-out
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
    result: dict[str, Any] = {
        "name": name, "data": data, "images": count, "quantized": quantized,
        "reconstruction": reconstruction_metrics(originals, recon, perceptual),
        "mean_image_psnr": mean_image_psnr(train_ds, originals),
        "codebook": stats,
    }
    # Fill value: each position's mean code over the evaluated images, the best constant guess under
    # squared error; it needs no training and is the same for every n.
    fill = codes_used.mean(0)
    k = min(prefix_images, count)
    result["prefix"] = prefix_curve(model, originals[:k], codes_used[:k], fill)
    result["prefix"]["fill"] = "per-position mean code over the evaluated images"
    if is_main():  # under torchrun the ranks share the encoding and decoding; rank 0 writes
        plot_prefix({name: result["prefix"]}, out / "prefix_curve.png", result["mean_image_psnr"])
    if isinstance(val, FactorDataset):  # what the data declares decides what is measured
        train_codes = in_batches(model.encode_codes, train_imgs, device=device_of(model)).numpy()
        truth = val.factor_table(count)
        probe = probe_scores(train_codes, train_ds.factor_table(probe_images), codes.numpy(), truth, val.factor_classes)
        result["probe"] = probe
        if is_main():
            plot_probe(probe, out / "factor_probe.png", name)
        reader = val.recogniser() if recognise else None
        if reader is not None:
            from stvq.judge import reading_accuracy

            result["recognised"] = {"originals": reading_accuracy(reader, originals, truth), "reconstructions": reading_accuracy(reader, recon.clamp(-1, 1), truth)}
        heldout = val.heldout_scenes()
        if heldout is not None:
            scenes = [heldout[i] for i in range(min(count, len(heldout)))]
            drawn, masks = torch.stack([image for image, _ in scenes]), torch.stack([mask for _, mask in scenes])
            drawn_recon = reconstruct(model, drawn)[3].clamp(-1, 1)
            result["heldout"] = {
                "generator": type(heldout).__name__, "images": len(scenes),
                "psnr": psnr(drawn_recon, drawn).mean().item(), "object_psnr": masked_psnr(drawn_recon, drawn, masks).mean().item(),
            }
    if is_main():
        write_json(out / "eval.json", result)
    return result


def evaluate_path(target: str | Path, data: str | None = None, device: torch.device | str = "cpu", **options: Any) -> dict[str, Any]:
    """:func:`evaluate` on the tokenizer in the directory ``target`` (a run, or one written by ``stvq
    compose``) computing on ``device``, on ``data`` or the run's own training data; writes into ``target``."""
    from stvq.checkpoint import load_tokenizer
    from stvq.interfaces import CodeTokenizer
    from stvq.run import RunDir

    path = Path(target)
    if not path.is_dir():
        raise StvqError(f"{target} is not a directory; pass a run or a Styled VQ directory")
    model = load_tokenizer(path).to(device)
    if not isinstance(model, CodeTokenizer):
        raise StvqError(f"{target} holds a {type(model).__name__}; stvq eval measures a tokenizer with continuous codes (a CodeTokenizer, e.g. a Styled VQ run)")
    run = RunDir(path)
    source = data or (run.read_train_config().data if run.is_run() else "shapes")
    return evaluate(model, path, source, name=path.name, **options)


def write_comparison(results: list[dict[str, Any]], out: str | Path) -> tuple[Path, Path]:
    """compare.json (every result by name) and prefix_compare.png (every prefix curve) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_prefix({r["name"]: r["prefix"] for r in results}, out / "prefix_compare.png", results[0]["mean_image_psnr"])
    write_json(out / "compare.json", {r["name"]: r for r in results})
    return out / "compare.json", out / "prefix_compare.png"


def summary_rows(result: dict[str, Any]) -> dict[str, str]:
    """The numbers a table shows for one evaluated model."""
    r, p = result["reconstruction"], result["prefix"]
    rows = {
        "PSNR (dB)": f"{r['psnr']:.2f}", "SSIM": f"{r['ssim']:.3f}", "MAE": f"{r['mae']:.4f}",
        "mean-image PSNR (dB)": f"{result['mean_image_psnr']:.2f}",
    }
    if "fd_effnet_lite0" in r:
        rows["Frechet dist. (EffNet-Lite0)"] = f"{r['fd_effnet_lite0']:.2f}"
        rows["cosine dist. (EffNet-Lite0)"] = f"{r['cos_effnet_lite0']:.4f}"
    last = len(p["n"]) - 1
    for n in sorted({0, 2, 4, 8, 18, last}):
        rows[f"PSNR first {n} known"] = f"{p['prefix_psnr'][n]:.2f}"
    for n in (4, 18):
        rows[f"PSNR last {n} known"] = f"{p['suffix_psnr'][n]:.2f}"
    if result.get("codebook"):
        c = result["codebook"]
        rows.update({"codebook usage": f"{c['usage']:.1%}", "perplexity": f"{c['perplexity']:.1f}", "dead codes": f"{c['dead_codes']:,}", "quantization MSE": f"{c['mse']:.5f}"})
    if "heldout" in result:
        rows["held-out drawn scenes: PSNR / object pixels (dB)"] = f"{result['heldout']['psnr']:.2f} / {result['heldout']['object_psnr']:.2f}"
    if "recognised" in result:
        seen = result["recognised"]
        rows["recogniser on reconstructions (originals)"] = " ".join(
            f"{n[:5]}:{seen['reconstructions'][f'{n}_accuracy']:.2f}({seen['originals'][f'{n}_accuracy']:.2f})" for n in ("shape", "color", "background", "texture")
        )
    if "probe" in result:
        probe = result["probe"]
        rows["ordering score"] = f"{probe['ordering_score']:+.2f} ({sum(probe['encoded'])} encoded factors)"
        rows["cumulative probe, all tokens"] = " ".join(f"{f[:3]}:{row[-1]:.2f}" for f, row in zip(probe["factors"], probe["cumulative"]))
        rows["cumulative probe, first 8"] = " ".join(f"{f[:3]}:{row[7]:.2f}" for f, row in zip(probe["factors"], probe["cumulative"]) if len(row) > 7)
        best = np.array(probe["scores"]).max(1)
        rows["first readable token"] = " ".join(
            f"{f[:3]}:{j}({b:.2f})" for f, j, b, e in zip(probe["factors"], probe["first_readable"], best, probe["encoded"]) if e
        ) or "none"
    return rows
