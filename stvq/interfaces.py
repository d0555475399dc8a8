"""The base classes of the plugin kinds and their output types. Small and stable: plugins subclass
them, and the core talks to plugins only through them (checked with ``isinstance``).

Two refinements say what the training and measuring commands need beyond the kinds themselves:
:class:`CodeTokenizer` (images -> continuous codes -> optional quantizer -> decoder: what ``stvq train``,
``stvq quantize`` and ``stvq eval`` drive) and :class:`FittableQuantizer` (a codebook fitted offline on a
data set's codes: what ``stvq quantize`` fits)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from stvq.errors import StvqError


@dataclass
class QuantizerOutput:
    """What a quantizer returns for codes z of shape (..., dim)."""

    codes: torch.Tensor  # (..., dim) quantized codes; straight-through gradient to z in training
    ids: torch.Tensor  # (...,) int64 codeword ids
    loss: torch.Tensor  # scalar auxiliary loss (commitment etc.), zero where the method has none
    stats: dict[str, float] = field(default_factory=dict)  # usage, perplexity, dead codes, error


class Encoder(nn.Module, ABC):
    """Images (B, 3, H, W) in [-1, 1] -> continuous codes (B, num_tokens, code_dim)."""

    num_tokens: int
    code_dim: int
    image_size: int

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor: ...


class Decoder(nn.Module, ABC):
    """Continuous or quantized codes (B, num_tokens, code_dim) -> images (B, 3, H, W)."""

    num_tokens: int
    code_dim: int
    image_size: int

    @abstractmethod
    def forward(self, codes: torch.Tensor) -> torch.Tensor: ...

    def last_layer(self) -> torch.Tensor | None:
        """The weight of the layer that writes the pixels: adversarial training scales its term by the ratio
        of the reconstruction's and its own gradient norms there (taming's adaptive weight). None: the
        adversarial weight applies as given."""
        return None


class Discriminator(nn.Module, ABC):
    """Images (B, 3, H, W) in [-1, 1] -> realness logits (B, ...): higher means more like the data. Built
    with ``image_size`` besides its own options; trained against a tokenizer's decoder (``stvq train
    --adversarial-weight``)."""

    image_size: int

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor: ...


class Quantizer(nn.Module, ABC):
    """Codes (..., dim) -> :class:`QuantizerOutput`; ``ids_to_codes`` inverts the ids (eval mode)."""

    dim: int
    codebook_size: int
    # True where the forward changes the quantizer's state in training (an EMA codebook): a training step
    # then runs whole, never split across threads (LoopConfig.step_threads).
    updates_in_forward: bool = False

    @abstractmethod
    def forward(self, z: torch.Tensor) -> QuantizerOutput: ...

    @abstractmethod
    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor: ...


class FittableQuantizer(Quantizer):
    """A quantizer whose codebook is fitted offline on a data set's codes (``stvq quantize``), e.g. k-means.
    It is built with ``dim``, ``codebook_size``, ``positions`` (0: one shared codebook; N: one per token
    position) and ``seed`` besides its own options."""

    @abstractmethod
    def fit(self, codes: torch.Tensor) -> dict[str, float]:
        """Fit the codebook in place on codes (M, N, dim) of M images; returns statistics."""


class Tokenizer(nn.Module, ABC):
    """Images (B, 3, H, W) in [-1, 1] <-> int64 ids (B, num_tokens) in [0, vocab_size)."""

    num_tokens: int
    vocab_size: int
    image_size: int

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, ids: torch.Tensor) -> torch.Tensor: ...

    def manifest(self) -> dict[str, Any]:
        """The layout of the ids, for token shards and tables: one part here; a composed tokenizer lists its
        parts with their id offsets and positions."""
        part = {
            "name": getattr(self, "plugin_name", type(self).__name__),
            "offset": 0,
            "vocab_size": self.vocab_size,
            "positions": [0, self.num_tokens],
            "num_tokens": self.num_tokens,
            "image_size": self.image_size,
            "resized_from": None,
        }
        return {"vocab_size": self.vocab_size, "num_tokens": self.num_tokens, "image_size": self.image_size, "parts": [part]}


@dataclass
class CodeTokenizerOutput:
    """What a :class:`CodeTokenizer`'s forward returns."""

    codes: torch.Tensor  # (B, N, code_dim) continuous codes (noised in training when sigma > 0)
    reconstruction: torch.Tensor  # (B, 3, H, W)
    quantized: QuantizerOutput | None = None  # set when the codes went through the quantizer


