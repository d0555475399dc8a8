"""The measures the field reports, computed by the libraries the papers use: rFID with pytorch-fid (the
Inception-V3 weights that reproduce TensorFlow's FID, 2048-d pool features, images resized to 299 px) and
LPIPS with the ``lpips`` package (AlexNet or VGG trunk, its calibrated linear layers). Their weights come
from torch's hub cache (``torch.hub.get_dir()/checkpoints``; ``TORCH_HOME`` or ``--metric-weights DIR``
moves it): where a file is there it is used, where it is not and there is internet the library downloads
it, and otherwise one line says which file goes where (docs/evaluation.md, "rFID and LPIPS")."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np
import torch

from stvq.errors import StvqError

#: metric -> (package, the weight file the library loads from the hub cache, where it is downloaded from).
WEIGHTS = {
    "rfid": ("pytorch-fid", "pt_inception-2015-12-05-6726825d.pth", "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"),
    "lpips-alex": ("lpips", "alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "lpips-vgg": ("lpips", "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
}


def weight_path(metric: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS[metric][1]


@contextmanager
def weights_from(folder: str | None) -> Iterator[None]:
    """torch's hub cache moved to ``folder`` for the block and put back after it (None: left where it is)."""
    if folder is None:
        yield
        return
    before = torch.hub.get_dir()
    torch.hub.set_dir(folder)
    try:
        yield
    finally:
        torch.hub.set_dir(before)


def available(metric: str) -> bool:
    """Whether ``metric`` can be computed without a download: its package imports and its weights are cached."""
    package = WEIGHTS[metric][0].replace("-", "_")
    try:
        __import__(package)
    except ImportError:
        return False
    return weight_path(metric).is_file()


def _load(metric: str, build):
    """``build()`` with the metric's package and weights, or one line naming what is missing and where."""
    package, name, url = WEIGHTS[metric]
    try:
        with warnings.catch_warnings():  # torchvision's deprecation of `pretrained`, inside lpips
            warnings.simplefilter("ignore")
            return build()
    except ImportError:
        raise StvqError(f"{metric} needs the {package} package: pip install 'stvq[metrics]'") from None
    except (OSError, RuntimeError) as err:  # no network (URLError is an OSError), or a torn file
        if weight_path(metric).is_file() and "download" not in str(err).lower():
            raise StvqError(f"{weight_path(metric)} is not the {metric} weights torch can load ({err}); delete it and fetch it again from {url}") from None
        raise StvqError(
            f"{metric} needs {name}: download it from {url} where there is internet and put it in {weight_path(metric).parent}/ (or pass --metric-weights DIR holding checkpoints/{name})"
        ) from None


@cache
def _inception(hub: str) -> torch.nn.Module:  # once per hub folder and process
    def model():
        from pytorch_fid.inception import InceptionV3

        return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True).eval()

    return _load("rfid", model)


@cache
def _lpips(net: str, hub: str) -> torch.nn.Module:
    def model():
        import lpips

        return lpips.LPIPS(net=net, verbose=False).eval()

    return _load(f"lpips-{net}", model)


@torch.no_grad()
def rfid(real: torch.Tensor, fake: torch.Tensor, batch_size: int = 50) -> float:
    """The Frechet Inception distance between two sets of images in [-1, 1], as pytorch-fid computes it."""
    inception = _inception(torch.hub.get_dir())
    from pytorch_fid.fid_score import calculate_frechet_distance

    def statistics(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        features = torch.cat([inception((batch.float() + 1) / 2)[0].flatten(1) for batch in images.split(batch_size)]).double().numpy()
        return features.mean(0), np.cov(features, rowvar=False)

    return float(calculate_frechet_distance(*statistics(real), *statistics(fake)))


def lpips_network(net: str = "alex") -> torch.nn.Module:
    """The ``lpips`` package's LPIPS (``net``: alex or vgg), frozen, loaded once per hub folder: its
    weights cached, downloaded, or one line saying where to put them."""
    return _lpips(net, torch.hub.get_dir())


@torch.no_grad()
def lpips_distance(x: torch.Tensor, y: torch.Tensor, net: str = "alex", batch_size: int = 32) -> float:
    """The mean LPIPS distance between pairs of images in [-1, 1] (``net``: alex or vgg)."""
    metric = lpips_network(net)
    return float(torch.cat([metric(a.float(), b.float()).flatten() for a, b in zip(x.split(batch_size), y.split(batch_size))]).mean())


def field_scores(real: torch.Tensor, fake: torch.Tensor, asked: tuple[str, ...] | None = None) -> dict[str, float]:
    """rFID and LPIPS of reconstructions ``fake`` against ``real``: the metrics ``asked`` ("rfid",
    "lpips-alex", "lpips-vgg"; each downloaded where missing, or one line), or where ``asked`` is None those
    whose weights are already cached (no download is tried)."""
    metrics = asked if asked is not None else tuple(m for m in WEIGHTS if available(m))
    scores = {}
    for metric in metrics:
        if metric == "rfid":
            scores["rfid"] = rfid(real, fake)
        else:
            scores[metric.replace("-", "_")] = lpips_distance(real, fake, metric.split("-")[1])
    return scores
