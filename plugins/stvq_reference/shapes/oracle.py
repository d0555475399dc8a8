"""The decoder oracle (``stvq oracle``): a registered decoder fed the true factors of ``shapes`` images, trained alone.

A learned linear map turns each image's factor vector (one-hot background, shape, colour and texture;
size, x, y; sin and cos of 4x the rotation, whose period is the squares' 90 degrees) into the 36 codes,
and the decoder learns to render the image from them. No encoder takes part, so the curve of validation
PSNR against steps and wall time measures how fast a decoder learns to render, the question that limits
stage 1 (an encoder cannot learn to encode what the decoder cannot yet use). Optimizer, schedule, objective
(reconstruction, and a discriminator where ``adversarial_weight`` > 0) and update are stage 1's
(:class:`stvq.config.TrainConfig`, :class:`stvq.losses.ImageObjective`, :func:`stvq.optim.update`), so a
recipe that speeds the oracle carries over.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from stvq.config import TrainConfig, parse_options
from stvq.data import check_batch_fits, make_dataset
from stvq.distributed import keep_freed_memory
from stvq.errors import StvqError
from stvq.flops import warn_if_bf16_is_emulated
from stvq.images import save_image_grid
from stvq.interfaces import Decoder, FactorDataset
from stvq.losses import ImageObjective
from stvq.metrics import psnr
from stvq.optim import make_optimizers, set_lr, update
from stvq.registry import create, parse_overrides
from stvq.streams import training_workers

#: The data set whose factors the oracle reads unless `--train data=...` names another (a
#: :class:`stvq.interfaces.FactorDataset` with factor vectors).
DATA = "shapes"


class FactorItems(Dataset):
    """A factor data set's items as (factor vector, image)."""

    def __init__(self, image_size: int, split: str = "train", seed: int = 0, data: str = DATA) -> None:
        self.data = make_dataset(data, image_size, split, seed)
        if not isinstance(self.data, FactorDataset) or self.data.factor_vector(0) is None:
            raise StvqError(f"the decoder oracle reads factor vectors; --data {data} declares none (an stvq.interfaces.FactorDataset with factor_vector does)")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.factor_vector(index), self.data[index]


class OracleModel(nn.Module):
    """factor vector (B, factor_dim) -> linear map -> codes (B, N, code_dim) -> decoder -> images."""

    def __init__(self, decoder: Decoder, factor_dim: int) -> None:
        super().__init__()
        self.decoder = decoder
        self.codes = nn.Linear(factor_dim, decoder.num_tokens * decoder.code_dim)

    def forward(self, factors: torch.Tensor) -> torch.Tensor:
        codes = self.codes(factors).view(len(factors), self.decoder.num_tokens, self.decoder.code_dim)
        return self.decoder(codes)


@dataclass
class OracleResult:
    curve: list[dict[str, float]] = field(default_factory=list)  # {"step", "seconds", "val_psnr"[, "val_shape_accuracy"]}, from step 0
    images_per_s: float = 0.0
    samples: torch.Tensor | None = None  # (2, 8, 3, H, W): validation images, their last renderings
    model: nn.Module | None = None  # the trained OracleModel (factor map and decoder)

    @property
    def final_psnr(self) -> float:
        return self.curve[-1]["val_psnr"]

    def save_grid(self, path: str | Path) -> None:
        """The last validation renderings as one PNG, the originals in the row above."""
        assert self.samples is not None, "no point measured yet"
        save_image_grid(Path(path), self.samples.flatten(0, 1), per_row=self.samples.shape[1])


@torch.no_grad()
def _val_psnr(model: nn.Module, factors: torch.Tensor, images: torch.Tensor) -> tuple[float, torch.Tensor]:
    model.eval()
    out = torch.cat([model(f) for f in factors.split(64)]).clamp(-1, 1)
    model.train()
    return psnr(out, images).mean().item(), out


