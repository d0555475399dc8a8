"""Every extension point is documented, listed in README and implemented; every registered encoder and
decoder keeps the interface's shape contract (datasette's hook test, run over the registry)."""

import inspect
from pathlib import Path

import pytest
import torch

import stvq
from stvq import hookspecs, registry
from stvq.config import make_config
from stvq.interfaces import CodeTokenizer, CodeTokenizerOutput, Decoder, Encoder, FittableQuantizer

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


def code_tokenizers() -> list[str]:
    names = stvq.list_plugins("tokenizer")["tokenizer"]
    return [n for n in names if isinstance(f := registry.get("tokenizer", n).resolve(), type) and issubclass(f, CodeTokenizer)]


def test_the_interfaces_the_core_checks_are_the_reference_plugins():
    assert "styled" in code_tokenizers() and "vqgan" not in code_tokenizers()
    assert issubclass(registry.get("quantizer", "kmeans").resolve(), FittableQuantizer)
    assert not issubclass(registry.get("quantizer", "fsq").resolve(), FittableQuantizer)


@pytest.mark.parametrize("name", code_tokenizers())
def test_every_code_tokenizer_keeps_the_surface_train_quantize_and_eval_use(name):
    model = stvq.create("tokenizer", name, config=make_config("tiny", width=32, heads=2))
    size = model.config.image_size
    images = torch.rand(3, 3, size, size) * 2 - 1
    out = model(images, noise_sigma=0.1, tail_drop=1.0)
    assert isinstance(out, CodeTokenizerOutput) and out.quantized is None
    assert out.codes.shape == (3, model.num_tokens, model.config.code_dim) and out.reconstruction.shape == images.shape
    with torch.no_grad():
        codes = model.encode_codes(images)
        assert torch.equal(model.decode_codes(codes), model(images).reconstruction)  # no noise: the same path
    assert isinstance(model.encoder, Encoder) and isinstance(model.decoder, Decoder) and model.quantizer is None
    model.set_quantizer({"name": "fsq", "levels": [4, 4, 4]})
    quantized = model(images, quantize=True).quantized
    assert quantized is not None and quantized.ids.shape == (3, model.num_tokens)
    assert model.encode(images).shape == (3, model.num_tokens) and model.manifest()["parts"][0]["vocab_size"] == 64