def drop_tail(codes: torch.Tensor, share: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``CodeTokenizer.forward``'s ``tail_drop``: each image, with probability ``share``, keeps only its
    first k codes (k uniform in 1..N) and has the rest set to the batch's mean code per position, as the
    prefix curve decodes them; the draws from ``generator`` (None: torch's global one). codes (B, N, D) ->
    (B, N, D)."""
    b, n = codes.shape[:2]
    keep = torch.randint(1, n + 1, (b, 1), device=codes.device, generator=generator)
    keep = torch.where(torch.rand(b, 1, device=codes.device, generator=generator) < share, keep, n)
    dropped = torch.arange(n, device=codes.device) >= keep  # (B, N)
    mean = codes.detach().mean(0, keepdim=True).expand_as(codes)
    return torch.where(dropped[..., None], mean, codes)


class CodeTokenizer(Tokenizer):
    """A tokenizer built as encoder -> continuous codes (B, N, code_dim) -> optional quantizer -> decoder:
    what ``stvq train`` trains (stage 1 on continuous codes, stage 2 on quantized ones with the encoder
    frozen), ``stvq quantize`` gives a codebook and ``stvq eval`` measures. Built by the registry with
    ``preset=`` and its config's fields, or ``config=`` its config (a
    :class:`stvq.config.PluginConfig`, or the dict a ``config.json`` holds)."""

    config: Any  # the model's config dataclass; the core reads image_size
    encoder: Encoder
    decoder: Decoder
    quantizer: Quantizer | None  # None until a quantizer is attached

    def last_layer(self) -> torch.Tensor | None:
        """The weight that writes the pixels (its decoder's :meth:`Decoder.last_layer`): the optimizer keeps
        it on AdamW where Muon trains the other matrices (:func:`stvq.optim.make_optimizer`)."""
        return self.decoder.last_layer()

    @abstractmethod
    def encode_codes(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> continuous codes (B, N, code_dim)."""

    @abstractmethod
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, N, code_dim), continuous or quantized -> images (B, 3, H, W)."""

    @abstractmethod
    def save_pretrained(self, directory) -> Any:
        """Write config.json + model.safetensors that ``stvq.load_tokenizer`` reads back (a run's model);
        :class:`stvq.checkpoint.PretrainedMixin` provides it."""

    @abstractmethod
    def set_quantizer(self, spec: dict[str, Any]) -> None:
        """Attach the registered quantizer ``spec["name"]`` built with the rest of ``spec`` as options."""

    @abstractmethod
    def forward(self, images: torch.Tensor, noise_sigma: float = 0.0, quantize: bool = False, codes: torch.Tensor | None = None, tail_drop: float = 0.0) -> CodeTokenizerOutput:
        """Reconstruct ``images``: Gaussian noise of std ``noise_sigma`` on the codes (stage 1), through the
        quantizer with ``quantize=True`` (stage 2); ``codes`` given skips the encoder; ``tail_drop`` p
        decodes a share p of the images from a random prefix of their codes (:func:`drop_tail`).

        A forward that also takes ``generator`` (a ``torch.Generator``, None: torch's global one) draws its
        noise from it and changes no state in training (a quantizer that does says so in
        ``Quantizer.updates_in_forward``): ``stvq train`` may then split a step's batch across threads, each
        slice with its own generator (``LoopConfig.step_threads``). One that takes none runs each step whole."""


class Composer(ABC):
    """Several tokenizers -> one tokenizer over one sequence and one vocabulary."""

    @abstractmethod
    def compose(self, tokenizers: Sequence[Tokenizer], **options) -> Tokenizer: ...


class Prior(nn.Module, ABC):
    """An autoregressive model over token ids (what ``stvq prior`` trains and samples): built with
    ``vocab_size`` and ``seq_len`` (ids per image) besides its own options. ``forward(ids)`` on ids (B, T),
    T <= seq_len, returns logits (B, T + 1, vocab_size): row t is the distribution of id t given ids 0..t-1
    (row 0 given only the start, or the class id ``labels`` (B,) of a class-conditional prior)."""

    vocab_size: int
    seq_len: int
    num_classes: int  # 0: unconditional

    @abstractmethod
    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor: ...


class ImageDataset(Dataset, ABC):
    """Images (3, S, S) in [-1, 1] by index: what a ``dataset`` plugin returns for a source that can be
    indexed (and every source's ``val`` split)."""

    #: A generator with no natural end (the built-in ``shapes``): a pass over all of it names a count.
    endless: bool = False

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @abstractmethod
    def fingerprint(self) -> str:
        """A string that changes when the images do (file names and sizes, a seed): ``stvq tokenize`` refuses
        to resume into shards of other images."""


class FactorDataset(ImageDataset):
    """Images with known generating factors (the built-in ``shapes``): ``stvq eval`` probes the codes for
    each factor and, where the data has them, reads the reconstructions with a recogniser and measures
    held-out scenes of another generator; ``--train recognise=true`` logs the reading while training. What
    a data set declares here, not its name, decides what is measured."""

    #: Factor name -> number of classes (0: a continuous factor), ordered from global to local.
    factor_classes: dict[str, int]

    @abstractmethod
    def factor_table(self, count: int | None = None) -> dict[str, Any]:
        """The factors of the first ``count`` items (all by default): name -> array (count,)."""

    def recogniser(self) -> Recogniser | None:
        """A :class:`Recogniser` that reads the factors back from images, or None where the data has none."""
        return None

    def heldout_scenes(self) -> Any:
        """Items (image, object mask (1, S, S) bool) of the same kind of scene drawn by another generator,
        for the object-pixel PSNR of ``stvq eval``; None where the data has none."""
        return None

    def factor_vector(self, index: int) -> torch.Tensor | None:
        """Item ``index``'s factors as one float vector (one-hots, values), what the decoder oracle
        (the reference plugin's ``stvq oracle``) maps to codes in place of an encoder; None where the data has none."""
        return None


class Recogniser(ABC):
    """Reads a :class:`FactorDataset`'s factors back from images: ``stvq eval`` reads originals and
    reconstructions with it, ``--train recognise=true`` logs the reading while training, and ``stvq prior
    eval`` judges samples (clean share, per-factor total variation, factor survival). On reconstructions
    it sees sharpness that PSNR misses: a blob in the right place and colour scores well in PSNR and
    reads as no shape. A subclass says what it reads (:attr:`factors`) and reads (:meth:`read`)."""

    #: What it reads: factor name -> number of classes (0: a value in [0, 1]).
    factors: dict[str, int]
    #: Per continuous factor, how far a variation's value may lie from its source's and still count as kept.
    tolerance: dict[str, float]
    #: A scene is read as clean when every class factor is read with at least this probability.
    confident: float = 0.9
    #: Its own reading of the data's validation images (:meth:`reading_accuracy`), for reports.
    accuracy: dict[str, float]

    @abstractmethod
    def read(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """Per image of ``images`` (B, 3, S, S) in [-1, 1]: each class factor's id (``NAME``) and its
        probability (``NAME_p``), each continuous factor's value (``NAME``)."""

    def classes(self) -> dict[str, int]:
        return {n: k for n, k in self.factors.items() if k}

    def clean(self, read: dict[str, np.ndarray]) -> np.ndarray:
        """Per reading (bool): a clean scene of the data's kind; by default every class factor read with
        probability :attr:`confident` or more."""
        return np.all([read[f"{n}_p"] >= self.confident for n in self.classes()], axis=0)

    def reading_accuracy(self, images: torch.Tensor, truth: dict[str, np.ndarray]) -> dict[str, float]:
        """How well ``images`` show the factors ``truth`` (arrays of B): accuracy per class factor
        (``NAME_accuracy``), mean absolute error per continuous one (``NAME_mae``)."""
        read = self.read(images.cpu())
        return {f"{n}_accuracy" if k else f"{n}_mae": float((read[n] == truth[n]).mean() if k else np.abs(read[n] - truth[n]).mean()) for n, k in self.factors.items()}

    def clean_share(self, read: dict[str, np.ndarray]) -> float:
        return float(self.clean(read).mean())

    def total_variation(self, samples: dict[str, np.ndarray], data: dict[str, np.ndarray]) -> dict[str, float]:
        """Per factor, half the L1 distance between the distributions read from samples and from real
        images (0: the same; 1: disjoint); continuous factors in 8 bins over [0, 1]."""

        def histogram(values: np.ndarray, classes: int) -> np.ndarray:
            counts = np.bincount(values.astype(int), minlength=classes) if classes else np.histogram(values, bins=8, range=(0.0, 1.0))[0]
            return counts / max(1, counts.sum())

        return {n: float(0.5 * np.abs(histogram(samples[n], k) - histogram(data[n], k)).sum()) for n, k in self.factors.items()}

    def survival(self, variations: dict[str, np.ndarray], sources: dict[str, np.ndarray]) -> dict[str, float]:
        """Per factor, the share of variations that keep their source image's reading (continuous: within
        :attr:`tolerance`)."""
        return {n: float((variations[n] == sources[n]).mean() if k else (np.abs(variations[n] - sources[n]) <= self.tolerance[n]).mean()) for n, k in self.factors.items()}


class ImageStream(IterableDataset, ABC):
    """Images read in order, piece by piece (the tar shards of a webdataset), not by index: what a
    ``dataset`` plugin returns for a source that cannot be indexed. :mod:`stvq.streams` splits the pieces
    over ranks and DataLoader workers and records where each reader stands, so that training over a
    stream resumes exactly; iterating the stream itself yields its readable images in order."""

    image_size: int

    @abstractmethod
    def pieces(self) -> list[str]:
        """The pieces in their order (shard paths or URLs)."""

    @abstractmethod
    def read(self, piece: str, skip: int = 0) -> Iterator[tuple[int, str, torch.Tensor | None]]:
        """(member index, key, image (3, S, S) in [-1, 1]) for each sample of ``piece`` from member ``skip``
        on, without decoding the members before it. The image is None for a member that cannot be
        decoded: the stream warns, the caller counts and skips it."""

    def fingerprint(self) -> str:
        """A string that changes when the pieces do (their names, here)."""
        import hashlib

        return hashlib.sha256("\n".join(self.pieces()).encode()).hexdigest()

    def __iter__(self) -> Iterator[torch.Tensor]:
        for piece in self.pieces():
            yield from (image for _, _, image in self.read(piece) if image is not None)


def check_ids(ids: torch.Tensor, num_tokens: int, vocab_size: int, what: str = "ids") -> None:
    """Raise a clear :class:`StvqError` unless ``ids`` is a non-empty integer (B, num_tokens) tensor with
    values in [0, vocab_size)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        kind = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise StvqError(f"{what} must be an integer tensor (int64), got {kind}; token ids are whole numbers")
    if ids.ndim != 2 or ids.shape[1] != num_tokens:
        raise StvqError(f"expected {what} of shape (B, {num_tokens}), got {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise StvqError(f"no {what} to decode: the batch is empty")
    if ids.device.type != "meta" and (ids.min() < 0 or ids.max() >= vocab_size):  # meta: shapes alone (FLOP counting)
        raise StvqError(f"{what} must lie in [0, {vocab_size}); got [{int(ids.min())}, {int(ids.max())}]")


def check_images(images: torch.Tensor, image_size: int, values: bool = False) -> None:
    """Raise a clear :class:`StvqError` unless ``images`` is (B, 3, image_size, image_size) and, with
    ``values`` (the public ``encode``), every pixel is finite and in [-1, 1] (a little slack for
    resampling): 0-255 or 0-1 pixels would encode without a word, and wrongly."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (3, image_size, image_size):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise StvqError(f"expected images of shape (B, 3, {image_size}, {image_size}), got {shape}; resize or pick a preset of that size")
    if not values:
        return
    if not torch.isfinite(images).all():
        raise StvqError("images hold NaN or infinite values; check the data that produced them")
    low, high = images.aminmax()
    if low < -1.05 or high > 1.05:
        raise StvqError(f"images must lie in [-1, 1], got values in [{low.item():.3g}, {high.item():.3g}]; scale 0-255 pixels with x / 127.5 - 1")
