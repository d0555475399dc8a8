"""LlamaGen's VQ (FoundationVision/LlamaGen, tokenizer/tokenizer_image/vq_model.py) as a tokenizer: its
checkpoints' layout (key names, the ``codebook_used`` buffer, the ``ema`` / ``model`` / ``state_dict``
wrappings), ids and reconstructions against a functional reading of the same weights, bad checkpoints in one
line, and composition through the stock commands. LlamaGen is not a package: the fixture is a small model of
its layout, written by the test as LlamaGen's training script writes checkpoints."""

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stvq
from stvq.cli import main

SMALL = {"preset": "VQ-16", "image_size": 32, "ch": 32, "encoder_ch_mult": [1, 2], "decoder_ch_mult": [1, 2], "z_channels": 32, "codebook_size": 64, "codebook_embed_dim": 8}


def group_norm(x, state, name):
    return F.group_norm(x, 32, state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)


def conv(x, state, name, **kw):
    return F.conv2d(x, state[f"{name}.weight"], state[f"{name}.bias"], **kw)


def resnet(x, state, name):
    h = conv(F.silu(group_norm(x, state, f"{name}.norm1")), state, f"{name}.conv1", padding=1)
    h = conv(F.silu(group_norm(h, state, f"{name}.norm2")), state, f"{name}.conv2", padding=1)
    return (conv(x, state, f"{name}.nin_shortcut") if f"{name}.nin_shortcut.weight" in state else x) + h


def attention(x, state, name):
    h = group_norm(x, state, f"{name}.norm")
    b, c, hh, ww = h.shape
    q, k, v = (conv(h, state, f"{name}.{p}").reshape(b, c, hh * ww) for p in "qkv")
    weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c**-0.5, dim=2)  # (b, query, key)
    return x + conv(torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, hh, ww), state, f"{name}.proj_out")


def levels(state, prefix):
    return sorted({int(k.split(".")[2]) for k in state if k.startswith(f"{prefix}.conv_blocks.")})


def run_level(h, state, name):
    blocks = sorted({int(k.split(".")[4]) for k in state if k.startswith(f"{name}.res.")})
    for j in blocks:
        h = resnet(h, state, f"{name}.res.{j}")
        if f"{name}.attn.{j}.q.weight" in state:
            h = attention(h, state, f"{name}.attn.{j}")
    if f"{name}.downsample.conv.weight" in state:
        h = conv(F.pad(h, (0, 1, 0, 1)), state, f"{name}.downsample.conv", stride=2)
    if f"{name}.upsample.conv.weight" in state:
        h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), state, f"{name}.upsample.conv", padding=1)
    return h


def middle(h, state, prefix):
    return resnet(attention(resnet(h, state, f"{prefix}.mid.0"), state, f"{prefix}.mid.1"), state, f"{prefix}.mid.2")


def reference_encode(state, images):
    h = conv(images, state, "encoder.conv_in", padding=1)
    for i in levels(state, "encoder"):
        h = run_level(h, state, f"encoder.conv_blocks.{i}")
    h = middle(h, state, "encoder")
    z = conv(conv(F.silu(group_norm(h, state, "encoder.norm_out")), state, "encoder.conv_out", padding=1), state, "quant_conv")
    z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)
    codes = F.normalize(state["quantize.embedding.weight"], dim=-1)
    d = (z**2).sum(1, keepdim=True) + (codes**2).sum(1) - 2 * z @ codes.T
    return d.argmin(1).reshape(len(images), -1)


def reference_decode(state, ids, grid):
    codes = F.normalize(state["quantize.embedding.weight"], dim=-1)[ids]  # (B, h*w, e)
    z = codes.reshape(len(ids), grid, grid, -1).permute(0, 3, 1, 2)
    h = middle(conv(conv(z, state, "post_quant_conv"), state, "decoder.conv_in", padding=1), state, "decoder")
    for i in levels(state, "decoder"):  # stored coarsest first
        h = run_level(h, state, f"decoder.conv_blocks.{i}")
    return conv(F.silu(group_norm(h, state, "decoder.norm_out")), state, "decoder.conv_out", padding=1)


