"""The factor recogniser of ``shapes``: a small CNN trained on the built-in shapes' known factors reads
each image (background, shape, colour, texture; size and position), without downloads. ``stvq eval``,
``--train recognise=true`` and ``stvq prior eval`` reach it through :meth:`ShapesDataset.recogniser`, as
:class:`ShapesRecogniser` (an :class:`stvq.interfaces.Recogniser`)."""

from __future__ import annotations

import hashlib
import json
import operator
import os
import warnings
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stvq.checkpoint import check_state_dict, load_tensors, read_json, save_tensors, write_json
from stvq.config import LoopConfig
from stvq.data import first_images
from stvq.distributed import keep_freed_memory
from stvq.errors import StvqError
from stvq.interfaces import FactorDataset, Recogniser
from stvq.optim import make_optimizers, set_lr, update

#: What it reads (its heads): the class factors with their class counts, and the regressed ones. Checked
#: against what the data set declares (``factor_classes``) before it trains.
CLASSES = {"background": 8, "shape": 5, "color": 8, "texture": 3}
REGRESSED = ("size", "x", "y")
#: Survival tolerances for the regressed factors (about a tenth of their range).
TOLERANCE = {"size": 0.03, "x": 0.1, "y": 0.1}


class FactorRecogniser(nn.Module):
    """images (B, 3, S, S) in [-1, 1] -> {factor: logits (B, classes)} and {"size","x","y": (B,)}."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.GELU()]
            channels = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(channels, n) for name, n in CLASSES.items()})
        self.regress = nn.Linear(channels, len(REGRESSED))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(images)
        out = {name: head(h) for name, head in self.heads.items()}
        out.update(dict(zip(REGRESSED, torch.sigmoid(self.regress(h)).unbind(1))))
        return out

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Per image: each class factor's id and probability (``NAME``, ``NAME_p``), each regressed value."""
        self.eval()
        parts: dict[str, list[np.ndarray]] = {}
        for batch in images.split(batch_size):
            out = self(batch.float())
            for name in CLASSES:
                p, ids = out[name].softmax(-1).max(-1)
                parts.setdefault(name, []).append(ids.numpy())
                parts.setdefault(f"{name}_p", []).append(p.numpy())
            for name in REGRESSED:
                parts.setdefault(name, []).append(out[name].numpy())
        return {k: np.concatenate(v) for k, v in parts.items()}


def factor_data(image_size: int, split: str, seed: int = 0, data: FactorDataset | None = None) -> FactorDataset:
    """``shapes`` at ``image_size`` (or ``data``), refused in one line unless it declares the factors the recogniser reads."""
    from stvq_reference.shapes import ShapesDataset

    data = ShapesDataset(image_size, split, seed) if data is None else data
    declared = data.factor_classes if isinstance(data, FactorDataset) else {}
    if {n: declared.get(n) for n in CLASSES} != CLASSES or not set(REGRESSED) <= set(declared):
        raise StvqError(f"the factor recogniser reads {', '.join([*CLASSES, *REGRESSED])}; the data declares {dict(declared) or 'no factors'}")
    return data


def _factor_targets(data: FactorDataset, count: int) -> dict[str, torch.Tensor]:
    table = data.factor_table(count)
    return {name: torch.as_tensor(table[name], dtype=torch.long if name in CLASSES else torch.float32) for name in (*CLASSES, *REGRESSED)}


