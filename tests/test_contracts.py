"""stvq.testing's contracts, run over every registered plugin of each kind (quantizers: test_quantizers.py).
A registered plugin without a case here fails the coverage test, so none escapes its contract."""

import pytest
from test_llamagen_vq import SMALL as LLAMAGEN_SMALL

import stvq
from stvq import registry
from stvq.interfaces import CodeTokenizer, FittableQuantizer
from stvq.testing import CodeTokenizerContract, ComposerContract, DatasetContract, DiscriminatorContract, EncoderDecoderContract, PriorContract, TokenizerContract
from stvq_reference.config import make_config
from stvq_reference.vqgan import VQGANTokenizer

SMALL = make_config("tiny", width=32, heads=2)
SMALL_DD = dict(double_z=False, z_channels=32, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0)


def styled():
    return stvq.create("tokenizer", "styled", config=SMALL, quantizer={"name": "fsq", "levels": [4, 4, 4]})


def vqgan():
    return VQGANTokenizer(ddconfig=SMALL_DD, embed_dim=8, n_embed=50)


#: A small diffusers VQModel config (two blocks: a 16 x 16 latent grid at 32 px).
SMALL_VQMODEL = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 32],
    layers_per_block=1,
    latent_channels=4,
    num_vq_embeddings=64,
    vq_embed_dim=4,
    sample_size=32,
    norm_num_groups=8,
)


PAIRS = {"styled+styled": ("styled", "styled"), "styled+unordered": ("styled", "unordered"), "styled+broadcast": ("styled", "broadcast"), "styled+titok": ("styled", "titok")}  # (encoder, decoder)
TOKENIZERS = {
    "styled": styled,
    "vqgan": vqgan,
    "titok": lambda: stvq.create("tokenizer", "titok", config=SMALL, quantizer={"name": "fsq", "levels": [4, 4, 4]}),
    "composed": lambda: stvq.create("tokenizer", "composed", parts=[styled(), vqgan()], separator=True),
    "diffusers-vq": lambda: stvq.create("tokenizer", "diffusers-vq", config=SMALL_VQMODEL),
    "llamagen-vq": lambda: stvq.create("tokenizer", "llamagen-vq", **LLAMAGEN_SMALL),
}
COMPOSERS = {"concat": lambda: stvq.create("composer", "concat")}
PRIORS = {"gpt": {"width": 32, "layers": 2, "heads": 2}}
DATASETS = ("shapes", "shapes-upright", "photos", "folder", "wds", "hf")
DISCRIMINATORS = {
    "patchgan": [{}, {"channels": 16, "layers": 2, "norm": "group"}, {"channels": 16, "layers": 2, "norm": "none", "blur_sigma": 1.0}]
}  # option sets  # the located ones are written by the fixture below


def code_tokenizers() -> list[str]:
    return [n for n in stvq.list_plugins("tokenizer")["tokenizer"] if issubclass(registry.get("tokenizer", n).resolve(), CodeTokenizer)]


def test_every_registered_plugin_is_under_contract():
    plugins = stvq.list_plugins()
    assert set(plugins["encoder"]) <= {e for e, _ in PAIRS.values()}
    assert set(plugins["decoder"]) <= {d for _, d in PAIRS.values()}
    assert set(plugins["tokenizer"]) <= set(TOKENIZERS)
    assert set(plugins["composer"]) <= set(COMPOSERS)
    assert set(plugins["prior"]) <= set(PRIORS)
    assert set(plugins["dataset"]) <= set(DATASETS)
    assert set(plugins["discriminator"]) <= set(DISCRIMINATORS)
    assert "styled" in code_tokenizers() and "vqgan" not in code_tokenizers()
    assert issubclass(registry.get("quantizer", "kmeans").resolve(), FittableQuantizer)
    assert not issubclass(registry.get("quantizer", "fsq").resolve(), FittableQuantizer)


class TestEncoderDecoderPairs(EncoderDecoderContract):
    @pytest.fixture(autouse=True, params=list(PAIRS))
    def _case(self, request):
        self.names = PAIRS[request.param]

    def make_pair(self):
        encoder, decoder = self.names
        return stvq.create("encoder", encoder, config=SMALL), stvq.create("decoder", decoder, config=SMALL)


class TestTokenizers(TokenizerContract):
    @pytest.fixture(autouse=True, params=list(TOKENIZERS))
    def _case(self, request):
        self.name = request.param

    def make_tokenizer(self):
        return TOKENIZERS[self.name]()


class TestCodeTokenizers(CodeTokenizerContract):
    @pytest.fixture(autouse=True, params=code_tokenizers())
    def _case(self, request):
        self.name = request.param

    def make_tokenizer(self):
        return stvq.create("tokenizer", self.name, config=SMALL)


class TestComposers(ComposerContract):
    @pytest.fixture(autouse=True, params=list(COMPOSERS))
    def _case(self, request):
        self.name = request.param

    def make_composer(self):
        return COMPOSERS[self.name]()

    def make_parts(self):
        return [styled(), vqgan()]


class TestPriors(PriorContract):
    @pytest.fixture(autouse=True, params=list(PRIORS))
    def _case(self, request):
        self.name = request.param

    def make_prior(self, vocab_size, seq_len):
        return stvq.create("prior", self.name, vocab_size=vocab_size, seq_len=seq_len, **PRIORS[self.name])


class TestDiscriminators(DiscriminatorContract):
    @pytest.fixture(autouse=True, params=[(n, i) for n, sets in DISCRIMINATORS.items() for i in range(len(sets))])
    def _case(self, request):
        self.name, index = request.param
        self.options = DISCRIMINATORS[self.name][index]

    def make_discriminator(self, image_size):
        return stvq.create("discriminator", self.name, image_size=image_size, **self.options)


class TestDatasets(DatasetContract):
    @pytest.fixture(autouse=True, params=list(DATASETS))
    def _case(self, request, tmp_path_factory):
        from test_sources import write_hf, write_shards

        self.name, root = request.param, tmp_path_factory.mktemp("data")
        self.spec = {"folder": lambda: str(write_folder(root)), "wds": lambda: write_shards(root / "w", shards=2, per_shard=4), "hf": lambda: write_hf(root / "h", 20)}.get(
            self.name, lambda: self.name
        )()

    def make_dataset(self, split, image_size):
        from stvq.data import make_dataset

        return make_dataset(self.spec, image_size, split)


def write_folder(root):
    from PIL import Image

    from stvq.data import make_dataset
    from stvq.images import to_uint8

    images = make_dataset("shapes", 64, "train")
    for i in range(21):
        Image.fromarray(to_uint8(images[i])).save(root / f"{i:02d}.png")
    return root
