"""Contract tests, written once per plugin kind: what every quantizer, encoder/decoder pair, tokenizer,
code tokenizer, composer, prior, data set and discriminator must do. A plugin package's tests subclass one and implement its ``make_*``
method; stvq's own suite runs each for every registered plugin of the kind (tests/test_hooks.py).

    class TestMyQuantizer(QuantizerContract):
        def make_quantizer(self, dim):
            return MyQuantizer(dim=dim)
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from stvq.errors import StvqError
from stvq.interfaces import CodeTokenizer, CodeTokenizerOutput, Decoder, Discriminator, Encoder, Prior, Quantizer, QuantizerOutput, Tokenizer


class QuantizerContract:
    """docs/model.md, "The public contract": ``q(z)`` on (..., dim) codes -> codes (same shape, straight-through), ids (...)
    int64 in [0, codebook_size), a scalar loss and stats; ``ids_to_codes(ids) == codes`` in eval mode."""

    dim = 6

    def make_quantizer(self, dim: int) -> Quantizer:
        """A ready-to-use quantizer (fitted, if it needs fitting) over ``dim``-wide codes."""
        raise NotImplementedError

    @pytest.fixture
    def quantizer(self) -> Quantizer:
        torch.manual_seed(0)
        return self.make_quantizer(self.dim)

    @pytest.fixture
    def z(self) -> torch.Tensor:
        return torch.randn(4, 36, self.dim, generator=torch.Generator().manual_seed(1))

    def test_output_types_and_shapes(self, quantizer, z):
        out = quantizer(z)
        assert isinstance(out, QuantizerOutput)
        assert out.codes.shape == z.shape and out.codes.dtype == z.dtype
        assert out.ids.shape == z.shape[:-1] and out.ids.dtype == torch.int64
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert 0 <= out.ids.min() and out.ids.max() < quantizer.codebook_size
        assert {"usage", "perplexity", "dead_codes", "mse"} <= set(out.stats)
        assert 0 < out.stats["usage"] <= 1 and 1 <= out.stats["perplexity"] <= quantizer.codebook_size

    def test_ids_to_codes_inverts_ids_in_eval(self, quantizer, z):
        quantizer.train()
        quantizer(z)  # a training step may initialise or update state
        quantizer.eval()
        out = quantizer(z)
        assert torch.equal(quantizer.ids_to_codes(out.ids), out.codes)

    def straight_through(self, quantizer: Quantizer, z: torch.Tensor) -> torch.Tensor:
        """The quantizer's map with its rounding taken as the identity: what its codes are to the gradient.
        A codebook quantizer's straight-through estimator passes the gradient at the codes to ``z``
        unchanged: ``z`` itself. Override for a quantizer whose codes pass through more (a normalisation,
        FSQ's bound and projections)."""
        return z

    def test_gradient_passes_straight_through(self, quantizer, z):
        """The gradient that reaches ``z`` is the gradient at the codes, carried back through
        :meth:`straight_through` alone (for a codebook: equal to it)."""
        quantizer.train()
        weight = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))  # a gradient at the codes
        through = z.clone().requires_grad_()
        (quantizer(through).codes * weight).sum().backward()
        expected = z.clone().requires_grad_()
        (self.straight_through(quantizer, expected) * weight).sum().backward()
        assert through.grad is not None and expected.grad is not None
        torch.testing.assert_close(through.grad, expected.grad)

    def test_state_round_trips_through_safetensors(self, quantizer, z, tmp_path):
        quantizer.train()
        quantizer(z)
        quantizer.eval()
        save_file({k: v.contiguous() for k, v in quantizer.state_dict().items()}, str(tmp_path / "q.safetensors"))
        fresh = self.make_quantizer(self.dim)
        fresh.load_state_dict(load_file(str(tmp_path / "q.safetensors")))
        fresh.eval()
        assert torch.equal(fresh(z).ids, quantizer(z).ids)