@pytest.fixture(scope="module")
def llamagen(tmp_path_factory):
    """A LlamaGen-layout model with trained-looking weights (random, codebook l2-normalised as LlamaGen
    initialises it, a usage buffer holding ids) in LlamaGen's three checkpoint wrappings."""
    root = tmp_path_factory.mktemp("llamagen")
    torch.manual_seed(0)
    model = stvq.create("tokenizer", "llamagen-vq", **SMALL)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["quantize.embedding.weight"] = F.normalize(torch.randn(64, 8), dim=-1)
    state["quantize.codebook_used"] = torch.randint(0, 64, (65536,)).float()
    for wrapper in ("ema", "model", "state_dict"):
        torch.save({wrapper: state, "steps": 1000, "args": {"vq_model": "VQ-16"}}, root / f"{wrapper}.pt")
    torch.save({"model": {k: v for k, v in state.items() if k != "quantize.codebook_used"}}, root / "no_usage.pt")
    return root, state


def test_llamagen_vq_is_llamagens_model_at_full_size():
    """VQ-16 and VQ-8 at LlamaGen's defaults: its 72 M parameters, 16,384 codes of 8 dimensions, 16 x 16
    (32 x 32) tokens of a 256-px image, and its key names."""
    vq16 = stvq.create("tokenizer", "llamagen-vq")
    assert round(sum(p.numel() for p in vq16.parameters()) / 1e6, 1) == 71.9 and (vq16.num_tokens, vq16.vocab_size) == (256, 16384)
    keys = vq16.state_dict()
    assert tuple(keys["decoder.conv_blocks.0.res.0.conv1.weight"].shape) == (512, 512, 3, 3) and "decoder.conv_blocks.0.attn.2.q.weight" in keys
    assert "encoder.conv_blocks.4.attn.1.proj_out.weight" in keys and "encoder.conv_blocks.3.downsample.conv.weight" in keys
    assert tuple(keys["quantize.codebook_used"].shape) == (65536,) and "encoder.mid.1.q.weight" in keys
    assert stvq.create("tokenizer", "llamagen-vq", preset="VQ-8").num_tokens == 1024


def test_ids_equal_and_reconstructions_match_a_functional_reading_of_the_weights(llamagen):
    root, state = llamagen
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    expected = reference_encode(state, images)
    for wrapper in ("ema", "model", "state_dict", "no_usage"):
        tok = stvq.load_tokenizer("llamagen-vq", checkpoint=str(root / f"{wrapper}.pt"), **{k: v for k, v in SMALL.items()})
        ids = tok.encode(images)
        assert ids.shape == (3, 256) and torch.equal(ids, expected), wrapper  # every id, bit for bit
        assert len(ids.unique()) > 8
    recon = tok.decode(ids)
    assert (recon - reference_decode(state, ids, 16).clamp(-1, 1)).abs().max() < 1e-4
    assert torch.equal(stvq.load_tokenizer("llamagen-vq", checkpoint=str(root / "ema.pt"), **SMALL).quantize.codebook_used, state["quantize.codebook_used"])


