"""Shared fixtures: small configs and a CLI runner that keeps stdout and stderr apart."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one intra-op thread a worker, its subprocesses included,
    os.environ["OMP_NUM_THREADS"] = "1"  # so that N workers on N cores do not oversubscribe them

import pytest
import torch
from click.testing import CliRunner

import stvq
from stvq.compose import tokenize_dataset
from stvq.data import make_dataset

collect_ignore = ["plugin_pkg"]  # the example package's own tests run installed, in test_plugin_packages.py


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """A tiny styled tokenizer (FSQ, 64 ids) and 240 shapes images tokenized into shards of 100."""
    root = tmp_path_factory.mktemp("prior")
    torch.manual_seed(0)
    tok = stvq.create("tokenizer", "styled", preset="tiny", width=32, heads=2, quantizer={"name": "fsq", "levels": [4, 4, 4]})
    tok.save_pretrained(root / "tok")
    tok = stvq.load_tokenizer(root / "tok")
    data = torch.utils.data.Subset(make_dataset("shapes", 64, "train"), range(240))
    tokenize_dataset(tok, data, root / "shards", shard_size=100, progress=False, data_fingerprint="shapes:240", tokenizer_dir=root / "tok")
    return root


@pytest.fixture(autouse=True, scope="session")
def _empty_torch_hub(tmp_path_factory):
    """torch's hub cache is an empty folder for every test and the processes it starts, so that no figure
    depends on the weights this machine happens to hold (rFID and LPIPS are reported where they are cached)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
        yield


@pytest.fixture(autouse=True, scope="session")
def _quick_recogniser(tmp_path_factory):
    """`stvq eval` and `--train recognise=true` read reconstructions with the factor recogniser, trained once
    (about 6 CPU-minutes) and cached under $STVQ_CACHE. The suite trains quick ones instead, in its own
    cache: 64 px up front for subprocesses (200 images, 50 steps of 64: the background read right, x within
    0.14), any other size on first use (64 images, 5 steps of 16: it only has to run)."""
    from functools import partial

    from stvq_reference.shapes import recogniser

    cache = tmp_path_factory.mktemp("stvq-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STVQ_CACHE", str(cache))
        patch.setattr(recogniser, "train_recogniser", partial(recogniser.train_recogniser, images=64, steps=5, batch_size=16))
        recogniser.trained_recogniser(64, images=200, steps=50, batch_size=64)
        yield
