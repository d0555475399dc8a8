"""Bad input, table-driven: each case is a command line (or an API call) with the exit status and a phrase
of the one line it must give, never a traceback; and inputs that used to give a silent wrong result."""

import io
import json
import os
import pickle
import shutil
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file
from test_tokenizers import NotATensor, write_taming

import stvq
from stvq.cli import main
from stvq.config import TrainConfig
from stvq.data import make_dataset
from stvq.images import load_image
from stvq.train import Trainer
from stvq_reference.folders import ImageFolderDataset

SMALL = {"width": 32, "heads": 2, "encoder_layers": 1, "plain_layers": 1, "patch_size": 8}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tokenizer with a vocabulary of 512, a short run, and a folder of bad and good files."""
    root = tmp_path_factory.mktemp("bad")
    stvq.create("tokenizer", "styled", preset="tiny", quantizer={"name": "fsq", "levels": [8, 8, 8]}).save_pretrained(root / "tok")
    Trainer(TrainConfig(model=SMALL, steps=2, batch_size=2, checkpoint_every=2, eval_every=2), root / "run", progress=False).fit()
    np.save(root / "float.npy", np.full((2, 36), 95.5))
    np.save(root / "bool.npy", np.ones((2, 36), dtype=bool))
    np.save(root / "uint8.npy", np.ones((2, 36), dtype=np.uint8))
    np.save(root / "empty.npy", np.zeros((0, 36), dtype=np.int64))
    np.save(root / "short.npy", np.zeros((2, 35), dtype=np.int64))
    np.save(root / "high.npy", np.full((2, 36), 512, dtype=np.int64))
    np.save(root / "object.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.savez(root / "archive.npz", ids=np.zeros((2, 36), dtype=np.int64))
    (root / "text.npy").write_text("1 2 3\n")
    (root / "a_file").write_text("")
    _, _, config = write_taming(root)  # model.ckpt, model.yaml
    text = config.read_text()
    (root / "no_z.yaml").write_text(text.replace("z_channels: 64", "zz: 64"))
    (root / "typed.yaml").write_text(text.replace("ch: 32", "ch: thirty-two"))
    torch.save({"state_dict": {}, "evil": NotATensor()}, root / "pickled.ckpt")
    for name, edit in (("options_list", {"options": [1]}), ("options_null", {"options": None}), ("just_5", 5), ("prior_like", {"kind": "prior", "name": "gpt"})):
        shutil.copytree(root / "tok", root / name)
        config = json.loads((root / "tok" / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps(config | edit if isinstance(edit, dict) else edit))
    weights = stvq.load_tokenizer(root / "tok").state_dict()
    for name, change in (("nan_weights", lambda w: w.fill_(float("nan"))), ("int64_weights", lambda w: w.to(torch.int64))):
        shutil.copytree(root / "tok", root / name)
        save_file({k: change(v.clone()) if k == "decoder.out_conv.weight" else v for k, v in weights.items()}, root / name / "model.safetensors")
    with open(root / "huge_header.npy", "wb") as f:  # a header that claims 26 TiB over 64 bytes
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (10**11, 36)})
        f.write(bytes(64))
    (root / "garbage.tar").write_bytes(b"not a tar file" * 50)
    (root / "tagged.yaml").write_text(text.replace("ddconfig:", "evil: !!python/object/apply:os.system ['touch planted']\n    ddconfig:", 1))
    torch.save({"state_dict": {"encoder.conv_in.weight": 5}}, root / "int_state.ckpt")
    Image.new("RGB", (64, 64), "red").save(root / "red.png")
    (root / "truncated.png").write_bytes((root / "red.png").read_bytes()[:60])
    chunks = [b"IHDR" + struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0), b"IDAT", b"IEND"]  # 30000 x 30000 RGB pixels, claimed
    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(c) - 4) + c + struct.pack(">I", zlib.crc32(c)) for c in chunks))
    (root / "torn_ids").mkdir()
    (root / "torn_ids" / "manifest.json").write_text('{"num_images": 4, "num_sh')
    (root / "list_ids").mkdir()
    (root / "list_ids" / "manifest.json").write_text("[1, 2]")
    for name, text in (("garbage", "{not json"), ("typed", None), ("unknown", None), ("lying", None), ("negative", None), ("quantized", None)):
        shutil.copytree(root / "run", root / name)
        fields = json.loads((root / "run" / "train.json").read_text())
        if name == "garbage":
            (root / name / "train.json").write_text(text)
        elif name in ("typed", "unknown", "negative"):
            fields.update({"typed": {"steps": "many"}, "unknown": {"epochs": 3}, "negative": {"steps": -5}}[name])
            (root / name / "train.json").write_text(json.dumps(fields))
        elif name == "quantized":  # what `stvq quantize --run` leaves beside the run
            (root / name / "quantize.json").write_text(json.dumps({"k": 4}))
        else:  # a header that says step 1 over another model's tensors
            save_file({"model.other.weight": torch.zeros(2)}, root / name / "checkpoint.safetensors", metadata={"step": "1", "param_groups": "[]"})
    # JSON read back: nested too deep, a 5,000-digit integer, Infinity, a key twice, a width of 10^18
    train = (root / "run" / "train.json").read_text()
    for name, text in (
        ("deep", train.replace('"steps": 2', '"steps": ' + "[" * 100_000 + "]" * 100_000, 1)),
        ("digits", train.replace('"steps": 2', '"steps": 1' + "0" * 5000, 1)),
        ("infinite", train.replace('"lr": 0.001', '"lr": Infinity', 1)),
        ("twice", train.replace('"steps": 2', '"steps": 2, "steps": 9', 1)),
    ):
        shutil.copytree(root / "run", root / name)
        (root / name / "train.json").write_text(text)
    from safetensors import safe_open

    with safe_open(str(root / "run" / "checkpoint.safetensors"), "pt") as f:
        header, saved = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for name, tensors, metadata in (
        ("minus_step", saved, header | {"step": "-5"}),
        ("no_moment", {k: v for k, v in saved.items() if not k.endswith(".exp_avg_sq")}, header),
    ):
        shutil.copytree(root / "run", root / name)
        save_file(tensors, root / name / "checkpoint.safetensors", metadata=metadata)
    shutil.copytree(root / "tok", root / "wide")
    config = json.loads((root / "tok" / "config.json").read_text())
    config["options"]["config"]["width"] = 10**18
    (root / "wide" / "config.json").write_text(json.dumps(config))
    shutil.copytree(root / "tok", root / "widish")
    config["options"]["config"]["width"] = 4096
    (root / "widish" / "config.json").write_text(json.dumps(config))
    runner = CliRunner()
    assert runner.invoke(main, ["tokenize", "--tokenizer", str(root / "tok"), "--data", "shapes", "--max-images", "4", "-o", str(root / "ids")]).exit_code == 0
    for name, edit in (
        ("vocab_twice", lambda m: m.replace('"vocab_size": 512', '"vocab_size": 4096, "vocab_size": 512', 1)),
        ("many_shards", lambda m: m.replace('"num_shards": 1', '"num_shards": 1000000000', 1)),
    ):
        shutil.copytree(root / "ids", root / name)
        (root / name / "manifest.json").write_text(edit((root / "ids" / "manifest.json").read_text()))
        assert (root / name / "manifest.json").read_text() != (root / "ids" / "manifest.json").read_text()
    shutil.copytree(root / "ids", root / "npz_shard")
    (root / "npz_shard" / "shard_00000.npy").unlink()
    with open(root / "npz_shard" / "shard_00000.npy", "wb") as f:
        np.savez(f, ids=np.zeros((4, 36), dtype=np.int64))
    shutil.copytree(root / "ids", root / "fifo_shard")
    (root / "fifo_shard" / "shard_00000.npy").unlink()
    os.mkfifo(root / "fifo_shard" / "shard_00000.npy")
    return root


CASES = [
    # (command line with {root} for the fixture's folder, exit status, phrase of the message)
    ("decode --tokenizer {root}/tok {root}/float.npy -o {root}/out", 1, "are float64, which cannot be ids"),
    ("decode --tokenizer {root}/tok {root}/bool.npy -o {root}/out", 1, "are bool, which cannot be ids"),
    ("decode --tokenizer {root}/tok {root}/uint8.npy -o {root}/out", 1, "are uint8, which cannot be ids of a vocabulary of 512"),
    ("decode --tokenizer {root}/tok {root}/empty.npy -o {root}/out", 1, "no ids to decode: the batch is empty"),
    ("decode --tokenizer {root}/tok {root}/short.npy -o {root}/out", 1, "expected ids of shape (B, 36), got (2, 35)"),
    ("decode --tokenizer {root}/tok {root}/high.npy -o {root}/out", 1, "ids must lie in [0, 512); got [512, 512]"),
    ("decode --tokenizer {root}/tok {root}/object.npy -o {root}/out", 1, "is not a NumPy .npy array of ids"),
    ("decode --tokenizer {root}/tok {root}/text.npy -o {root}/out", 1, "is not a NumPy .npy array of ids"),
    ("decode --tokenizer {root}/tok {root}/archive.npz -o {root}/out", 1, "is not a NumPy .npy array of ids (an .npz archive, not one .npy array)"),
    ("decode --tokenizer {root}/tok {root}/none.npy -o {root}/out", 1, "no such ids file"),
    ("tokenize --tokenizer {root}/tok --data shapes --max-images 4 --shard-size 0 -o {root}/s", 2, "Invalid value for '--shard-size'"),
    ("tokenize --tokenizer {root}/tok --data shapes --max-images 4 --batch-size 0 -o {root}/s", 2, "Invalid value for '--batch-size'"),
    ("tokenize --tokenizer {root}/tok --data shapes --max-images -1 -o {root}/s", 2, "Invalid value for '--max-images'"),
    ("tokenize --tokenizer {root}/tok --data shapes --max-images 4 -o {root}/a_file/s", 1, "{root}/a_file/s"),
    ("compose vqgan --vqgan {root}/model.ckpt --vqgan-config {root}/no_z.yaml -o {root}/v", 1, "is not a taming-transformers VQGAN ddconfig (TypeError"),
    ("compose vqgan --vqgan {root}/model.ckpt --vqgan-config {root}/typed.yaml -o {root}/v", 1, "is not a taming-transformers VQGAN ddconfig"),
    ("compose vqgan --vqgan {root}/pickled.ckpt --vqgan-config {root}/model.yaml -o {root}/v", 1, "weights_only=True, which never runs code (UnpicklingError"),
    ("train --resume {root}/garbage", 1, "garbage/train.json is not valid JSON (Expecting property name enclosed in double quotes"),
    ("train --resume {root}/typed", 1, "is not a train.json that stvq wrote (TypeError"),
    ("train --resume {root}/unknown", 1, "unexpected keyword argument 'epochs'"),
    ("train --resume {root}/lying", 1, "checkpoint.safetensors does not match this run (RuntimeError"),
    ("train --stage 2 --from {root}/run --quantizer fsq --quantizer-option levels=notjson --run-dir {root}/q", 1, "quantizer 'fsq' cannot be built with levels='notjson'"),
    ("train --stage 2 --from {root}/run --quantizer fsq --quantizer-option foo=1 --run-dir {root}/q", 1, "got an unexpected keyword argument 'foo' (its options: levels, dim, eps)"),
    ("compose styled+vqgan --styled {root}/tok --part vqgan -o {root}/c", 1, "--part 'vqgan' is not KEY=VALUE, e.g. --part titok=runs/titok"),
    ("train --tokenizer nope --run-dir {root}/t", 1, "no tokenizer named 'nope'; available: "),
    ("train --tokenizer vqgan --run-dir {root}/t", 1, "tokenizer 'vqgan' (VQGANTokenizer) is not a CodeTokenizer: stvq train trains"),
    ("quantize --run {root}/run --quantizer fsq", 1, "quantizer 'fsq' (FSQ) is not a FittableQuantizer: it is not fitted offline; train it in stage 2"),
    ("train --train nope=1 --run-dir {root}/t", 1, "--train nope: unknown config field; known fields: adaptive_weight, adversarial_weight, batch_size"),
    ("train --train lr=fast --run-dir {root}/t", 1, "--train lr=fast: expected a value of type float"),
    ("train --train lr_scales=3 --run-dir {root}/t", 1, "lr_scales must map parameter-name substrings to numbers"),
    ("train --train model=[1] --run-dir {root}/t", 1, "model and quantizer must be JSON objects of options"),
    ("quantize --run {root}/run --k 0", 2, "Invalid value for '--k'"),
    ("quantize --run {root}/run --niter 0", 2, "Invalid value for '--niter'"),
    ("eval --run {root}/run --images 0", 2, "Invalid value for '--images'"),
    ("eval --run {root}/run -o {root}/ev", 1, "one run's eval.json and plots go into the run itself ({root}/run): drop -o"),
    ("train --resume {root}/run --preset small", 1, "--resume continues {root}/run with its own train.json; drop --preset"),
    ("train --resume {root}/run --set width=64 --lr 0.1", 1, "drop --set, --lr (only --steps may change"),
    # run directories and files read back
    ("encode --tokenizer {root}/options_list {root}/x.png -o {root}/e.npy", 1, "config.json: 'options' is a JSON array, not an object of options"),
    ("encode --tokenizer {root}/options_null {root}/x.png -o {root}/e.npy", 1, "config.json: 'options' is a JSON null, not an object of options"),
    ("encode --tokenizer {root}/just_5 {root}/x.png -o {root}/e.npy", 1, "config.json holds a JSON number, not the object stvq writes; re-save the model"),
    ("encode --tokenizer {root}/prior_like {root}/x.png -o {root}/e.npy", 1, "holds a prior (gpt), not a tokenizer"),
    ("decode --tokenizer {root}/nan_weights {root}/uint8.npy -o {root}/out", 1, "NaN or infinite values: decoder.out_conv.weight"),
    ("decode --tokenizer {root}/int64_weights {root}/uint8.npy -o {root}/out", 1, "dtype mismatch: decoder.out_conv.weight: checkpoint torch.int64 vs model torch.float32"),
    ("decode --tokenizer {root}/tok {root}/huge_header.npy -o {root}/out", 1, "is not a NumPy .npy array of ids (mmap length is greater than file size)"),
    (
        "encode --tokenizer {root}/tok {root}/text.npy -o {root}/e.npy",
        1,
        "cannot read the image {root}/text.npy: UnidentifiedImageError: not an image of a format stvq reads (PNG, JPEG, WEBP, GIF, BMP, TIFF)",
    ),
    ("encode --tokenizer {root}/tok {root}/truncated.png -o {root}/e.npy", 1, "cannot read the image {root}/truncated.png: "),
    ("encode --tokenizer {root}/tok {root}/bomb.png -o {root}/e.npy", 1, "cannot read the image {root}/bomb.png: DecompressionBombError: Image size (900000000 pixels)"),
    ("tokenize --tokenizer {root}/tok --data wds:{root}/garbage.tar -o {root}/z", 1, "read no image from the data"),
    ("tokenize --tokenizer {root}/tok --data shapes --max-images 4 -o {root}/torn_ids", 1, "torn_ids/manifest.json is not valid JSON"),
    ("tokenize --tokenizer {root}/tok --data shapes --max-images 4 -o {root}/list_ids", 1, "list_ids/manifest.json holds a JSON array, not the object stvq writes"),
    ("compose vqgan --vqgan {root}/model.ckpt --vqgan-config {root}/tagged.yaml -o {root}/v", 1, "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("compose vqgan --vqgan {root}/int_state.ckpt --vqgan-config {root}/model.yaml -o {root}/v", 1, "state_dict['encoder.conv_in.weight'] is a int, not a tensor"),
    ("compose styled --part styled={root}/tok --part-option composer.name=nope -o {root}/c", 1, "options were given for 'composer', which 'styled' does not name"),
    ("train --resume {root}/negative", 1, "negative/train.json is not a train.json that stvq wrote (--steps must be at least 1, got -5)"),
    ("quantize --run {root}/negative --k 4", 1, "negative/train.json is not a train.json that stvq wrote (--steps must be at least 1"),
    ("train --resume {root}/quantized --steps 5", 1, "was quantized after its training"),
    ("train --seed 99999999999999999999999 --run-dir {root}/t", 2, "is not in the range 0<=x<=9223372036854775807"),
    ("train --num-workers -1 --run-dir {root}/t", 2, "'--num-workers': -1 is not in the range 0<=x<="),
    ("train --lr nan --run-dir {root}/t", 2, "'nan' is not a finite number"),
    # a value outside an option's range, whether click or the config class finds it: exit status 2
    ("train --steps 0 --run-dir {root}/t", 2, "--steps must be at least 1, got 0"),
    ("train --eval-every 0 --run-dir {root}/t", 2, "--eval-every must be at least 1, got 0"),
    ("train --ema-decay 1 --run-dir {root}/t", 2, "--ema-decay must be in [0, 1)"),
    ("train --noise-sigma -1 --run-dir {root}/t", 2, "noise_sigma must be a number of 0 or more, got -1.0"),
    ("train --num-workers 1000000000000000000 --run-dir {root}/t", 2, "1000000000000000000 is not in the range 0<=x<="),
    ('train --train lr_scales={{"encoder.":-1}} --run-dir {root}/t', 2, "lr_scales must be finite multiples of 0 or more"),
    ("train --train beta2=1.5 --run-dir {root}/t", 2, "beta2 must be in [0, 1)"),
    ("train --stage 2 --from {root}/run --quantizer ema-vq --quantizer-option decay=2 --run-dir {root}/t", 2, "ema-vq needs decay in [0, 1)"),
    ("quantize --run {root}/run --k 4 --niter 1000000000000000000", 2, "Invalid value for '--niter': 1000000000000000000 is not in the range 1<=x<=2147483647"),
    ("quantize --run {root}/run --k 4 --max-points-per-centroid 4294967296", 2, "Invalid value for '--max-points-per-centroid'"),
    ("quantize --run {root}/run --k 4 --quantizer-option niter=4294967296", 2, "k-means niter must lie in [1, 2,147,483,647]"),
    # files read back: bounded JSON, plausible sizes, files of the right kind
    ("train --resume {root}/minus_step --steps 4", 1, "minus_step/checkpoint.safetensors is not a readable stvq checkpoint (step -5 is not a step of a run)"),
    ("train --resume {root}/no_moment --steps 4", 1, "no_moment/checkpoint.safetensors holds "),
    ("train --resume {root}/deep", 1, "deep/train.json is not valid JSON (nested too deeply)"),
    ("train --resume {root}/digits", 1, "digits/train.json is not valid JSON (an integer of 5,001 digits)"),
    ("train --resume {root}/infinite", 1, "infinite/train.json is not valid JSON (Infinity is not a JSON number stvq writes)"),
    ("train --resume {root}/twice", 1, "twice/train.json is not valid JSON (the key 'steps' twice in one object)"),
    ("encode --tokenizer {root}/wide {root}/red.png -o {root}/e.npy", 1, "wide/config.json: its options describe a styled too large to build"),
    ("encode --tokenizer {root}/widish {root}/red.png -o {root}/e.npy", 1, "widish/config.json describes a styled of 25,429.0 MiB of weights, and"),
    ("prior train --shards {root}/vocab_twice --run-dir {root}/p", 1, "vocab_twice/manifest.json is not valid JSON (the key 'vocab_size' twice in one object)"),
    ("prior train --shards {root}/many_shards --run-dir {root}/p", 1, "1,000,000,000 shards: outside what stvq writes"),
    ("prior train --shards {root}/npz_shard --run-dir {root}/p", 1, "npz_shard/shard_00000.npy is missing or unreadable (an .npz archive, not one .npy array)"),
    ("prior train --shards {root}/fifo_shard --run-dir {root}/p", 1, "fifo_shard/shard_00000.npy is missing or unreadable (missing, or not a regular file)"),
    ("tokenize --tokenizer {root}/tok --data shapes --max-images 4 -o {root}/fifo_shard", 0, ""),
    ("train --batch-size 1000000000 --steps 1 --run-dir {root}/t", 1, "--batch-size 1000000000: its items alone take 45,776.4 GiB, more than the"),
]


@pytest.mark.parametrize("line,status,phrase", CASES, ids=[c[0].split(" {root}/")[0] + " " + c[2][:30] for c in CASES])
def test_bad_command_line_is_one_clear_line(runner, files, line, status, phrase):
    result = runner.invoke(main, line.format(root=files).split())
    assert result.exit_code == status, result.output + result.stderr
    assert phrase.format(root=files) in result.stderr and "Traceback" not in result.output + result.stderr
    if status == 1:  # our errors: exactly one line (click's usage errors, status 2, add a usage line)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_eval_refuses_more_probe_images_than_memory_holds_before_reading_them(runner, files, monkeypatch):
    monkeypatch.setattr("stvq.data.device_memory", lambda device=None: 2**30)  # a 1-GiB machine
    result = runner.invoke(main, ["eval", "--run", str(files / "run"), "--probe-images", "1000000000", "--no-recogniser", "--no-perceptual"])
    assert result.exit_code == 1 and "1,000,000 images take 45.8 GiB, more than the 1.0 GiB of memory here; ask for fewer" in result.stderr


def test_encode_writes_exactly_the_path_it_names(runner, files, tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    result = runner.invoke(main, ["encode", "--tokenizer", str(files / "tok"), str(tmp_path / "red.png"), "-o", str(tmp_path / "nosuffix")])
    assert result.exit_code == 0 and f"-> {tmp_path / 'nosuffix'}:" in result.output
    assert np.load(tmp_path / "nosuffix").shape == (1, 36) and not (tmp_path / "nosuffix.npy").exists()


def test_a_data_name_that_is_also_a_path_is_refused_naming_both_spellings(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    result = runner.invoke(main, ["train", "--data", "photos", "--steps", "1", "--run-dir", "r"])
    assert result.exit_code == 1 and "--data photos names both the registered data set and the path ./photos; write ./photos for the path, or photos: for the data set" in result.stderr
    from stvq.data import parse_data

    assert parse_data("photos:") == ("photos", None) and parse_data("./photos") == ("folder", "./photos")


def test_bad_tensors_through_the_api_are_one_clear_error(files):
    tok = stvq.load_tokenizer(files / "tok")
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with pytest.raises(stvq.StvqError, match=r"images must lie in \[-1, 1\], got values in \[0, 25\d\]; scale 0-255 pixels"):
        tok.encode(images.add(1).mul(127.5).round())
    with pytest.raises(stvq.StvqError, match="images hold NaN or infinite values"):
        tok.encode(images.where(torch.rand_like(images) > 0.01, float("nan")))
    ids = tok.encode(images)
    with pytest.raises(stvq.StvqError, match="ids must be an integer tensor \\(int64\\), got torch.float32"):
        tok.decode(ids.float())
    with pytest.raises(stvq.StvqError, match="got torch.bool"):
        tok.decode(ids > 3)
    assert tok.decode(ids).shape == (2, 3, 64, 64)


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(runner, files, tmp_path, monkeypatch):
    import stvq.train

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(stvq.train.Trainer, "fit", interrupted)
    result = runner.invoke(main, ["train", "--resume", str(files / "run"), "--steps", "9"])
    assert result.exit_code == 130
    assert f"Interrupted; the last checkpoint (step 2) is in {files / 'run'}: continue with stvq train --resume {files / 'run'}" in result.stderr
    result = runner.invoke(main, ["train", "--run-dir", str(tmp_path / "fresh")])
    assert result.exit_code == 130 and "no checkpoint was written yet" in result.stderr


def test_a_16_bit_grey_png_keeps_its_grey_levels(tmp_path):
    levels = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16).repeat(4, 0)  # black, dark, mid, white
    Image.fromarray(levels).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    image = load_image(tmp_path / "grey16.png", 4)
    assert image.shape == (3, 4, 4) and torch.equal(image[0], image[2])  # grey in every channel
    np.testing.assert_allclose(image[0, 0].numpy(), np.array([0, 64, 128, 255]) / 127.5 - 1, atol=0.02)


def test_a_truncated_jpeg_is_skipped_mid_run_with_one_warning_and_counted(runner, files, tmp_path):
    """In training a stand-in is harmless (one warning, counted once); in tokenize, whose rows are the
    files, it would give the file another's ids: one line naming the file, from a DataLoader worker too."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.jpg", "c.png"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / name)
    whole = (folder / "b.jpg").read_bytes()
    (folder / "b.jpg").write_bytes(whole[:-300])  # the scan's verify() reads no pixels: it passes
    dataset = ImageFolderDataset(folder, 16, split="train")  # a.png is the validation split's
    assert dataset.paths == [folder / "b.jpg", folder / "c.png"] and not dataset.broken
    with pytest.warns(UserWarning, match=r"skipped unreadable image file .*b\.jpg"):
        stand_in = dataset[0]
    assert torch.equal(stand_in, dataset[1]) and dataset.broken == [folder / "b.jpg"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # counted once: no second warning for the same file
        dataset[0]
    assert pickle.loads(pickle.dumps(dataset)).paths == dataset.paths  # still picklable for DataLoader workers
    with pytest.raises(stvq.StvqError, match=r"cannot decode .*b\.jpg \(.*\): fix or remove it and run the same command again"):
        ImageFolderDataset(folder, 16, split="all")[1]
    for workers in ("0", "1"):
        result = runner.invoke(main, ["tokenize", "--tokenizer", str(files / "tok"), "--data", str(folder), "--num-workers", workers, "-o", str(tmp_path / f"ids{workers}")])
        assert result.exit_code == 1 and f"cannot decode {folder / 'b.jpg'} (" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_tokenize_resume_refuses_another_folder_or_tokenizer_with_the_same_count(runner, files, tmp_path):
    for folder, seed in (("one", 0), ("two", 1)):
        (tmp_path / folder).mkdir()
        rng = np.random.default_rng(seed)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / folder / f"{folder}{i}.png")
    out = str(tmp_path / "shards")
    assert runner.invoke(main, ["tokenize", "--tokenizer", str(files / "tok"), "--data", str(tmp_path / "one"), "-o", out]).exit_code == 0
    again = runner.invoke(main, ["tokenize", "--tokenizer", str(files / "tok"), "--data", str(tmp_path / "one"), "-o", out])
    assert again.exit_code == 0 and "(1 already there)" in again.output
    other_data = runner.invoke(main, ["tokenize", "--tokenizer", str(files / "tok"), "--data", str(tmp_path / "two"), "-o", out])
    assert other_data.exit_code == 1 and "holds shards of another tokenizer or data set (data_fingerprint differ)" in other_data.stderr
    retrained = stvq.load_tokenizer(files / "tok")
    with torch.no_grad():
        retrained.decoder.out_conv.bias.add_(0.01)
    retrained.save_pretrained(tmp_path / "tok2")
    other_weights = runner.invoke(main, ["tokenize", "--tokenizer", str(tmp_path / "tok2"), "--data", str(tmp_path / "one"), "-o", out])
    assert other_weights.exit_code == 1 and "(tokenizer_sha256 differ)" in other_weights.stderr


