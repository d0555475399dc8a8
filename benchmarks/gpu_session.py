"""The checks a lent GPU runs, in one prepared script of about 7 minutes (docs/experiments/sharp-reconstructions.md and throughput.md).

    STVQ_CACHE=runs/cache python benchmarks/gpu_session.py --out $OUT        # on the device
    python benchmarks/gpu_session.py --out /tmp/gpu --smoke                  # on a CPU: every part, tiny budgets

Parts, in order, each writing under ``--out`` as it finishes (a run cut short keeps what it wrote):

1. ``throughput.json``: training steps per preset (tiny, small, reference) for fp32, bf16 and bf16 with
   fused AdamW at two batches, images/s, MFU and peak memory (``benchmarks/train_throughput.py``).
2. ``oracle_mse.jsonl`` and ``.png``: the decoder oracle of ``tiny`` under MSE for ``--oracle-seconds``
   (bf16, a large batch, DataLoader workers), the recogniser's reading of the shape at every point: at
   which step, if any, does the shape appear?
3. ``oracle_adversarial.jsonl`` and ``.png``: the same number of steps with the PatchGAN from half way.
4. ``train_tiny/``: the main job's recipe at the device's batch for ``--train-seconds`` (steps set from
   part 1's bf16 images/s), the recogniser in the validation log.

``session.json`` gathers the figures. Copy the recogniser into ``STVQ_CACHE`` first (``cp
~/.cache/stvq/recogniser-64-* runs/cache/``) and carry it, or part 2 trains one first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_throughput import main as throughput  # noqa: E402

from stvq.checkpoint import write_json  # noqa: E402
from stvq.config import TrainConfig  # noqa
from stvq.train import Trainer  # noqa: E402
from stvq_reference.shapes.oracle import run_oracle  # noqa: E402


def oracle(out: Path, name: str, train: dict, seconds: float | None, eval_every: int, model: dict) -> dict:
    with open(out / f"{name}.jsonl", "w") as log:
        result = run_oracle("styled", "tiny", model, train, seconds, eval_every, recognise=True, on_point=lambda point: print(json.dumps(point), file=log, flush=True))
    result.save_grid(out / f"{name}.png")
    return {"steps": result.curve[-1]["step"], "images_per_s": result.images_per_s, "last": result.curve[-1]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny budgets and models: check that every part runs (CPU)")
    parser.add_argument("--oracle-seconds", type=float, default=90.0)
    parser.add_argument("--oracle-batch", type=int, default=128)
    parser.add_argument("--train-seconds", type=float, default=100.0)
    parser.add_argument("--train-batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    small = {"width": 32, "heads": 2, "plain_layers": 1} if args.smoke else {}
    workers = 0 if args.smoke else args.workers
    session: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "smoke": args.smoke}
    started = time.perf_counter()

    def keep(part: str, value) -> None:
        session[part] = value
        session["seconds"] = round(time.perf_counter() - started, 1)
        write_json(out / "session.json", session)

    if args.smoke:
        rows = throughput(
            ["--presets", "tiny", "--variants", "fp32,bf16", "--batches", "2", "--steps", "1", "--warmup", "1", "--workers", "0", "--data-batches", "1", "--json", str(out / "throughput.json")]
        )
    else:
        rows = throughput(
            ["--presets", "tiny,small,reference", "--variants", "fp32,bf16,bf16+fused,bf16+fused+adamw", "--batches", "32,128", "--steps", "8", "--warmup", "2", "--json", str(out / "throughput.json")]
        )
    keep("throughput", rows)

    batch = 4 if args.smoke else args.oracle_batch
    recipe = {"steps": 10**6, "batch_size": batch, "bf16": cuda, "num_workers": workers}
    mse = oracle(out, "oracle_mse", recipe, 2.0 if args.smoke else args.oracle_seconds, 1 if args.smoke else 1000, small)
    keep("oracle_mse", mse)
    steps = mse["steps"]
    adversarial = {**recipe, "steps": steps, "adversarial_weight": 0.5, "disc_start": steps // 2}
    keep("oracle_adversarial", oracle(out, "oracle_adversarial", adversarial, None, max(1, steps // 10), small))

    batch = 2 if args.smoke else args.train_batch
    rate = max((r["images_per_s"] for r in rows if r.get("preset") == "tiny" and r.get("variant") == "bf16"), default=100.0)
    train_steps = 2 if args.smoke else max(2, int(args.train_seconds * rate / batch))
    cfg = TrainConfig(
        preset="tiny", model=small, bf16=cuda, batch_size=batch, num_workers=workers, steps=train_steps, eval_every=max(1, train_steps // 5), log_every=max(1, train_steps // 20), recognise=True
    )
    summary = Trainer(cfg, out / "train_tiny", progress=False).fit()
    keep("train_tiny", {"steps": train_steps, "batch": batch, **{k: v for k, v in summary.items() if isinstance(v, (int, float, str))}})
    return session


if __name__ == "__main__":
    print(json.dumps(main(), indent=1, default=str))
