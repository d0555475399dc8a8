"""Training configuration as dataclasses, and the base of a plugin's own model config (:class:`PluginConfig`:
fields, presets and overrides by name live with the plugin that builds the model)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from stvq.errors import ConfigError, OptionRangeError, StvqError


def env_count(name: str, default: int, minimum: int) -> int:
    """A whole number from the environment (torchrun's ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ...), or one
    line naming the variable where it is not one or lies below ``minimum``."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum or value > 1 << 20:
        raise ConfigError(f"{name}={text!r} is not a whole number from {minimum} to {1 << 20:,}; unset it, or start the command with torchrun, which sets it")
    return value


def torchrun_world() -> int:
    """``WORLD_SIZE``, checked: above 1 only where torchrun (or another launcher) also set the rank and the
    rendezvous address, so that a stray ``WORLD_SIZE=2`` is one line, not a process waiting for its peers."""
    world = env_count("WORLD_SIZE", 1, 1)
    if world > 1:
        missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the command with torchrun (torchrun --nproc_per_node {world} $(which stvq) ...), or unset WORLD_SIZE")
        for name in ("RANK", "LOCAL_RANK"):
            env_count(name, 0, 0)
    return world


@dataclass(frozen=True)
class PluginConfig:
    """Base of a plugin's own architecture config (a frozen dataclass of its fields): named presets, and
    :meth:`make` from a config, a dict of fields (a ``config.json``'s) or a preset name, with overrides by
    field name. A tokenizer, encoder or decoder class names its config as ``config_class``; the commands
    find it through the registry (:func:`stvq.registry.config_class`) to type ``--set KEY=VALUE``, and the
    core reads no field of it but ``image_size``."""

    PRESETS: ClassVar[dict[str, PluginConfig]] = {}
    DEFAULT_PRESET: ClassVar[str] = "reference"

    @classmethod
    def make(cls, config: PluginConfig | dict | str | None = None, **overrides: Any) -> Any:
        preset = overrides.pop("preset", None)
        if isinstance(config, str):
            config, preset = None, config
        if isinstance(config, dict):
            overrides, config = {**config, **overrides}, None
        if config is None:
            name = preset or cls.DEFAULT_PRESET
            if name not in cls.PRESETS:
                raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(cls.PRESETS)}")
            config = cls.PRESETS[name]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
        return replace(config, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> list[tuple[str, str]]:
        """(what, value) rows for ``stvq info``: every field, unless a plugin says it in fewer words."""
        return [(f.name, str(getattr(self, f.name))) for f in fields(self)]


class FileSpec(str):
    """A ``--data`` spec read back from a file (a run's ``train.json``), not typed by the user.

    Run directories are shared and downloaded, so what they say may only name local files:
    :func:`make_dataset` refuses a spec of this type that would run a command (webdataset's ``pipe:``) or
    open a URL. Typed on one's own command line, the same spec is read as given."""

    origin: str

    def __new__(cls, value: str, origin: str) -> FileSpec:
        spec = super().__new__(cls, value)
        spec.origin = origin
        return spec

    def __reduce__(self):  # copies (dataclasses.asdict) and pickles (DataLoader workers) keep the origin
        return FileSpec, (str(self), self.origin)


#: The largest seed: torch and NumPy take any 63-bit integer.
MAX_SEED = 2**63 - 1
#: The most DataLoader worker processes a config may ask for (the command line bounds it by the machine).
MAX_WORKERS = 1024


def check_ranges(cfg: Any, nonnegative: tuple[str, ...] = (), fractions: tuple[str, ...] = ()) -> None:
    """Raise a :class:`StvqError` naming the first field of ``cfg`` in ``nonnegative`` that is not a finite
    number of 0 or more, or in ``fractions`` that is not between 0 and 1."""
    for name in nonnegative:
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0):
            raise OptionRangeError(f"{name} must be a number of 0 or more, got {getattr(cfg, name)}")
    for name in fractions:
        if not 0 <= getattr(cfg, name) <= 1:
            raise OptionRangeError(f"{name} must be between 0 and 1, got {getattr(cfg, name)}")


OPTIMIZERS = ("adamw", "muon")
#: Fields a train.json written before they existed reads at these values, not today's defaults.
WRITTEN_BEFORE = {"optimizer": "adamw"}


