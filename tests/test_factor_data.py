"""The factor evaluation is the data set's, not shapes': a second factor data set registered here (``bars``:
a vertical bar of one of three colours at a position, two factors) with its own recogniser gets the same
``stvq eval`` probes and readings, ``--train recognise=true`` logs and ``stvq prior eval`` judgement."""

import json

import numpy as np
import pytest
import torch

import stvq
from stvq.compose import tokenize_dataset
from stvq.config import PriorTrainConfig, TrainConfig
from stvq.evaluate import evaluate
from stvq.interfaces import FactorDataset, Recogniser
from stvq.plugins import PluginInfo, plugin_table
from stvq.prior import PriorTrainer, evaluate_prior
from stvq.train import Trainer

COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])  # red, green, blue on black


class BarsRecogniser(Recogniser):
    """Reads a bar exactly: its colour from the brightest column's mean, its place from that column (the
    bar's left edge, as the data states it)."""

    factors = {"colour": 3, "x": 0}
    tolerance = {"x": 0.1}
    accuracy = {"colour_accuracy": 1.0, "x_mae": 0.0}

    def read(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        columns = images.float().mean(2)  # (B, 3, S)
        column = columns.sum(1).argmax(1)  # (B,) the brightest column
        colour = columns[torch.arange(len(images)), :, column]  # (B, 3)
        logits = colour @ COLOURS.T
        p, ids = logits.softmax(-1).max(-1)
        return {"colour": ids.numpy(), "colour_p": p.numpy(), "x": (column.float() / (images.shape[-1] - 1)).numpy()}


class BarsDataset(FactorDataset):
    """Item i: a 4-px bar of colour i % 3 at a place drawn from (seed, split, i)."""

    factor_classes = {"colour": 3, "x": 0}

    def __init__(self, image_size: int = 64, split: str = "train", seed: int = 0) -> None:
        self.image_size, self.split, self.seed = image_size, split, seed

    def __len__(self) -> int:
        return 64 if self.split == "val" else 512

    def factors(self, index: int) -> dict[str, float]:
        rng = np.random.default_rng([self.seed, self.split == "val", index])
        return {"colour": index % 3, "x": float(rng.integers(0, self.image_size - 4)) / (self.image_size - 1)}

    def __getitem__(self, index: int) -> torch.Tensor:
        f = self.factors(index)
        image = -torch.ones(3, self.image_size, self.image_size)
        left = round(f["x"] * (self.image_size - 1))
        image[:, :, left : left + 4] = COLOURS[int(f["colour"])].view(3, 1, 1)
        return image

    def fingerprint(self) -> str:
        return f"bars:{self.split}:seed{self.seed}"

    def factor_table(self, count: int | None = None) -> dict[str, np.ndarray]:
        rows = [self.factors(i) for i in range(count or len(self))]
        return {name: np.array([row[name] for row in rows]) for name in self.factor_classes}

    def recogniser(self) -> BarsRecogniser:
        return BarsRecogniser()


@pytest.fixture
def bars(monkeypatch):
    monkeypatch.setitem(plugin_table()["dataset"], "bars", PluginInfo("dataset", "bars", BarsDataset, "tests", "0", "tests"))
    return "bars"


def tiny_tokenizer(**options):
    return stvq.create("tokenizer", "styled", preset="tiny", width=32, heads=2, **options)


def test_the_recogniser_of_bars_reads_its_own_images():
    val = BarsDataset(split="val")
    images = torch.stack([val[i] for i in range(len(val))])
    accuracy = val.recogniser().reading_accuracy(images, val.factor_table())
    assert accuracy == {"colour_accuracy": 1.0, "x_mae": pytest.approx(0.0, abs=1e-6)}


def test_stvq_eval_probes_and_reads_a_second_factor_data_set(bars, tmp_path):
    result = evaluate(tiny_tokenizer(), tmp_path, data=bars, images=32, prefix_images=8, probe_images=128, perceptual=False)
    assert result["probe"]["factors"] == ["colour", "x"] and np.array(result["probe"]["scores"]).shape == (2, 36)
    originals = result["recognised"]["originals"]
    assert originals == {"colour_accuracy": 1.0, "x_mae": pytest.approx(0.0, abs=1e-6)}  # the recogniser reads real images right
    assert set(result["recognised"]["reconstructions"]) == {"colour_accuracy", "x_mae"}
    assert (tmp_path / "factor_probe.png").is_file() and "heldout" not in result  # bars has no held-out scenes


def test_training_logs_the_reading_of_a_second_factor_data_set(bars, tmp_path):
    cfg = TrainConfig(data=bars, preset="tiny", model={"width": 32, "heads": 2}, steps=2, batch_size=4, eval_every=2, log_every=1, recognise=True)
    summary = Trainer(cfg, tmp_path / "run", progress=False).fit()
    val = BarsDataset(split="val")  # the reading, computed again from the saved weights
    images, model = torch.stack([val[i] for i in range(len(val))]), stvq.load_tokenizer(tmp_path / "run")
    with torch.no_grad():
        recon = torch.cat([model(batch).reconstruction for batch in images.split(32)]).clamp(-1, 1)
    read = val.recogniser().reading_accuracy(recon, val.factor_table())
    assert summary["val_colour_accuracy"] == read["colour_accuracy"] and summary["val_x_mae"] == pytest.approx(read["x_mae"])
    assert "val_shape_accuracy" not in summary


def test_prior_eval_judges_samples_of_a_second_factor_data_set(bars, tmp_path):
    tok = tiny_tokenizer(quantizer={"name": "fsq", "levels": [4, 4, 4]})
    tok.save_pretrained(tmp_path / "tok")
    tok = stvq.load_tokenizer(tmp_path / "tok")
    data = BarsDataset(split="train")
    tokenize_dataset(tok, data, tmp_path / "shards", shard_size=256, progress=False, data_fingerprint=data.fingerprint(), tokenizer_dir=tmp_path / "tok")
    run = tmp_path / "prior"
    cfg = PriorTrainConfig(shards=str(tmp_path / "shards"), model={"width": 32, "layers": 2, "heads": 2}, steps=2, batch_size=8, heldout=32)
    PriorTrainer(cfg, run, progress=False).fit()
    report = evaluate_prior(run, samples=8, keeps=(4,))
    assert report["recogniser"] == BarsRecogniser.accuracy and report["judge"]["samples"] == 8
    assert set(report["judge"]["total_variation"]) == {"colour", "x"}
    assert report["judge"]["clean_share_real"] == 1.0  # every real bar is read with confidence
    assert set(report["keep"]["4"]["survival"]) == {"colour", "x"}
    assert json.loads((run / "prior_eval.json").read_text())["judge"]["samples"] == 8
