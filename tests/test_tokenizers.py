"""Tokenizers: the taming-compatible VQGAN (checkpoints in taming's format), the concat composer, and the
compose/encode/decode/tokenize commands."""

import json
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import stvq
from stvq.cli import main
from stvq_reference.vqgan import AttnBlock, VQGANTokenizer

SMALL_DD = dict(double_z=False, z_channels=64, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
F16_DD = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0)


def write_taming(tmp_path, dd=SMALL_DD, n_embed=50, embed_dim=8, mutate=None):
    """A Lightning-style checkpoint and YAML config in taming-transformers' layout, random weights."""
    model = VQGANTokenizer(ddconfig=dd, embed_dim=embed_dim, n_embed=n_embed)
    state = dict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)  # LPIPS/discriminator: skipped
    state["loss.logvar"] = torch.zeros(())
    if mutate:
        mutate(state)
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1200}, tmp_path / "model.ckpt")
    config = {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel", "params": {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": dd, "lossconfig": {"target": "x"}}}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(config))
    return model, tmp_path / "model.ckpt", tmp_path / "model.yaml"


def test_public_f16_16384_layout_has_taming_keys():
    with torch.device("meta"):
        model = VQGANTokenizer(ddconfig=F16_DD, embed_dim=256, n_embed=16384)
    keys = set(model.state_dict())
    assert len(keys) == 392 - 49  # the public checkpoint's keys less its 49 loss.* keys
    for key in (
        "encoder.down.4.attn.1.q.weight",
        "encoder.down.3.downsample.conv.weight",
        "decoder.up.4.attn.2.proj_out.weight",
        "decoder.up.4.upsample.conv.weight",
        "decoder.up.0.block.2.conv2.bias",
        "quantize.embedding.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
        "encoder.down.2.block.0.nin_shortcut.weight",
        "decoder.mid.attn_1.k.bias",
    ):
        assert key in keys, key
    assert "decoder.up.0.upsample.conv.weight" not in keys and "encoder.down.4.downsample.conv.weight" not in keys
    assert (model.num_tokens, model.vocab_size, model.image_size) == (256, 16384, 256)


def test_taming_checkpoint_loads_and_encodes_row_major_nearest_codes(tmp_path):
    source, ckpt, cfg = write_taming(tmp_path)
    tok = stvq.load_tokenizer("vqgan", checkpoint=str(ckpt), config=str(cfg))
    for key, value in source.state_dict().items():
        assert torch.equal(tok.state_dict()[key], value), key
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = tok.encode(images)
    assert ids.shape == (2, 256) and ids.dtype == torch.int64
    with torch.no_grad():
        z = tok.quant_conv(tok.encoder(images))  # (2, 8, 16, 16)
    codebook = tok.quantize.embedding.weight
    manual = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 8), codebook).argmin(-1).view(2, 16, 16)
    assert torch.equal(ids.view(2, 16, 16), manual)  # (b, h, w) row-major
    decoded = tok.decode(ids)
    assert decoded.shape == (2, 3, 32, 32) and decoded.min() >= -1 and decoded.max() <= 1


def test_attention_matches_tamings_bmm_formulation():
    block = AttnBlock(32)
    x = torch.randn(2, 32, 6, 5)
    h = block.norm(x)
    q, k, v = block.q(h).reshape(2, 32, 30), block.k(h).reshape(2, 32, 30), block.v(h).reshape(2, 32, 30)
    w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * 32**-0.5, dim=2)
    literal = x + block.proj_out(torch.bmm(v, w.permute(0, 2, 1)).reshape(2, 32, 6, 5))
    torch.testing.assert_close(block(x), literal, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda s: s.pop("decoder.conv_out.bias"), r"missing: decoder\.conv_out\.bias"),
        (lambda s: s.update({"quantize.embedding.weight": torch.zeros(51, 8)}), r"shape mismatch: quantize\.embedding\.weight: checkpoint \(51, 8\) vs model \(50, 8\)"),
        (lambda s: s.update({"extra.weight": torch.zeros(1)}), r"unexpected: extra\.weight"),
    ],
)
def test_bad_checkpoints_are_clear_errors(tmp_path, mutate, message):
    _, ckpt, cfg = write_taming(tmp_path, mutate=mutate)
    with pytest.raises(stvq.CheckpointError, match=message):
        stvq.load_tokenizer("vqgan", checkpoint=str(ckpt), config=str(cfg))