def random_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """(count, 3, size, size) uniform in [-1, 1], reproducible."""
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class EncoderDecoderContract:
    """docs/model.md, "The reference architecture": an encoder maps images (B, 3, H, W) to codes (B, N, code_dim), its decoder maps such
    codes back to images of the same size; the two agree on N, code_dim and the image size, and a loss on
    the decoder's images reaches every encoder parameter that the codes depend on."""

    def make_pair(self) -> tuple[Encoder, Decoder]:
        """A small encoder and the decoder that reads its codes."""
        raise NotImplementedError

    @pytest.fixture
    def pair(self) -> tuple[Encoder, Decoder]:
        torch.manual_seed(0)
        return self.make_pair()

    def test_the_pair_agrees_on_its_sizes(self, pair):
        encoder, decoder = pair
        assert isinstance(encoder, Encoder) and isinstance(decoder, Decoder)
        assert (encoder.num_tokens, encoder.code_dim, encoder.image_size) == (decoder.num_tokens, decoder.code_dim, decoder.image_size)

    def test_images_to_codes_to_images(self, pair):
        encoder, decoder = pair
        images = random_images(2, encoder.image_size)
        codes = encoder(images)
        assert codes.shape == (2, encoder.num_tokens, encoder.code_dim) and codes.dtype == images.dtype
        assert decoder(codes).shape == images.shape

    def test_a_loss_on_the_images_trains_the_encoder(self, pair):
        encoder, decoder = pair
        images = random_images(2, encoder.image_size)
        (decoder(encoder(images)) - images).pow(2).mean().backward()
        grads = [p.grad for p in encoder.parameters() if p.requires_grad]
        assert grads and sum(g.abs().sum() for g in grads if g is not None) > 0

    def test_the_last_layer_is_a_decoder_weight_that_writes_the_pixels(self, pair):
        encoder, decoder = pair
        last = decoder.last_layer()
        if last is None:  # the adversarial weight then applies as given
            return
        assert any(last is p for p in decoder.parameters())
        (grad,) = torch.autograd.grad(decoder(encoder(random_images(2, encoder.image_size))).pow(2).mean(), last)
        assert grad.abs().sum() > 0

    def test_each_image_is_encoded_alone(self, pair):
        encoder, _ = pair
        encoder.eval()
        images = random_images(3, encoder.image_size)
        with torch.no_grad():
            torch.testing.assert_close(encoder(images)[1:2], encoder(images[1:2]), rtol=1e-4, atol=1e-5)


class TokenizerContract:
    """docs/model.md, "Composition with another VQ-VAE": images (B, 3, H, W) in [-1, 1] <-> int64 ids (B, num_tokens) in [0, vocab_size);
    ``decode`` refuses ids it cannot mean with a :class:`StvqError`; ``manifest()`` describes the layout;
    ``save_pretrained`` (where the tokenizer has it) round-trips through ``stvq.load_tokenizer``."""

    def make_tokenizer(self) -> Tokenizer:
        """A small, ready tokenizer (with its codebook, if it needs one)."""
        raise NotImplementedError

    @pytest.fixture
    def tokenizer(self) -> Tokenizer:
        torch.manual_seed(0)
        return self.make_tokenizer().eval()

    @pytest.fixture
    def images(self, tokenizer) -> torch.Tensor:
        return random_images(2, tokenizer.image_size)

    def test_encode_gives_ids_in_the_vocabulary(self, tokenizer, images):
        with torch.no_grad():
            ids = tokenizer.encode(images)
        assert isinstance(tokenizer, Tokenizer)
        assert ids.shape == (2, tokenizer.num_tokens) and ids.dtype == torch.int64
        assert 0 <= ids.min() and ids.max() < tokenizer.vocab_size

    def test_decode_gives_images(self, tokenizer, images):
        with torch.no_grad():
            out = tokenizer.decode(tokenizer.encode(images))
        assert out.shape == images.shape and torch.isfinite(out).all()
        assert out.min() >= -1 and out.max() <= 1  # the promised range

    def test_decode_refuses_ids_it_cannot_mean(self, tokenizer, images):
        with torch.no_grad():
            ids = tokenizer.encode(images)
        for bad in (ids.float(), ids[:, :-1], torch.full_like(ids, tokenizer.vocab_size), torch.full_like(ids, -1)):
            with pytest.raises(StvqError):
                tokenizer.decode(bad)

    def test_manifest_describes_the_layout(self, tokenizer):
        m = tokenizer.manifest()
        assert (m["vocab_size"], m["num_tokens"], m["image_size"]) == (tokenizer.vocab_size, tokenizer.num_tokens, tokenizer.image_size)
        assert sum(p["num_tokens"] for p in m["parts"]) <= tokenizer.num_tokens  # special ids (begin, separator) add tokens
        assert sum(p["vocab_size"] for p in m["parts"]) <= tokenizer.vocab_size
        assert [p["positions"][0] for p in m["parts"]] == sorted(p["positions"][0] for p in m["parts"])

    def test_save_and_load_round_trip(self, tokenizer, images, tmp_path):
        if not hasattr(tokenizer, "save_pretrained"):
            pytest.skip("this tokenizer is not saved by stvq")
        from stvq.pretrained import load_tokenizer

        tokenizer.save_pretrained(tmp_path / "tok")
        with torch.no_grad():
            assert torch.equal(load_tokenizer(tmp_path / "tok").eval().encode(images), tokenizer.encode(images))


