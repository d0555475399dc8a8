"""Adversarial training: taming's PatchGAN shape and losses, the adaptive weight, LeCam, disc_start, and a
discriminator that trains beside the tokenizer, resumes exactly and stays out of the tokenizer's files."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import SMALL, metrics, small_config

import stvq
from stvq.losses import AdversarialLoss, adaptive_weight, hinge_discriminator_loss
from stvq.train import Trainer

CRITIC = {"channels": 8, "layers": 2, "norm": "group"}
ADVERSARIAL = dict(adversarial_weight=0.5, disc_start=4, discriminator_options=CRITIC, lecam_weight=0.01)


def taming_parameters(channels: int = 64, layers: int = 3) -> int:
    """NLayerDiscriminator's parameter count with BatchNorm, written out from taming's layer list."""
    widths = [channels * min(2**n, 8) for n in range(layers + 1)]
    count = 3 * widths[0] * 16 + widths[0]
    for n in range(1, layers + 1):
        count += widths[n - 1] * widths[n] * 16 + 2 * widths[n]  # conv without bias, BatchNorm's scale and shift
    return count + widths[-1] * 16 + 1


def test_patchgan_is_taming_nlayer_discriminator_in_shape():
    critic = stvq.create("discriminator", "patchgan", image_size=256)
    assert sum(p.numel() for p in critic.parameters()) == taming_parameters() == 2_765_633
    assert critic(torch.zeros(2, 3, 256, 256)).shape == (2, 1, 30, 30)  # taming's 30 x 30 patches at 256 px
    small = stvq.create("discriminator", "patchgan", image_size=64, channels=32, layers=2)
    assert small(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 14, 14)


def test_patchgan_refuses_images_too_small_for_its_layers():
    with pytest.raises(stvq.ConfigError, match="patchgan with 3 layers needs images of at least 32 px"):
        stvq.create("discriminator", "patchgan", image_size=16)
    with pytest.raises(stvq.ConfigError, match="norm 'layer' is not one of batch, group, none"):
        stvq.create("discriminator", "patchgan", image_size=64, norm="layer")


def test_hinge_loss_and_the_adaptive_weight_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1) / 2))
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec, gen = (3 * w).sum(), (w**2).sum()  # gradients (3, 3) and (2, 4)
    assert adaptive_weight(rec, gen, w).item() == pytest.approx(18**0.5 / (20**0.5 + 1e-4))


def test_the_generator_term_leaves_the_discriminator_untouched_and_lecam_tracks_the_logits():
    critic = stvq.create("discriminator", "patchgan", image_size=32, **CRITIC)
    loss = AdversarialLoss(critic, weight=1.0, adaptive=False, lecam_weight=0.1, lecam_decay=0.5)
    fake = torch.rand(2, 3, 32, 32, requires_grad=True)
    g_loss, terms = loss.generator_loss(fake, torch.zeros(()), None)
    g_loss.backward()
    assert fake.grad.abs().sum() > 0 and all(p.grad is None for p in critic.parameters())
    assert all(p.requires_grad for p in critic.parameters())  # unfrozen again for its own step
    d_loss, terms = loss(torch.rand(2, 3, 32, 32), fake)
    assert {"d_loss", "lecam", "logits_real", "logits_fake"} <= set(terms)
    assert loss.ema_real.item() == pytest.approx(0.5 * terms["logits_real"].item())  # lerp from 0 with decay 0.5
    d_loss.backward()
    assert all(p.grad is not None for p in critic.parameters())


@pytest.fixture(scope="module")
def adversarial_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("adv") / "run"
    Trainer(small_config(steps=8, checkpoint_every=4, eval_every=8, **ADVERSARIAL), run, progress=False).fit()
    return run


def test_the_discriminator_trains_from_disc_start_and_is_logged(adversarial_run):
    rows = metrics(adversarial_run)
    assert all("d_loss" not in r for r in rows if r["step"] <= 4)  # steps 0-3 are before disc_start
    assert all({"d_loss", "g_loss", "adaptive_weight", "lecam"} <= set(r) for r in rows if r["step"] > 4)
    assert all(r["adaptive_weight"] > 0 for r in rows if r["step"] > 4)


def test_the_discriminator_lives_in_the_checkpoint_not_in_the_tokenizer(adversarial_run):
    weights = load_file(str(adversarial_run / "model.safetensors"))
    assert weights and not any("discriminator" in k for k in weights)
    with safe_open(str(adversarial_run / "checkpoint.safetensors"), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert "discriminator.discriminator.main.0.weight" in keys and "discriminator.ema_real" in keys
    assert any(k.startswith("optim_discriminator.") for k in keys) and "param_groups.discriminator" in metadata
    tok = stvq.load_tokenizer(adversarial_run)  # the tokenizer alone, as any stage-1 run
    assert tok.config.width == SMALL["width"]


def test_adversarial_resume_continues_exactly(adversarial_run, tmp_path):
    """Interrupted at step 6, resumed from the step-4 checkpoint: the same losses as the uninterrupted run,
    the discriminator's and LeCam's included (the SIGKILL test in test_train.py kills one in a subprocess)."""

    class Interrupted(Trainer):
        def step(self, net, batch, step):
            if step == 6:
                raise KeyboardInterrupt
            return super().step(net, batch, step)

    cfg = small_config(steps=8, checkpoint_every=4, eval_every=8, **ADVERSARIAL)
    run = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        Interrupted(cfg, run, progress=False).fit()
    Trainer(cfg, run, resume=True, progress=False).fit()
    ours = {r["step"]: r for r in metrics(run)}
    theirs = {r["step"]: r for r in metrics(adversarial_run)}
    assert sorted(ours) == sorted(theirs) == list(range(1, 9))
    for step in range(5, 9):
        for key in ("loss", "d_loss", "g_loss", "lecam"):
            assert ours[step][key] == pytest.approx(theirs[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_a_checkpoint_without_the_discriminator_is_refused_in_one_line(tmp_path, runner):
    from stvq.cli import main

    run = tmp_path / "plain"
    Trainer(small_config(steps=2, checkpoint_every=2, eval_every=2), run, progress=False).fit()
    train_json = json.loads((run / "train.json").read_text())
    (run / "train.json").write_text(json.dumps({**train_json, **ADVERSARIAL, "steps": 4}))
    result = runner.invoke(main, ["train", "--resume", str(run), "--no-progress"])
    assert result.exit_code == 1
    assert "holds no discriminator: it was written by a run without one" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_train_flags_reach_the_config(runner, tmp_path):
    from stvq.cli import main

    run = tmp_path / "flags"
    args = [
        "train",
        "--run-dir",
        str(run),
        "--no-progress",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--log-every",
        "1",
        "--eval-every",
        "2",
        "--adversarial-weight",
        "0.1",
        "--disc-start",
        "1",
        "--discriminator",
        "patchgan",
        "--train",
        f"discriminator_options={json.dumps(CRITIC)}",
    ]
    args += [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.stderr
    saved = json.loads((run / "train.json").read_text())
    assert (saved["adversarial_weight"], saved["disc_start"], saved["discriminator_options"]) == (0.1, 1, CRITIC)
    assert "d_loss" in metrics(run)[-1]
    bad = runner.invoke(main, ["train", "--run-dir", str(tmp_path / "bad"), "--discriminator", "nope", "--adversarial-weight", "1"])
    assert bad.exit_code == 1 and "no discriminator named 'nope'; available: patchgan" in bad.stderr


def test_the_oracle_trains_with_the_same_adversarial_objective():
    from stvq_reference.shapes.oracle import run_oracle

    result = run_oracle("styled", "tiny", {"width": 32, "heads": 2, "plain_layers": 1}, {"steps": 4, "batch_size": 4, **ADVERSARIAL, "disc_start": 2}, eval_every=4, val_count=4)
    assert [p["step"] for p in result.curve] == [0, 4] and all(p["val_psnr"] > 0 for p in result.curve)


def test_stage_2_fine_tunes_the_decoder_against_the_discriminator(adversarial_run, tmp_path):
    run = tmp_path / "s2"
    cfg = small_config(stage=2, from_run=str(adversarial_run), quantizer={"name": "fsq", "levels": [4, 4, 4]}, steps=3, eval_every=3, **{**ADVERSARIAL, "disc_start": 0})
    summary = Trainer(cfg, run, progress=False).fit()
    assert summary["steps"] == 3 and all("d_loss" in r and any(k.startswith("q_") for k in r) for r in metrics(run))
    assert not any("discriminator" in k for k in load_file(str(run / "model.safetensors")))


def test_a_blurring_patchgan_barely_sees_pixel_noise():
    from stvq_reference.shapes import ShapesDataset

    torch.manual_seed(0)
    sharp, blurred = (stvq.create("discriminator", "patchgan", image_size=32, blur_sigma=s, **CRITIC).eval() for s in (0.0, 1.5))
    blurred.load_state_dict(sharp.state_dict())
    image = ShapesDataset(32, "val", noise=0.0)[0][None]
    noisy = image + 0.02 * torch.randn_like(image)  # the shapes images' own pixel noise
    with torch.no_grad():
        seen_sharp = (sharp(noisy) - sharp(image)).abs().mean()
        seen_blurred = (blurred(noisy) - blurred(image)).abs().mean()
    assert seen_blurred < 0.4 * seen_sharp
