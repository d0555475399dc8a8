"""The extension points of stvq: one ``register_*`` hook per plugin kind.

A plugin package declares an entry point in the ``stvq`` group that names a module; that module defines
functions decorated with :data:`stvq.hookimpl` whose names match the hooks below. Each hook receives a
``register(name, factory)`` callback. ``factory`` is a class or callable, or a ``"module:attribute"``
string that is imported only when the plugin is first created (this keeps ``stvq plugins`` fast).
"""

import pluggy

PROJECT = "stvq"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: The plugin kinds, in the order ``stvq plugins`` lists them. Hook for kind K: ``register_{K}s``.
KINDS = ("encoder", "decoder", "quantizer", "tokenizer", "composer", "prior", "dataset", "discriminator")


@hookspec
def register_encoders(register):
    """Register image encoders, e.g. ``register('styled', StyledEncoder)``.

    An encoder is a :class:`stvq.interfaces.Encoder`: images (B, 3, H, W) in [-1, 1] -> continuous codes
    (B, N, code_dim).
    """


@hookspec
def register_decoders(register):
    """Register conditional decoders, e.g. ``register('styled', StyledDecoder)``.

    A decoder is a :class:`stvq.interfaces.Decoder`: codes (B, N, code_dim) -> images (B, 3, H, W).
    """


@hookspec
def register_quantizers(register):
    """Register quantizers, e.g. ``register('fsq', FSQ)``.

    A quantizer is a :class:`stvq.interfaces.Quantizer`: codes (..., dim) -> QuantizerOutput.
    """


@hookspec
def register_tokenizers(register):
    """Register tokenizers, e.g. ``register('vqgan', VQGANTokenizer)``.

    A tokenizer is a :class:`stvq.interfaces.Tokenizer`: images <-> int64 ids (B, N).
    """


@hookspec
def register_composers(register):
    """Register tokenizer composers, e.g. ``register('concat', ConcatComposer)``.

    A composer is a :class:`stvq.interfaces.Composer`: a list of tokenizers -> one tokenizer.
    """


@hookspec
def register_priors(register):
    """Register autoregressive priors over token ids, e.g. ``register('gpt', GPT)``.

    A prior is a :class:`stvq.interfaces.Prior`: ids (B, T) -> next-id logits (B, T + 1, vocab_size).
    """


@hookspec
def register_datasets(register):
    """Register image sources that ``--data`` names, e.g. ``register('wds', WebDatasetSource)``.

    ``--data NAME`` or ``--data NAME:LOCATION`` builds ``factory(image_size=, split=, seed=[, location=])``
    with ``split`` one of ``train``, ``val``, ``all``; any other ``--data`` is a folder (the ``folder``
    source). The result is a :class:`stvq.interfaces.ImageDataset` (images (3, S, S) in [-1, 1] by index,
    with a fingerprint), or, for a source that cannot be indexed, a :class:`stvq.interfaces.ImageStream`
    (``val`` stays an ImageDataset).
    """


@hookspec
def register_discriminators(register):
    """Register discriminators for adversarial training, e.g. ``register('patchgan', PatchDiscriminator)``.

    A discriminator is a :class:`stvq.interfaces.Discriminator`, built with ``image_size`` besides its own
    options (``--train discriminator_options=...``): images (B, 3, H, W) in [-1, 1] -> realness logits
    (B, ...), one per patch for a PatchGAN. ``stvq train --adversarial-weight W`` trains one beside the
    tokenizer; its weights and optimizer state live in the run's checkpoint, never in ``model.safetensors``.
    """


@hookspec
def register_commands(cli):
    """Add commands to the ``stvq`` command line, e.g. ``cli.add_command(my_command)``.

    ``cli`` is the :class:`click.Group` of ``stvq`` with its commands built (as simonw/llm's hook). Options
    of a stock command are added through :func:`register_options`, never by editing its parameters.
    """


@hookspec
def register_options(register):
    """Add options to a stock command, e.g. ``register('quantize', '--niter', 'niter', 'k-means iterations.', type=int)``.

    ``register(command, flag, key, help, **click_options)``: the commands that read plugins' options, and
    what ``key`` names there, are listed in :data:`stvq.cli.PLUGIN_OPTIONS`: ``compose`` reads ``PART.KEY``
    (an option of the part ``PART``, e.g. ``vqgan.config``), ``quantize`` an option of the quantizer. A
    value the user gives reaches the command as if given with its generic flag (``--part-option``,
    ``--quantizer-option``); an option left out hands nothing on. ``click_options`` are click's
    (``type``, ``is_flag``...).
    """
