"""Every extension point is documented, listed in README and implemented; every registered encoder and
decoder keeps the interface's shape contract (datasette's hook test, run over the registry)."""

import inspect
from pathlib import Path

import pytest
import torch

import stvq
from stvq import hookspecs

README = (Path(__file__).parents[1] / "README.md").read_text()


@pytest.mark.parametrize("kind", stvq.KINDS)
def test_every_hook_is_documented_listed_and_implemented(kind):
    hook = getattr(hookspecs, f"register_{kind}s")
    doc = inspect.getdoc(hook)
    assert doc and "register('" in doc.splitlines()[0], f"register_{kind}s needs a one-line docstring with a call"
    assert f"register_{kind}s" in README
    assert stvq.list_plugins(kind)[kind], f"no installed plugin implements register_{kind}s"


@pytest.mark.parametrize("name", stvq.list_plugins("encoder")["encoder"])
def test_every_encoder_maps_images_to_codes(name):
    encoder = stvq.create("encoder", name, preset="tiny").eval()
    with torch.no_grad():
        codes = encoder(torch.rand(2, 3, encoder.image_size, encoder.image_size) * 2 - 1)
    assert codes.shape == (2, encoder.num_tokens, encoder.code_dim)


@pytest.mark.parametrize("name", stvq.list_plugins("decoder")["decoder"])
def test_every_decoder_maps_codes_to_images(name):
    decoder = stvq.create("decoder", name, preset="tiny").eval()
    with torch.no_grad():
        images = decoder(torch.randn(2, decoder.num_tokens, decoder.code_dim))
    assert images.shape == (2, 3, decoder.image_size, decoder.image_size)
