"""The prior: a GPT over token ids trained on `stvq tokenize` shards, sampled and measured."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import stvq
from stvq.cli import main
from stvq.config import PriorTrainConfig
from stvq.data import make_dataset
from stvq.prior import PriorTrainer, TokenShards, heldout_nll, load_prior, pick, sample


def small(shards, **changes):
    return PriorTrainConfig(
        **{
            "shards": str(shards / "shards"),
            "model": {"width": 32, "layers": 2, "heads": 2},
            "steps": 60,
            "batch_size": 16,
            "lr": 3e-3,
            "warmup_steps": 5,
            "eval_every": 30,
            "checkpoint_every": 30,
            "heldout": 24,
            **changes,
        }
    )


def test_gpt_is_causal_and_shaped_at_the_full_composed_size():
    gpt = stvq.create("prior", "gpt", vocab_size=8192 + 16384, seq_len=36 + 256, width=64, layers=2, heads=2).eval()
    ids = torch.randint(0, gpt.vocab_size, (2, 292))
    logits = gpt(ids)
    assert logits.shape == (2, 293, 24576)
    changed = ids.clone()
    changed[:, 100:] = 7  # a later id never changes an earlier prediction
    torch.testing.assert_close(gpt(changed)[:, :101], logits[:, :101])
    assert not torch.allclose(gpt(changed)[:, 101:], logits[:, 101:])


def test_class_conditional_gpt_starts_from_the_class_token():
    gpt = stvq.create("prior", "gpt", vocab_size=16, seq_len=4, width=16, layers=1, heads=2, num_classes=3).eval()
    ids = torch.randint(0, 16, (2, 4))
    a, b = gpt(ids, torch.tensor([0, 0])), gpt(ids, torch.tensor([0, 2]))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    with pytest.raises(stvq.ConfigError, match="class-conditional"):
        gpt(ids)


def test_base_preset_is_about_llamagen_b():
    with torch.device("meta"):
        gpt = stvq.create("prior", "gpt", vocab_size=16384, seq_len=256, preset="base", num_classes=1000)
    assert 105e6 < sum(p.numel() for p in gpt.parameters()) < 115e6  # LlamaGen-B: 111 M


def test_picking_greedy_top_k_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(500, 1)
    assert (pick(logits, temperature=0) == 1).all() and (pick(logits, top_k=1) == 1).all()
    g = torch.Generator().manual_seed(0)
    assert set(pick(logits, top_k=2, generator=g).tolist()) == {1, 3}
    p = logits[0].softmax(-1)  # 0.032, 0.644, 0.087, 0.237: the top 0.644 + 0.237 reach 0.85
    assert set(pick(logits, top_p=0.85, generator=g).tolist()) == {1, 3} and float(p[1] + p[3]) > 0.85
    assert set(pick(logits, top_p=0.5, generator=g).tolist()) == {1}
    assert set(pick(logits, generator=g).tolist()) == {0, 1, 2, 3}


def test_shards_split_and_refuse_what_they_cannot_read(shards, tmp_path):
    data = TokenShards(shards / "shards")
    assert (len(data), data.num_tokens, data.vocab_size) == (240, 36, 64) and data.split(1000) == (216, 24)
    assert torch.equal(data.rows(98, 102)[2], torch.from_numpy(np.load(shards / "shards" / "shard_00001.npy")[0].astype(np.int64)))
    with pytest.raises(stvq.StvqError, match="holds no manifest.json"):
        TokenShards(tmp_path)


def test_a_tiny_prior_learns_resumes_exactly_and_samples_reproducibly(shards, tmp_path):
    data = TokenShards(shards / "shards")
    heldout = data.rows(216, 240)
    untrained = stvq.create("prior", "gpt", vocab_size=64, seq_len=36, width=32, layers=2, heads=2)
    before = np.mean(heldout_nll(untrained, heldout))
    summary = PriorTrainer(small(shards), tmp_path / "run", progress=False).fit()
    assert summary["val_nll"] < before - 0.5 and abs(before - math.log(64)) < 0.3  # learned, from about uniform
    assert summary["train_images"] == 216 and summary["heldout_images"] == 24

    class Killed(PriorTrainer):  # as if the process died at step 35, after the checkpoint at 30
        def step(self, net, batch, step):
            if step == 35:
                raise KeyboardInterrupt
            return super().step(net, batch, step)

    with pytest.raises(KeyboardInterrupt):
        Killed(small(shards), tmp_path / "half", progress=False).fit()
    resumed = PriorTrainer(small(shards), tmp_path / "half", resume=True, progress=False).fit()
    assert resumed["val_nll"] == summary["val_nll"] and resumed["resumed_from"] == 30  # exact resume

    prior, cfg = load_prior(tmp_path / "run")
    a, b = sample(prior, 5, seed=3), sample(prior, 5, seed=3)
    assert torch.equal(a, b) and a.shape == (5, 36) and not torch.equal(a, sample(prior, 5, seed=4))
    greedy = sample(prior, 3, temperature=0)
    assert torch.equal(greedy, sample(prior, 3, top_k=1, seed=9)) and (greedy == greedy[0]).all()
    prefix = heldout[:4, :6]
    kept = sample(prior, 4, prefix=prefix, seed=1)
    assert torch.equal(kept[:, :6], prefix)


def test_prior_commands_train_sample_and_evaluate(shards, tmp_path, runner):
    run = tmp_path / "prior"
    args = [
        "prior",
        "train",
        "--shards",
        str(shards / "shards"),
        "--set",
        "width=32",
        "--set",
        "layers=2",
        "--set",
        "heads=2",
        "--steps",
        "20",
        "--batch-size",
        "8",
        "--eval-every",
        "20",
        "--run-dir",
        str(run),
        "--no-progress",
        "--train",
        "heldout=24",
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.stderr
    assert "216 images x 36 ids over 64 (24 held out)" in result.output

    result = runner.invoke(main, ["prior", "sample", "--prior", str(run), "-n", "6", "--seed", "2", "-o", str(tmp_path / "s")])
    assert result.exit_code == 0, result.stderr
    ids = np.load(tmp_path / "s" / "ids.npy")
    assert ids.shape == (6, 36) and (tmp_path / "s" / "samples.png").is_file()
    result = runner.invoke(main, ["prior", "sample", "--prior", str(run), "-n", "4", "--keep", "8", "--from", "shapes", "-o", str(tmp_path / "v")])
    assert result.exit_code == 0, result.stderr
    tok = stvq.load_tokenizer(shards / "tok")
    real = tok.encode(torch.stack([make_dataset("shapes", 64, "val")[i] for i in range(4)]))
    np.testing.assert_array_equal(np.load(tmp_path / "v" / "ids.npy")[:, :8], real[:, :8].numpy())
    assert (tmp_path / "v" / "sources.png").is_file()

    result = runner.invoke(main, ["prior", "eval", "--prior", str(run)])
    assert result.exit_code == 0, result.stderr
    report = json.loads((run / "prior_eval.json").read_text())
    assert report["images"] == 24 and len(report["bits_per_position"]) == 36
    assert report["bits_per_image"] == pytest.approx(sum(report["bits_per_position"])) and report["uniform_bits_per_image"] == 216
    assert (run / "prior_nll.png").is_file()


def bad_input_run(shards):
    run = shards / "bad-input-run"
    if not run.exists():
        PriorTrainer(small(shards, steps=2, eval_every=2, checkpoint_every=2), run, progress=False).fit()
    return run


@pytest.mark.parametrize(
    "args,status,message",
    [
        (["prior", "train", "--shards", "{tmp}", "--run-dir", "{tmp}/r"], 1, "holds no manifest.json: pass a directory written by `stvq tokenize`"),
        (["prior", "train", "--run-dir", "{tmp}/r"], 1, "pass --shards DIR"),
        (["prior", "sample", "--prior", "{tmp}", "-n", "3", "-o", "{tmp}/o"], 1, "holds no prior (no config.json)"),
        (["prior", "sample", "--prior", "{run}", "-n", "0", "-o", "{tmp}/o"], 2, "Invalid value for '-n'"),  # a value out of range: click's usage status
        (["prior", "sample", "--prior", "{run}", "-n", "2", "--keep", "4", "-o", "{tmp}/o"], 1, "give them with --from"),
        (["prior", "sample", "--prior", "{run}", "-n", "2", "--tokenizer", "{other}", "-o", "{tmp}/o"], 1, "is not the one that wrote"),
    ],
)
def test_bad_prior_input_is_one_line(shards, tmp_path, runner, args, status, message):
    run = bad_input_run(shards)
    other = tmp_path / "other"
    torch.manual_seed(1)  # other weights than the tokenizer that wrote the shards
    stvq.create("tokenizer", "styled", preset="tiny", width=32, heads=2, quantizer={"name": "fsq", "levels": [4, 4, 4]}).save_pretrained(other)
    result = runner.invoke(main, [a.format(tmp=tmp_path, run=run, other=other) for a in args])
    assert result.exit_code == status and message in result.stderr, result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("Error")]) == 1
    assert "Traceback" not in result.output + result.stderr


def test_sampling_keeps_each_position_to_its_part_of_a_composed_layout():
    from stvq.prior import layout_mask

    layout = {"begin_id": None, "separator_id": 30, "parts": [{"offset": 0, "vocab_size": 10, "positions": [0, 3]}, {"offset": 10, "vocab_size": 20, "positions": [4, 8]}]}
    mask = layout_mask(layout, 8, 31)
    assert mask.sum(1).tolist() == [10, 10, 10, 1, 20, 20, 20, 20] and mask[3, 30]
    assert layout_mask({"parts": [{"offset": 0, "vocab_size": 31, "positions": [0, 8]}]}, 8, 31) is None
    prior = stvq.create("prior", "gpt", vocab_size=31, seq_len=8, width=16, layers=1, heads=2)
    ids = sample(prior, 200, seed=0, allowed=mask)
    assert (ids[:, :3] < 10).all() and (ids[:, 3] == 30).all() and ((ids[:, 4:] >= 10) & (ids[:, 4:] < 30)).all()
    assert not ((sample(prior, 200, seed=0)[:, :3] < 10).all())  # unconstrained, it strays


SAMPLE = ["prior", "sample", "--prior", "{run}", "-o", "{tmp}/o"]


@pytest.mark.parametrize(
    "args,status,message",
    [
        (SAMPLE + ["-n", "2", "--keep", "37", "--from", "shapes"], 2, "--keep must lie in [0, 36], got 37"),
        (SAMPLE + ["-n", "1000000000"], 2, "-n must lie in [1, 1,000,000], got 1,000,000,000"),
        (SAMPLE + ["--temperature", "nan"], 2, "'nan' is not a finite number"),
        (SAMPLE + ["--top-p", "nan"], 2, "'nan' is not a finite number"),
        (SAMPLE + ["--seed", "99999999999999999999999"], 2, "is not in the range 0<=x<=9223372036854775807"),
        (["encode", "--tokenizer", "{run}", "{tmp}/x.png", "-o", "{tmp}/e.npy"], 1, "holds a prior (gpt), not a tokenizer"),
        (["tokenize", "--tokenizer", "{run}", "--data", "shapes", "--max-images", "2", "-o", "{tmp}/t"], 1, "holds a prior (gpt), not a tokenizer"),
        (["prior", "train", "--shards", "{float}", "--run-dir", "{tmp}/r"], 1, "holds float64 values, not integer ids"),
        (["prior", "train", "--shards", "{high}", "--run-dir", "{tmp}/r"], 1, "9999], outside the vocabulary [0, 64) of its manifest"),
        (["prior", "train", "--shards", "{shards}", "--set", "vocab_size=5", "--run-dir", "{tmp}/r"], 1, "vocab_size: the shards decide the vocabulary (64)"),
        (["prior", "train", "--shards", "{shards}", "--set", "seq_len=10", "--run-dir", "{tmp}/r"], 1, "seq_len: the shards decide the vocabulary (64) and length (36)"),
        (["prior", "eval", "--prior", "{run}", "--keep", "1000000000000000000"], 2, "--keep must lie in [0, 36] (the prior's sequence)"),
        (["prior", "eval", "--prior", "{run}", "--samples", "1000000000000000000"], 2, "--samples must lie in [0, 50,000]"),
        (SAMPLE[:-1] + ["", "-n", "2"], 2, "an empty path; name the directory or file to write"),
    ],
)
def test_bad_prior_values_are_one_line_with_the_promised_status(shards, tmp_path, runner, args, status, message):
    run = bad_input_run(shards)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    for name, values in (("float", lambda ids: ids + 0.7), ("high", lambda ids: np.where(np.arange(ids.shape[1]) == 5, 9999, ids))):
        shutil.copytree(shards / "shards", tmp_path / name)
        shard = tmp_path / name / "shard_00000.npy"
        np.save(shard, values(np.load(shard).astype(np.int64)))
    result = runner.invoke(main, [a.format(tmp=tmp_path, run=run, float=tmp_path / "float", high=tmp_path / "high", shards=shards / "shards") for a in args])
    assert result.exit_code == status and message in result.stderr, result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 or status == 2  # click's usage errors add a usage line


def test_a_prior_resumes_over_a_torn_last_log_line_and_names_a_torn_summary(shards, tmp_path, runner):
    run = tmp_path / "run"
    shutil.copytree(bad_input_run(shards), run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a kill mid-append
    result = runner.invoke(main, ["prior", "train", "--resume", str(run), "--steps", "3", "--no-progress"])
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 3
    (run / "summary.json").write_text('{"run": ')
    result = runner.invoke(main, ["prior", "train", "--resume", str(run), "--steps", "3", "--no-progress"])
    assert result.exit_code == 1 and "summary.json is not valid JSON" in result.stderr and len(result.stderr.strip().splitlines()) == 1
