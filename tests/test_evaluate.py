"""Evaluation: metrics against hand-computed values, the prefix curve's end points, probes that find a
planted factor, the offline perceptual network, and `stvq eval` end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_llamagen_vq import SMALL as LLAMAGEN_SMALL

import stvq
from stvq.cli import main
from stvq.config import TrainConfig
from stvq.data import first_images, make_dataset
from stvq.evaluate import prefix_curve
from stvq.features import efficientnet_lite0, features
from stvq.images import load_image
from stvq.metrics import frechet_distance, masked_psnr, ordering_score, probe_scores, psnr, ssim
from stvq.train import Trainer
from stvq_reference.folders import photo_paths
from stvq_reference.shapes import FACTORS


def test_psnr_of_a_known_error():
    x = torch.zeros(2, 3, 8, 8)
    assert psnr(x + 0.1, x).tolist() == pytest.approx([10 * math.log10(4 / 0.01)] * 2, rel=1e-5)


def test_masked_psnr_scores_only_the_masked_pixels():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[:, :, :4] = 0.1  # an error of 0.1 in the top half only
    top = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    top[:, :, :4] = True
    assert masked_psnr(y, x, top).tolist() == pytest.approx([10 * math.log10(4 / 0.01)] * 2, rel=1e-5)
    assert masked_psnr(y, x, ~top).tolist() == pytest.approx([10 * math.log10(4 / 1e-10)] * 2)  # no error: the floor
    whole = masked_psnr(y, x, torch.ones_like(top))
    assert torch.allclose(whole, psnr(y, x)) and torch.allclose(whole, masked_psnr(y, x, top) + 10 * math.log10(2))


def test_ssim_identical_and_of_two_flat_images():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0])
    a, b = torch.full((1, 3, 16, 16), 0.5), torch.zeros(1, 3, 16, 16)
    c1 = (0.01 * 2) ** 2  # data range 2 for images in [-1, 1]
    assert ssim(a, b).item() == pytest.approx(c1 / (0.25 + c1), rel=1e-4)  # luminance term only


def test_frechet_distance_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    b = a * 2 + 1  # N(1, 4I) vs N(0, I): ||mu||^2 + tr(I + 4I - 2 * 2I) = 3 + 3 (sample moments: approx)
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)


def test_efficientnet_weights_are_mapped_right_a_cat_is_a_cat():
    chelsea = next(p for p in photo_paths() if p.name == "chelsea.png")
    image = load_image(chelsea, 224).unsqueeze(0)
    with torch.no_grad():
        label = efficientnet_lite0()(image).argmax().item()
    assert 281 <= label <= 285  # ImageNet's domestic cats
    assert features(image).shape == (1, 1280)


def test_prefix_curve_end_points():
    model = stvq.create("tokenizer", "styled", preset="tiny").eval()
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    codes = model.encode_codes(images)
    fill = torch.randn(36, 16)
    curve = prefix_curve(model, images, codes, fill, batch_size=16)
    with torch.no_grad():
        full = psnr(model.decoder(codes).clamp(-1, 1), images).mean().item()
        none = psnr(model.decoder(fill.expand(3, -1, -1)).clamp(-1, 1), images).mean().item()
        first5 = psnr(model.decoder(torch.cat([codes[:, :5], fill[5:].expand(3, -1, -1)], 1)).clamp(-1, 1), images).mean().item()
    assert curve["n"] == list(range(37))
    assert curve["prefix_psnr"][36] == pytest.approx(full, abs=1e-4) == curve["suffix_psnr"][36]
    assert curve["prefix_psnr"][0] == pytest.approx(none, abs=1e-4) == curve["suffix_psnr"][0]
    assert curve["prefix_psnr"][5] == pytest.approx(first5, abs=1e-4)


def synthetic_codes(n, rng):
    """6 tokens of 4 dims of noise; 'shape' planted in token 2 and 'x' in token 4."""
    factors = {name: (rng.integers(classes or 1, size=n) if classes else rng.uniform(size=n)) for name, classes in FACTORS.items()}
    codes = rng.normal(size=(n, 6, 4))
    codes[:, 2, :] += 3 * np.eye(5)[factors["shape"]][:, :4] - 3 * (factors["shape"] == 4)[:, None]
    codes[:, 4, 0] = 5 * factors["x"] + 0.05 * rng.normal(size=n)
    return codes, factors


def test_probe_finds_a_planted_factor_where_it_is_and_nowhere_else():
    rng = np.random.default_rng(0)
    (train, ftrain), (test, ftest) = synthetic_codes(2000, rng), synthetic_codes(500, rng)
    probe = probe_scores(train, ftrain, test, ftest, FACTORS)
    scores = np.array(probe["scores"])
    shape, x = probe["factors"].index("shape"), probe["factors"].index("x")
    assert scores[shape].argmax() == 2 and scores[shape, 2] > 0.9
    assert scores[x].argmax() == 4 and scores[x, 4] > 0.99
    assert np.delete(scores[shape], 2).max() < 0.05 and np.delete(scores[x], 4).max() < 0.05
    assert scores[probe["factors"].index("texture")].max() < 0.05  # never planted
    ftrain["rotation"], ftest["rotation"] = np.zeros(2000), np.zeros(500)  # shapes-upright's: nothing to read
    upright = probe_scores(train, ftrain, test, ftest, FACTORS)
    assert "rotation" not in upright["factors"] and np.isfinite(upright["cumulative"]).all()
    assert upright["scores"] == np.delete(scores, probe["factors"].index("rotation"), axis=0).tolist()


def test_cumulative_probe_finds_a_factor_split_over_two_tokens():
    """x = (token 1 + token 3) / 5 with a large shared nuisance: unreadable from either token alone, read
    perfectly once the first 4 tokens are known together."""
    rng = np.random.default_rng(0)

    def split_codes(n):
        codes, factors = synthetic_codes(n, rng)
        nuisance = 10 * rng.normal(size=n)
        codes[:, 1, 0], codes[:, 3, 0] = nuisance, 5 * factors["x"] - nuisance
        codes[:, 4, 0] = rng.normal(size=n)  # remove the planted copy of x
        return codes, factors

    (train, ftrain), (test, ftest) = split_codes(2000), split_codes(500)
    probe = probe_scores(train, ftrain, test, ftest, FACTORS)
    x = probe["factors"].index("x")
    alone, together = np.array(probe["scores"])[x], np.array(probe["cumulative"])[x]
    assert alone.max() < 0.05
    assert together[:3].max() < 0.05 and together[3:].min() > 0.99  # column j: the first j + 1 tokens
    shape = probe["factors"].index("shape")
    assert np.array(probe["cumulative"])[shape, 2] > 0.9  # a factor in one token is found by the prefix too


def test_ordering_score_signs_and_unencoded_factors():
    diagonal = np.eye(8, 36)
    assert ordering_score(diagonal)["ordering_score"] == pytest.approx(1.0)
    assert ordering_score(diagonal[::-1])["ordering_score"] == pytest.approx(-1.0)
    readable_everywhere = np.vstack([np.ones(36), np.eye(7, 36, k=3) * 0.5])  # background in every token
    result = ordering_score(readable_everywhere)
    assert result["first_readable"][:3] == [0, 3, 4] and result["ordering_score"] == pytest.approx(1.0)
    noise = np.full((8, 36), 0.03)
    noise[0, 0] = noise[1, 5] = 0.9
    result = ordering_score(noise)
    assert result["encoded"] == [True, True] + [False] * 6 and math.isnan(result["ordering_score"])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalruns")
    small = {"width": 32, "heads": 2, "encoder_layers": 1, "plain_layers": 1}
    for name, preset in (("styled", "tiny"), ("unordered", "tiny-unordered")):
        Trainer(TrainConfig(preset=preset, model=small, steps=4, batch_size=4, eval_every=4), root / name, progress=False).fit()
    return root / "styled", root / "unordered"


def test_eval_end_to_end_writes_table_json_and_plots(two_runs, runner):
    styled, _ = two_runs
    result = runner.invoke(main, ["eval", "--run", str(styled), "--images", "16", "--prefix-images", "4", "--probe-images", "200"])
    assert result.exit_code == 0, result.stderr
    assert "ordering score" in result.output and "PSNR first 36 known" in result.output
    written = json.loads((styled / "eval.json").read_text())
    assert len(written["prefix"]["prefix_psnr"]) == 37 and written["probe"]["factors"] == list(FACTORS)
    assert {"psnr", "ssim", "mae", "fd_effnet_lite0", "cos_effnet_lite0"} <= set(written["reconstruction"])
    heldout = written["heldout"]
    assert heldout["images"] == 16 and 0 < heldout["object_psnr"] < 60 and 0 < heldout["psnr"] < 60
    assert heldout["object_psnr"] != heldout["psnr"]
    assert "held-out drawn scenes" in result.output
    seen = written["recognised"]  # the factor recogniser on the same 16 images, originals and reconstructions
    assert set(seen) == {"originals", "reconstructions"} and {"shape_accuracy", "x_mae"} <= set(seen["reconstructions"])
    assert seen["originals"]["background_accuracy"] > max(0.5, seen["reconstructions"]["background_accuracy"])  # 4 steps: no background yet
    val = make_dataset("shapes", 64, "val")  # the originals' reading, computed here from the data set's own recogniser
    assert seen["originals"] == val.recogniser().reading_accuracy(first_images(val, 16), val.factor_table(16))
    assert (16 * seen["reconstructions"]["shape_accuracy"]).is_integer() and "recogniser on reconstructions" in result.output
    for name in ("prefix_curve.png", "factor_probe.png"):
        assert (styled / name).stat().st_size > 10_000


def test_eval_compare_writes_one_table_and_one_plot(two_runs, runner, tmp_path):
    result = runner.invoke(
        main, ["eval", "--compare", *map(str, two_runs), "--images", "8", "--prefix-images", "2", "--probe-images", "100", "--no-perceptual", "--no-recogniser", "-o", str(tmp_path / "cmp")]
    )
    assert result.exit_code == 0, result.stderr
    assert "recogniser on reconstructions" not in result.output
    assert "styled" in result.output and "unordered" in result.output
    assert set(json.loads((tmp_path / "cmp" / "compare.json").read_text())) == {"styled", "unordered"}
    assert (tmp_path / "cmp" / "prefix_compare.png").stat().st_size > 10_000


def test_eval_errors(runner, tmp_path):
    assert "name a run to evaluate" in runner.invoke(main, ["eval"]).stderr
    assert "--compare needs at least two runs" in runner.invoke(main, ["eval", "--compare", str(tmp_path)]).stderr
    assert "is not a directory" in runner.invoke(main, ["eval", str(tmp_path / "nope")]).stderr


@pytest.mark.slow
def test_the_comparison_benchmark_rebuilds_its_table_from_nothing(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from compare import main as compare

    out = tmp_path / "cmp"
    args = ["--out", str(out), "--tokenizers", "styled,titok", "--steps", "4", "--k", "8", "--quantize-images", "32", "--images", "8", "--oracle-steps", "2"]
    report = compare(args)
    table = (out / "compare.md").read_text()
    assert table.startswith("| measure | styled | titok |") and "| quantized: PSNR (dB) |" in table and "decoder oracle, 2 steps" in table
    assert "Rebuilt in" in table and report["wall_seconds"] > 0 and set(report["oracle"]) == {"styled", "titok"}
    assert json.loads((out / "compare.json").read_text())["eval"]["titok"]["quantized"] is True
    assert set(report["seconds"]["styled"]) == {"train", "quantize"}
    assert (out / "eval" / "prefix_compare.png").is_file()


def test_eval_measures_a_composed_tokenizer_by_its_ids_and_every_position_s_code_health(tmp_path, runner):
    """A tokenizer without continuous codes (styled + a VQ-VAE) is measured through encode and decode:
    the reconstruction metrics and, for each of its token positions, the ids it uses and their entropy;
    a quantized Styled VQ's eval gains the same per-position health."""
    import json

    import stvq
    from stvq.cli import main
    from stvq.codebook_stats import position_health

    health = position_health(torch.tensor([[0, 5], [0, 6], [0, 7], [0, 8]]), 16)
    assert health["used"] == [1, 4] and health["entropy_bits"] == [0.0, 2.0] and health["perplexity"] == [1.0, 4.0]
    styled = tmp_path / "styled"
    stvq.create("tokenizer", "styled", preset="tiny", quantizer={"name": "fsq", "levels": [8, 8, 8]}).save_pretrained(styled)
    vq = tmp_path / "vq"
    stvq.create("tokenizer", "llamagen-vq", **LLAMAGEN_SMALL).save_pretrained(vq)
    assert runner.invoke(main, ["compose", "styled+llamagen-vq", "--part", f"styled={styled}", "--part", f"llamagen-vq={vq}", "-o", str(tmp_path / "tok")]).exit_code == 0
    args = ["--images", "8", "--prefix-images", "4", "--probe-images", "8", "--no-perceptual", "--no-recogniser"]
    result = runner.invoke(main, ["eval", str(tmp_path / "tok"), *args])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((tmp_path / "tok" / "eval.json").read_text())
    assert len(report["positions"]["used"]) == 36 + 256 and 0 < report["reconstruction"]["psnr"] < 60
    assert "ids used per position" in result.output and "prefix" not in report
    result = runner.invoke(main, ["eval", str(styled), *args])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((styled / "eval.json").read_text())
    assert len(report["positions"]["entropy_bits"]) == 36 and "prefix" in report
    prefix = report["prefix"]  # the marginal gain of token k: what it adds to the first k - 1
    assert len(prefix["marginal_psnr"]) == len(prefix["marginal_mse"]) == 36
    assert sum(prefix["marginal_psnr"]) == pytest.approx(prefix["prefix_psnr"][36] - prefix["prefix_psnr"][0], abs=1e-3)
    assert prefix["marginal_psnr"][4] == pytest.approx(prefix["prefix_psnr"][5] - prefix["prefix_psnr"][4])
    assert "marginal" in result.output
    assert (styled / "positions.png").is_file() and (tmp_path / "tok" / "positions.png").is_file()
