"""Model and training configuration as dataclasses; model presets are named instances of ModelConfig."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from stvq.errors import ConfigError, StvqError

ATTN_MASKS = ("none", "causal-placeholders")
ENCODER_INITS = ("vit", "lecun-sincos")
POS_INITS = ("normal", "sincos")
HEADS = ("linear", "conv", "pixel", "film")  # what follows out_conv (stvq_reference.heads)


@dataclass(frozen=True)
class ModelConfig:
    """The Styled VQ architecture (SPEC section 3). Defaults are the ``reference`` preset."""

    image_size: int = 256  # square input and output resolution
    patch_size: int = 16  # input_conv kernel and stride; out_conv inverts it
    width: int = 1024  # transformer width D, encoder and decoder
    heads: int = 16  # attention heads; width must divide by it
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width
    encoder_layers: int = 24
    condition_layers: int = 18  # layer i consumes codes 2i and 2i+1: num_tokens = 2 * condition_layers
    plain_layers: int = 6  # plain transformer layers after the condition layers
    code_dim: int = 16  # width of each continuous code c_i (the quantizer's input)
    attn_mask: str = "none"  # decoder attention: "none", or "causal-placeholders" (no peeking at later ones)
    qk_norm: bool = False  # LayerNorm on queries and keys in every attention (a stabiliser for higher learning rates)
    # What follows out_conv: "linear" (none: out_conv un-patchifies straight to RGB, the SPEC's structure),
    # "conv" (out_conv to head_channels C, then two 3x3 convs) or "pixel" (to C channels, plus the token grid
    # upsampled bilinearly, a 3x3 conv and a per-pixel MLP: no patch seams). head_channels > 0 with "linear"
    # is the earlier spelling of "conv".
    head: str = "linear"
    head_channels: int = 0
    zero_init: bool = False  # decoder blocks start as the identity (adaLN-Zero style)
    pos_init: str = "normal"  # position embeddings start as "normal" (ViT, std 0.02) or "sincos" (2D sin-cos)
    # How the encoder starts: "vit" (std 0.02 weights and positions, as ViT) or "lecun-sincos" (weights std
    # 1/sqrt(fan_in), 2D sin-cos positions): a fresh encoder whose codes already tell where the object is
    # (README, "The background plateau").
    encoder_init: str = "vit"
    encoder: str = "styled"  # registered encoder plugin
    decoder: str = "styled"  # registered decoder plugin

    @property
    def num_tokens(self) -> int:
        return 2 * self.condition_layers

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def seq_len(self) -> int:
        """Encoder and decoder sequence length: patches + tokens."""
        return self.num_patches + self.num_tokens

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type == "int" and (not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 0):
                raise ConfigError(f"config field {f.name} must be a non-negative integer, got {getattr(self, f.name)!r}")
        for name in ("image_size", "patch_size", "width", "heads", "code_dim"):  # sizes that divide or allocate
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name} must be at least 1, got {getattr(self, name)}")
        if not (isinstance(self.mlp_ratio, (int, float)) and math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0):
            raise ConfigError(f"config field mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}; pick sizes that divide"
            )
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.condition_layers < 1:
            raise ConfigError("condition_layers must be at least 1 (it sets the number of tokens)")
        if self.attn_mask not in ATTN_MASKS:
            raise ConfigError(f"attn_mask {self.attn_mask!r} is not one of {', '.join(ATTN_MASKS)}")
        if self.pos_init not in POS_INITS:
            raise ConfigError(f"pos_init {self.pos_init!r} is not one of {', '.join(POS_INITS)}")
        if self.head not in HEADS:
            raise ConfigError(f"head {self.head!r} is not one of {', '.join(HEADS)}")
        if self.head == "linear" and self.head_channels:
            object.__setattr__(self, "head", "conv")  # configs written before the head field
        if self.head != "linear" and not self.head_channels:
            raise ConfigError(f"head {self.head!r} needs head_channels > 0 (the channels out_conv writes), e.g. --set head_channels=16")
        if self.encoder_init not in ENCODER_INITS:
            raise ConfigError(f"encoder_init {self.encoder_init!r} is not one of {', '.join(ENCODER_INITS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # Exactly SPEC section 3: 256 px, width 1024, 24 encoder layers, 18 condition + 6 plain decoder layers.
    "reference": ModelConfig(),
    # Between the two: 128 px, width 512; still 36 tokens.
    "small": ModelConfig(image_size=128, width=512, heads=8, encoder_layers=8, plain_layers=2),
    # CPU preset: 64 px, 16 px patches (16 positions), width 64. Chosen by the decoder oracle at equal wall
    # time on 2 cores (README, "The background plateau"): 3.6x the images per second of width 128 with
    # 8 px patches, and the better PSNR after 5 minutes. Its encoder starts "lecun-sincos": with ViT's start
    # a narrow encoder's codes carry no position, and stage 1 never leaves the background plateau. Its
    # decoder ends in the pixel head: no patch seams, +1.5 dB in the oracle at 1,400 steps (README).
    "tiny": ModelConfig(
        image_size=64, patch_size=16, width=64, heads=2, encoder_layers=4, plain_layers=2, encoder_init="lecun-sincos", head="pixel", head_channels=16
    ),
    # The ablation of SPEC section 6: tiny with the unordered decoder (same size, no per-layer code pairs).
    "tiny-unordered": ModelConfig(
        image_size=64, patch_size=16, width=64, heads=2, encoder_layers=4, plain_layers=2, encoder_init="lecun-sincos", head="pixel", head_channels=16,
        decoder="unordered",
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def make_config(config: ModelConfig | dict | str | None = None, **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a config, a dict of fields, a preset name (default ``reference``),
    with ``overrides`` applied by field name. ``preset=NAME`` may be given as an override too."""
    preset = overrides.pop("preset", None)
    if isinstance(config, str):
        config, preset = None, config
    if isinstance(config, dict):
        config = dict(config)
        overrides = {**config, **overrides}
        config = None
    base = config if config is not None else get_preset(preset or "reference")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
    return replace(base, **overrides)


