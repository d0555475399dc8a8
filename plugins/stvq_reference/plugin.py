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
    register("broadcast", "stvq_reference.broadcast:BroadcastDecoder")
    register("titok", "stvq_reference.titok:TiTokDecoder")


@hookimpl
def register_tokenizers(register):
    register("styled", "stvq_reference.model:StyledVQ")
    register("vqgan", "stvq_reference.vqgan:VQGANTokenizer")
    register("diffusers-vq", "stvq_reference.diffusers_vq:DiffusersVQTokenizer")
    register("llamagen-vq", "stvq_reference.llamagen_vq:LlamaGenVQTokenizer")
    register("composed", "stvq_reference.concat:ComposedTokenizer")
    register("titok", "stvq_reference.titok:TiTokVQ")


@hookimpl
def register_quantizers(register):
    register("kmeans", "stvq_reference.kmeans:KMeansQuantizer")
    register("ema-vq", "stvq_reference.ema_vq:EMAVectorQuantizer")
    register("fsq", "stvq_reference.fsq:FSQ")


@hookimpl
def register_composers(register):
    register("concat", "stvq_reference.concat:ConcatComposer")


@hookimpl
def register_priors(register):
    register("gpt", "stvq_reference.gpt:GPT")


@hookimpl
def register_datasets(register):
    register("shapes", "stvq_reference.shapes:ShapesDataset")
    register("shapes-upright", "stvq_reference.shapes:UprightShapesDataset")
    register("photos", "stvq_reference.folders:PhotosDataset")
    register("folder", "stvq_reference.folders:ImageFolderDataset")
    register("wds", "stvq_reference.sources:webdataset")
    register("hf", "stvq_reference.sources:HFImageDataset")


@hookimpl
def register_discriminators(register):
    register("patchgan", "stvq_reference.patchgan:PatchDiscriminator")


@hookimpl
def register_commands(cli):
    """The decoder oracle: ``stvq oracle``."""
    from stvq_reference.shapes.oracle import oracle

    cli.add_command(oracle)


@hookimpl
def register_options(register):
    """The reference plugins' options of stock commands: a part's source and config for ``stvq compose``,
    k-means's options for ``stvq quantize``."""
    import click

    register("compose", "--styled", "styled.source", "The styled part: a run directory (stage 2, or stage 1 + `stvq quantize`).", type=click.Path())
    register("compose", "--vqgan", "vqgan.source", "The vqgan part: a taming .ckpt (with --vqgan-config) or a directory.", type=click.Path())
    register("compose", "--vqgan-config", "vqgan.config", "The taming YAML config of --vqgan.", type=click.Path())
    register("compose", "--diffusers-vq", "diffusers-vq.source", "The diffusers-vq part: a diffusers VQModel directory (or a hub id, online).")
    register("compose", "--llamagen-vq", "llamagen-vq.source", "The llamagen-vq part: a LlamaGen VQ checkpoint (.pt).", type=click.Path())
    register("compose", "--llamagen-preset", "llamagen-vq.preset", "The LlamaGen model of --llamagen-vq: VQ-16 (default) or VQ-8.")
    register("quantize", "--niter", "niter", "k-means iterations (default 20).", type=click.IntRange(1, 2**31 - 1))
    register("quantize", "--spherical", "spherical", "Spherical k-means (unit-norm centroids).", is_flag=True)
    register(
        "quantize",
        "--max-points-per-centroid",
        "max_points_per_centroid",
        "k-means trains on at most K x this many code vectors, sampled by faiss (default 256).",
        type=click.IntRange(1, 2**31 - 1),
    )
