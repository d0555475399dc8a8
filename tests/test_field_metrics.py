"""rFID (pytorch-fid) and LPIPS (lpips) as `stvq eval` reports them and LPIPS as `stvq train`'s perceptual
term: the whole path with stand-in weights of the right layout written into a temporary torch hub cache
(the figures are then meaningless; the plumbing is what is tested), and the one line where the weights are
missing."""

import json
import urllib.error

import pytest
import torch

import stvq
from stvq.cli import main
from stvq.field_metrics import WEIGHTS, lpips_distance, rfid


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A torch hub folder holding stand-ins for AlexNet's and pytorch-fid's Inception-V3 weights: the same
    tensors' names and shapes, random values."""
    import pytorch_fid.inception as inception
    import torchvision

    root = tmp_path_factory.mktemp("hub")
    (root / "checkpoints").mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), root / "checkpoints" / WEIGHTS["lpips-alex"][1])
    captured = {}
    real_url, real_load = inception.load_state_dict_from_url, torch.nn.Module.load_state_dict

    def layout(self, state, *args, **kwargs):  # the model pytorch-fid builds, before it loads its weights
        if state == "stand-in":
            captured["state"] = self.state_dict()
            return None
        return real_load(self, state, *args, **kwargs)

    try:
        inception.load_state_dict_from_url = lambda url, progress=True: "stand-in"
        torch.nn.Module.load_state_dict = layout
        inception.fid_inception_v3()
    finally:
        inception.load_state_dict_from_url, torch.nn.Module.load_state_dict = real_url, real_load
    for tensor in captured["state"].values():  # He initialisation: random features that do not vanish over 90 layers
        if tensor.ndim == 4:
            torch.nn.init.kaiming_normal_(tensor)
    torch.save(captured["state"], root / "checkpoints" / WEIGHTS["rfid"][1])
    return root


@pytest.fixture
def offline(monkeypatch):
    """No network: a download raises as urllib does without one."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_rfid_and_lpips_of_a_set_against_itself_are_zero_and_rise_with_noise(hub, monkeypatch, offline):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    torch.manual_seed(1)
    images = torch.rand(8, 3, 64, 64) * 2 - 1
    noisy = (images + 0.5 * torch.randn_like(images)).clamp(-1, 1)
    same, apart = rfid(images, images), rfid(images, noisy)
    assert abs(same) < 1e-3 * apart and apart > 0
    assert lpips_distance(images, images) == 0 < lpips_distance(images, noisy)


def test_eval_reports_them_where_the_weights_are_and_says_where_to_put_them_where_not(hub, tmp_path, runner, monkeypatch, offline):
    tok = tmp_path / "tok"
    stvq.create("tokenizer", "styled", preset="tiny", quantizer={"name": "fsq", "levels": [8, 8, 8]}).save_pretrained(tok)
    args = ["eval", str(tok), "--images", "8", "--prefix-images", "2", "--probe-images", "8", "--no-perceptual", "--no-recogniser"]
    before = torch.hub.get_dir()
    result = runner.invoke(main, [*args, "--rfid", "--lpips", "--metric-weights", str(hub)])
    assert result.exit_code == 0, result.output + result.stderr
    assert torch.hub.get_dir() == before  # the folder is the command's alone
    scores = json.loads((tok / "eval.json").read_text())["reconstruction"]
    assert scores["rfid"] > 0 and scores["lpips_alex"] > 0 and "rFID" in result.output
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty"))
    result = runner.invoke(main, args)  # not asked, not cached: not reported, nothing downloaded
    assert result.exit_code == 0 and "rfid" not in json.loads((tok / "eval.json").read_text())["reconstruction"]
    result = runner.invoke(main, [*args, "--lpips", "vgg"])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert (
        f"lpips-vgg needs vgg16-397923af.pth: download it from https://download.pytorch.org/models/vgg16-397923af.pth where there is internet and put it in {tmp_path / 'empty' / 'checkpoints'}/"
        in result.stderr
    )


def test_lpips_trains_the_decoder_and_missing_weights_stop_a_run_before_it_starts(hub, tmp_path, runner, monkeypatch, offline):
    from stvq.losses import lpips_loss

    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    recon = (images + 0.3 * torch.randn_like(images)).requires_grad_()
    loss = lpips_loss(recon, images, "alex")
    loss.backward()
    assert loss.item() > 0 and recon.grad.abs().sum() > 0
    assert lpips_loss(images, images, "alex").item() == pytest.approx(0.0, abs=1e-6)

    small = [f"--set={k}={v}" for k, v in {"width": 32, "heads": 2, "encoder_layers": 1, "plain_layers": 1, "patch_size": 8}.items()]
    args = ["train", *small, "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--perceptual", "lpips-alex", "--perceptual-weight", "1", "--no-progress"]
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty"))
    result = runner.invoke(main, [*args, "--run-dir", str(tmp_path / "run"), "--metric-weights", str(hub)])
    assert result.exit_code == 0, result.output + result.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["perceptual"] > 0 and json.loads((tmp_path / "run" / "train.json").read_text())["perceptual"] == "lpips-alex"

    result = runner.invoke(main, [*args, "--run-dir", str(tmp_path / "none")])  # the weights where torch looks: none
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert f"lpips-alex needs {WEIGHTS['lpips-alex'][1]}" in result.stderr and str(tmp_path / "empty" / "checkpoints") in result.stderr
    assert not (tmp_path / "none" / "metrics.jsonl").exists()
    result = runner.invoke(main, ["train", "--perceptual", "lpips", "--run-dir", str(tmp_path / "zero")])
    assert result.exit_code == 2 and "add --perceptual-weight W" in result.stderr and not (tmp_path / "zero").exists()