# ------------------------------------------------------------------------------------------- security


def test_a_run_directory_cannot_make_stvq_run_a_command(runner, files, tmp_path):
    """A train.json naming ``wds:pipe:...`` (or a URL) is refused wherever stvq reads it back; the same spec
    typed on one's own command line still reads."""
    from test_sources import write_shards

    run = tmp_path / "piped"
    shutil.copytree(files / "run", run)
    planted = tmp_path / "planted"
    fields = json.loads((run / "train.json").read_text())
    for data in (f"wds:pipe:touch {planted}; cat x.tar", "wds:https://example.com/train-{000..009}.tar"):
        (run / "train.json").write_text(json.dumps(fields | {"data": data}))
        for line in (["quantize", "--run", str(run), "--k", "4"], ["eval", "--run", str(run)], ["train", "--resume", str(run), "--steps", "3"]):
            result = runner.invoke(main, line)
            assert result.exit_code == 1 and "runs a command or opens a URL" in result.stderr and f"{run / 'train.json'} names the data" in result.stderr, (line, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output + result.stderr
            assert not planted.exists()
    shards = write_shards(tmp_path / "w", shards=1, per_shard=3).removeprefix("wds:").replace("{000..000}", "000")
    assert len(list(make_dataset(f"wds:pipe:cat {shards}", 64, "all"))) == 3  # typed by the user: as given


def test_a_yaml_alias_bomb_is_refused_before_it_expands(runner, files, tmp_path):
    levels = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = (files / "model.yaml").read_text().replace("ddconfig:\n", "ddconfig:\n" + "".join(f"      {line}\n" for line in levels), 1)
    assert "a8: &a8" in text
    (tmp_path / "bomb.yaml").write_text(text)  # under 1 kB; 10**9 values once expanded
    result = runner.invoke(main, ["compose", "vqgan", "--vqgan", str(files / "model.ckpt"), "--vqgan-config", str(tmp_path / "bomb.yaml"), "-o", str(tmp_path / "v")])
    assert result.exit_code == 1 and "ddconfig['a1'] is not a number, a short string or a list of at most 16 numbers (nested YAML aliases?)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "v").exists()


def test_a_huge_tar_member_is_skipped_unread_with_one_warning(tmp_path, monkeypatch):
    import tarfile

    from test_sources import write_shards

    import stvq_reference.sources as sources

    spec = write_shards(tmp_path / "w", shards=1, per_shard=2)
    with tarfile.open(tmp_path / "w" / "train-000.tar", "a") as tar:  # a member "of gigabytes", scaled down
        info = tarfile.TarInfo("huge.png")
        info.size = 100_000
        tar.addfile(info, io.BytesIO(bytes(100_000)))
    monkeypatch.setattr(sources, "MAX_MEMBER_BYTES", 50_000)
    with pytest.warns(UserWarning, match=r"skipped member 'huge.png' of .*train-000.tar: 100,000 bytes, over the 50,000 an image may hold"):
        images = list(make_dataset(spec.replace("{000..000}", "000"), 64, "all"))
    assert len(images) == 2


def test_a_file_name_holding_a_newline_keeps_its_warning_on_one_line(runner, files, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "bad\nname.png").write_bytes(b"not a png")
    result = runner.invoke(main, ["tokenize", "--tokenizer", str(files / "tok"), "--data", str(tmp_path), "-o", str(tmp_path / "ids")])
    assert result.exit_code == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "unreadable" in line]
    assert len(warned) == 1 and warned[0].startswith("Warning: skipped 1 unreadable image file(s)") and "bad\\nname.png" in warned[0]