@dataclass
class LoopConfig:
    """What every training loop of stvq shares (:class:`stvq.loop.BaseTrainer`): optimizer, schedule,
    precision, seed, and how often it logs, evaluates and checkpoints."""

    steps: int = 2400
    batch_size: int = 24  # per process
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.05
    beta2: float = 0.95  # AdamW's second-moment decay
    # Parameter-name substring -> lr multiple (the tokenizer's encoder learns at a tenth: see TrainConfig).
    lr_scales: dict[str, float] = field(default_factory=dict)
    lr_scales_until: float = 0.5  # lr_scales hold for this fraction of the steps, then move linearly to 1 by the end
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    bf16: bool = False  # autocast matrix work to bfloat16
    compile: bool = False  # torch.compile the model's parts (checkpoints are unchanged)
    fused_optimizer: bool = True  # AdamW's fused kernel (one per step in place of a loop over parameters; 3.7x at tiny on CPU)
    # "adamw", or "muon": torch.optim.Muon (its update's RMS matched to AdamW's, so the same lr and weight
    # decay) on the matrices and convolution weights (as the matrix of their linear map) whose names contain
    # a key of muon_params (never embeddings or a decoder's last layer), AdamW on every other parameter
    # (stvq.optim.MuonAdamW). A tokenizer trains with Muon (TrainConfig).
    optimizer: str = "adamw"
    muon_params: tuple[str, ...] = ("*",)  # name substrings; "*": every hidden matrix and convolution
    # Exponential moving average of the model's weights (timm's ModelEmaV3, its decay warmed up as
    # 1 - (1 + step) ** -0.75 up to ema_decay): validation reads it, model.safetensors holds it, the
    # checkpoint holds both; 0: off.
    ema_decay: float = 0.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 300
    checkpoint_every: int = 200
    # DataLoader workers; None: 0 on a CPU, where a step outweighs reading its batch, and one per core (at
    # most 8) on a GPU, whose steps outrun one process's decoding (stvq.streams.training_workers)
    num_workers: int | None = None
    tensorboard: bool = False  # also write the log records and sample grids to RUN/tensorboard/
    wandb: str | None = None  # also log them to this Weights & Biases project (stvq.trackers)
    # CPU, one process: split each step's batch into this many slices, each slice's forward and backward
    # in its own Python thread on a share of the intra-op threads, the gradients summed in slice order
    # (a run repeats itself and resumes exactly). 1: whole steps; 0: 2 where the step can be split (a
    # CPU with two or more torch threads, no torchrun, no torch.compile, a trainer and model that allow
    # it), else 1.
    step_threads: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise OptionRangeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (isinstance(self.lr_scales, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in self.lr_scales.items())):
            raise StvqError(f'lr_scales must map parameter-name substrings to numbers, e.g. {{"encoder.": 0.1}}; got {self.lr_scales!r}')
        if not all(math.isfinite(v) and v >= 0 for v in self.lr_scales.values()):
            raise OptionRangeError(f'lr_scales must be finite multiples of 0 or more, e.g. {{"encoder.": 0.1}}; got {self.lr_scales!r}')
        if not (math.isfinite(self.beta2) and 0 <= self.beta2 < 1) or self.warmup_steps < 0:
            raise OptionRangeError(f"beta2 must be in [0, 1) and warmup_steps 0 or more, got {self.beta2} and {self.warmup_steps}")
        if self.num_workers is not None and not 0 <= self.num_workers <= MAX_WORKERS:
            raise OptionRangeError(f"--num-workers must lie in [0, {MAX_WORKERS}], got {self.num_workers:,}")
        if not 0 <= self.step_threads <= self.batch_size:
            raise OptionRangeError(f"step_threads must be between 0 (auto) and the batch size {self.batch_size}, got {self.step_threads}")
        if not 0 <= self.seed <= MAX_SEED:
            raise OptionRangeError(f"--seed must be between 0 and {MAX_SEED} (2**63 - 1), got {self.seed}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise OptionRangeError(f"--lr must be a positive number, got {self.lr}")
        check_ranges(self, nonnegative=("weight_decay", "grad_clip"), fractions=("lr_scales_until", "min_lr_ratio"))
        if not 0 <= self.ema_decay < 1:
            raise OptionRangeError(f"--ema-decay must be in [0, 1) (0: no moving average; 0.999 is usual), got {self.ema_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise StvqError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if not (isinstance(self.muon_params, (list, tuple)) and all(isinstance(k, str) and k for k in self.muon_params)):
            raise StvqError(f'muon_params must be a list of parameter-name substrings, e.g. ["blocks."]; got {self.muon_params!r}')
        self.muon_params = tuple(self.muon_params)  # train.json holds a list

    def scales_weight_at(self, step: int) -> float:
        """How much of ``lr_scales`` applies at ``step``: 1 until ``lr_scales_until`` of the run, then
        linearly down to 0 (every group at the base rate) at the last step."""
        hold = self.lr_scales_until * self.steps
        return 1.0 if step <= hold else max(0.0, (self.steps - step) / max(1.0, self.steps - hold))

    def lr_at(self, step: int, progress: float | None = None) -> float:
        """Linear warmup, then cosine decay to lr * min_lr_ratio; ``progress`` in [0, 1] drives the cosine
        instead of the step count when a run is budgeted in time (the decoder oracle)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps) if progress is None else progress
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


#: The perceptual training losses (TrainConfig.perceptual).
PERCEPTUAL_LOSSES = ("efficientnet", "lpips", "lpips-alex")


@dataclass
class TrainConfig(LoopConfig):
    """One tokenizer training run. The defaults are stage 1's recipe for ``tiny`` on 2 CPU cores, chosen
    with the decoder oracle and the full pipeline (docs/experiments/background-plateau.md)."""

    stage: int = 1  # 1: continuous codes + noise; 2: frozen encoder, quantized codes
    tokenizer: str = "styled"  # stage 1: the registered CodeTokenizer to train (stage 2 takes from_run's)
    preset: str = "tiny"  # model preset (stage 1); stage 2 takes the model of from_run
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the tokenizer's config fields, by name
    data: str = "shapes"  # "shapes" (built in) or an image folder
    # Muon on every hidden matrix and convolution (LoopConfig.muon_params), the encoder at the full rate
    # from the start: the main job 22.53 dB at seed 0 (Muon on the blocks alone: 22.00; AdamW: 20.66), the
    # decoder oracle 22.73 against AdamW's 21.29 dB (docs/experiments/sharp-reconstructions.md). AdamW needs
    # lr_scales={"encoder.": 0.1} over the first half, or training erases where the object is before the
    # decoder uses it (docs/experiments/background-plateau.md).
    optimizer: str = "muon"
    noise_sigma: float = 0.1  # stage 1: std of the Gaussian noise added to the codes
    # Stage 1, nested dropout for the prefix curve: from ``tail_drop_from`` of the steps on (once the decoder
    # renders the objects; from the start it holds training on the plateau), a share ``tail_drop`` of the
    # images is decoded from a random prefix of its codes, the rest at the batch mean (docs/experiments/background-plateau.md).
    tail_drop: float = 0.25
    tail_drop_from: float = 2 / 3
    l1_weight: float = 0.0  # L1 on the background's pixel noise drowns the object's gradient (docs/experiments/background-plateau.md)
    mse_weight: float = 1.0
    perceptual_weight: float = 0.0  # the weight of the perceptual term, 0: none
    # "efficientnet": LPIPS-style on the EfficientNet-Lite0 the package ships (stvq.losses.perceptual_loss,
    # offline); "lpips" (VGG16, what taming-transformers and LlamaGen train with) or "lpips-alex": the lpips
    # package, its weights from torch's hub cache (stvq.field_metrics)
    perceptual: str = "efficientnet"
    # Adversarial training (taming's VQGAN recipe): a registered discriminator trained beside the tokenizer
    # with the hinge loss; the decoder's term -mean D(reconstruction) is weighted by adversarial_weight times
    # the adaptive weight (gradient norms at the decoder's last layer), from step disc_start on.
    adversarial_weight: float = 0.0  # 0: no discriminator
    discriminator: str = "patchgan"  # registered discriminator plugin
    discriminator_options: dict[str, Any] = field(default_factory=dict)  # its options, e.g. {"channels": 32, "layers": 2}
    disc_start: int = 0  # first step of the adversarial term and of the discriminator's training
    adaptive_weight: bool = True
    lecam_weight: float = 0.0  # LeCam regularisation of the discriminator (TiTok: 0.001)
    # Validation also reads the reconstructions with the data set's recogniser (a FactorDataset's; shapes' is
    # trained once, about 6 CPU-minutes, then cached): val_shape_accuracy and the other factors in the log.
    recognise: bool = False
    from_run: str | None = None  # stage 2: the stage-1 run to start from
    quantizer: dict[str, Any] | None = None  # stage 2: {"name": ..., **options}; None: the run's codebook
    cache_codes: bool = True  # stage 2: train on the images whose codes `stvq quantize` cached, encoder skipped

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage not in (1, 2):
            raise OptionRangeError(f"--stage must be 1 or 2, got {self.stage}")
        if self.stage == 2 and not self.from_run:
            raise StvqError("stage 2 starts from a stage-1 run: pass --from runs/NAME")
        if not isinstance(self.model, dict) or not (self.quantizer is None or isinstance(self.quantizer, dict)):
            raise StvqError('model and quantizer must be JSON objects of options, e.g. model={"width": 64}')
        if not isinstance(self.discriminator_options, dict):
            raise StvqError('discriminator_options must be a JSON object of the discriminator\'s options, e.g. {"channels": 32}')
        if self.disc_start < 0:
            raise OptionRangeError(f"--disc-start must be a step of 0 or more, got {self.disc_start}")
        if self.perceptual not in PERCEPTUAL_LOSSES:
            raise OptionRangeError(f"--perceptual must be one of {', '.join(PERCEPTUAL_LOSSES)}, got {self.perceptual!r}")
        if self.perceptual != "efficientnet" and not self.perceptual_weight:
            raise OptionRangeError(f"--perceptual {self.perceptual} is a term of weight 0: add --perceptual-weight W (taming-transformers and LlamaGen train with 1.0)")
        check_ranges(
            self,
            nonnegative=("noise_sigma", "l1_weight", "mse_weight", "perceptual_weight", "adversarial_weight", "lecam_weight"),
            fractions=("tail_drop", "tail_drop_from"),
        )

    def tail_drop_at(self, step: int) -> float:
        """The share of images decoded from a random prefix at ``step`` (stage 1 only)."""
        return self.tail_drop if self.stage == 1 and step >= self.tail_drop_from * self.steps else 0.0


@dataclass
class PriorTrainConfig(LoopConfig):
    """One prior training run (``stvq prior train``) on the token shards that ``stvq tokenize`` wrote."""

    shards: str = ""  # the directory of shard_NNNNN.npy files and manifest.json
    prior: str = "gpt"  # the registered prior to train
    preset: str = "tiny"  # the prior's preset
    model: dict[str, Any] = field(default_factory=dict)  # the prior's options by name (e.g. width, layers)
    heldout: int = 1000  # the last images of the shards, kept out of training for evaluation (at most a tenth)
    steps: int = 1800  # 574 s on 2 cores for 20,000 images; 2000 steps: 0.3 bits per image better, 10.6 min (docs/experiments/generation.md)
    batch_size: int = 64
    weight_decay: float = 0.1
    eval_every: int = 500
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.shards:
            raise StvqError("a prior trains on token shards: pass --shards DIR (written by stvq tokenize)")
        if not isinstance(self.model, dict):
            raise StvqError('model must be a JSON object of the prior\'s options, e.g. model={"width": 256}')
        if self.heldout < 1:
            raise OptionRangeError(f"heldout must be at least 1 image, got {self.heldout}")


# --------------------------------------------------------------------------------- KEY=VALUE options


def _parse_bool(value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(value)
    return value.lower() in ("true", "1")


CASTS: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "bool": _parse_bool}


def parse_pairs(pairs: tuple[str, ...], flag: str, schema: type | None = None, example: str = "levels=[8,5,5,5]") -> dict[str, Any]:
    """The one KEY=VALUE parser: ``("width=256", "lr_scales={\"encoder.\": 0.3}")`` -> a dict. With a
    config dataclass ``schema``, keys must be its fields and values take the field's type (int, float,
    bool, str; other types as JSON); without one, values are JSON where they parse, else strings."""
    types = {f.name: f.type for f in fields(schema)} if schema else None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not (sep and key and value):
            raise ConfigError(f"{flag} {pair!r} is not KEY=VALUE, e.g. {flag} {example}")
        if types is not None and key not in types:
            raise ConfigError(f"{flag} {key}: unknown config field; known fields: {', '.join(sorted(types))}")
        kind = str(types[key]) if types is not None else None
        try:
            out[key] = CASTS[kind](value) if kind in CASTS else json.loads(value)
        except ValueError:  # json.JSONDecodeError is a ValueError
            if kind is None:
                out[key] = value  # an option's plain string
            else:
                raise ConfigError(f"{flag} {key}={value}: expected a value of type {kind}") from None
    return out


def parse_options(pairs: tuple[str, ...], flag: str) -> dict[str, Any]:
    """``("levels=[8,5,5,5]", "decay=0.9")`` -> {"levels": [8, 5, 5, 5], "decay": 0.9}: a plugin's options."""
    return parse_pairs(pairs, flag)