class NotATensor:
    pass


def test_checkpoints_that_would_run_code_are_refused(tmp_path):
    _, _, cfg = write_taming(tmp_path)
    torch.save({"state_dict": {}, "evil": NotATensor()}, tmp_path / "pickled.ckpt")
    with pytest.raises(stvq.CheckpointError, match="weights_only=True"):
        stvq.load_tokenizer("vqgan", checkpoint=str(tmp_path / "pickled.ckpt"), config=str(cfg))
    with pytest.raises(stvq.ConfigError, match="not a taming-transformers VQModel config"):
        (tmp_path / "bad.yaml").write_text("model: {}\n")
        stvq.load_tokenizer("vqgan", checkpoint=str(tmp_path / "model.ckpt"), config=str(tmp_path / "bad.yaml"))


@pytest.fixture
def styled_dir(tmp_path):
    model = stvq.create("tokenizer", "styled", preset="tiny", quantizer={"name": "fsq", "levels": [4, 4, 4]})
    return model.save_pretrained(tmp_path / "styled")


def test_concat_styled_plus_vqgan_offsets_resizing_and_reload(tmp_path, styled_dir):
    _, ckpt, cfg = write_taming(tmp_path)
    styled = stvq.load_tokenizer(styled_dir)
    vqgan = stvq.load_tokenizer("vqgan", checkpoint=str(ckpt), config=str(cfg))
    tok = stvq.create("composer", "concat").compose([styled, vqgan])
    assert (tok.num_tokens, tok.vocab_size, tok.image_size) == (36 + 256, 64 + 50, 32)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    ids = tok.encode(images)
    assert ids.shape == (3, 292)
    assert ids[:, :36].min() >= 0 and ids[:, :36].max() < 64
    assert ids[:, 36:].min() >= 64 and ids[:, 36:].max() < 114
    big = torch.nn.functional.interpolate(images, size=64, mode="bicubic", antialias=True).clamp(-1, 1)
    assert torch.equal(ids[:, :36], styled.encode(big))  # the styled part saw the image resized to 64
    assert torch.equal(ids[:, 36:] - 64, vqgan.encode(images))
    assert tok.decode(ids).shape == (3, 3, 32, 32)
    assert tok.decode_part(ids, 0).shape == (3, 3, 64, 64)

    tok.save_pretrained(tmp_path / "composed")
    manifest = json.loads((tmp_path / "composed" / "manifest.json").read_text())
    assert [(p["name"], p["offset"], p["positions"], p["resized_from"]) for p in manifest["parts"]] == [("styled", 0, [0, 36], 32), ("vqgan", 64, [36, 292], None)]
    again = stvq.load_tokenizer(tmp_path / "composed")
    assert torch.equal(again.encode(images), ids)


def test_special_ids_and_range_checks(tmp_path, styled_dir):
    _, ckpt, cfg = write_taming(tmp_path)
    parts = [stvq.load_tokenizer(styled_dir), stvq.load_tokenizer("vqgan", checkpoint=str(ckpt), config=str(cfg))]
    tok = stvq.create("composer", "concat").compose(parts, begin=True, separator=True)
    ids = tok.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert tok.vocab_size == 116 and ids.shape == (2, 294)
    assert (ids[:, 0] == 114).all() and (ids[:, 37] == 115).all()
    bad = ids.clone()
    bad[0, 40] = 3  # a styled id where VQGAN ids belong
    with pytest.raises(stvq.StvqError, match=r"positions 38\.\.293 belong to part 1 \(vqgan\) and must lie in \[64, 114\)"):
        tok.decode(bad)
    bad = ids.clone()
    bad[:, 37] = 0
    with pytest.raises(stvq.StvqError, match="position 37 must hold the separator id 115"):
        tok.decode(bad)


