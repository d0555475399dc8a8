"""The example package's own tests: stvq's contracts, subclassed as any third-party package would."""

from stvq_plugin_example import SignQuantizer
from stvq_plugin_example.tokenizer import ConvConfig, ConvDecoder, ConvEncoder

import stvq
from stvq.testing import CodeTokenizerContract, EncoderDecoderContract, QuantizerContract

SMALL = ConvConfig.make("tiny", width=8)


class TestSignQuantizer(QuantizerContract):
    def make_quantizer(self, dim):
        return SignQuantizer(dim=dim)


class TestConvPair(EncoderDecoderContract):
    def make_pair(self):
        return ConvEncoder(SMALL), ConvDecoder(SMALL)


class TestConvTokenizer(CodeTokenizerContract):
    def make_tokenizer(self):
        return stvq.create("tokenizer", "example-conv", config=SMALL)