class CodeTokenizerContract(TokenizerContract):
    """What ``stvq train``, ``stvq quantize`` and ``stvq eval`` use of a :class:`CodeTokenizer`:
    ``make_tokenizer`` returns one with no quantizer yet; the contract attaches FSQ where it needs ids."""

    def attach_quantizer(self, tokenizer: CodeTokenizer) -> None:
        tokenizer.set_quantizer({"name": "fsq", "levels": [4, 4, 4]})

    @pytest.fixture
    def tokenizer(self) -> CodeTokenizer:
        torch.manual_seed(0)
        model = self.make_tokenizer()
        assert isinstance(model, CodeTokenizer) and model.quantizer is None
        self.attach_quantizer(model)
        return model.eval()

    def test_decode_keeps_images_in_range_whatever_the_decoder_draws(self, tokenizer, images):
        """``decode`` promises images in [-1, 1] even from a decoder that draws far outside (its last layer
        scaled a thousandfold here): they are clipped, not passed on."""
        last = tokenizer.decoder.last_layer()
        if last is None:  # nothing that writes the pixels to scale
            return
        with torch.no_grad():
            ids = tokenizer.encode(images)
            last.mul_(1000)
            out = tokenizer.decode(ids)
        assert out.min() >= -1 and out.max() <= 1
        assert (out.abs() == 1).float().mean() > 0.1  # the scaled drawing did reach the range's ends

    def test_forward_reconstructs_with_the_training_options(self, tokenizer, images):
        tokenizer.train()
        out = tokenizer(images, noise_sigma=0.1, tail_drop=1.0)
        assert isinstance(out, CodeTokenizerOutput) and out.quantized is None
        assert out.codes.shape == (2, tokenizer.num_tokens, tokenizer.config.code_dim) and out.reconstruction.shape == images.shape
        quantized = tokenizer(images, quantize=True).quantized
        assert quantized is not None and quantized.ids.shape == (2, tokenizer.num_tokens)

    def test_codes_path_is_the_forward_path(self, tokenizer, images):
        assert isinstance(tokenizer.encoder, Encoder) and isinstance(tokenizer.decoder, Decoder)
        with torch.no_grad():
            codes = tokenizer.encode_codes(images)
            assert torch.equal(tokenizer.decode_codes(codes), tokenizer(images).reconstruction)  # no noise: one path
            assert torch.equal(tokenizer(images, codes=codes).reconstruction, tokenizer(images).reconstruction)

    def test_a_forward_that_takes_a_generator_draws_only_from_it(self, tokenizer, images):
        """Where the forward takes ``generator`` (so that ``stvq train`` may split a step across threads),
        the same seed draws the same noise and prefixes, and torch's global RNG is left alone."""
        if "generator" not in inspect.signature(tokenizer.forward).parameters:
            pytest.skip("this forward takes no generator: its training steps run whole")
        tokenizer.train()
        options = {"noise_sigma": 0.5, "tail_drop": 1.0}
        with torch.no_grad():
            state = torch.get_rng_state()
            first = tokenizer(images, generator=torch.Generator().manual_seed(3), **options).reconstruction
            assert torch.equal(torch.get_rng_state(), state)
            again = tokenizer(images, generator=torch.Generator().manual_seed(3), **options).reconstruction
            other = tokenizer(images, generator=torch.Generator().manual_seed(4), **options).reconstruction
        assert torch.equal(first, again) and not torch.equal(first, other)

    def test_tail_drop_keeps_a_prefix_and_fills_the_rest(self, tokenizer, images):
        from stvq.interfaces import drop_tail

        codes = torch.randn(64, tokenizer.num_tokens, tokenizer.config.code_dim)
        dropped = drop_tail(codes, 1.0)
        kept = (dropped == codes).all(-1)  # (B, N): True where the code survived
        assert (kept[:, :1]).all() and (kept.int().diff(dim=1) <= 0).all()  # a prefix, never a gap


