"""LlamaGen's VQ (FoundationVision/LlamaGen, tokenizer/tokenizer_image/vq_model.py) as a tokenizer, against
a fixture LlamaGen's own code wrote (tests/data/llamagen/make_fixture.py): its state-dict keys and shapes at
full size, a small checkpoint of its layout in its three wrappings, and the ids and images LlamaGen computes
for it; bad checkpoints in one line; composition through the stock commands."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import stvq
from stvq.cli import main

FIXTURE = Path(__file__).parent / "data" / "llamagen"
#: The options that build the fixture's small model (LlamaGen's layout at base width 32).
SMALL = {"preset": "VQ-16", "image_size": 32, "ch": 32, "encoder_ch_mult": [1, 1], "decoder_ch_mult": [1, 1], "z_channels": 32, "codebook_size": 64, "codebook_embed_dim": 8}


@pytest.fixture(scope="module")
def llamagen(tmp_path_factory):
    """LlamaGen's small checkpoint in its three wrappings (``ema`` as written by LlamaGen, ``model`` and
    ``state_dict`` re-wrapped), and one without the usage buffer."""
    root = tmp_path_factory.mktemp("llamagen")
    saved = torch.load(FIXTURE / "small_ema.pt", weights_only=True)
    state = saved["ema"]
    for wrapper in ("ema", "model", "state_dict"):
        torch.save({wrapper: state, "steps": saved["steps"], "args": saved["args"]}, root / f"{wrapper}.pt")
    torch.save({"model": {k: v for k, v in state.items() if k != "quantize.codebook_used"}}, root / "no_usage.pt")
    return root, state


def test_llamagen_vq_is_llamagens_model_at_full_size():
    """VQ-16 and VQ-8 at LlamaGen's defaults: every key LlamaGen's own model has, in its order and shape
    (keys.json, written by LlamaGen's code), its 72 M parameters, 16,384 codes, 16 x 16 (32 x 32) tokens of
    a 256-px image."""
    expected = json.loads((FIXTURE / "keys.json").read_text())
    with torch.device("meta"):  # shapes without 72 M parameters' worth of memory
        models = {preset: stvq.create("tokenizer", "llamagen-vq", preset=preset) for preset in expected}
    for preset, keys in expected.items():
        assert [(k, list(v.shape)) for k, v in models[preset].state_dict().items()] == list(keys.items()), preset
    vq16, vq8 = models["VQ-16"], models["VQ-8"]
    assert round(sum(p.numel() for p in vq16.parameters()) / 1e6, 1) == 71.9 and (vq16.num_tokens, vq16.vocab_size) == (256, 16384)
    assert vq8.num_tokens == 1024


def test_ids_and_reconstructions_are_llamagens(llamagen):
    """The ids LlamaGen's ``encode`` picked, every one, from each wrapping; the images its ``decode_code``
    drew within 1e-4 (ours are clamped to [-1, 1])."""
    root, state = llamagen
    reference = load_file(FIXTURE / "small_reference.safetensors")
    loaded = {wrapper: stvq.load_tokenizer("llamagen-vq", checkpoint=str(root / f"{wrapper}.pt"), **SMALL) for wrapper in ("ema", "model", "state_dict", "no_usage")}
    for wrapper, tok in loaded.items():
        ids = tok.encode(reference["images"])
        assert ids.shape == (3, 256) and torch.equal(ids, reference["ids"]), wrapper  # every id, bit for bit
    assert len(reference["ids"].unique()) > 8
    torch.testing.assert_close(tok.decode(ids), reference["reconstructions"].clamp(-1, 1), rtol=0, atol=1e-4)
    assert torch.equal(loaded["ema"].quantize.codebook_used, state["quantize.codebook_used"]) and state["quantize.codebook_used"].any()


def test_a_llamagen_checkpoint_of_another_model_or_a_pickle_payload_is_one_line(llamagen, tmp_path, runner):
    root, state = llamagen
    with pytest.raises(stvq.CheckpointError, match=r"shape mismatch: encoder.conv_blocks.1.res.0.conv1.weight: checkpoint \(32, 32, 3, 3\) vs model \(64, 32, 3, 3\)"):
        stvq.load_tokenizer("llamagen-vq", checkpoint=str(root / "ema.pt"), **{**SMALL, "encoder_ch_mult": [1, 2]})
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