#: The largest seed: torch and NumPy take any 63-bit integer.
MAX_SEED = 2**63 - 1


def check_ranges(cfg: Any, nonnegative: tuple[str, ...] = (), fractions: tuple[str, ...] = ()) -> None:
    """Raise a :class:`StvqError` naming the first field of ``cfg`` in ``nonnegative`` that is not a finite
    number of 0 or more, or in ``fractions`` that is not between 0 and 1."""
    for name in nonnegative:
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0):
            raise StvqError(f"{name} must be a number of 0 or more, got {getattr(cfg, name)}")
    for name in fractions:
        if not 0 <= getattr(cfg, name) <= 1:
            raise StvqError(f"{name} must be between 0 and 1, got {getattr(cfg, name)}")


@dataclass
class LoopConfig:
    """What every training loop of stvq shares (:class:`stvq.train.BaseTrainer`): optimizer, schedule,
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
    fused_optimizer: bool = False  # AdamW's fused kernel (one per step in place of a loop over parameters)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 300
    checkpoint_every: int = 200
    num_workers: int = 0
    tensorboard: bool = False  # also write the log records and sample grids to RUN/tensorboard/

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise StvqError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (isinstance(self.lr_scales, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in self.lr_scales.items())):
            raise StvqError(f'lr_scales must map parameter-name substrings to numbers, e.g. {{"encoder.": 0.1}}; got {self.lr_scales!r}')
        if self.num_workers < 0:
            raise StvqError(f"--num-workers must be 0 or more, got {self.num_workers}")
        if not 0 <= self.seed <= MAX_SEED:
            raise StvqError(f"--seed must be between 0 and {MAX_SEED} (2**63 - 1), got {self.seed}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise StvqError(f"--lr must be a positive number, got {self.lr}")
        check_ranges(self, nonnegative=("weight_decay", "grad_clip"), fractions=("lr_scales_until", "min_lr_ratio"))

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


@dataclass
class TrainConfig(LoopConfig):
    """One tokenizer training run. The defaults are stage 1's recipe for ``tiny`` on 2 CPU cores, chosen
    with the decoder oracle and the full pipeline (README, "The background plateau")."""

    stage: int = 1  # 1: continuous codes + noise; 2: frozen encoder, quantized codes
    tokenizer: str = "styled"  # stage 1: the registered CodeTokenizer to train (stage 2 takes from_run's)
    preset: str = "tiny"  # model preset (stage 1); stage 2 takes the model of from_run
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides by field name
    data: str = "shapes"  # "shapes" (built in) or an image folder
    # The encoder learns at a tenth of the rate, so that where the object is, which a fresh `lecun-sincos`
    # encoder already tells, survives until the decoder uses it.
    lr_scales: dict[str, float] = field(default_factory=lambda: {"encoder.": 0.1})
    noise_sigma: float = 0.1  # stage 1: std of the Gaussian noise added to the codes
    # Stage 1, nested dropout for the prefix curve: from ``tail_drop_from`` of the steps on (once the decoder
    # renders the objects; from the start it holds training on the plateau), a share ``tail_drop`` of the
    # images is decoded from a random prefix of its codes, the rest at the batch mean (README).
    tail_drop: float = 0.25
    tail_drop_from: float = 2 / 3
    l1_weight: float = 0.0  # L1 on the background's pixel noise drowns the object's gradient (README)
    mse_weight: float = 1.0
    perceptual_weight: float = 0.0  # LPIPS-style EfficientNet-Lite0 feature loss at every stage (stvq.losses.perceptual_loss)
    # Adversarial training (taming's VQGAN recipe): a registered discriminator trained beside the tokenizer
    # with the hinge loss; the decoder's term -mean D(reconstruction) is weighted by adversarial_weight times
    # the adaptive weight (gradient norms at the decoder's last layer), from step disc_start on.
    adversarial_weight: float = 0.0  # 0: no discriminator
    discriminator: str = "patchgan"  # registered discriminator plugin
    discriminator_options: dict[str, Any] = field(default_factory=dict)  # its options, e.g. {"channels": 32, "layers": 2}
    disc_start: int = 0  # first step of the adversarial term and of the discriminator's training
    adaptive_weight: bool = True
    lecam_weight: float = 0.0  # LeCam regularisation of the discriminator (TiTok: 0.001)
    # Validation also reads the reconstructions with the factor recogniser (stvq.judge; shapes only; trained
    # once, about 6 CPU-minutes, then cached): val_shape_accuracy and the other factors in the log.
    recognise: bool = False
    from_run: str | None = None  # stage 2: the stage-1 run to start from
    quantizer: dict[str, Any] | None = None  # stage 2: {"name": ..., **options}; None: the run's codebook
    cache_codes: bool = True  # stage 2: train on the images whose codes `stvq quantize` cached, encoder skipped

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage not in (1, 2):
            raise StvqError(f"--stage must be 1 or 2, got {self.stage}")
        if self.stage == 2 and not self.from_run:
            raise StvqError("stage 2 starts from a stage-1 run: pass --from runs/NAME")
        if not isinstance(self.model, dict) or not (self.quantizer is None or isinstance(self.quantizer, dict)):
            raise StvqError("model and quantizer must be JSON objects of options, e.g. model={\"width\": 64}")
        if not isinstance(self.discriminator_options, dict):
            raise StvqError('discriminator_options must be a JSON object of the discriminator\'s options, e.g. {"channels": 32}')
        if self.disc_start < 0:
            raise StvqError(f"--disc-start must be a step of 0 or more, got {self.disc_start}")
        check_ranges(
            self, nonnegative=("noise_sigma", "l1_weight", "mse_weight", "perceptual_weight", "adversarial_weight", "lecam_weight"),
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
    steps: int = 1800  # 574 s on 2 cores for 20,000 images; 2000 steps: 0.3 bits per image better, 10.6 min (README)
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
            raise StvqError(f"heldout must be at least 1 image, got {self.heldout}")
