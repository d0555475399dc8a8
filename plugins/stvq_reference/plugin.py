"""The entry-point module of the reference plugins (``[project.entry-points.stvq] reference = ...``).

Factories are given as ``"module:attribute"`` strings so that listing plugins does not import torch.
"""

from stvq import hookimpl


@hookimpl
def register_encoders(register):
    register("styled", "stvq_reference.encoder:StyledEncoder")


@hookimpl
def register_decoders(register):
    register("styled", "stvq_reference.decoder:StyledDecoder")
    register("unordered", "stvq_reference.unordered:UnorderedDecoder")


@hookimpl
def register_tokenizers(register):
    register("styled", "stvq_reference.model:StyledVQ")
    register("vqgan", "stvq_reference.vqgan:VQGANTokenizer")
    register("composed", "stvq_reference.concat:ComposedTokenizer")


@hookimpl
def register_quantizers(register):
    register("kmeans", "stvq_reference.kmeans:KMeansQuantizer")
    register("ema-vq", "stvq_reference.ema_vq:EMAVectorQuantizer")
    register("fsq", "stvq_reference.fsq:FSQ")


@hookimpl
def register_composers(register):
    register("concat", "stvq_reference.concat:ConcatComposer")