def test_a_llamagen_checkpoint_of_another_model_or_a_pickle_payload_is_one_line(llamagen, tmp_path, runner):
    root, state = llamagen
    with pytest.raises(stvq.CheckpointError, match=r"shape mismatch: encoder.conv_blocks.1.res.0.conv1.weight: checkpoint \(64, 32, 3, 3\) vs model \(32, 32, 3, 3\)"):
        stvq.load_tokenizer("llamagen-vq", checkpoint=str(root / "ema.pt"), **{**SMALL, "encoder_ch_mult": [1, 1]})
    vq8 = stvq.create("tokenizer", "llamagen-vq", preset="VQ-8", ch=32, z_channels=32, codebook_size=64)
    torch.save({"ema": vq8.state_dict()}, tmp_path / "vq8.pt")
    with pytest.raises(
        stvq.CheckpointError,
        match=r"do not match the config: .*shape mismatch: encoder.conv_blocks.1.res.0.conv1.weight: checkpoint \(64, 32, 3, 3\) vs model \(32, 32, 3, 3\).*its encoder has 4 levels, as VQ-8: pass preset='VQ-8'",
    ):
        stvq.load_tokenizer("llamagen-vq", checkpoint=str(tmp_path / "vq8.pt"), ch=32, z_channels=32, codebook_size=64)

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"ema": Payload()}, f)
    result = runner.invoke(main, ["compose", "llamagen-vq", "--llamagen-vq", str(tmp_path / "evil.pt"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "is not a checkpoint torch can load with weights_only=True, which never runs code" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not marker.exists()
    with pytest.raises(stvq.ConfigError, match="codebook_sise: not a LlamaGen ModelArgs field"):
        stvq.create("tokenizer", "llamagen-vq", codebook_sise=4)


def test_styled_plus_llamagen_composes_encodes_decodes_and_tokenizes(llamagen, tmp_path, runner):
    root, _ = llamagen
    styled = tmp_path / "styled"
    stvq.create("tokenizer", "styled", preset="tiny", quantizer={"name": "fsq", "levels": [8, 8, 8]}).save_pretrained(styled)
    options = [f"--part-option=llamagen-vq.{k}={v}".replace("'", '"') for k, v in SMALL.items() if k != "preset"]
    result = runner.invoke(main, ["compose", "styled+llamagen-vq", "--styled", str(styled), "--llamagen-vq", str(root / "model.pt"), *options, "-o", str(tmp_path / "tok")])
    assert result.exit_code == 0, result.output + result.stderr
    tok = stvq.load_tokenizer(tmp_path / "tok")
    assert (tok.num_tokens, tok.vocab_size) == (36 + 256, 512 + 64)
    parts = tok.manifest()["parts"]
    assert parts[1]["name"] == "llamagen-vq" and parts[1]["image_size"] == 32 and parts[0]["resized_from"] == 32
    from PIL import Image

    Image.new("RGB", (48, 48), "orange").save(tmp_path / "x.png")
    assert runner.invoke(main, ["encode", "--tokenizer", str(tmp_path / "tok"), str(tmp_path / "x.png"), "-o", str(tmp_path / "ids.npy")]).exit_code == 0
    ids = np.load(tmp_path / "ids.npy")
    assert ids.shape == (1, 292) and (ids[:, :36] < 512).all() and (ids[:, 36:] >= 512).all()
    assert runner.invoke(main, ["decode", "--tokenizer", str(tmp_path / "tok"), str(tmp_path / "ids.npy"), "-o", str(tmp_path / "png")]).exit_code == 0
    assert Image.open(tmp_path / "png" / "000000.png").size == (32, 32)
    result = runner.invoke(main, ["tokenize", "--tokenizer", str(tmp_path / "tok"), "--data", "shapes", "--max-images", "20", "-o", str(tmp_path / "shards")])
    assert result.exit_code == 0 and np.load(tmp_path / "shards" / "shard_00000.npy").shape == (20, 292)
    prior = ["--set", "width=32", "--set", "layers=1", "--set", "heads=2", "--steps", "2", "--eval-every", "2", "--batch-size", "4", "--no-progress"]
    result = runner.invoke(main, ["prior", "train", "--shards", str(tmp_path / "shards"), *prior, "--run-dir", str(tmp_path / "prior")])
    assert result.exit_code == 0, result.output + result.stderr
    result = runner.invoke(main, ["prior", "sample", "--prior", str(tmp_path / "prior"), "-n", "2", "-o", str(tmp_path / "samples")])
    assert result.exit_code == 0, result.output + result.stderr
    sampled = np.load(tmp_path / "samples" / "ids.npy")
    assert sampled.shape == (2, 292) and (sampled[:, :36] < 512).all() and (sampled[:, 36:] >= 512).all()  # each position in its part's range
    np.save(tmp_path / "bad.npy", np.full((1, 292), 600))
    result = runner.invoke(main, ["decode", "--tokenizer", str(tmp_path / "tok"), str(tmp_path / "bad.npy"), "-o", str(tmp_path / "png2")])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1 and "576" in result.stderr
