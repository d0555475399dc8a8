"""The benchmark suite's README commands start: `pytest benchmarks/ --benchmark-only` at `tiny` (one round
each) and `python benchmarks/report.py` on what it wrote, whose tables then hold every ratio."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
ALONE = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # pytest-benchmark turns itself off in an xdist worker


def test_every_benchmark_file_collects():
    """`pytest benchmarks/ --benchmark-only` starts: every file imports and every parametrisation builds
    (the k-means, memory and oracle benchmarks run for minutes, so only the block and model ones run below)."""
    run = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    files = {line.split("::")[0] for line in run.stdout.splitlines() if "::" in line}
    assert files == {str(path.relative_to(ROOT)) for path in (ROOT / "benchmarks").glob("test_*.py")}, files


def test_the_block_and_model_benchmarks_run_at_tiny_and_report_every_ratio(tmp_path):
    results = tmp_path / "results.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks/test_condition_block.py",
            "benchmarks/test_models.py",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "tiny and not compile and not stage2 and not encode_quantize",
            "--benchmark-only",
            "--benchmark-min-rounds=1",
            "--benchmark-max-time=0.001",
            "--benchmark-warmup=off",
            f"--benchmark-json={results}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=ALONE,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = subprocess.run([sys.executable, "benchmarks/report.py", str(results)], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    number = r"\d+\.\d+"
    assert re.search(rf"^\| tiny cpu \| 32 \|(?: {number} \|){{6}}$", report, re.M), report  # the sequential block table
    interleaved = re.search(rf"\| tiny cpu \(30 rounds\) \|((?: {number} \|){{6}})$", report, re.M)
    assert interleaved, report  # ours/literal, ours/bare, timm/bare, forward and forward+backward
    ours_bare, timm_bare = (float(v) for v in interleaved.group(1).split("|")[4:6])
    assert ours_bare > 0.5 and timm_bare > 0.5
    decoder = re.search(rf"\| decoder tiny cpu \| 16 \|.*\| ({number}) \|$", report, re.M)
    assert decoder, report  # the linear head's column is filled at tiny, whose preset ends in the pixel head


def test_the_data_at_scale_benchmark_runs_every_part_at_a_few_images(tmp_path):
    """README's `python benchmarks/data_at_scale.py` at 16 images (4 shards, so that the training part's two
    readers each get some), one round: tokenize with 0-3 workers, torchrun against one process, training
    on the stream against the folder."""
    run = subprocess.run(
        [sys.executable, "benchmarks/data_at_scale.py", "--images", "16", "--train-steps", "4", "--rounds", "1", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tokenize_ids_identical_across_workers"] and report["torchrun_ids_identical"]
    assert report["train_wds_over_folder_mean"] > 0 and len(list((tmp_path / "shards").glob("*.tar"))) == 4
