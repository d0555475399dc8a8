"""Training: stage 1 and 2 end to end, image folders, checkpoints that survive SIGKILL, exact resume,
torchrun with two gloo ranks, divergence, and one-line errors for bad input."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from docs_pages import DOCS, command_lines
from PIL import Image
from safetensors.torch import load_file

import stvq
from stvq.cli import main
from stvq.config import TrainConfig
from stvq.data import first_images, make_dataset
from stvq.optim import make_optimizer, set_lr
from stvq.quantize import fit_codebook
from stvq.streams import StepBatches
from stvq.train import Trainer

# A narrow tiny model so that a step takes milliseconds; still 36 tokens and 18 condition layers.
SMALL = {"width": 32, "heads": 2, "encoder_layers": 1, "plain_layers": 1, "patch_size": 8}
SMALL_ARGS = [arg for k, v in SMALL.items() for arg in ("--set", f"{k}={v}")]


def small_config(**fields) -> TrainConfig:
    base = dict(preset="tiny", model=SMALL, steps=30, batch_size=8, lr=3e-3, warmup_steps=3, log_every=1, eval_every=15, checkpoint_every=10)
    return TrainConfig(**(base | fields))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def fit_until_interrupted(cfg: TrainConfig, run: Path, monkeypatch, function: str, calls: int) -> None:
    """Train ``cfg`` in ``run`` until the loop's ``<function>``'s ``calls``-th call (:mod:`stvq.loop`), which
    raises KeyboardInterrupt in its place: a run stopped between checkpoints."""
    import stvq.loop as train_module

    real, seen = getattr(train_module, function), {"n": 0}

    def stopping(*args):
        seen["n"] += 1
        if seen["n"] == calls:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(train_module, function, stopping)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, run, progress=False).fit()
    monkeypatch.setattr(train_module, function, real)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "s1"
    Trainer(small_config(), run, progress=False).fit()
    return run


def test_stage1_learns_and_writes_the_run(stage1_run):
    names = {p.name for p in stage1_run.iterdir()}
    assert {"train.json", "checkpoint.safetensors", "config.json", "model.safetensors", "metrics.jsonl", "samples", "summary.json"} <= names
    losses = [m["loss"] for m in metrics(stage1_run)]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])  # MSE: 0.55 -> 0.39
    assert sorted(p.name for p in (stage1_run / "samples").iterdir()) == ["step_000015.png", "step_000030.png"]
    assert Image.open(stage1_run / "samples" / "step_000030.png").size == (8 * 66 + 2, 2 * 66 + 2)
    summary = json.loads((stage1_run / "summary.json").read_text())
    assert summary["val_psnr"] > summary["mean_image_psnr"]
    model = stvq.load_tokenizer(stage1_run)
    assert model.config.width == 32 and model.quantizer is None


def test_quantize_then_stage2_gives_a_working_tokenizer(stage1_run, tmp_path):
    stats = fit_codebook(stage1_run, k=16, max_images=64, progress=False)
    assert stats["vectors"] == 64 * 36 and stats["dead_codes"] == 0 and stats["mse"] > 0
    run2 = tmp_path / "s2"
    Trainer(small_config(stage=2, from_run=str(stage1_run), steps=12), run2, progress=False).fit()
    records = metrics(run2)
    assert {"q_usage", "q_perplexity", "q_dead_codes", "q_mse"} <= set(records[-1])
    first = load_file(str(stage1_run / "model.safetensors"))
    second = load_file(str(run2 / "model.safetensors"))
    assert torch.equal(first["encoder.head.weight"], second["encoder.head.weight"])  # frozen
    assert not torch.equal(first["decoder.out_conv.weight"], second["decoder.out_conv.weight"])  # fine-tuned
    tok = stvq.load_tokenizer(run2)
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    ids = tok.encode(images)
    assert ids.shape == (3, 36) and ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < 16 == tok.vocab_size
    assert tok.decode(ids).shape == (3, 3, 64, 64)


def test_stage2_with_an_online_quantizer_from_the_cli(stage1_run, tmp_path, runner):
    result = runner.invoke(
        main,
        [
            "train",
            "--stage",
            "2",
            "--from",
            str(stage1_run),
            "--quantizer",
            "fsq",
            "--quantizer-option",
            "levels=[4,4,3]",
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--run",
            str(tmp_path / "fsq"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "stvq train: done" in result.output
    assert stvq.load_tokenizer(tmp_path / "fsq").vocab_size == 48


@pytest.mark.parametrize("k,per_position,message", [(10_000, False, "--k 10000 is larger than the 2,304 code vectors"), (100, True, "--k 100 is larger than the 64 code vectors")])
def test_quantize_rejects_k_above_the_vectors(stage1_run, runner, k, per_position, message):
    args = ["quantize", "--run", str(stage1_run), "--k", str(k), "--max-images", "64"] + (["--per-position"] if per_position else [])
    result = runner.invoke(main, args)
    assert result.exit_code == 1 and message in result.stderr


def test_quantize_cli_prints_the_table(stage1_run, runner):
    result = runner.invoke(main, ["quantize", "--run", str(stage1_run), "--k", "8", "--max-images", "32", "--per-position"])
    assert result.exit_code == 0, result.stderr
    assert "1,152" in result.output and "perplexity" in result.output  # 32 images x 36 tokens
    written = json.loads((stage1_run / "quantize.json").read_text())
    assert written["k"] == 8 and written["vectors"] == 1152 and 0 < written["usage"] <= 1
    assert stvq.load_tokenizer(stage1_run).quantizer.codebook.shape == (36, 8, 16)


def write_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "nested").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / f"rgb{i}.png")
    Image.fromarray(rng.integers(0, 255, (70, 70), dtype=np.uint8), mode="L").save(root / "nested" / "gray.png")
    Image.new("CMYK", (64, 80), (10, 200, 30, 0)).save(root / "nested" / "cmyk.jpg")
    (root / "nested" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "notes.txt").write_text("ignored")
    return root


def test_image_folder_with_corrupt_grayscale_and_cmyk_files(tmp_path):
    folder = write_folder(tmp_path / "images")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\).*broken.jpg"):
        Trainer(small_config(data=str(folder), steps=6, eval_every=6), tmp_path / "run", progress=False).fit()
    assert len(metrics(tmp_path / "run")) == 6
    from stvq_reference.folders import ImageFolderDataset

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once per folder, not again for the next split or run
        ds = ImageFolderDataset(folder, 64)
    assert [p.name for p in ds.broken] == ["broken.jpg"]
    assert all(ds[i].shape == (3, 64, 64) and -1 <= ds[i].min() and ds[i].max() <= 1 for i in range(len(ds)))


def test_step_batches_are_deterministic_disjoint_across_ranks_and_cover_epochs():
    whole = [i for b in StepBatches(10, 5, 0, 0, 4) for i in b]
    assert sorted(whole[:10]) == list(range(10)) and sorted(whole[10:]) == list(range(10))
    assert list(StepBatches(10, 5, 0, 2, 4)) == list(StepBatches(10, 5, 0, 0, 4))[2:]
    r0, r1 = StepBatches(10, 2, 0, 0, 1, rank=0, world=2), StepBatches(10, 2, 0, 0, 1, rank=1, world=2)
    assert not set(next(iter(r0))) & set(next(iter(r1)))


def cli_train(run: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stvq.cli",
        "train",
        "--run",
        str(run),
        "--no-progress",
        *SMALL_ARGS,
        "--batch-size",
        "8",
        "--steps",
        "40",
        "--log-every",
        "1",
        "--checkpoint-every",
        "5",
        "--eval-every",
        "40",
        *extra,
    ]


ADVERSARIAL_ARGS = ("--adversarial-weight", "0.5", "--disc-start", "10", "--train", 'discriminator_options={"channels": 8, "layers": 2}', "--train", "lecam_weight=0.01")


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path, request):
    """Steps 1-10 train the tokenizer alone, steps 11-40 against a discriminator: a kill after step 16 and a
    resume give the uninterrupted run's losses, both kinds of step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"  # the uninterrupted run, beside the killed one (one thread each)
    errors = tmp_path / "reference.stderr"
    with errors.open("w") as sink:  # the child keeps its own descriptor
        uninterrupted = subprocess.Popen(cli_train(reference, *ADVERSARIAL_ARGS), env=env, stdout=subprocess.DEVNULL, stderr=sink)
    request.addfinalizer(uninterrupted.kill)  # a failure below leaves no training behind

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli_train(killed, *ADVERSARIAL_ARGS), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed / "metrics.jsonl").exists() and len((killed / "metrics.jsonl").read_text().splitlines()) >= 17:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_file(str(killed / "checkpoint.safetensors"))  # never truncated: it loads
    assert "model.encoder.head.weight" in state

    resumed = subprocess.run([sys.executable, "-m", "stvq.cli", "train", "--resume", str(killed), "--no-progress"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert uninterrupted.wait(timeout=300) == 0, errors.read_text()[-2000:]
    ours = {m["step"]: m["loss"] for m in metrics(killed)}
    theirs = {m["step"]: m["loss"] for m in metrics(reference)}
    assert sorted(ours) == list(range(1, 41))  # lines logged after the checkpoint were replaced, not duplicated
    for step in range(1, 41):
        assert ours[step] == pytest.approx(theirs[step], rel=1e-5, abs=1e-6), step
    # the discriminator (BatchNorm statistics included) and LeCam's averages came back exactly too
    d_ours = {m["step"]: m["d_loss"] for m in metrics(killed) if "d_loss" in m}
    assert d_ours == pytest.approx({m["step"]: m["d_loss"] for m in metrics(reference) if "d_loss" in m}, rel=1e-5, abs=1e-6)
    assert sorted(d_ours) == list(range(11, 41))
    assert json.loads((killed / "summary.json").read_text())["resumed_from"] >= 15
    seconds = [m["seconds"] for m in metrics(killed)]
    assert seconds[0] > 0 and all(later > earlier for earlier, later in zip(seconds, seconds[1:]))  # counted on across the resume


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--adversarial-weight", "0.5", "--train", 'discriminator_options={"channels": 8, "layers": 2}')], ids=["plain", "adversarial"])
def test_torchrun_two_cpu_ranks_agree_on_the_weights(tmp_path, extra):
    """Every trained part, a discriminator included, holds the same weights on both ranks."""
    run = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "stvq.cli",
        "train",
        "--run-dir",
        str(run),
        "--no-progress",
        *SMALL_ARGS,
        "--batch-size",
        "4",
        "--steps",
        "4",
        "--log-every",
        "1",
        "--eval-every",
        "4",
        *extra,
    ]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ranks_agree"] is True
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]  # rank 0 alone writes


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from stvq.errors import TrainingDiverged
    from stvq.losses import ReconstructionLoss

    real = ReconstructionLoss.__call__
    calls = {"n": 0}

    def poisoned(self, recon, images, quantized=None):
        calls["n"] += 1
        loss, terms = real(self, recon, images, quantized)
        return (loss * float("nan"), terms) if calls["n"] == 7 else (loss, terms)

    monkeypatch.setattr(ReconstructionLoss, "__call__", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 6; the last good checkpoint"):
        Trainer(small_config(checkpoint_every=5), tmp_path / "run", progress=False).fit()
    state = load_file(str(tmp_path / "run" / "checkpoint.safetensors"))
    assert torch.isfinite(state["model.decoder.out_conv.weight"]).all()


def test_the_moving_average_is_validated_saved_and_resumed_exactly(tmp_path, monkeypatch):
    """With --ema-decay the run validates and saves the weights' moving average (the live weights in the
    checkpoint beside it, and read once at the end as live_*); a run stopped after its step-10 checkpoint
    and resumed ends with the uninterrupted run's average."""
    cfg = small_config(steps=20, ema_decay=0.9, eval_every=10)
    whole = tmp_path / "whole"
    summary = Trainer(cfg, whole, progress=False).fit()
    state = load_file(str(whole / "checkpoint.safetensors"))
    saved = load_file(str(whole / "model.safetensors"))
    key = "decoder.out_conv.weight"
    assert torch.equal(saved[key], state[f"ema.{key}"]) and not torch.allclose(saved[key], state[f"model.{key}"])
    assert summary["val_psnr"] != summary["live_val_psnr"] and "live_val_psnr" not in metrics(whole)[9]

    cut = tmp_path / "cut"
    fit_until_interrupted(cfg, cut, monkeypatch, "update", 13)
    assert load_file(str(cut / "checkpoint.safetensors")).keys() == state.keys()
    Trainer(cfg, cut, resume=True, progress=False).fit()
    resumed = load_file(str(cut / "model.safetensors"))
    assert all(torch.allclose(resumed[k], saved[k], atol=1e-6) for k in saved)
    assert json.loads((cut / "summary.json").read_text())["resumed_from"] == 10


def test_readme_ema_flag_runs_from_the_cli(runner, tmp_path):
    """README's `--ema-decay 0.999`, as a flag of `stvq train`: the summary holds both readings."""
    run = tmp_path / "ema"
    args = ["train", "--ema-decay", "0.999", *SMALL_ARGS, "--steps", "4", "--batch-size", "2", "--eval-every", "2", "--run-dir", str(run), "--no-progress"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads((run / "train.json").read_text())["ema_decay"] == 0.999 and {"val_psnr", "live_val_psnr"} <= summary.keys()


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--data", "/no/such/folder"], "data folder /no/such/folder does not exist"),
        (["train", "--preset", "huge"], "unknown preset 'huge'"),
        (["train", "--stage", "2"], "stage 2 starts from a stage-1 run: pass --from runs/NAME"),
        (["train", "--resume", "/no/such/run"], "is not a training run"),
        (["train", "--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
        (["train", "--eval-every", "0"], "--eval-every must be at least 1"),
        (["train", "--lr", "-1"], "--lr must be a positive number"),
        (["train", "--train", "num_workers=-1"], "--num-workers must lie in [0, 1024], got -1"),
        (["train", "--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
        (["train", "--train", "step_threads=25"], "step_threads must be between 0 (auto) and the batch size 24, got 25"),
        (["train", "--adversarial-weight", "0.5", "--train", "step_threads=2"], "(adversarial training: the discriminator's loss"),
        (["train", "--set", "heads=0"], "config field heads must be at least 1"),
        (["train", "--set", "image_size=0"], "config field image_size must be at least 1"),
        (["quantize", "--run", "/no/such/run"], "is not a training run"),
    ],
)
def test_bad_training_input_is_one_line(runner, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(main, args)
    assert result.exit_code != 0 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # a run that cannot start leaves no directory behind


def test_empty_folder_and_stage2_without_codebook(runner, tmp_path, stage1_run):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(main, ["train", "--data", str(tmp_path / "empty"), "--run", str(tmp_path / "r")])
    assert result.exit_code == 1 and "no readable image" in result.stderr
    bare = tmp_path / "bare"
    Trainer(small_config(steps=1), bare, progress=False).fit()
    result = runner.invoke(main, ["train", "--stage", "2", "--from", str(bare), "--run", str(tmp_path / "r2")])
    assert result.exit_code == 1 and "has no codebook: run `stvq quantize --run" in result.stderr
    result = runner.invoke(main, ["train", "--run", str(bare)])
    assert result.exit_code == 1 and "already holds a run; continue it with --resume" in result.stderr


def test_quantize_caches_codes_and_stage2_skips_the_encoder(tmp_path, monkeypatch):
    from stvq.run import RunDir, cache_key
    from stvq_reference.encoder import StyledEncoder
    from stvq_reference.shapes import ShapesDataset

    run = tmp_path / "s1"
    Trainer(small_config(steps=2), run, progress=False).fit()
    first = fit_codebook(run, k=8, max_images=48, progress=False)
    assert first["codes_from_cache"] is False
    model = stvq.load_tokenizer(run)
    key = cache_key(model.encoder, "shapes", 64, 0)
    cached = RunDir(run).load_codes(key, model.num_tokens, model.encoder.code_dim)
    images = torch.stack([ShapesDataset(64)[i] for i in range(3)])
    with torch.no_grad():
        assert torch.allclose(cached[:3], model.encode_codes(images), atol=1e-5)
    assert fit_codebook(run, k=4, max_images=40, progress=False)["codes_from_cache"] is True

    with torch.no_grad():
        model.encoder.head.bias.add_(1.0)  # other weights: another key, so stale codes are never used
    assert cache_key(model.encoder, "shapes", 64, 0) != key and cache_key(model.encoder, "photos", 64, 0) != key

    calls = []
    real_forward = StyledEncoder.forward

    def counting(self, images):
        if images.device.type != "meta":  # a pass on the meta device only counts FLOPs (stvq.flops)
            calls.append(len(images))
        return real_forward(self, images)

    monkeypatch.setattr(StyledEncoder, "forward", counting)
    summary = Trainer(small_config(stage=2, from_run=str(run), steps=3, eval_every=100), tmp_path / "s2", progress=False).fit()
    assert summary["cached_codes"] == 48
    assert calls == [32, 32]  # only the final validation pass (64 images) ran the encoder, no training step
    calls.clear()
    Trainer(small_config(stage=2, from_run=str(run), steps=3, eval_every=100, cache_codes=False), tmp_path / "s2b", progress=False).fit()
    assert calls == [8, 8, 8, 32, 32]  # every training step ran it


def test_perceptual_loss_is_logged_and_reaches_the_decoder(tmp_path):
    from stvq.losses import perceptual_loss

    images = torch.rand(2, 3, 64, 64) * 2 - 1
    recon = (images + 0.3 * torch.randn_like(images)).requires_grad_()
    loss = perceptual_loss(recon, images)
    loss.backward()
    assert loss.item() > 0 and recon.grad.abs().sum() > 0
    assert perceptual_loss(images, images).item() == pytest.approx(0.0, abs=1e-10)
    from torchvision.transforms.functional import gaussian_blur

    from stvq.data import first_images
    from stvq_reference.shapes import ShapesDataset

    shapes = first_images(ShapesDataset(64, "val"), 8)
    blurred = [perceptual_loss(gaussian_blur(shapes, int(6 * s) | 1, s), shapes).item() for s in (1.0, 2.0, 4.0)]
    assert blurred[0] < blurred[1] < blurred[2] and blurred[2] > 1.3 * blurred[1]  # it still sees how blurred a blob is
    Trainer(small_config(steps=2, eval_every=100, perceptual_weight=0.1), tmp_path / "run", progress=False).fit()
    assert all(m["perceptual"] > 0 for m in metrics(tmp_path / "run"))


def test_lr_scales_hold_then_ramp_to_the_base_rate():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=0, lr_scales={"encoder.": 0.1}, lr_scales_until=0.5)
    assert [cfg.scales_weight_at(s) for s in (0, 50, 75, 100)] == [1.0, 1.0, 0.5, 0.0]
    model = stvq.create("tokenizer", "styled", preset="tiny", width=32, heads=2)
    opt = make_optimizer(model, cfg)
    encoder_ids = {id(p) for p in model.encoder.parameters()}

    def rates(step: int) -> set[tuple[bool, float]]:
        set_lr(opt, 1e-3, cfg.scales_weight_at(step))
        return {(all(id(p) in encoder_ids for p in g["params"]), round(g["lr"], 8)) for g in opt.param_groups}

    assert rates(10) == {(True, 1e-4), (False, 1e-3)}  # the encoder at a tenth while the scales hold
    assert rates(75) == {(True, 5.5e-4), (False, 1e-3)}
    assert rates(100) == {(True, 1e-3), (False, 1e-3)}


def test_a_tokenizer_trains_with_muon_and_a_run_written_before_the_optimizer_field_resumes_with_adamw(tmp_path):
    from stvq.optim import MuonAdamW
    from stvq.run import RunDir

    model = stvq.create("tokenizer", "styled", preset="tiny")
    opt = make_optimizer(model, TrainConfig())
    assert isinstance(opt, MuonAdamW)
    muon = {n for n, p in model.named_parameters() if any(p is q for g in opt.param_groups if g["muon"] for q in g["params"])}
    hidden = {n for n, p in model.named_parameters() if p.ndim in (2, 4)} - {"decoder.out_head.mlp.3.weight"}
    assert muon == hidden  # every hidden matrix and convolution: not the RGB layer, biases, norms or learned tokens
    assert model.decoder.last_layer() is dict(model.named_parameters())["decoder.out_head.mlp.3.weight"]
    blocks = make_optimizer(model, TrainConfig(muon_params=("blocks.",)))
    assert sum(len(g["params"]) for g in blocks.param_groups if g["muon"]) == len({n for n in muon if "blocks." in n})
    table = torch.nn.ModuleDict({"decoder": torch.nn.Embedding(10, 4), "proj": torch.nn.Linear(4, 4)})
    assert [p.shape for g in make_optimizer(table, TrainConfig()).param_groups if g["muon"] for p in g["params"]] == [(4, 4)]
    run = RunDir(tmp_path)
    run.write_train_config(TrainConfig())
    assert run.read_train_config().optimizer == "muon"
    old = json.loads((tmp_path / "train.json").read_text())
    del old["optimizer"], old["muon_params"]
    (tmp_path / "train.json").write_text(json.dumps(old))
    assert run.read_train_config().optimizer == "adamw"  # its checkpoint holds AdamW's state


def test_tail_drop_starts_at_its_fraction_of_the_run_and_only_in_stage_1(tmp_path, monkeypatch):
    import stvq.train as train

    seen, build = [], train.build_model

    def spy(cfg):
        model = build(cfg)

        def hook(m, args, kwargs):  # training passes; a meta-device pass counts FLOPs (stvq.flops)
            if m.training and args[0].device.type != "meta":
                seen.append(kwargs.get("tail_drop", 0.0))

        model.register_forward_pre_hook(hook, with_kwargs=True)
        return model

    monkeypatch.setattr(train, "build_model", spy)
    cfg = small_config(steps=12, eval_every=100, checkpoint_every=100, tail_drop=0.5, tail_drop_from=0.75)
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert seen == [0.0] * 9 + [0.5] * 3  # steps 9, 10, 11 are the last quarter
    assert TrainConfig(stage=2, from_run="runs/x", tail_drop=0.5, tail_drop_from=0.0).tail_drop_at(5) == 0.0


def test_any_train_config_field_is_set_by_name_with_train(runner, tmp_path):
    run = tmp_path / "run"
    args = [
        "train",
        *SMALL_ARGS,
        "--steps",
        "9",
        "--batch-size",
        "2",
        "--eval-every",
        "3",
        "--run-dir",
        str(run),
        "--no-progress",
        "--train",
        "tail_drop=0.5",
        "--train",
        'lr_scales={"decoder.": 2}',
        "--train",
        "steps=3",
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.stderr
    saved = json.loads((run / "train.json").read_text())
    assert (saved["tail_drop"], saved["lr_scales"], saved["steps"]) == (0.5, {"decoder.": 2}, 3)  # --train last
    assert [m["step"] for m in metrics(run)][-1] == 3


def copy_run(run: Path, to: Path) -> Path:
    """A copy of ``run`` to resume: without the codebook other tests fitted into it (a quantized run is not
    trained further; its message says to delete quantize.json first)."""
    shutil.copytree(run, to)
    (to / "quantize.json").unlink(missing_ok=True)
    return to


def test_resume_of_a_finished_run_leaves_it_untouched_and_steps_extend_it(runner, stage1_run, tmp_path):
    run = copy_run(stage1_run, tmp_path / "done")
    files = lambda: {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    result = runner.invoke(main, ["train", "--resume", str(run), "--no-progress"])
    assert result.exit_code == 0 and "is finished (step 30); nothing to do: extend it with --resume" in result.output
    assert files() == before  # summary, metrics and weights as they were
    result = runner.invoke(main, ["train", "--resume", str(run), "--steps", "32", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert [m["step"] for m in metrics(run)][-3:] == [30, 31, 32]
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == 30


def test_resume_from_a_torn_checkpoint_is_one_line(runner, stage1_run, tmp_path):
    run = copy_run(stage1_run, tmp_path / "torn")
    (run / "checkpoint.safetensors").write_bytes((run / "checkpoint.safetensors").read_bytes()[:100])
    result = runner.invoke(main, ["train", "--resume", str(run), "--no-progress"])
    assert result.exit_code == 1 and "is not a readable stvq checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_one_writer_per_run_directory_and_orphaned_temp_files_are_removed(runner, stage1_run, tmp_path):
    from stvq.checkpoint import run_lock

    run = copy_run(stage1_run, tmp_path / "busy")
    with run_lock(run):  # as if another `stvq train` were writing it
        result = runner.invoke(main, ["train", "--resume", str(run), "--steps", "31", "--no-progress"])
        assert result.exit_code == 1 and "is being written by another stvq process" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        result = runner.invoke(main, ["train", "--run", str(tmp_path / "busy"), "--no-progress"])
        assert result.exit_code == 1  # a fresh run into it is refused too (it already holds a run)
    (run / "codes").mkdir(exist_ok=True)
    orphans = [run / ".stvq-tmpa1b2c3d4" / "checkpoint.safetensors", run / "codes" / ".stvq-tmpz9y8x7w6" / ".tmpZz9Yy8"]
    for orphan in orphans:  # what kills during writes leave: our staging directories, the safetensors library's file inside
        orphan.parent.mkdir()
        orphan.write_bytes(b"x" * 1000)
    (run / "notes" / "sub").mkdir(parents=True)
    users = [run / ".tmpwork_plan.md", run / "notes" / ".tmplate.txt", run / "notes" / "sub" / ".draft.tmp2", run / "codes" / ".a.safetensors.tmp77"]
    for path in users:  # the user's own files, whatever their names look like
        path.write_text("mine")
    result = runner.invoke(main, ["train", "--resume", str(run), "--steps", "31", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert not any(o.parent.exists() for o in orphans) and [m["step"] for m in metrics(run)][-1] == 31
    assert all(path.read_text() == "mine" for path in users)


def test_tensorboard_gets_the_records_and_grids_and_a_resume_purges_what_followed_its_checkpoint(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, cfg = tmp_path / "tb", small_config(steps=8, eval_every=3, checkpoint_every=3, tensorboard=True)
    real_step = Trainer.step

    def interrupted(self, net, batch, step):
        if step == 7:  # steps 1-7 logged, the checkpoint holds step 6
            raise KeyboardInterrupt
        return real_step(self, net, batch, step)

    monkeypatch.setattr(Trainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, run, progress=False).fit()
    monkeypatch.setattr(Trainer, "step", real_step)
    Trainer(cfg, run, resume=True, progress=False).fit()
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"loss", "psnr", "lr", "val_psnr"} <= set(events.Tags()["scalars"]) and events.Tags()["images"] == ["samples"]
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 9))  # step 7 once: the first run's was purged
    assert [e.step for e in events.Images("samples")] == [3, 6, 8]


def test_validation_reads_reconstructions_with_the_recogniser(tmp_path, runner):
    run = tmp_path / "judged"
    Trainer(small_config(steps=4, eval_every=2, recognise=True), run, progress=False).fit()
    evaluated = [m for m in metrics(run) if "val_psnr" in m]
    assert [m["step"] for m in evaluated] == [2, 4]
    summary = json.loads((run / "summary.json").read_text())
    val = make_dataset("shapes", 64, "val")  # the last reading, computed again from the saved weights
    images, model = first_images(val, 64), stvq.load_tokenizer(run)
    with torch.no_grad():
        recon = torch.cat([model(batch).reconstruction for batch in images.split(32)]).clamp(-1, 1)
    read = val.recogniser().reading_accuracy(recon, val.factor_table(64))
    assert summary["val_shape_accuracy"] == evaluated[-1]["val_shape_accuracy"] == read["shape_accuracy"]
    assert evaluated[-1]["val_x_mae"] == pytest.approx(read["x_mae"])
    upright = tmp_path / "upright"  # README's `stvq train --stage 1 --data shapes-upright`, as it is read back
    result = runner.invoke(
        main, ["train", "--data", "shapes-upright", *SMALL_ARGS, "--steps", "2", "--batch-size", "2", "--eval-every", "2", "--train", "recognise=true", "--run-dir", str(upright), "--no-progress"]
    )
    assert result.exit_code == 0, result.stderr
    assert "val_shape_accuracy" in metrics(upright)[-1] and json.loads((upright / "train.json").read_text())["data"] == "shapes-upright"
    result = runner.invoke(main, ["train", "--data", "photos", "--train", "recognise=true", "--run-dir", str(tmp_path / "f")])
    assert result.exit_code == 1 and "reads the factors of the images back; --data photos has no known factors and no recogniser (shapes has both)" in result.stderr


GPU_RECIPES = [line for line in command_lines([DOCS / "training.md"]) if line.startswith("stvq train") and "--bf16" in line]


@pytest.mark.slow
@pytest.mark.parametrize("command", GPU_RECIPES, ids=["tiny", "small"])
def test_the_gpu_recipes_the_training_guide_documents_start_on_a_cpu(command, runner, tmp_path):
    """The training guide's one-GPU commands, as written, for two steps of two images (the later flags win), at width 64:
    bf16 autocast on a CPU without AVX512_BF16 runs `small`'s width 512 for minutes."""
    import shlex

    args = shlex.split(command)[1:] + [
        "--set",
        "width=64",
        "--set",
        "heads=2",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--eval-every",
        "2",
        "--log-every",
        "1",
        "--train",
        "disc_start=1",
        "--run-dir",
        str(tmp_path / "gpu"),
        "--no-progress",
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.stderr
    last = metrics(tmp_path / "gpu")[-1]
    assert last["step"] == 2 and "val_shape_accuracy" in last and "d_loss" in last


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_training_keeps_freed_activation_memory_instead_of_faulting_it_in_every_step():
    """The pattern of a training step (several large activations made, then all freed) faults its pages in
    again on every repeat with glibc's static default thresholds, and under a tenth of them once the loops
    have called keep_freed_memory. (glibc's dynamic threshold makes its untouched default vary between
    processes, 15,335 to 612,800 faults measured, so the contrast sets the static defaults explicitly.)"""
    code = """
import resource, sys, torch
from stvq.distributed import keep_freed_memory
if sys.argv[1] == "kept":
    keep_freed_memory()
else:  # glibc's documented defaults, set explicitly: that turns its dynamic adjustment off
    keep_freed_memory(mmap_threshold=128 << 10, trim_threshold=128 << 10)
[torch.ones(3 << 20) for _ in range(4)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    [torch.ones(3 << 20) for _ in range(4)]  # 12 MiB each, over the mmap threshold
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    touched = 50 * 4 * (12 << 20) // resource.getpagesize()  # pages written in the loop
    faults = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True).stdout) for mode in ("default", "kept")}
    assert faults["default"] > touched / 2 and faults["kept"] < touched / 10, (faults, touched)


def _built(cfg: TrainConfig, run: Path) -> tuple[Trainer, torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    """A trainer whose model, optimizer and a batch of the data set are ready, as its loop holds them."""
    trainer = Trainer(cfg, run, progress=False)
    torch.manual_seed(cfg.seed)
    model, dataset, val = trainer.build()
    dataset, _ = trainer.prepare(model, dataset, val)
    trainer.nets, trainer.threads = {"model": model}, 2
    opt = make_optimizer(model, cfg)
    return trainer, model, opt, torch.stack([dataset[i] for i in range(cfg.batch_size)])


def test_a_batch_splits_into_slices_of_the_same_kind():
    from stvq.loop import batch_length, split_batch

    images, codes = torch.arange(7.0), torch.arange(14).view(7, 2)  # stage 2's (images, cached codes)
    parts = split_batch((images, codes), 2)
    assert all(isinstance(p, tuple) for p in parts) and [batch_length(p) for p in parts] == [4, 3]
    assert torch.equal(torch.cat([p[1] for p in parts]), codes)
    assert [len(p) for p in split_batch(images, 3)] == [3, 2, 2]


@pytest.mark.parametrize("batch_size", [8, 7])  # 7: slices of 4 and 3, weighted by their sizes
def test_a_step_split_across_threads_gives_the_whole_steps_loss_and_gradient(tmp_path, batch_size):
    from concurrent.futures import ThreadPoolExecutor

    cfg = small_config(batch_size=batch_size, noise_sigma=0.0, tail_drop=0.0)  # no draws: both see the same forward
    trainer, model, opt, batch = _built(cfg, tmp_path / "run")
    losses, terms, size = trainer.step(model, batch, 0)
    losses["model"].backward()
    whole = {name: p.grad.clone() for name, p in model.named_parameters()}
    with ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        split_losses, split_terms, split_size = trainer._split_step(pool, opt, batch, 0)
    assert split_size == size == batch_size
    assert split_losses["model"].item() == pytest.approx(losses["model"].item(), rel=1e-5)
    assert split_terms.keys() == terms.keys() and all(float(split_terms[k]) == pytest.approx(float(terms[k]), rel=1e-4) for k in terms)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, whole[name], rtol=1e-4, atol=1e-7, msg=name)


def test_a_parameter_only_a_later_slice_reaches_keeps_that_slices_gradient(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    trainer, model, opt, batch = _built(small_config(batch_size=8), tmp_path / "run")
    params = [p for g in opt.param_groups for p in g["params"]]
    a, b = params[0], params[1]

    def step(net, part, step, generator=None):  # b enters the loss of the slice holding the last image only
        later = torch.equal(part[-1], batch[-1])
        return {"model": a.sum() * part.mean() + (b.sum() if later else 0)}, {}, len(part)

    trainer.step = step
    with ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        trainer._split_step(pool, opt, batch, 0)
    torch.testing.assert_close(b.grad, torch.full_like(b, 0.5))  # the second slice's share of the batch
    torch.testing.assert_close(a.grad, torch.full_like(a, float(batch.mean())))
    assert all(p.grad is None for p in params[2:])  # no slice reaches them


def test_a_run_with_split_steps_repeats_itself_and_resumes_exactly(tmp_path, monkeypatch):
    """Each slice draws its noise from a generator seeded from the global RNG: a second run from the same
    seed, stopped after its step-5 checkpoint and resumed, logs the first run's losses and ends with its
    weights, to the bit."""
    cfg = small_config(steps=10, eval_every=10, checkpoint_every=5, step_threads=2)
    first = tmp_path / "first"
    assert Trainer(cfg, first, progress=False).fit()["step_threads"] == 2
    weights = load_file(str(first / "model.safetensors"))

    cut = tmp_path / "cut"
    fit_until_interrupted(cfg, cut, monkeypatch, "clip_and_step", 8)
    assert Trainer(cfg, cut, resume=True, progress=False).fit()["resumed_from"] == 5
    assert [m["loss"] for m in metrics(cut)] == [m["loss"] for m in metrics(first)]
    assert all(torch.equal(t, weights[k]) for k, t in load_file(str(cut / "model.safetensors")).items())


def test_step_threads_zero_splits_where_it_can_and_a_split_that_cannot_be_is_refused(tmp_path):
    import stvq.train as train_module
    from stvq.errors import StvqError

    threads = torch.get_num_threads()
    try:
        for intra, expected in ((1, 1), (2, 2)):  # auto takes no more cores than torch's thread count allows
            torch.set_num_threads(intra)
            assert Trainer(small_config(steps=2, step_threads=0), tmp_path / f"auto-{intra}", progress=False).fit()["step_threads"] == expected
    finally:
        torch.set_num_threads(threads)
    adversarial = dict(steps=2, adversarial_weight=0.5, discriminator_options={"channels": 8, "layers": 2})
    assert Trainer(small_config(**adversarial, step_threads=0), tmp_path / "adv-auto", progress=False).fit()["step_threads"] == 1
    with pytest.raises(StvqError, match=r"step_threads=2: a step here cannot be split across threads \(adversarial training"):
        Trainer(small_config(**adversarial, step_threads=2), tmp_path / "adv", progress=False).fit()
    with pytest.raises(StvqError, match=r"torch.compile's graphs are run from one thread\); use step_threads=1"):
        Trainer(small_config(steps=2, compile=True, step_threads=2), tmp_path / "compiled", progress=False).fit()
    with pytest.raises(StvqError, match="step_threads must be between 0 .auto. and the batch size 8, got 9"):
        small_config(step_threads=9)
    trainer, model, _, _ = _built(small_config(), tmp_path / "plugins")
    assert trainer.split_refusal(model) is None
    trainer.stage = train_module.STAGES[2]
    model.set_quantizer({"name": "ema-vq", "dim": model.config.code_dim, "codebook_size": 16})
    assert trainer.split_refusal(model) == "the quantizer EMAVectorQuantizer updates its codebook in each forward"
    model.forward = lambda images, noise_sigma=0.0, quantize=False, codes=None, tail_drop=0.0: None  # a plugin's older forward
    assert trainer.split_refusal(model) == "StyledVQ.forward takes no generator to draw its noise from"


def test_a_runs_workers_default_to_0_on_a_cpu_and_one_per_core_on_a_gpu_and_train_json_holds_the_number(tmp_path, monkeypatch):
    from stvq import streams
    from stvq.run import RunDir

    monkeypatch.setattr(streams, "cores", lambda: 12)
    assert streams.training_workers(None, torch.device("cpu")) == 0
    assert streams.training_workers(None, torch.device("cuda")) == 8  # one per core, at most 8
    assert streams.training_workers(3, torch.device("cuda")) == streams.training_workers(3, torch.device("cpu")) == 3
    assert TrainConfig().num_workers is None
    Trainer(small_config(steps=1), tmp_path / "run", progress=False).fit()
    assert RunDir(tmp_path / "run").read_train_config().num_workers == 0  # resolved: a resume elsewhere reads the same


def test_wandb_gets_the_config_records_grids_and_summary_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    """--wandb PROJECT: what W&B is handed (a recording stand-in for the library), then the library itself
    in offline mode, which writes RUN/wandb/ and needs no network; a resume continues the same W&B run."""
    import subprocess
    import sys
    import types

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(stvq.StvqError, match=r"--wandb needs the wandb package: pip install 'stvq\[wandb\]'"):
        Trainer(small_config(steps=2, wandb="proj"), tmp_path / "none", progress=False).fit()
    calls: dict[str, Any] = {"log": [], "init": [], "summary": {}, "finished": 0}

    class Run:
        summary = types.SimpleNamespace(update=lambda values: calls["summary"].update(values))

        def log(self, values, step):
            calls["log"].append((step, sorted(values)))

        def finish(self):
            calls["finished"] += 1

    fake = types.SimpleNamespace(init=lambda **options: calls["init"].append(options) or Run(), Image=lambda path: f"image:{Path(path).name}")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "wb"
    Trainer(small_config(steps=4, eval_every=2, checkpoint_every=2, log_every=2, wandb="proj"), run, progress=False).fit()
    (init,) = calls["init"]
    assert init["project"] == "proj" and init["name"] == "wb" and init["resume"] == "allow" and init["config"]["steps"] == 4 and init["dir"] == str(run)
    assert init["id"] == json.loads((run / "wandb.json").read_text())["id"]
    assert [step for step, _ in calls["log"]] == [2, 4] and {"loss", "lr", "val_psnr", "samples"} <= set(calls["log"][-1][1])
    assert "val_psnr" in calls["summary"] and calls["finished"] == 1
    Trainer(small_config(steps=6, eval_every=2, checkpoint_every=2, log_every=2, wandb="proj"), run, resume=True, progress=False).fit()
    assert calls["init"][1]["id"] == init["id"] and [step for step, _ in calls["log"]] == [2, 4, 6]
    monkeypatch.delitem(sys.modules, "wandb")

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "stvq.cli", "train", "--steps", "2", "--eval-every", "2", "--log-every", "1", "--batch-size", "2", "--no-progress", "--wandb"]
    args += [f"--set={k}={v}" for k, v in {"width": 32, "heads": 2, "encoder_layers": 1, "plain_layers": 1, "patch_size": 8}.items()]
    done = subprocess.run([*args, "--run-dir", str(tmp_path / "offline")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run_id = json.loads((tmp_path / "offline" / "wandb.json").read_text())["id"]
    assert json.loads((tmp_path / "offline" / "wandb.json").read_text())["project"] == "stvq"
    assert len(list((tmp_path / "offline" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))) == 1
    assert list((tmp_path / "offline" / "wandb").glob("offline-run-*/files/media/images/samples_*.png"))
