"""The comparison table of docs/experiments/ordering.md, rebuilt from nothing by one command: Styled VQ, the TiTok-style
tokenizer and the unordered ablation trained with the same recipe and budget (stage 1 of the main job),
quantized alike, evaluated side by side by ``stvq eval --compare``, plus each decoder's row of the decoder
oracle, and the wall time of every part.

    python benchmarks/compare.py                          # the main job's budget: about 45 CPU-minutes on 2 cores
    python benchmarks/compare.py --steps 20 --oracle-steps 10 --k 16 --quantize-images 64 --images 16 --out /tmp/cmp   # a smoke run

Writes OUT/compare.md (the table), OUT/compare.json (every figure), and ``stvq eval --compare``'s
prefix_compare.png into OUT/eval. A run directory that already holds a finished run is reused; delete OUT to
rebuild everything. Run it alone: two torch jobs on one machine slow each other.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

#: name -> (tokenizer, preset, decoder the oracle runs)
TOKENIZERS = {"styled": ("styled", "tiny", "styled"), "titok": ("titok", "tiny", "titok"), "unordered": ("styled", "tiny-unordered", "unordered")}


def stvq(*args: str) -> float:
    """Run one ``stvq`` command in this process (its output passes through; a failure raises); its wall
    time in seconds."""
    from stvq.cli import main

    start = time.perf_counter()
    main.main(list(args), prog_name="stvq", standalone_mode=False)
    return time.perf_counter() - start


def build(out: Path, steps: int, k: int, quantize_images: int, images: int, oracle_steps: int, names: list[str]) -> dict:
    seconds: dict[str, dict[str, float]] = {}
    for name in names:
        tokenizer, preset, _ = TOKENIZERS[name]
        run = out / name
        seconds[name] = {}
        if not (run / "summary.json").is_file():
            seconds[name]["train"] = stvq("train", "--stage", "1", "--tokenizer", tokenizer, "--preset", preset, "--steps", str(steps), "--run-dir", str(run), "--no-progress")
        if not (run / "quantize.json").is_file():
            seconds[name]["quantize"] = stvq("quantize", "--run", str(run), "--k", str(k), "--max-images", str(quantize_images))
    start = time.perf_counter()
    probe = str(min(2000, 8 * images))
    stvq("eval", "--compare", *(str(out / n) for n in names), "--images", str(images), "--prefix-images", str(min(64, images)), "--probe-images", probe, "-o", str(out / "eval"))
    evaluated = time.perf_counter() - start
    oracle = {}
    if oracle_steps:
        from stvq_reference.shapes.oracle import run_oracle

        for name in names:
            _, preset, decoder = TOKENIZERS[name]
            start = time.perf_counter()
            result = run_oracle(decoder, preset, {}, {"steps": oracle_steps}, eval_every=oracle_steps, val_count=min(256, images))
            oracle[name] = {"val_psnr": result.final_psnr, "images_per_s": result.images_per_s, "seconds": time.perf_counter() - start}
    results = json.loads((out / "eval" / "compare.json").read_text())
    summaries = {n: json.loads((out / n / "summary.json").read_text()) for n in names}
    return {"steps": steps, "k": k, "seconds": seconds, "eval_seconds": evaluated, "oracle_steps": oracle_steps, "oracle": oracle, "summaries": summaries, "eval": results}


def table(report: dict, names: list[str]) -> str:
    from stvq.evaluate import summary_rows

    rows: dict[str, list[str]] = {"stage-1 val PSNR (dB)": [f"{report['summaries'][n]['val_psnr']:.2f}" for n in names]}
    rows["training images/s"] = [f"{report['summaries'][n]['images_per_s']:.0f}" for n in names]
    per_model = [summary_rows(report["eval"][n]) for n in names]
    for key in per_model[0]:
        rows[f"quantized: {key}"] = [row.get(key, "") for row in per_model]
    if report["oracle"]:
        rows[f"decoder oracle, {report['oracle_steps']} steps: val PSNR (dB)"] = [f"{report['oracle'][n]['val_psnr']:.2f}" for n in names]
    lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {key} | " + " | ".join(values) + " |" for key, values in rows.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--steps", type=int, default=2400, help="stage-1 steps of each tokenizer (the main job's)")
    parser.add_argument("--k", type=int, default=1024, help="k-means codebook size of each")
    parser.add_argument("--quantize-images", type=int, default=20000, help="images stvq quantize encodes for each codebook")
    parser.add_argument("--images", type=int, default=256, help="validation images of stvq eval")
    parser.add_argument("--oracle-steps", type=int, default=1400, help="decoder-oracle steps per decoder (0: none)")
    parser.add_argument("--tokenizers", default=",".join(TOKENIZERS))
    args = parser.parse_args(argv)
    names = args.tokenizers.split(",")
    unknown = sorted(set(names) - set(TOKENIZERS))
    if unknown:
        parser.error(f"unknown tokenizer(s) {', '.join(unknown)}; choose from {', '.join(TOKENIZERS)}")
    start = time.perf_counter()
    report = build(args.out, args.steps, args.k, args.quantize_images, args.images, args.oracle_steps, names)
    report["wall_seconds"] = time.perf_counter() - start
    text = table(report, names) + f"\nRebuilt in {report['wall_seconds']:.0f} s of wall time by `python benchmarks/compare.py {' '.join(argv or sys.argv[1:])}`.\n"
    (args.out / "compare.md").write_text(text)
    (args.out / "compare.json").write_text(json.dumps(report, indent=1))
    print(text)
    return report


if __name__ == "__main__":
    main()