def write_images(folder, count):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_compose_encode_decode_tokenize_cli(tmp_path, styled_dir, runner):
    _, ckpt, cfg = write_taming(tmp_path)
    out = tmp_path / "tok"
    result = runner.invoke(main, ["compose", "styled+vqgan", "--styled", str(styled_dir), "--vqgan", str(ckpt), "--vqgan-config", str(cfg), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert re.search(r"total\s*│\s*292\s*│\s*114", result.output)

    images = write_images(tmp_path / "images", 5)
    result = runner.invoke(main, ["encode", "--tokenizer", str(out), *sorted(str(p) for p in images.iterdir())[:3], "-o", str(tmp_path / "ids.npy")])
    assert result.exit_code == 0, result.stderr
    ids = np.load(tmp_path / "ids.npy")
    assert ids.shape == (3, 292)
    result = runner.invoke(main, ["decode", "--tokenizer", str(out), str(tmp_path / "ids.npy"), "-o", str(tmp_path / "decoded")])
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "decoded").iterdir() if p.name != ".lock") == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(tmp_path / "decoded" / "000000.png").size == (32, 32)

    shards = tmp_path / "shards"
    args = ["tokenize", "--tokenizer", str(out), "--data", str(images), "-o", str(shards), "--shard-size", "2"]
    assert runner.invoke(main, args).exit_code == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert (manifest["num_images"], manifest["num_shards"], manifest["vocab_size"], manifest["layout"]["parts"][1]["offset"]) == (5, 3, 114, 64)
    first = [np.load(shards / f"shard_{i:05d}.npy") for i in range(3)]
    assert [len(a) for a in first] == [2, 2, 1] and first[0].dtype == np.uint16
    np.testing.assert_array_equal(np.concatenate(first)[:3], ids)  # same ids as `encode`, same order
    (shards / "shard_00002.npy").unlink()  # as if interrupted before the last shard
    result = runner.invoke(main, args)
    assert result.exit_code == 0 and "(2 already there)" in result.output
    np.testing.assert_array_equal(np.load(shards / "shard_00002.npy"), first[2])
    torn = shards / "shard_00001.npy"
    torn.write_bytes(torn.read_bytes()[:100])  # a shard cut short: verified on resume and written again
    result = runner.invoke(main, args)
    assert result.exit_code == 0 and "(2 already there)" in result.output
    np.testing.assert_array_equal(np.load(torn), first[1])
    from stvq.checkpoint import run_lock

    with run_lock(shards):  # another tokenize writing the same directory
        result = runner.invoke(main, args)
    assert result.exit_code == 1 and "is being written by another stvq process" in result.stderr


def test_single_part_compose_converts_a_taming_checkpoint(tmp_path, runner):
    source, ckpt, cfg = write_taming(tmp_path)
    result = runner.invoke(main, ["compose", "vqgan", "--vqgan", str(ckpt), "--vqgan-config", str(cfg), "-o", str(tmp_path / "v")])
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "v").iterdir() if p.name != ".lock") == ["config.json", "model.safetensors"]
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    source.eval()
    assert torch.equal(stvq.load_tokenizer(tmp_path / "v").encode(images), source.encode(images))


@pytest.mark.parametrize(
    "args,message",
    [
        (["compose", "styled+nope", "--styled", "x", "-o", "o"], "no tokenizer named 'nope'"),
        (["compose", "styled+vqgan", "--vqgan", "x.ckpt", "-o", "o"], "part 'styled' needs a source"),
        (["compose", "vqgan", "--vqgan", "x.ckpt", "-o", "o"], "also needs --vqgan-config"),
        (["encode", "--tokenizer", "/nope", "a.png", "-o", "x.npy"], "is not a directory"),
    ],
)
def test_composition_errors_are_one_line(runner, args, message):
    result = runner.invoke(main, args)
    assert result.exit_code == 1 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_generic_part_flags_give_what_the_plugins_flags_give(tmp_path, styled_dir, runner):
    _, ckpt, cfg = write_taming(tmp_path)
    plugin = ["compose", "styled+vqgan", "--styled", str(styled_dir), "--vqgan", str(ckpt), "--vqgan-config", str(cfg), "-o", str(tmp_path / "a")]
    generic = ["compose", "styled+vqgan", "--part", f"styled={styled_dir}", "--part", f"vqgan={ckpt}", "--part-option", f"vqgan.config={cfg}", "-o", str(tmp_path / "b")]
    assert runner.invoke(main, plugin).exit_code == 0 and runner.invoke(main, generic).exit_code == 0
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(stvq.load_tokenizer(tmp_path / "a").encode(images), stvq.load_tokenizer(tmp_path / "b").encode(images))
    result = runner.invoke(main, ["compose", "vqgan", "--part", f"vqgan={ckpt}", "--part-option", "config=x", "-o", str(tmp_path / "c")])
    assert result.exit_code == 1 and "--part-option config: not NAME.KEY=VALUE" in result.stderr