class ComposerContract:
    """docs/model.md, "Composition with another VQ-VAE": several tokenizers -> one over one sequence and one vocabulary, each part's ids
    offset into its own range, decoding back through each part."""

    def make_composer(self):
        raise NotImplementedError

    def make_parts(self) -> list[Tokenizer]:
        """Two or more small, ready tokenizers."""
        raise NotImplementedError

    @pytest.fixture
    def parts(self) -> list[Tokenizer]:
        torch.manual_seed(0)
        return [p.eval() for p in self.make_parts()]

    def test_the_composed_tokenizer_is_a_tokenizer_of_all_parts(self, parts):
        composed = self.make_composer().compose(parts)
        assert isinstance(composed, Tokenizer)
        assert composed.num_tokens >= sum(p.num_tokens for p in parts) and composed.vocab_size >= sum(p.vocab_size for p in parts)
        layout = composed.manifest()["parts"]
        assert [p["num_tokens"] for p in layout] == [p.num_tokens for p in parts]
        offsets = [p["offset"] for p in layout]
        assert offsets == sorted(offsets) and all(a["offset"] + a["vocab_size"] <= b["offset"] for a, b in zip(layout, layout[1:]))

    def test_each_part_keeps_its_ids_in_its_range(self, parts):
        composed = self.make_composer().compose(parts).eval()
        images = random_images(2, composed.image_size)
        with torch.no_grad():
            ids = composed.encode(images)
            for part in composed.manifest()["parts"]:
                first, last = part["positions"]
                block = ids[:, first:last]
                assert block.min() >= part["offset"] and block.max() < part["offset"] + part["vocab_size"]
            assert composed.decode(ids).shape == images.shape


class PriorContract:
    """A :class:`Prior`: ids (B, T) -> logits (B, T + 1, vocab_size) for any T up to ``seq_len``; row t
    never sees id t or later; its weights round-trip through ``save_pretrained``."""

    vocab_size, seq_len = 50, 12

    def make_prior(self, vocab_size: int, seq_len: int) -> Prior:
        raise NotImplementedError

    @pytest.fixture
    def prior(self) -> Prior:
        torch.manual_seed(0)
        return self.make_prior(self.vocab_size, self.seq_len).eval()

    def test_logits_for_every_prefix_length(self, prior):
        assert isinstance(prior, Prior) and (prior.vocab_size, prior.seq_len) == (self.vocab_size, self.seq_len)
        ids = torch.randint(0, self.vocab_size, (3, self.seq_len))
        for t in (0, 1, self.seq_len):
            assert prior(ids[:, :t]).shape == (3, t + 1, self.vocab_size)

    def test_row_t_never_sees_id_t_or_later(self, prior):
        ids = torch.randint(0, self.vocab_size, (2, self.seq_len))
        changed = ids.clone()
        changed[:, 5] = (changed[:, 5] + 1) % self.vocab_size
        with torch.no_grad():
            torch.testing.assert_close(prior(changed)[:, :6], prior(ids)[:, :6])

    def test_save_and_load_round_trip(self, prior, tmp_path):
        from stvq.pretrained import load_pretrained

        prior.save_pretrained(tmp_path / "prior")
        ids = torch.randint(0, self.vocab_size, (2, self.seq_len))
        with torch.no_grad():
            assert torch.equal(load_pretrained(tmp_path / "prior")(ids), prior(ids))


