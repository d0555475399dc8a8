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


@hookimpl
def register_tokenizers(register):
    register("styled", "stvq_reference.model:StyledVQ")