def test_an_image_file_never_starts_a_program(runner, files, tmp_path, monkeypatch):
    """An EPS document named ``x.png`` (PIL's EPS reader runs the ``gs`` program found on PATH): encode, a
    folder and a webdataset shard read it as no image, in one line or one warning, and the stand-in ``gs``
    never runs. The control opens the file as plain PIL does and shows the stand-in would have run."""
    import os
    import subprocess
    import tarfile

    from PIL import EpsImagePlugin

    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\necho ran >> {marker}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # PIL looks gs up on PATH once, at first use
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "x.png", format="EPS")
    Image.new("RGB", (64, 64), "blue").save(folder / "y.png")
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for name in ("x.png", "y.png"):
            tar.add(folder / name, arcname=f"{name[0]}.png")

    done = runner.invoke(main, ["encode", "--tokenizer", str(files / "tok"), str(folder / "x.png"), "-o", str(tmp_path / "e.npy")])
    assert done.exit_code == 1 and "not an image of a format stvq reads (PNG, JPEG, WEBP, GIF, BMP, TIFF)" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    for data, out in ((str(folder), "f"), (f"wds:{tmp_path}/shard-0.tar", "w")):
        done = runner.invoke(main, ["tokenize", "--tokenizer", str(files / "tok"), "--data", data, "-o", str(tmp_path / out)])
        assert done.exit_code == 0, done.stderr
        assert np.load(tmp_path / out / "shard_00000.npy").shape == (1, 36), "the blue PNG alone"  # the EPS skipped
    assert not marker.exists(), "an image file started gs"
    with pytest.raises(subprocess.CalledProcessError), Image.open(folder / "x.png") as plain:  # the control: plain PIL runs gs
        plain.load()
    assert marker.exists(), "the stand-in gs is what plain PIL runs"