class DatasetContract:
    """A ``dataset`` plugin: every split gives RGB images (3, S, S) in [-1, 1] at the asked size; ``val`` is
    indexed; the training split is indexed or an :class:`ImageStream` whose ``read(piece, skip)`` gives the
    members a full read gives from ``skip`` on (what an exact resume relies on)."""

    image_size = 32

    def make_dataset(self, split: str, image_size: int):
        raise NotImplementedError

    @staticmethod
    def check(image: torch.Tensor, size: int) -> None:
        assert image.shape == (3, size, size) and image.dtype == torch.float32
        assert -1 <= image.min() and image.max() <= 1

    def test_validation_is_indexed_images(self):
        from stvq.interfaces import ImageDataset

        val = self.make_dataset("val", self.image_size)
        assert isinstance(val, ImageDataset) and len(val) > 0 and isinstance(val.fingerprint(), str)
        self.check(val[0], self.image_size)
        assert torch.equal(val[len(val) - 1], val[len(val) - 1])  # deterministic

    def test_training_images_in_order_and_a_stream_skips_exactly(self):
        from itertools import islice

        from stvq.interfaces import ImageDataset, ImageStream

        train = self.make_dataset("train", self.image_size)
        assert isinstance(train, (ImageDataset, ImageStream))
        if not isinstance(train, ImageStream):
            self.check(train[0], self.image_size)
            assert torch.equal(train[1], self.make_dataset("train", self.image_size)[1])
            return
        piece = train.pieces()[0]
        whole = list(islice(train.read(piece), 4))
        for _, _, image in whole:
            if image is not None:
                self.check(image, self.image_size)
        tail = list(islice(train.read(piece, skip=2), 2))
        assert [(m, k) for m, k, _ in tail] == [(m, k) for m, k, _ in whole[2:]]
        assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(tail, whole[2:]))

    def test_declared_factors_are_a_table_per_image(self):
        """A :class:`FactorDataset` (what ``stvq eval`` probes): one value per image for every declared
        factor, class ids within the declared count; held-out scenes, where it has them, as (image, mask)."""
        from stvq.interfaces import FactorDataset

        val = self.make_dataset("val", self.image_size)
        if not isinstance(val, FactorDataset):
            return
        table = val.factor_table(5)
        assert list(table) == list(val.factor_classes) and all(len(np.asarray(v)) == 5 for v in table.values())
        for name, classes in val.factor_classes.items():
            if classes:
                assert set(np.asarray(table[name]).tolist()) <= set(range(classes)), name
        scenes = val.heldout_scenes()
        if scenes is not None:
            image, mask = scenes[0]
            self.check(image, self.image_size)
            assert mask.shape == (1, self.image_size, self.image_size) and mask.dtype == torch.bool


class DiscriminatorContract:
    """A :class:`Discriminator`: images (B, 3, S, S) -> finite logits with the batch first, one image's
    logits independent of the others' in eval mode, and a gradient that reaches the images (what trains the
    decoder) and every parameter (what trains the discriminator)."""

    image_size = 64

    def make_discriminator(self, image_size: int) -> Discriminator:
        raise NotImplementedError

    @pytest.fixture
    def critic(self) -> Discriminator:
        torch.manual_seed(0)
        return self.make_discriminator(self.image_size)

    def test_logits_per_image(self, critic):
        assert isinstance(critic, Discriminator) and critic.image_size == self.image_size
        logits = critic(random_images(3, self.image_size))
        assert logits.shape[0] == 3 and logits.is_floating_point() and torch.isfinite(logits).all()

    def test_each_image_is_judged_alone_in_eval_mode(self, critic):
        critic.eval()
        images = random_images(3, self.image_size)
        with torch.no_grad():
            torch.testing.assert_close(critic(images)[1:2], critic(images[1:2]), rtol=1e-4, atol=1e-5)

    def test_gradients_reach_the_images_and_every_parameter(self, critic):
        images = random_images(2, self.image_size).requires_grad_(True)
        critic(images).mean().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0
        assert all(p.grad is not None for p in critic.parameters() if p.requires_grad)
