"""Data at scale on this machine (docs/data.md): tokenize throughput with DataLoader workers
against the single-process loop, two torchrun processes against one (ids and wall time), and training
images/s on a wds: stream against the same images in a folder.

    python benchmarks/data_at_scale.py [--images 2000] [--out /tmp/stvq-data-bench] [--rounds 3]

The images are 512 x 512 JPEGs (quality 90) cut from the photos scikit-image ships (random crops and
flips, :class:`stvq_reference.folders.PhotosDataset`), written once as a folder and as webdataset shards of 100
(of fewer where there are fewer than 400 images: at least 4 shards, so that two training readers each get some).
Run it alone: two torch jobs on 2 cores slow each other many times over.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

import stvq
from stvq.compose import tokenize_dataset
from stvq.data import make_dataset
from stvq.images import to_uint8
from stvq.prior import TokenShards
from stvq_reference.folders import PhotosDataset


def write_images(root: Path, count: int, per_shard: int = 100) -> tuple[Path, str]:
    import webdataset as wds

    folder, shards = root / "jpegs", root / "shards"
    if not (folder / f"{count - 1:06d}.jpg").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shards.mkdir(parents=True, exist_ok=True)
        photos = PhotosDataset(512, "train", seed=3)
        writer = None
        for i in range(count):
            buf = io.BytesIO()
            Image.fromarray(to_uint8(photos[i])).save(buf, format="JPEG", quality=90)
            (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())
            if i % per_shard == 0:
                writer and writer.close()
                writer = wds.TarWriter(str(shards / f"train-{i // per_shard:06d}.tar"))
            writer.write({"__key__": f"{i:06d}", "jpg": buf.getvalue()})
        writer.close()
    last = (count + per_shard - 1) // per_shard - 1
    return folder, f"wds:{shards}/train-{{000000..{last:06d}}}.tar"


def todays_loop_rate(tokenizer, folder: Path) -> float:
    """The loop ``stvq tokenize`` ran before DataLoader workers (commit 5eeb024): images read one by one in
    the main process, with that version's image reading (EXIF transpose and RGB conversion as copies)."""
    from PIL import ImageOps

    from stvq.images import from_pil

    def load(path: Path) -> torch.Tensor:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            return from_pil(ImageOps.fit(img, (64, 64), Image.Resampling.BICUBIC))

    paths = sorted(folder.glob("*.jpg"))
    started = time.perf_counter()
    for start in range(0, len(paths), 64):
        tokenizer.encode(torch.stack([load(p) for p in paths[start : start + 64]])).numpy()
    return len(paths) / (time.perf_counter() - started)


def tokenize_rate(tokenizer, data: str, out: Path, workers: int) -> float:
    dataset = make_dataset(data, 64, "all")
    started = time.perf_counter()
    result = tokenize_dataset(tokenizer, dataset, out, shard_size=500, batch_size=64, progress=False, num_workers=workers)
    return result["num_images"] / (time.perf_counter() - started)


def cli(*args: str, procs: int = 1, env: dict | None = None) -> float:
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else [sys.executable]
    started = time.perf_counter()
    done = subprocess.run([*prefix, "-m", "stvq.cli", *args], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode:
        raise SystemExit(f"stvq {' '.join(args)} failed: {(done.stderr.strip().splitlines() or ['(no message)'])[-1]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--out", default="/tmp/stvq-data-bench")
    parser.add_argument("--train-steps", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved tokenize rounds and training pairs, the median / mean of each")
    args = parser.parse_args()
    root = Path(args.out)
    folder, shards = write_images(root, args.images, per_shard=min(100, max(1, args.images // 4)))
    torch.manual_seed(0)
    tok = stvq.create("tokenizer", "styled", preset="tiny", quantizer={"name": "fsq", "levels": [8, 5, 5, 5]}).eval()
    tok.save_pretrained(root / "tok")
    report: dict = {"images": args.images, "cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads()}

    # 1. tokenize throughput: workers against the single-process loop (num_workers=0 reads in the main
    # process, as stvq tokenize did before); three interleaved rounds, the median of each
    rates: dict[str, list[float]] = {"today": [], **{f"workers{w}": [] for w in (0, 1, 2, 3)}}
    for _ in range(args.rounds):
        rates["today"].append(todays_loop_rate(tok, folder))
        for workers in (0, 1, 2, 3):
            out = root / f"ids-w{workers}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            rates[f"workers{workers}"].append(tokenize_rate(tok, str(folder), out, workers))
    median = {name: statistics.median(values) for name, values in rates.items()}
    for name, rate in median.items():
        report[f"tokenize_images_per_s_{name}"] = rate
        report[f"tokenize_{name}_over_today"] = rate / median["today"]
        report[f"tokenize_{name}_over_workers0"] = rate / median["workers0"]
    report["tokenize_ids_identical_across_workers"] = all(torch.equal(TokenShards(root / "ids-w0").rows(0, args.images), TokenShards(root / f"ids-w{w}").rows(0, args.images)) for w in (1, 2, 3))

    # 2. two processes under torchrun against one, each reading with one worker
    for procs in (1, 2):
        out = root / f"ids-p{procs}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        threads = {"OMP_NUM_THREADS": "1"} if procs > 1 else {}
        report[f"torchrun_{procs}_seconds"] = cli("tokenize", "--tokenizer", str(root / "tok"), "--data", shards, "-o", str(out), "--num-workers", "1", procs=procs, env=threads)
    one, two = TokenShards(root / "ids-p1"), TokenShards(root / "ids-p2")
    report["torchrun_ids_identical"] = len(one) == len(two) and torch.equal(one.rows(0, len(one)), two.rows(0, len(two)))

    # 3. training images/s on the stream against the folder (the same images; 2 workers each): three pairs,
    # the order alternating, each run's mean over its logging windows but the first (the workers' start)
    ratios = []
    for pair in range(args.rounds):
        rates = {}
        for name, data in (("folder", str(folder)), ("wds", shards))[:: 1 if pair % 2 else -1]:
            run = root / f"train-{name}"
            subprocess.run(["rm", "-rf", str(run)], check=True)
            cli(
                "train",
                "--data",
                data,
                "--run-dir",
                str(run),
                "--steps",
                str(args.train_steps),
                "--num-workers",
                "2",
                "--eval-every",
                str(args.train_steps),
                "--log-every",
                str(max(1, args.train_steps // 8)),
                "--no-progress",
            )
            windows = [json.loads(line)["images_per_s"] for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
            rates[name] = sum(windows) / len(windows)
        ratios.append(rates["wds"] / rates["folder"])
        report[f"train_pair{pair}_images_per_s"] = rates
    report["train_wds_over_folder"] = ratios
    report["train_wds_over_folder_mean"] = sum(ratios) / len(ratios)
    print(json.dumps(report, indent=2))
    (root / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