def test_a_run_directory_never_has_stvq_write_through_a_link(runner, files, tmp_path):
    """A run whose ``samples/`` or ``metrics.jsonl`` is a symbolic link to elsewhere is refused in one
    line before anything is written, and where the link points stays as it was."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_text("mine")
    for name in ("samples", "metrics.jsonl"):
        run = tmp_path / f"run-{name}"
        shutil.copytree(files / "run", run)
        if name == "samples":
            shutil.rmtree(run / name)
            (run / name).symlink_to(outside, target_is_directory=True)
        else:
            shutil.copy(run / name, outside / name)
            (run / name).unlink()
            (run / name).symlink_to(outside / name)
        before = {p.name: p.read_bytes() for p in outside.iterdir()}
        result = runner.invoke(main, ["train", "--resume", str(run), "--steps", "4", "--no-progress"])
        assert result.exit_code == 1 and f"{run / name} is a symbolic link inside {run}; stvq does not write through links" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


def test_a_writer_removes_only_its_own_temporary_files(runner, files, tmp_path):
    """Files of the user's whose names look temporary stay; what a killed writer left (a ``.stvq-tmp*``
    directory) goes, in a tokenize output and a compose output alike."""
    out = tmp_path / "d"
    (out / "notes" / "sub").mkdir(parents=True)
    users = {out / ".tmpwork_plan.md": "p", out / "notes" / ".tmplate.txt": "t", out / "notes" / "sub" / ".draft.tmp2": "v", out / ".a.npy.tmp123": "w"}
    for path, text in users.items():
        path.write_text(text)
    (out / ".stvq-tmpk1ll3d").mkdir()
    (out / ".stvq-tmpk1ll3d" / "shard_00000.npy").write_bytes(b"torn")
    result = runner.invoke(main, ["tokenize", "--tokenizer", str(files / "tok"), "--data", "shapes", "--max-images", "4", "-o", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    assert all(path.read_text() == text for path, text in users.items()) and not (out / ".stvq-tmpk1ll3d").exists()
    composed = tmp_path / "c"
    (composed / ".stvq-tmpk1ll3d").mkdir(parents=True)
    (composed / ".tmpnotes").write_text("mine")
    result = runner.invoke(main, ["compose", "styled", "--part", f"styled={files / 'tok'}", "-o", str(composed)])
    assert result.exit_code == 0, result.output + result.stderr
    assert not (composed / ".stvq-tmpk1ll3d").exists() and (composed / ".tmpnotes").read_text() == "mine"


def test_a_full_disk_changes_nothing_and_says_where_in_one_line(runner, files, tmp_path, monkeypatch):
    """decode over 40 older PNGs, prior-sample-like groups and a training checkpoint: the disk fills
    midway, the command says which path and that nothing was changed, and every older file is as it was."""
    import errno

    import stvq.checkpoint

    out = tmp_path / "decoded"
    np.save(tmp_path / "ids.npy", np.arange(40 * 36).reshape(40, 36) % 512)
    assert runner.invoke(main, ["decode", "--tokenizer", str(files / "tok"), str(tmp_path / "ids.npy"), "-o", str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len([name for name in before if name.endswith(".png")]) == 40
    np.save(tmp_path / "other.npy", (np.arange(40 * 36).reshape(40, 36) * 7) % 512)
    saves = {"n": 0}
    original = Image.Image.save

    def save(self, fp, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    result = runner.invoke(main, ["decode", "--tokenizer", str(files / "tok"), str(tmp_path / "other.npy"), "-o", str(out)])
    assert result.exit_code == 1 and f"cannot write {out}: No space left on device" in result.stderr and "nothing there was changed" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the 40 older images are whole and unchanged"
    monkeypatch.setattr(Image.Image, "save", original)

    run = tmp_path / "run"
    shutil.copytree(files / "run", run)
    checkpoint = (run / "checkpoint.safetensors").read_bytes()

    def full(*args, **kwargs):  # what the safetensors library raises on a full disk
        raise Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(stvq.checkpoint, "save_file", full)
    result = runner.invoke(main, ["train", "--resume", str(run), "--steps", "4", "--no-progress"])
    assert result.exit_code == 1 and f"cannot write {run / 'checkpoint.safetensors'}: No space left on device" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and (run / "checkpoint.safetensors").read_bytes() == checkpoint
    assert not list(run.rglob(".stvq-tmp*"))


def test_two_writers_of_one_output_directory_and_a_long_output_name(runner, files, tmp_path):
    """A second decode (or prior sample, compose) into a directory being written stops with one line; a
    250-byte file name is written as named (the temporary name is no longer longer than the name)."""
    from stvq.checkpoint import run_lock

    np.save(tmp_path / "ids.npy", np.zeros((2, 36), dtype=np.int64))
    with run_lock(tmp_path / "out", tree=False):
        result = runner.invoke(main, ["decode", "--tokenizer", str(files / "tok"), str(tmp_path / "ids.npy"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "is being written by another stvq process" in result.stderr
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    name = tmp_path / ("a" * 246 + ".npy")
    result = runner.invoke(main, ["encode", "--tokenizer", str(files / "tok"), str(tmp_path / "red.png"), "-o", str(name)])
    assert result.exit_code == 0, result.stderr
    assert np.load(name).shape == (1, 36)


def test_staged_files_replace_their_namesakes_together_or_not_at_all(tmp_path):
    """The group write under prior sample, compose and decode: a failure after some files are written
    leaves every older file; success replaces all and leaves no temporary directory."""
    from stvq.checkpoint import staged

    for name in ("ids.npy", "samples.png"):
        (tmp_path / name).write_text("old")
    with pytest.raises(RuntimeError), staged(tmp_path) as tmp:
        (tmp / "ids.npy").write_text("new")
        raise RuntimeError("the decoder failed")
    assert [(tmp_path / n).read_text() for n in ("ids.npy", "samples.png")] == ["old", "old"]
    with staged(tmp_path) as tmp:
        for name in ("ids.npy", "samples.png"):
            (tmp / name).write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.npy", "samples.png"]
    assert [(tmp_path / n).read_text() for n in ("ids.npy", "samples.png")] == ["new", "new"]


@pytest.mark.parametrize(
    "env,phrase",
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number from 1 to 1,048,576; unset it, or start the command with torchrun"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not a whole number from 1"),
        ({"LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE='0' is not a whole number from 1"),
        ({"LOCAL_WORLD_SIZE": "abc"}, "LOCAL_WORLD_SIZE='abc' is not a whole number from 1"),
        ({"STVQ_PEAK_TFLOPS": "1e999"}, "STVQ_PEAK_TFLOPS='1e999' must be a finite positive number of TFLOP/s"),
    ],
)
def test_a_bad_environment_variable_is_one_line_naming_it(runner, files, tmp_path, env, phrase):
    """torchrun's variables set by hand or wrongly, and stvq's own, before a process waits for peers that
    never come or writes a summary that is not JSON."""
    args = ["train", "--steps", "2", "--eval-every", "2", "--set", "width=32", "--set", "heads=2", "--set", "encoder_layers=1", "--set", "plain_layers=1", "--run-dir", str(tmp_path / "t")]
    if "LOCAL" in next(iter(env)):
        args = ["tokenize", "--tokenizer", str(files / "tok"), "--data", "shapes", "--max-images", "2", "-o", str(tmp_path / "z")]
    result = runner.invoke(main, args, env=env)
    assert result.exit_code == 1 and phrase in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_world_size_set_without_torchrun_is_one_line_not_a_wait(files, tmp_path):
    """``WORLD_SIZE=2`` by hand: the process group would wait for a peer that never comes."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} | {"WORLD_SIZE": "2"}
    script = "import sys; from stvq.cli import main; main(sys.argv[1:], prog_name='stvq')"
    args = ["tokenize", "--tokenizer", str(files / "tok"), "--data", "shapes", "--max-images", "2", "-o", str(tmp_path / "z")]
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "WORLD_SIZE=2 but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set: start the command with torchrun" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_run_started_again_after_a_kill_before_its_first_checkpoint_logs_afresh(runner, files, tmp_path):
    """The message of a run killed before its first checkpoint says to start it again: the same command
    into the same directory then logs steps 1, 2, ... once, not after the dead run's rows."""
    run = tmp_path / "again"
    shutil.copytree(files / "run", run)
    (run / "checkpoint.safetensors").unlink()  # killed before its first checkpoint
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    args = ["train", "--steps", "2", "--eval-every", "2", "--log-every", "1", "--checkpoint-every", "2", "--batch-size", "2", "--no-progress"]
    result = runner.invoke(main, [*args, *(f"--set={k}={v}" for k, v in SMALL.items()), "--run-dir", str(run)])
    assert result.exit_code == 0, result.output + result.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]
    assert steps == [1, 2] and 9.0 not in [json.loads(line).get("loss") for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_cache_that_fails_its_checks_is_built_again_with_one_warning(runner, files, tmp_path, monkeypatch):
    """The recogniser's cached weights and accuracy (torn, a list, a tensor of the wrong shape, NaN) and the
    codes `stvq quantize` caches (NaN, which faiss would abort on) are computed again, with one warning;
    a cache directory that is a file is said before minutes of training."""
    from stvq_reference.shapes.recogniser import FactorRecogniser, _cached, trained_recogniser

    weights, report = tmp_path / "r.safetensors", tmp_path / "r.json"
    good = FactorRecogniser().state_dict()
    name = next(iter(good))
    for state, accuracy in (
        (None, '{"shape_accuracy": 0.9}'),  # torn weights
        (good, "[0.9]"),  # a list
        (good | {name: torch.zeros(3)}, '{"shape_accuracy": 0.9}'),  # the wrong shape
        (good | {name: torch.full_like(good[name], float("nan"))}, '{"shape_accuracy": 0.9}'),  # NaN
        (good, '{"shape_accuracy": 9}'),  # not an accuracy
    ):
        if state is None:
            weights.write_bytes(b"torn")
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, weights)
        report.write_text(accuracy)
        with pytest.warns(UserWarning, match="the cached recogniser is unusable .*; training it again"):
            assert _cached(weights, report) is None
    save_file({k: v.contiguous() for k, v in good.items()}, weights)
    report.write_text('{"shape_accuracy": 0.9}')
    assert _cached(weights, report).accuracy == {"shape_accuracy": 0.9}
    (tmp_path / "cache-file").write_text("")
    with pytest.raises(stvq.StvqError, match="the cache directory .*cache-file is a file; point STVQ_CACHE at a directory"):
        trained_recogniser(cache=tmp_path / "cache-file")

    run = tmp_path / "run"
    shutil.copytree(files / "run", run)
    assert runner.invoke(main, ["quantize", "--run", str(run), "--k", "4", "--max-images", "16"]).exit_code == 0
    (codes,) = (run / "codes").glob("*.safetensors")
    save_file({"codes": torch.full((16, 36, 16), float("nan"))}, codes)
    result = runner.invoke(main, ["quantize", "--run", str(run), "--k", "4", "--max-images", "16"])
    assert result.exit_code == 0 and "the cached codes are unusable" in result.stderr and "holds NaN or infinite codes); encoding the images again" in result.stderr, result.stderr
    assert json.loads((run / "quantize.json").read_text())["codes_from_cache"] is False


