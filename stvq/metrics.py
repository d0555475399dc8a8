"""What stvq measures, on tensors and arrays: reconstruction metrics (PSNR from :mod:`stvq.losses`, SSIM,
MAE, the EfficientNet-Lite0 Frechet and cosine distances), the Frechet distance itself, and the linear
probes that say where in the token order each known factor of the images can be read.

Perceptual score: the Frechet distance and the mean cosine distance between EfficientNet-Lite0 pooled
features (:func:`stvq.losses.features`, the network the perceptual training loss uses) of originals and
reconstructions. It is not FID (no Inception network is available offline) and its values are not
comparable to FID's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stvq.data import first_images
from stvq.features import features


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, for (B, C, H, W) images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


def masked_psnr(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PSNR per image over the pixels where ``mask`` (B, 1, H, W) is true, e.g. an object's own pixels."""
    weight = mask.float().expand_as(x)
    mse = ((x.float() - y.float()).pow(2) * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


def mean_image_psnr(train, images: torch.Tensor, count: int = 512) -> float:
    """PSNR of ``images`` against the mean of the first ``count`` items of the data set ``train``: the
    baseline a reconstruction has to beat."""
    mean = first_images(train, count).mean(0, keepdim=True).to(images.device)
    return psnr(mean.expand_as(images), images).mean().item()


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
    train_codes: np.ndarray,
    train_factors: dict[str, np.ndarray],
    test_codes: np.ndarray,
    test_factors: dict[str, np.ndarray],
    classes: dict[str, int],
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
