"""The factor recogniser that judges generated shapes images (the reference plugin's, through the
:class:`stvq.interfaces.Recogniser` interface), and the judgements read from it."""

import json

import numpy as np
import pytest
import torch

import stvq
from stvq.cli import main
from stvq.config import PriorTrainConfig
from stvq.data import first_images, make_dataset
from stvq.prior import PriorTrainer
from stvq_reference.shapes import recogniser as judge
from stvq_reference.shapes.recogniser import FactorRecogniser, ShapesRecogniser

#: The recogniser's judgements on given readings need no trained network.
READER = ShapesRecogniser(FactorRecogniser(), {})


def readings(**factors):
    n = len(next(iter(factors.values())))
    base = {name: np.zeros(n, dtype=int) for name in judge.CLASSES}
    base.update({f"{name}_p": np.ones(n) for name in judge.CLASSES})
    base.update({name: np.full(n, 0.5) for name in judge.REGRESSED})
    base["color"] = np.ones(n, dtype=int)
    base.update({k: np.asarray(v) for k, v in factors.items()})
    return base


def test_a_clean_scene_is_confident_with_an_object_unlike_its_background():
    read = readings(shape_p=[0.95, 0.5, 0.99, 0.99], color=[1, 1, 0, 2])  # 2nd unsure, 3rd colour = background
    assert READER.clean_share(read) == 0.5


def test_total_variation_is_zero_for_the_same_readings_and_one_for_disjoint_ones():
    a = readings(shape=[0, 0, 1, 1], x=[0.1, 0.1, 0.9, 0.9])
    tv = READER.total_variation(a, a)
    assert all(v == 0 for v in tv.values())
    b = readings(shape=[2, 2, 3, 3], x=[0.5, 0.5, 0.5, 0.5])
    tv = READER.total_variation(a, b)
    assert tv["shape"] == 1.0 and tv["x"] == 1.0 and tv["background"] == 0.0


def test_survival_counts_equal_classes_and_close_positions():
    sources = readings(shape=[0, 1, 2, 3], x=[0.2, 0.2, 0.2, 0.2])
    variations = readings(shape=[0, 1, 0, 0], x=[0.25, 0.35, 0.2, 0.1])
    kept = READER.survival(variations, sources)
    assert kept["shape"] == 0.5 and kept["x"] == 0.75 and kept["background"] == 1.0


@pytest.mark.slow
def test_recogniser_learns_the_factors_and_prior_eval_judges_samples(shards, tmp_path, runner):
    reader = stvq.create("dataset", "shapes", image_size=64, split="val").recogniser()  # the suite's stand-in, trained in $STVQ_CACHE (conftest)
    assert isinstance(reader, stvq.interfaces.Recogniser)
    accuracy = reader.accuracy
    assert accuracy["background_accuracy"] > 0.8  # the easiest factor, after a few seconds of training
    assert accuracy["x_mae"] < 0.2
    with torch.no_grad():  # as stvq eval calls it: training still has its gradients
        again = judge.trained_recogniser(64)  # cached: not trained again
        judge.trained_recogniser(32, cache=tmp_path / "cache", images=64, steps=2)
    assert again.accuracy == accuracy and all(torch.equal(a, b) for a, b in zip(reader.model.state_dict().values(), again.model.state_dict().values()))
    assert len(list((tmp_path / "cache").glob("recogniser-32-*.safetensors"))) == 1  # written where asked

    run = tmp_path / "prior"
    PriorTrainer(PriorTrainConfig(shards=str(shards / "shards"), model={"width": 32, "layers": 2, "heads": 2}, steps=4, batch_size=8, heldout=24), run, progress=False).fit()
    result = runner.invoke(main, ["prior", "eval", "--prior", str(run), "--samples", "16", "--keep", "4", "--keep", "36"])
    assert result.exit_code == 0, result.stderr
    report = json.loads((run / "prior_eval.json").read_text())
    assert report["recogniser"] == accuracy and report["judge"]["samples"] == 16
    assert set(report["judge"]["total_variation"]) == {"background", "shape", "color", "texture", "size", "x", "y"}
    real = first_images(make_dataset("shapes", 64, "val"), 16)  # the real images judged beside the samples
    assert report["judge"]["clean_share_real"] == reader.clean_share(reader.read(real))
    assert (16 * report["judge"]["clean_share"]).is_integer() and report["judge"]["fd_effnet_lite0"] > 0
    assert set(report["keep"]) == {"4", "36"} and (run / "keep_4.png").is_file() and (run / "samples.png").is_file()
    assert "keep 4 " in result.output and "keep 36 " in result.output


def test_judging_refuses_shards_of_other_images(shards, tmp_path, runner):
    run = tmp_path / "prior"
    manifest = json.loads((shards / "shards" / "manifest.json").read_text())
    other = tmp_path / "folder-shards"
    other.mkdir()
    for f in (shards / "shards").iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "manifest.json").write_text(json.dumps({**manifest, "data_fingerprint": "folder:abc"}))
    PriorTrainer(PriorTrainConfig(shards=str(other), model={"width": 32, "layers": 2, "heads": 2}, steps=2, batch_size=8, heldout=24), run, progress=False).fit()
    result = runner.invoke(main, ["prior", "eval", "--prior", str(run), "--samples", "4"])
    assert result.exit_code == 1 and "judging samples reads images of a data set with known factors and a recogniser" in result.stderr


def test_the_blur_calibration_readme_shows_runs_and_blur_costs_psnr_and_reading(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from blur_calibration import calibrate, main

    rows = calibrate(images=64, sigmas=(0.0, 1.0, 4.0))
    assert rows[0]["psnr"] == float("inf") and rows[1]["psnr"] > rows[2]["psnr"] > 15
    assert rows[0]["color"] >= rows[2]["color"]  # the quick test recogniser: colours blur away too
    main(["--images", "16"])
    assert capsys.readouterr().out.count("\n") == 2 + 7  # header, rule, one row per sigma


def test_the_recogniser_refuses_data_that_does_not_declare_its_factors(monkeypatch):
    assert judge.factor_data(16, "val").factor_classes["shape"] == judge.CLASSES["shape"]  # shapes declares them
    photos = stvq.create("dataset", "photos", image_size=16, split="val")
    with pytest.raises(stvq.StvqError, match="the factor recogniser reads background, shape, color, texture, size, x, y; the data declares no factors"):
        judge.factor_data(16, "val", data=photos)