def run_oracle(
    decoder: str = "styled",
    preset: str = "tiny",
    model: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    seconds: float | None = None,
    eval_every: int = 60,
    val_count: int = 64,
    seed: int = 0,
    device: str | None = None,
    recognise: bool = False,
    on_point: Callable[[dict[str, float]], None] | None = None,
) -> OracleResult:
    """Train the oracle of ``decoder`` (a registered name) at ``preset`` with overrides ``model`` of its
    config's fields and TrainConfig overrides ``train`` (lr, steps, batch_size, warmup...). Stops after
    ``train["steps"]`` steps or ``seconds`` of training wall time, whichever comes first; evaluation time
    is not counted. ``device`` defaults to CUDA where there is one. ``recognise`` adds the factor
    recogniser's accuracy on the renderings to every point (``val_shape_accuracy``...: whether the decoder
    draws the shape, which PSNR does not tell). ``on_point`` is called with every point as it is measured
    (a long run shows its curve as it goes). Returns the validation curve."""
    cfg = TrainConfig(**{"seed": seed, **(train or {})})
    keep_freed_memory()
    torch.manual_seed(seed)
    on = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))  # where it trains
    built = create("decoder", decoder, preset=preset, **(model or {}))
    image_size = built.image_size
    val, train_set = FactorItems(image_size, "val", seed, cfg.data), FactorItems(image_size, "train", seed, cfg.data)
    net = OracleModel(built, len(val.data.factor_vector(0))).to(on)
    objective = ImageObjective(cfg, image_size)  # stage 1's: reconstruction, and a discriminator where asked
    parts = {"model": net, **{name: m.to(on) for name, m in objective.companions().items()}}
    opts = make_optimizers(parts, cfg)
    warn_if_bf16_is_emulated(on, cfg.bf16)
    if cfg.compile:
        net.decoder.compile()
    val_factors, val_images = (torch.stack(t).to(on) for t in zip(*(val[i] for i in range(val_count))))
    check_batch_fits(cfg.batch_size, train_set[0], on)
    sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(train_set, cfg.batch_size, sampler=sampler, drop_last=True, num_workers=training_workers(cfg.num_workers, on))

    def point(step: int, seconds: float) -> dict[str, float]:
        value, renders = _val_psnr(net, val_factors, val_images)
        result.samples = torch.stack([val_images[:8], renders[:8]]).cpu()
        out = {"step": step, "seconds": round(seconds, 2), "val_psnr": value}
        if reader is not None:
            out.update({f"val_{k}": v for k, v in reader.reading_accuracy(renders, truth).items() if k.endswith("accuracy")})
        return out

    reader = None
    if recognise:
        reader, truth = val.data.recogniser(), val.data.factor_table(val_count)
    result = OracleResult()

    def record(step: int, seconds: float) -> None:
        result.curve.append(point(step, seconds))
        if on_point:
            on_point(result.curve[-1])

    record(0, 0.0)
    elapsed, images_seen = 0.0, 0
    started = time.perf_counter()
    for step, (factors, images) in enumerate(loader):
        factors, images = factors.to(on, non_blocking=True), images.to(on, non_blocking=True)
        now = elapsed + time.perf_counter() - started
        for opt in opts.values():
            set_lr(opt, cfg.lr_at(step, now / seconds if seconds else None), cfg.scales_weight_at(step))
        with torch.autocast(on.type, dtype=torch.bfloat16, enabled=cfg.bf16):  # as stage 1 steps
            losses, _ = objective(net(factors), images, None, step, net.decoder)
        update(opts, losses, cfg.grad_clip)
        images_seen += len(images)
        done = step + 1
        last = done >= cfg.steps or (seconds is not None and now >= seconds)
        if done % eval_every == 0 or last:
            elapsed += time.perf_counter() - started
            record(done, elapsed)
            started = time.perf_counter()
        if last:
            break
    result.images_per_s = images_seen / max(elapsed, 1e-9)
    result.model = net.eval()
    return result


@click.command()
@click.option("--decoder", default="styled", show_default=True, help="The registered decoder to train.")
@click.option("--preset", default="tiny", show_default=True, help="The decoder's preset.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="A field of the decoder's config; repeatable.")
@click.option("--train", "train_fields", multiple=True, metavar="KEY=VALUE", help="A TrainConfig field (JSON value); repeatable.")
@click.option("--seconds", type=click.FloatRange(min=0), default=300.0, show_default=True, help="Training wall time; 0: none, the cosine runs over --train steps=N.")
@click.option("--eval-every", type=click.IntRange(min=1), default=60, show_default=True, help="Steps between validation points.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda where there is one).")
@click.option("--grid", type=click.Path(dir_okay=False), default=None, help="Write the last validation renderings to this PNG.")
@click.option("--recognise", is_flag=True, help="Read the renderings' factors with the recogniser at every point.")
def oracle(decoder, preset, overrides, train_fields, seconds, eval_every, device, grid, recognise) -> None:
    """The decoder oracle: a decoder fed the true factors of shapes images, trained alone; prints its
    validation curve as JSON lines as it is measured, then the final PSNR and images/s.

    \b
    Example:
      stvq oracle --seconds 300 --grid oracle.png
      stvq oracle --seconds 0 --train steps=1400 --set width=96
    """
    options = parse_options(tuple(train_fields), "--train")
    if not seconds and "steps" not in options:
        raise click.UsageError("--seconds 0 runs the cosine over the steps: give them, e.g. --train steps=1400")
    result = run_oracle(
        decoder,
        preset,
        parse_overrides(tuple(overrides), "decoder", decoder),
        {"steps": 10**6, **options},
        seconds or None,
        eval_every,
        device=device,
        recognise=recognise,
        on_point=lambda point: click.echo(json.dumps(point)),  # as it is measured
    )
    click.echo(json.dumps({"final_psnr": result.final_psnr, "images_per_s": round(result.images_per_s, 1), "steps": result.curve[-1]["step"]}))
    if grid:
        result.save_grid(grid)
