"""The decoder oracle (the reference plugin's ``stvq oracle``): factor vectors that encode the shapes factors exactly, a short run for every
registered decoder that reports its curve (and, for the Styled decoder, beats its untrained start), and
the wall-time budget."""

import math

import pytest
import torch

from stvq.cli import main
from stvq.data import make_dataset
from stvq.errors import StvqError
from stvq.registry import list_plugins
from stvq_reference.shapes import FACTOR_DIM, PALETTE, SHAPES, TEXTURES
from stvq_reference.shapes.oracle import FactorItems, run_oracle


def test_factor_vector_holds_every_factor():
    shapes = make_dataset("shapes", 64)
    f, v = shapes.factors(3), shapes.factor_vector(3)
    assert v.shape == (FACTOR_DIM,) == (29,)
    hot = [len(PALETTE), len(SHAPES), len(PALETTE), len(TEXTURES)]
    chunks = torch.split(v[: sum(hot)], hot)
    assert [int(c.argmax()) for c in chunks] == [f["background"], f["shape"], f["color"], f["texture"]]
    assert all(c.sum() == 1 for c in chunks)
    size, x, y, s, c = v[sum(hot) :].tolist()
    assert (size, x, y) == pytest.approx((f["size"], f["x"], f["y"]))
    assert math.degrees(math.atan2(s, c)) % 360 == pytest.approx((4 * f["rotation"]) % 360, abs=1e-3)


def test_the_oracle_refuses_data_without_factor_vectors():
    with pytest.raises(StvqError, match="the decoder oracle reads factor vectors; --data photos declares none"):
        FactorItems(64, "val", data="photos")


def test_stvq_oracle_refuses_a_batch_larger_than_memory_in_one_line(runner):
    result = runner.invoke(main, ["oracle", "--seconds", "0", "--train", "steps=1", "--train", "batch_size=1000000000"])
    assert result.exit_code == 1 and result.stderr.startswith("Error: --batch-size 1000000000: its items alone take") and len(result.stderr.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("decoder", list_plugins("decoder")["decoder"])
def test_oracle_runs_every_registered_decoder_and_the_styled_one_learns(decoder):
    from stvq.registry import config_class

    fields = set(config_class("decoder", decoder).__dataclass_fields__)  # each decoder's own, smaller
    small = {k: v for k, v in {"width": 32, "heads": 2, "plain_layers": 1, "channels": 16}.items() if k in fields}
    result = run_oracle(decoder, "tiny", small, {"steps": 60, "batch_size": 16, "lr": 1e-3, "warmup_steps": 10}, eval_every=30, val_count=16)
    assert [p["step"] for p in result.curve] == [0, 30, 60]
    assert result.curve[2]["seconds"] > result.curve[1]["seconds"] > result.curve[0]["seconds"] == 0
    assert all(math.isfinite(p["val_psnr"]) for p in result.curve)
    if decoder == "styled":
        assert result.final_psnr > result.curve[0]["val_psnr"] + 1.0  # from grey towards the background colours
    assert result.samples.shape == (2, 8, 3, 64, 64) and result.images_per_s > 0


def test_the_oracle_reads_the_factors_of_the_data_its_train_config_names():
    """`--train data=shapes-upright` (README's rotation row): the oracle trains and validates on it."""
    result = run_oracle("styled", "tiny", {"width": 32, "heads": 2, "plain_layers": 1}, {"steps": 1, "batch_size": 2, "data": "shapes-upright"}, eval_every=10, val_count=2)
    assert torch.equal(result.samples[0, :2], torch.stack([make_dataset("shapes-upright", 64, "val")[i] for i in range(2)]))
    with pytest.raises(StvqError, match="--data photos declares none"):
        run_oracle("styled", "tiny", {"width": 32}, {"steps": 1, "data": "photos"})


def test_oracle_stops_at_its_time_budget():
    seen = []
    result = run_oracle("styled", "tiny", {"width": 32, "heads": 2, "plain_layers": 1}, {"steps": 10**6, "batch_size": 4}, seconds=1.0, eval_every=10**6, val_count=4, on_point=seen.append)
    assert len(result.curve) == 2 and 1.0 <= result.curve[1]["seconds"] < 5.0
    assert seen == result.curve  # every point reported as it is measured


@pytest.mark.slow
def test_stvq_oracle_runs_as_the_docs_document_it(tmp_path):
    """The documented `stvq oracle --seconds 300 --grid oracle.png`, on a one-second budget, in a process of its own."""
    import json
    import os
    import subprocess
    import sys

    grid = tmp_path / "oracle.png"
    cmd = [
        sys.executable,
        "-m",
        "stvq.cli",
        "oracle",
        "--seconds",
        "1",
        "--set",
        "width=32",
        "--set",
        "heads=2",
        "--set",
        "plain_layers=1",
        "--train",
        "batch_size=4",
        "--eval-every",
        "1000000",
        "--grid",
        str(grid),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["steps"] >= 1 and math.isfinite(last["final_psnr"]) and grid.is_file()


def test_the_oracle_without_a_time_budget_runs_its_cosine_over_the_steps(runner):
    """`stvq oracle --seconds 0 --train steps=N` (the equal-step rows of the records): N steps, the
    schedule over them; without steps it is refused in one line, not run for a million steps."""
    import json

    small = ["--set", "width=32", "--set", "heads=2", "--set", "plain_layers=1", "--eval-every", "1000000"]
    result = runner.invoke(main, ["oracle", "--seconds", "0", "--train", "steps=3", "--train", "batch_size=4", *small])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 3
    result = runner.invoke(main, ["oracle", "--seconds", "0", *small])
    assert result.exit_code == 2 and "give them, e.g. --train steps=1400" in result.stderr


def test_readme_shape_probe_reads_the_oracles_codes_tokens_and_pixel_features():
    """README's `python benchmarks/shape_probe.py --steps 1400`, two steps at width 32: the shape class
    is read from the codes (a linear map of its one-hot) without a miss, the outline readings are scores
    of stvq eval's probes (at most 1), and the script answers --help as a command."""
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from shape_probe import main

    report = main(["--steps", "2", "--set", "width=32", "--fit", "200", "--test", "100", "--pixels", "5000"])
    assert report["steps"] == 2 and report["shape_from_codes"] == 1.0 and -1 < report["shape_from_tokens"] <= 1
    assert -1 < report["outline_from_features"] <= 1 and -1 < report["outline_of_rendering"] <= 1
    done = subprocess.run([sys.executable, "benchmarks/shape_probe.py", "--help"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0 and "--steps" in done.stdout


def test_each_decoder_takes_its_own_fields_and_refuses_the_others(runner):
    """The broadcast decoder's renderer is set by name (it was fixed before), and a Styled field it does
    not read is refused in one line, not ignored."""
    import stvq

    assert stvq.create("decoder", "broadcast", preset="tiny", channels=8).convs[0].out_channels == 8
    result = runner.invoke(main, ["oracle", "--decoder", "broadcast", "--set", "width=32", "--seconds", "1"])
    assert result.exit_code == 1 and "--set width: unknown config field; known fields: channels, code_dim, convs, image_size, latent, num_tokens" in result.stderr