@torch.enable_grad()  # also when called from a measurement under no_grad (stvq eval)
def train_recogniser(image_size: int = 64, images: int = 40000, steps: int = 4000, batch_size: int = 64, seed: int = 0) -> tuple[FactorRecogniser, dict[str, float]]:
    """Train on ``images`` rendered shapes (train split) and report accuracy on the 512 validation images
    (class factors: share right; regressed: mean absolute error). The defaults read the shape right 95 % of
    the time (20,000 images and 1,500 steps: 80 %; docs/experiments/sharp-reconstructions.md); about 6 minutes on 2 CPU cores."""
    keep_freed_memory()
    torch.manual_seed(seed)
    train = factor_data(image_size, "train", seed + 1)  # another stream than the tokenizers' training images
    x = first_images(train, images)
    y = _factor_targets(train, images)
    model = FactorRecogniser()
    # The training loop's optimizer, schedule and update (stvq.optim), with a classifier's settings.
    cfg = LoopConfig(steps=steps, batch_size=batch_size, lr=2e-3, weight_decay=0.01, beta2=0.999, warmup_steps=steps * 3 // 10, min_lr_ratio=0.0, grad_clip=0.0, seed=seed)
    opts = make_optimizers({"model": model}, cfg)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        set_lr(opts["model"], cfg.lr_at(step))
        index = torch.randint(0, images, (batch_size,), generator=generator)
        out = model(x[index])
        classes = reduce(operator.add, (F.cross_entropy(out[n], y[n][index]) for n in CLASSES))
        loss = classes + 10 * reduce(operator.add, (F.mse_loss(out[n], y[n][index]) for n in REGRESSED))
        update(opts, {"model": loss}, cfg.grad_clip)
    return model.eval(), recogniser_accuracy(model, image_size)


class ShapesRecogniser(Recogniser):
    """The :class:`stvq.interfaces.Recogniser` of ``shapes``: a trained :class:`FactorRecogniser` and its
    accuracy on the validation images. A clean scene also has an object colour other than the
    background's, as every real shapes image has."""

    factors = {**CLASSES, **{n: 0 for n in REGRESSED}}
    tolerance = TOLERANCE

    def __init__(self, model: FactorRecogniser, accuracy: dict[str, float]) -> None:
        self.model, self.accuracy = model.eval(), accuracy

    def read(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        return self.model.read(images)

    def clean(self, read: dict[str, np.ndarray]) -> np.ndarray:
        return super().clean(read) & (read["color"] != read["background"])


def recogniser_accuracy(model: FactorRecogniser, image_size: int = 64) -> dict[str, float]:
    """:meth:`Recogniser.reading_accuracy` on the 512 real validation images."""
    val = factor_data(image_size, "val")
    return ShapesRecogniser(model, {}).reading_accuracy(first_images(val, len(val)), val.factor_table())


def trained_recogniser(image_size: int = 64, cache: str | Path | None = None, **train_options: Any) -> ShapesRecogniser:
    """The recogniser for ``image_size``, trained once (6 CPU minutes; ``train_options`` go to
    :func:`train_recogniser`) and kept in the cache directory (``$STVQ_CACHE``, default ``~/.cache/stvq``)
    as safetensors beside its accuracy."""
    root = Path(cache or os.environ.get("STVQ_CACHE") or Path.home() / ".cache" / "stvq")
    if root.exists() and not root.is_dir():  # said before minutes of training, not after
        raise StvqError(f"the cache directory {root} is a file; point STVQ_CACHE at a directory")
    factors = factor_data(image_size, "val").factor_classes
    key = hashlib.sha256(json.dumps([image_size, sorted(factors.items()), "v3"]).encode()).hexdigest()[:12]
    weights, report = root / f"recogniser-{image_size}-{key}.safetensors", root / f"recogniser-{image_size}-{key}.json"
    if weights.is_file() or report.is_file():
        cached = _cached(weights, report)
        if cached is not None:
            return cached
    model, accuracy = train_recogniser(image_size, **train_options)
    save_tensors(weights, model.state_dict())
    write_json(report, accuracy)
    return ShapesRecogniser(model, accuracy)


def _cached(weights: Path, report: Path) -> ShapesRecogniser | None:
    """The recogniser in the cache, or None (with one warning: it is trained again) where its files are
    torn, missing, of another layout, hold NaN, or its accuracy is not an object of numbers in [0, 1]."""
    try:
        model = FactorRecogniser()
        state = load_tensors(weights)
        check_state_dict(model.state_dict(), state, str(weights))
        model.load_state_dict(state)
        accuracy = read_json(report, "")
        if not all(isinstance(v, float) and 0 <= v <= 1 for v in accuracy.values()):
            raise StvqError(f"{report} holds values that are not accuracies")
        return ShapesRecogniser(model, accuracy)
    except StvqError as err:
        warnings.warn(f"the cached recogniser is unusable ({err}); training it again", stacklevel=3)
        return None