@pytest.mark.slow
def test_under_torchrun_an_error_is_said_once(files, tmp_path):
    """Every rank raises the problem any rank met (so none waits in a collective); rank 0 alone says it,
    and every rank ends with its exit status."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "stvq.cli", "tokenize", "--tokenizer", str(files / "tok")]
    done = subprocess.run([*cmd, "--data", str(tmp_path / "nothing"), "-o", str(tmp_path / "z")], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1
    said = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(said) == 1 and "nothing does not exist" in said[0], done.stderr


def test_compared_runs_of_one_name_keep_their_own_rows_and_a_newline_stays_on_one_line(runner, files, tmp_path):
    for parent in ("a", "b"):
        shutil.copytree(files / "run", tmp_path / parent / "run")
    args = ["--images", "4", "--prefix-images", "4", "--probe-images", "8", "--no-recogniser", "--no-perceptual"]
    result = runner.invoke(main, ["eval", "--compare", str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), *args, "-o", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output + result.stderr
    assert sorted(json.loads((tmp_path / "cmp" / "compare.json").read_text())) == ["a/run", "b/run"]
    result = runner.invoke(main, ["eval", "--compare", str(tmp_path / "a" / "run"), str(tmp_path / "a" / "run") + "/", *args])
    assert result.exit_code == 1 and "is named twice; compare different runs" in result.stderr
    result = runner.invoke(main, ["encode", "--tokenizer", str(files / "tok"), str(tmp_path / "a\nb.png"), "-o", str(tmp_path / "e.npy")])
    assert result.exit_code == 1 and result.stderr.strip().endswith("a\\nb.png") and len(result.stderr.strip().splitlines()) == 1
