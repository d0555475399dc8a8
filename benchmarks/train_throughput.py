"""Training throughput per preset (docs/experiments/throughput.md): images/s, MFU and peak memory of stage-1 training steps for
fp32, bf16 autocast, ``torch.compile``, fused AdamW and Muon against AdamW alone, at batch sizes doubling
up to what fits, and the data path on its own (the shapes renderer and JPEG decoding through DataLoader
workers), so that a run says whether it is data- or compute-bound.

    python benchmarks/train_throughput.py                      # on a GPU: tiny, small, reference
    python benchmarks/train_throughput.py --presets tiny --batches 24 --steps 3 --variants fp32,fused

Each row times ``--steps`` steps after ``--warmup`` steps (compilation happens there) of the step stage 1
runs: the tokenizer's forward with code noise, the MSE, backward, gradient clipping and the optimizer
(:func:`stvq.optim.update`): training's default, Muon on the blocks' matrices and AdamW on the rest, or AdamW
alone in the ``adamw`` variants. FLOPs per image are torch's count (:mod:`stvq.flops`); MFU is against the
device's peak (bf16 for the bf16 rows). Prints a markdown table; ``--json`` writes the rows too. Run it
alone: two torch jobs on one machine slow each other.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

import stvq
from stvq.config import TrainConfig
from stvq.data import make_dataset
from stvq.flops import count_flops, device_peak
from stvq.images import to_uint8
from stvq.optim import make_optimizer, update
from stvq_reference.folders import PhotosDataset

VARIANTS = ("fp32", "bf16", "bf16+fused", "bf16+fused+adamw", "bf16+fused+compile", "fused", "fused+adamw")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(preset: str, variant: str, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    """One row: images/s, MFU and peak memory of ``steps`` training steps."""
    torch.manual_seed(0)
    model = stvq.create("tokenizer", "styled", preset=preset).to(device).train()
    size = model.config.image_size
    flops = count_flops(model, torch.empty(1, 3, size, size))
    cfg = TrainConfig(preset=preset, fused_optimizer="fused" in variant, optimizer="adamw" if "adamw" in variant else TrainConfig.optimizer)
    opt = make_optimizer(model, cfg)
    bf16 = "bf16" in variant
    net = torch.compile(model) if "compile" in variant else model
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(images, noise_sigma=cfg.noise_sigma)
            loss = (out.reconstruction.float() - images).square().mean()
        update({"model": opt}, {"model": loss}, cfg.grad_clip)

    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    peak, _ = device_peak(device, bf16)
    images_per_s = batch * steps / seconds
    memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "preset": preset,
        "variant": variant,
        "optimizer": cfg.optimizer,
        "batch": batch,
        "images_per_s": images_per_s,
        "gflops_per_image": flops / 1e9,
        "mfu": flops * images_per_s / peak if peak else None,
        "peak_memory_mb": memory,
        "step_ms": 1000 * seconds / steps,
    }


def data_rate(dataset, workers: int, batch: int, batches: int) -> float:
    """Images/s a DataLoader with ``workers`` delivers from ``dataset`` (after its first batch)."""
    load = iter(DataLoader(dataset, batch_size=batch, num_workers=workers, shuffle=False))
    next(load)
    start = time.perf_counter()
    for _ in range(batches):
        next(load)
    return batch * batches / (time.perf_counter() - start)


def data_rows(workers: int, batch: int, batches: int, size: int) -> list[dict]:
    """The shapes renderer and JPEG decoding (512-px photo crops, decoded, resized to ``size``)."""
    rows = [{"data": "shapes (rendered)", "size": size, "workers": workers, "images_per_s": data_rate(make_dataset("shapes", size, "train"), workers, batch, batches)}]
    with tempfile.TemporaryDirectory() as root:
        photos = PhotosDataset(512, "train", seed=3)
        for i in range(batch * (batches + 1)):
            buf = io.BytesIO()
            Image.fromarray(to_uint8(photos[i])).save(buf, format="JPEG", quality=90)
            (Path(root) / f"{i:05d}.jpg").write_bytes(buf.getvalue())
        folder = make_dataset(root, size, "all")
        rows.append({"data": "JPEG folder (512 px, decoded)", "size": size, "workers": workers, "images_per_s": data_rate(Subset(folder, range(len(folder))), workers, batch, batches)})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small,reference")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batches", default="", help="comma-separated batch sizes; default: doubling from 8 until one does not fit (GPU) or 24 (CPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the data-path rows (0: none)")
    parser.add_argument("--data-batches", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("| preset | variant | batch | images/s | MFU | peak memory (MB) | step (ms) |\n|---|---|---|---|---|---|---|")
    rows: list[dict] = []
    for preset in args.presets.split(","):
        for variant in args.variants.split(","):
            if variant not in VARIANTS:
                parser.error(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
            batches = [int(b) for b in args.batches.split(",")] if args.batches else [8 * 2**i for i in range(12)] if device.type == "cuda" else [24]
            for batch in batches:
                try:
                    rows.append(time_steps(preset, variant, batch, args.steps, args.warmup, device))
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    break  # larger batches will not fit either
                print(_row(rows[-1]), flush=True)
    data = data_rows(args.workers, 32, args.data_batches, 64)
    for row in data:
        print(f"| data: {row['data']} | {row['size']} px | {row['workers']} workers | {row['images_per_s']:.0f} images/s |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "train": rows, "data": data}, indent=1))
    return rows + data


def _row(r: dict) -> str:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    memory = f"{r['peak_memory_mb']:,.0f}" if r["peak_memory_mb"] is not None else "-"
    return f"| {r['preset']} | {r['variant']} | {r['batch']} | {r['images_per_s']:,.0f} | {mfu} | {memory} | {r['step_ms']:.1f} |"


if __name__ == "__main__":
    main()
