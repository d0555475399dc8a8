"""Data sources at scale: the dataset plugin kind, webdataset shards (streamed, with exact resume of
training over them), Hugging Face datasets on disk, DataLoader workers, and tokenize / quantize / eval
under torchrun giving the same ids as one process."""

import io
import json
import os
import subprocess
import sys
import tarfile
import warnings
from collections.abc import Collection
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import stvq
from stvq.cli import main
from stvq.config import TrainConfig
from stvq.data import make_dataset, parse_data
from stvq.images import to_uint8
from stvq.prior import TokenShards
from stvq.streams import StreamBatches, StreamState, loader
from stvq.train import Trainer
from stvq_reference.config import make_config

SMALL = {"width": 32, "heads": 2, "encoder_layers": 1, "plain_layers": 1, "patch_size": 8}


def write_shards(root: Path, shards: int = 4, per_shard: int = 10, corrupt: Collection[tuple[int, int]] = ()) -> str:
    """``shards`` tar files of shapes images (PNG and JPEG members alternating); each (shard, member) of
    ``corrupt`` gets bytes no codec reads. Returns the ``wds:`` spec."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    images = make_dataset("shapes", 64, "train")
    for s in range(shards):
        with wds.TarWriter(str(root / f"train-{s:03d}.tar")) as writer:
            for i in range(per_shard):
                ext = "png" if i % 2 else "jpg"
                buf = io.BytesIO()
                Image.fromarray(to_uint8(images[s * per_shard + i])).save(buf, format="PNG" if ext == "png" else "JPEG", quality=95)
                data = b"\xff\xd8 not a jpeg" if (s, i) in corrupt else buf.getvalue()
                writer.write({"__key__": f"s{s:03d}_{i:04d}", ext: data})
    return f"wds:{root}/train-{{000..{shards - 1:03d}}}.tar"


def write_hf(root: Path, count: int = 40) -> str:
    import datasets

    images = make_dataset("shapes", 64, "train")
    rows = {"image": [Image.fromarray(to_uint8(images[i])) for i in range(count)], "label": list(range(count))}
    datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})).save_to_disk(str(root))
    return f"hf:{root}"


def small_config(data: str, **fields) -> TrainConfig:
    base = dict(preset="tiny", model=SMALL, data=data, steps=12, batch_size=4, lr=3e-3, warmup_steps=2, log_every=1, eval_every=12, checkpoint_every=5)
    return TrainConfig(**(base | fields))


def losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def assert_resume_is_exact(cfg: TrainConfig, tmp_path: Path, monkeypatch, stop: int, checkpoint: int) -> None:
    """A run interrupted in step ``stop`` and resumed from its checkpoint at ``checkpoint`` logs the losses
    of an uninterrupted one (tmp_path/reference, tmp_path/killed)."""
    Trainer(cfg, tmp_path / "reference", progress=False).fit()
    real_step = Trainer.step

    def interrupted(self, net, batch, step):
        if step == stop:
            raise KeyboardInterrupt
        return real_step(self, net, batch, step)

    monkeypatch.setattr(Trainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "killed", progress=False).fit()
    monkeypatch.setattr(Trainer, "step", real_step)
    assert Trainer(cfg, tmp_path / "killed", resume=True, progress=False).fit()["resumed_from"] == checkpoint
    ours, theirs = losses(tmp_path / "killed"), losses(tmp_path / "reference")
    assert sorted(ours) == list(range(1, cfg.steps + 1))  # lines logged after the checkpoint were replaced
    for step in range(1, cfg.steps + 1):
        assert ours[step] == pytest.approx(theirs[step], rel=1e-5, abs=1e-6), step


# ----------------------------------------------------------------------------------- the plugin kind


def test_data_sources_are_plugins_and_data_strings_keep_their_spellings(tmp_path):
    assert stvq.list_plugins("dataset")["dataset"] == ["folder", "hf", "photos", "shapes", "shapes-upright", "wds"]
    assert parse_data("shapes") == ("shapes", None) and parse_data("photos") == ("photos", None) and parse_data("shapes-upright") == ("shapes-upright", None)
    assert parse_data("wds:a/train-{000..009}.tar") == ("wds", "a/train-{000..009}.tar")
    assert parse_data("hf:some/dir:validation") == ("hf", "some/dir:validation")
    assert parse_data(str(tmp_path)) == ("folder", str(tmp_path))
    assert parse_data("odd:name") == ("folder", "odd:name")  # no plugin 'odd': a folder path


def test_a_source_that_is_neither_indexed_images_nor_a_stream_is_refused(monkeypatch):
    from stvq.plugins import PluginInfo, plugin_table

    def plain(image_size, split, seed):
        return torch.utils.data.TensorDataset(torch.zeros(4, 3, image_size, image_size))

    monkeypatch.setitem(plugin_table()["dataset"], "plain", PluginInfo("dataset", "plain", plain, "test", "0", "test"))
    with pytest.raises(stvq.StvqError, match="dataset .plain. of package .test. returned a TensorDataset, not an stvq.interfaces.ImageDataset or stvq.interfaces.ImageStream; fix the plugin"):
        make_dataset("plain", 64)


# --------------------------------------------------------------------------------------- webdataset


def test_wds_reads_members_in_order_skips_without_decoding_and_keeps_the_last_shard_for_validation(tmp_path):
    spec = write_shards(tmp_path / "w")
    train, every = make_dataset(spec, 64, "train"), make_dataset(spec, 64, "all")
    assert [Path(p).name for p in train.pieces()] == ["train-000.tar", "train-001.tar", "train-002.tar"]
    assert len(every.pieces()) == 4
    images = list(every)
    shapes = make_dataset("shapes", 64, "train")
    assert len(images) == 40 and images[0].shape == (3, 64, 64)
    assert torch.allclose(images[1], shapes[1], atol=1 / 127)  # PNG: exact up to 8 bits
    assert (images[0] - shapes[0]).abs().mean() < 0.05  # JPEG: close
    tail = list(every.read(every.pieces()[1], skip=7))
    assert [(m, k) for m, k, _ in tail] == [(7, "s001_0007"), (8, "s001_0008"), (9, "s001_0009")]
    assert torch.equal(tail[0][2], images[17])
    val = make_dataset(spec, 64, "val")
    assert len(val) == 10 and torch.equal(val[0], images[30])


def test_a_corrupt_tar_member_is_skipped_and_counted(tmp_path, runner):
    spec = write_shards(tmp_path / "w", corrupt={(2, 4)})
    tok = stvq.create("tokenizer", "styled", config=make_config("tiny", **SMALL), quantizer={"name": "fsq", "levels": [4, 4, 4]})
    tok.save_pretrained(tmp_path / "tok")
    result = runner.invoke(main, ["tokenize", "--tokenizer", str(tmp_path / "tok"), "--data", spec, "-o", str(tmp_path / "ids"), "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    assert "Warning: skipped unreadable member s002_0004 of" in result.stderr
    assert "39 images -> 4 shard(s)" in result.output and "1 unreadable member(s) skipped" in result.output
    manifest = json.loads((tmp_path / "ids" / "manifest.json").read_text())
    assert manifest["unreadable"] == 1 and manifest["shard_rows"] == [10, 10, 9, 10]
    keys = json.loads((tmp_path / "ids" / "shard_00002.keys.json").read_text())
    assert "s002_0004" not in keys["keys"] and len(keys["keys"]) == 9 and keys["unreadable"] == 1
    assert len(TokenShards(tmp_path / "ids")) == 39


def test_stream_batches_resumed_at_any_step_continue_the_uninterrupted_sequence(tmp_path):
    spec = write_shards(tmp_path / "w", shards=5, per_shard=7)
    stream = make_dataset(spec, 64, "all")

    def run(first_step: int, state: StreamState) -> tuple[list[torch.Tensor], np.ndarray]:
        reader = StreamBatches(stream, 3, seed=1, rank=0, world=1, readers=2, first_step=first_step, positions=state.positions, stop_step=16)
        out, saved = [], None
        for step, batch in enumerate(loader(reader, 2, batch_size=None), start=first_step):  # each worker stops at step 16
            out.append(state.take(batch))
            if step == 8:  # batch 8 consumed: what a checkpoint at step 9 records
                saved = state.positions.copy()
        return out, saved

    whole, saved = run(0, StreamState(2))  # 16 batches of 3 from 35 images: into epoch 2
    resumed, _ = run(9, StreamState(2, saved))  # an odd step: the workers swap readers
    assert len(whole) == 16 and len(resumed) == 7
    assert all(torch.equal(a, b) for a, b in zip(whole[9:], resumed))
    assert not torch.equal(whole[0], whole[1])


@pytest.mark.slow
def test_training_on_wds_shards_resumes_exactly_with_workers(tmp_path, monkeypatch):
    spec = write_shards(tmp_path / "w", shards=5, per_shard=8)
    cfg = small_config(spec, num_workers=2)
    assert_resume_is_exact(cfg, tmp_path, monkeypatch, stop=7, checkpoint=5)  # resumed at an odd step: readers swap

    result = CliRunner().invoke(main, ["eval", str(tmp_path / "killed"), "--images", "8", "--prefix-images", "4", "--no-perceptual"])
    assert result.exit_code == 0, result.output  # the validation images of the last shard, the mean of the stream's first
    assert json.loads((tmp_path / "killed" / "eval.json").read_text())["images"] == 8

    stage2 = small_config(spec, stage=2, from_run=str(tmp_path / "killed"), quantizer={"name": "fsq", "levels": [4, 4, 4]}, steps=2, num_workers=2)
    summary = Trainer(stage2, tmp_path / "stage2", progress=False).fit()
    assert summary["cached_codes"] is None and np.isfinite(summary["val_psnr"])  # a stream has no cached codes by index

    other = small_config(spec, num_workers=1, steps=14)
    with pytest.raises(stvq.StvqError, match=r"read its stream with 1 process\(es\) x 2 reader\(s\); resume it with the same"):
        Trainer(other, tmp_path / "killed", resume=True, progress=False).fit()


def test_quantize_samples_a_streams_first_images_whatever_the_workers(tmp_path):
    from stvq.quantize import encode_dataset

    spec = write_shards(tmp_path / "w", shards=5, per_shard=6, corrupt={(1, 2)})
    stream = make_dataset(spec, 64, "all")
    model = stvq.create("tokenizer", "styled", config=make_config("tiny", **SMALL)).eval()
    first = torch.stack([image for image, _ in zip(stream, range(17))])  # 17 readable images: into the third shard
    with torch.no_grad():
        expected = model.encode_codes(first)
    for workers in (0, 2, 3):
        codes = encode_dataset(model, stream, 17, batch_size=4, progress=False, num_workers=workers)
        torch.testing.assert_close(codes, expected, rtol=1e-5, atol=1e-5)
    assert len(encode_dataset(model, stream, 1000, batch_size=4, progress=False)) == 29  # the whole stream, one member unreadable


def test_bad_stream_input_is_one_line(tmp_path, runner, capfd):
    spec = write_shards(tmp_path / "w", shards=2, per_shard=4)
    cases = [
        (["train", "--data", f"wds:{tmp_path}/none-{{0..3}}.tar", "--steps", "1"], "no shard file"),
        (["train", "--data", spec, "--num-workers", "3", "--steps", "1", "--run", str(tmp_path / "r")], "too few for 1 process(es) x 3 reader(s)"),
        (["tokenize", "--tokenizer", str(tmp_path / "tok"), "--data", spec, "--max-images", "3", "-o", str(tmp_path / "o")], "is a stream and is tokenized whole"),
        (["train", "--data", f"hf:{tmp_path}/missing", "--steps", "1"], "does not exist"),
        (["train", "--data", f"wds:{tmp_path}/w/train-{{000..002}}.tar", "--steps", "1"], "train-002.tar, the last shard of wds:"),
        (["train", "--data", f"hf:{tmp_path}/pq", "--steps", "1"], "cannot load it as a Hugging Face dataset (ArrowInvalid: Parquet magic bytes not found"),
    ]
    with tarfile.open(tmp_path / "w" / "train-002.tar", "w"):
        pass  # an empty last shard: no validation images
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "train-0.parquet").write_bytes(bytes(range(256)) * 20)  # datasets logs this one before it raises
    stvq.create("tokenizer", "styled", config=make_config("tiny", **SMALL), quantizer={"name": "fsq", "levels": [4, 4, 4]}).save_pretrained(tmp_path / "tok")
    for args, message in cases:
        result = runner.invoke(main, args)
        assert result.exit_code != 0 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert capfd.readouterr().err == ""  # nor a library's log line past click's streams


# ------------------------------------------------------------------------------------- Hugging Face


def test_hf_dataset_on_disk_trains_resumes_and_tokenizes(tmp_path, runner, monkeypatch):
    spec = write_hf(tmp_path / "hf")
    train, val, every = (make_dataset(spec, 64, split) for split in ("train", "val", "all"))
    assert (len(train), len(val), len(every)) == (38, 2, 40)
    assert torch.allclose(every[3], make_dataset("shapes", 64, "train")[3], atol=1 / 127)
    assert_resume_is_exact(small_config(spec, steps=6, checkpoint_every=3, num_workers=1), tmp_path, monkeypatch, stop=4, checkpoint=3)
    tok = stvq.create("tokenizer", "styled", config=make_config("tiny", **SMALL), quantizer={"name": "fsq", "levels": [4, 4, 4]})
    tok.save_pretrained(tmp_path / "tok")
    result = runner.invoke(main, ["tokenize", "--tokenizer", str(tmp_path / "tok"), "--data", spec, "-o", str(tmp_path / "ids"), "--shard-size", "16"])
    assert result.exit_code == 0 and "40 images -> 3 shard(s)" in result.output, result.output
    assert torch.equal(TokenShards(tmp_path / "ids")[5], tok.encode(every[5][None])[0])


def test_hf_reads_parquet_and_imagefolder_directories_offline(tmp_path, monkeypatch):
    import socket

    import datasets

    write_hf(tmp_path / "saved", 30)
    (tmp_path / "parquet").mkdir()
    datasets.load_from_disk(str(tmp_path / "saved")).to_parquet(str(tmp_path / "parquet" / "train-00000.parquet"))
    (tmp_path / "folder" / "train").mkdir(parents=True)
    shapes = make_dataset("shapes", 64, "train")
    for i in range(25):
        Image.fromarray(to_uint8(shapes[i])).save(tmp_path / "folder" / "train" / f"{i:03d}.png")

    def no_network(*args, **kwargs):
        raise AssertionError("hf: tried to reach the network")

    before = (datasets.config.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    parquet, folder = make_dataset(f"hf:{tmp_path / 'parquet'}", 64, "all"), make_dataset(f"hf:{tmp_path / 'folder'}", 64, "all")
    assert (len(parquet), len(folder)) == (30, 25)
    assert torch.allclose(parquet[7], shapes[7], atol=1 / 127) and torch.allclose(folder[7], shapes[7], atol=1 / 127)
    assert (datasets.config.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")) == before  # offline for the call only


def test_an_hf_row_that_does_not_decode_is_skipped_with_one_warning_and_counted(tmp_path, runner):
    import datasets

    images = make_dataset("shapes", 64, "train")
    good = [{"bytes": _png(images[i]), "path": None} for i in range(3)]
    rows = {"image": [good[0], {"bytes": b"\x89PNG not really", "path": None}, good[1], good[2]]}
    datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image()})).save_to_disk(str(tmp_path / "h"))
    with pytest.raises(stvq.StvqError, match=r"cannot decode the image in row 1 of hf:.*: fix or drop the row"):
        make_dataset(f"hf:{tmp_path / 'h'}", 64, "all")[1]  # tokenize's rows are the data's: no stand-in
    data = make_dataset(f"hf:{tmp_path / 'h'}", 64, "train")  # no validation split: every 20th row is its, row 0
    with pytest.warns(
        UserWarning, match=r"skipped undecodable image in row 1 of hf:.*/h \(not an image of a format stvq reads \(PNG, JPEG, WEBP, GIF, BMP, TIFF\)\); the next row stands in"
    ) as caught:
        read = [data[i] for i in range(3)]  # rows 1, 2, 3
    assert len([w for w in caught if "undecodable" in str(w.message)]) == 1 and "BytesIO" not in str(caught[0].message)
    assert torch.equal(read[0], read[1]) and data.broken == [1]


def test_unreadable_members_cost_a_line_a_shard_and_a_source_with_none_is_one_error(tmp_path, runner):
    import datasets

    spec = write_shards(tmp_path / "w", shards=2, per_shard=4, corrupt={(0, 1), (0, 2), *((1, i) for i in range(4))})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(list(make_dataset(spec, 64, "all"))) == 2
    assert [str(w.message).split(" (")[0] for w in caught] == [f"skipped unreadable member s00{s}_000{i} of {tmp_path}/w/train-00{s}.tar" for s, i in ((0, 1), (1, 0))]
    result = runner.invoke(main, ["train", "--data", spec, "--steps", "1", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"train-001.tar, the last shard of {spec}, holds no readable image (its first member, s001_0000: not an image of a format" in result.stderr

    rows = {"image": [{"bytes": b"\x89PNG not really", "path": None}] * 3}
    datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image()})).save_to_disk(str(tmp_path / "h"))
    result = runner.invoke(main, ["train", "--data", f"hf:{tmp_path / 'h'}", "--steps", "1", "--run-dir", str(tmp_path / "run-hf")])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"none of the 1 val row(s) of hf:{tmp_path / 'h'} decodes (row 0: not an image of a format" in result.stderr  # every 20th row validates


def _png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- torchrun


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "stvq.cli", *args]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_torchrun_quantize_tokenize_and_eval_match_one_process(tmp_path, runner):
    folder = tmp_path / "images"
    folder.mkdir()
    shapes = make_dataset("shapes", 64, "train")
    for i in range(90):
        Image.fromarray(to_uint8(shapes[i])).save(folder / f"{i:03d}.jpg", quality=95)
    spec = write_shards(tmp_path / "w", shards=3, per_shard=10)
    run = tmp_path / "s1"
    Trainer(TrainConfig(preset="tiny", model=SMALL, steps=2, batch_size=4, eval_every=2, data=str(folder)), run, progress=False).fit()
    import shutil

    shutil.copytree(run, tmp_path / "s1-two")
    args = ["--k", "32", "--max-images", "80", "--num-workers", "1"]
    assert runner.invoke(main, ["quantize", "--run", str(run), *args]).exit_code == 0
    torchrun("quantize", "--run-dir", str(tmp_path / "s1-two"), *args)
    one, two = stvq.load_tokenizer(run), stvq.load_tokenizer(tmp_path / "s1-two")
    assert torch.equal(one.quantizer.codebook, two.quantizer.codebook)

    torchrun("quantize", "--run-dir", str(tmp_path / "s1-two"), "--data", spec, *args[:2], "--max-images", "25", "--num-workers", "1")
    assert runner.invoke(main, ["quantize", "--run", str(run), "--data", spec, *args[:2], "--max-images", "25", "--num-workers", "2"]).exit_code == 0
    one, two = stvq.load_tokenizer(run), stvq.load_tokenizer(tmp_path / "s1-two")
    assert torch.equal(one.quantizer.codebook, two.quantizer.codebook)  # a stream's first 25 images, any processes or workers

    for name, data in (("folder", str(folder)), ("wds", spec)):
        tokenize = ["tokenize", "--tokenizer", str(run), "--data", data, "--shard-size", "16", "--num-workers", "1"]
        assert runner.invoke(main, [*tokenize, "-o", str(tmp_path / f"{name}-one")]).exit_code == 0
        torchrun(*tokenize, "-o", str(tmp_path / f"{name}-two"))
        a, b = TokenShards(tmp_path / f"{name}-one"), TokenShards(tmp_path / f"{name}-two")
        assert len(a) == len(b) == (90 if name == "folder" else 30)
        assert torch.equal(a.rows(0, len(a)), b.rows(0, len(b))), name
        assert json.loads((tmp_path / f"{name}-two" / "manifest.json").read_text())["shard_rows"] == a.manifest["shard_rows"]

    evaluate = ["eval", str(run), "--images", "24", "--prefix-images", "8", "--no-perceptual", "--num-workers", "1"]
    assert runner.invoke(main, evaluate).exit_code == 0
    alone = json.loads((run / "eval.json").read_text())
    torchrun(*evaluate)
    shared = json.loads((run / "eval.json").read_text())
    assert shared["reconstruction"] == pytest.approx(alone["reconstruction"], rel=1e-5)
    assert shared["prefix"]["prefix_psnr"] == pytest.approx(alone["prefix"]["prefix_psnr"], rel=1e-5)

    two = tmp_path / "folder-two"  # resume under torchrun: a missing and a truncated shard are written again
    (two / "shard_00003.npy").unlink()
    (two / "shard_00001.npy").write_bytes((two / "shard_00001.npy").read_bytes()[:90])
    again = torchrun("tokenize", "--tokenizer", str(run), "--data", str(folder), "--shard-size", "16", "--num-workers", "1", "-o", str(two))
    assert "90 images -> 6 shard(s)" in again.stdout and "(4 already there)" in again.stdout
    assert torch.equal(TokenShards(two).rows(0, 90), TokenShards(tmp_path / "folder-one").rows(0, 90))


def test_an_empty_or_foreign_shard_among_good_ones_is_passed_over(tmp_path):
    spec = write_shards(tmp_path / "w", shards=3, per_shard=2)
    middle = tmp_path / "w" / "train-001.tar"
    with tarfile.open(middle, "w"):
        pass  # empty: nothing to read, nothing to warn about
    assert len(list(make_dataset(spec, 64, "all"))) == 4
    middle.write_bytes(b"not a tar file" * 50)
    with pytest.warns(UserWarning, match="train-001.tar is not a readable tar file"):
        assert len(list(make_dataset(spec, 64, "all"))) == 4
