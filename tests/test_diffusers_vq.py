"""diffusers' VQModel as a tokenizer: the same ids as diffusers computes them, bit for bit, decoding within
float tolerance, a round trip through stvq's own files, composition with Styled VQ through the generic
--part, and a directory of another model refused in one line."""

import json

import pytest
import torch

import stvq
from stvq.cli import main

diffusers = pytest.importorskip("diffusers")


@pytest.fixture
def vq_dir(tmp_path):
    """A small VQModel written by diffusers itself (config.json + diffusion_pytorch_model.safetensors)."""
    from test_contracts import SMALL_VQMODEL

    torch.manual_seed(0)
    model = diffusers.VQModel(**SMALL_VQMODEL).eval()
    with torch.no_grad():  # codes drawn from the encoder's own latents, as a trained codebook covers them
        latents = model.encode(torch.rand(4, 3, 32, 32) * 2 - 1).latents.permute(0, 2, 3, 1).flatten(0, 2)
        model.quantize.embedding.weight.copy_(latents[torch.randperm(len(latents))[:64]])
    model.save_pretrained(tmp_path / "vq")
    return tmp_path / "vq", model


def test_the_same_ids_as_diffusers_and_its_decoding(vq_dir):
    path, model = vq_dir
    tok = stvq.load_tokenizer("diffusers-vq", path=str(path))
    assert (tok.image_size, tok.num_tokens, tok.vocab_size) == (32, 256, 64)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids = tok.encode(images)
    with torch.no_grad():
        latents = model.encode(images).latents
        _, _, (_, _, indices) = model.quantize(latents)
        expected = model.decode(latents).sample.clamp(-1, 1)  # diffusers quantizes inside its decode
    assert ids.dtype == torch.int64 and torch.equal(ids, indices.reshape(3, -1))  # raster order over the 16 x 16 grid
    assert len(ids.unique()) > 32  # most of the 64 codes picked: the nearest-code search is what is compared
    torch.testing.assert_close(tok.decode(ids), expected, rtol=1e-4, atol=1e-4)


def test_a_round_trip_through_stvqs_files_keeps_the_ids(vq_dir, tmp_path):
    path, _ = vq_dir
    tok = stvq.load_tokenizer("diffusers-vq", path=str(path))
    tok.save_pretrained(tmp_path / "saved")
    again = stvq.load_tokenizer(tmp_path / "saved")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(again.encode(images), tok.encode(images))


def test_styled_and_diffusers_vq_compose_through_the_generic_part_option(vq_dir, shards, tmp_path, runner):
    path, _ = vq_dir
    out = tmp_path / "composed"
    result = runner.invoke(main, ["compose", "styled+diffusers-vq", "--part", f"styled={shards / 'tok'}", "--part", f"diffusers-vq={path}", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    tok = stvq.load_tokenizer(out)
    assert tok.image_size == 32  # the size of the part that draws the pixels
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = tok.encode(images)
    assert ids.shape == (2, 36 + 256) and tok.decode(ids).shape == (2, 3, 32, 32)  # pixels from the VQ-VAE part
    parts = tok.manifest()["parts"]  # each part reads the image at its own size
    assert [(p["name"], p["image_size"], p["resized_from"]) for p in parts] == [("styled", 64, 32), ("diffusers-vq", 32, None)]
    result = runner.invoke(main, ["tokenize", "--tokenizer", str(out), "--data", "shapes", "--max-images", "4", "-o", str(tmp_path / "ids"), "--num-workers", "0"])
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "ids" / "manifest.json").read_text())
    assert (manifest["num_images"], manifest["num_tokens"], manifest["vocab_size"]) == (4, 292, tok.vocab_size)


def test_the_readable_options_compose_the_same_tokenizer(vq_dir, shards, tmp_path, runner):
    path, _ = vq_dir
    out = tmp_path / "readable"
    result = runner.invoke(main, ["compose", "styled+diffusers-vq", "--styled", str(shards / "tok"), "--diffusers-vq", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert stvq.load_tokenizer(out).num_tokens == 36 + 256


def test_without_diffusers_the_extra_is_named_in_one_line(vq_dir, monkeypatch):
    import sys

    path, _ = vq_dir
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if it were not installed
    with pytest.raises(stvq.StvqError, match=r'pip install "stvq\[diffusers\]"'):
        stvq.load_tokenizer("diffusers-vq", path=str(path))


def test_a_directory_of_another_model_is_refused_in_one_line(tmp_path, runner):
    kl = diffusers.AutoencoderKL(block_out_channels=[32], norm_num_groups=8, sample_size=32)
    kl.save_pretrained(tmp_path / "kl")
    with pytest.raises(stvq.CheckpointError, match="holds a diffusers AutoencoderKL, not a VQModel"):
        stvq.load_tokenizer("diffusers-vq", path=str(tmp_path / "kl"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    result = runner.invoke(main, ["compose", "diffusers-vq", "--part", f"diffusers-vq={tmp_path / 'empty'}", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "not a readable diffusers VQModel with diffusion_pytorch_model.safetensors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
