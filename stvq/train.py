"""Training: stage 1 (continuous codes with Gaussian noise, encoder and decoder together) and stage 2
(frozen encoder, quantized codes, decoder fine-tuned). One run = one directory (:class:`stvq.run.RunDir`
owns its layout). Runs under ``torchrun`` with DistributedDataParallel (NCCL on GPUs, gloo on CPU); rank 0 alone writes.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from stvq.checkpoint import load_pretrained, run_lock, save_tensors
from stvq.config import MAX_SEED, LoopConfig, TrainConfig
from stvq.data import check_fits, first_images, is_stream, make_dataset
from stvq.distributed import all_gather_objects, init_distributed
from stvq.errors import CheckpointError, StvqError, TrainingDiverged, first_line
from stvq.flops import count_flops, device_peak, emulates_bf16, mfu
from stvq.images import save_image_grid
from stvq.interfaces import CodeTokenizer, Decoder, Discriminator, FactorDataset
from stvq.losses import AdversarialLoss, ReconstructionLoss, mean_image_psnr, psnr
from stvq.optim import MuonAdamW
from stvq.registry import create, require_subclass
from stvq.run import RunDir, cache_key
from stvq.streams import StreamBatches, StreamState, loader, training_workers



# --------------------------------------------------------------------------------------------- data


class WithCodes(Dataset):
    """Items 0..M-1 of a data set with their cached codes: (image, codes)."""

    def __init__(self, dataset: Dataset, codes: torch.Tensor) -> None:
        self.dataset, self.codes = dataset, codes

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset[index], self.codes[index]


class StepBatches:
    """Deterministic batches by step: epoch e is a permutation seeded by (seed, e); step s takes the next
    ``batch_size * world`` indices and this rank its slice. Resuming at step s gives the same batches."""

    def __init__(self, length: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1) -> None:
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.length)
        return self._perm

    def indices(self, step: int) -> list[int]:
        size = self.batch_size * self.world
        first = step * size + self.rank * self.batch_size
        out = []
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, self.length)
            out.append(int(self._permutation(epoch)[offset]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return (self.indices(step) for step in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


# ------------------------------------------------------------------------------------------ stages


class Stage:
    """One training stage: what it builds, what stays frozen, and what the model's forward gets."""

    number: int

    def build(self, cfg: TrainConfig) -> CodeTokenizer:
        raise NotImplementedError

    def set_modes(self, model: CodeTokenizer) -> None:
        """After ``model.train()``: put the parts that do not train back into eval mode."""

    def forward_options(self, cfg: TrainConfig, step: int) -> dict[str, Any]:
        """Keyword arguments of :meth:`CodeTokenizer.forward` at a training ``step``; ``step=None``: at
        validation."""
        raise NotImplementedError

    def with_cached_codes(self, cfg: TrainConfig, model: CodeTokenizer, dataset: Dataset) -> tuple[Dataset, int | None]:
        """The data set to train on, and how many images come with cached codes (None: no cache)."""
        return dataset, None


class ContinuousStage(Stage):
    """Stage 1: a fresh ``cfg.tokenizer``, encoder and decoder trained on noisy continuous codes, with
    nested dropout (``tail_drop``) over the last part of the run."""

    number = 1

    def build(self, cfg: TrainConfig) -> CodeTokenizer:
        require_subclass("tokenizer", cfg.tokenizer, CodeTokenizer, "stvq train trains tokenizers with continuous codes (encoder, codes, decoder)")
        return _code_tokenizer(create("tokenizer", cfg.tokenizer, preset=cfg.preset, **cfg.model))

    def forward_options(self, cfg: TrainConfig, step: int | None) -> dict[str, Any]:
        if step is None:
            return {}
        return {"noise_sigma": cfg.noise_sigma, "tail_drop": cfg.tail_drop_at(step)}


class QuantizedStage(Stage):
    """Stage 2: the stage-1 run's model with its quantizer (or ``cfg.quantizer``); the encoder is frozen,
    the decoder learns the quantized codes, which come from the cache ``stvq quantize`` wrote where it can."""

    number = 2

    def build(self, cfg: TrainConfig) -> CodeTokenizer:
        source = Path(cfg.from_run)
        if not (source / "config.json").is_file():
            raise StvqError(f"--from {source}: not a run directory (no config.json); pass a finished stage-1 run")
        model = _code_tokenizer(load_pretrained(source).train())
        if cfg.quantizer:
            model.set_quantizer(cfg.quantizer)
        elif model.quantizer is None:
            raise StvqError(f"run {cfg.from_run} has no codebook: run `stvq quantize --run {cfg.from_run} --k 8192` first, or pass --quantizer fsq or ema-vq")
        model.encoder.requires_grad_(False)
        return model

    def set_modes(self, model: CodeTokenizer) -> None:
        model.encoder.eval()

    def forward_options(self, cfg: TrainConfig, step: int | None) -> dict[str, Any]:
        return {"quantize": True}

    def with_cached_codes(self, cfg: TrainConfig, model: CodeTokenizer, dataset: Dataset) -> tuple[Dataset, int | None]:
        if not cfg.cache_codes or is_stream(dataset):  # a stream's images have no index to look codes up by
            return dataset, None
        cached = RunDir(cfg.from_run).load_codes(cache_key(model.encoder, cfg.data, model.config.image_size, cfg.seed))
        return (dataset, None) if cached is None else (WithCodes(dataset, cached), len(cached))


STAGES: dict[int, Stage] = {1: ContinuousStage(), 2: QuantizedStage()}
VAL_IMAGES = 64  # validation images a run reconstructs at each evaluation


def _code_tokenizer(model: Any) -> CodeTokenizer:
    if not isinstance(model, CodeTokenizer):
        raise StvqError(f"tokenizer {type(model).__name__} cannot be trained by stvq train: it is not a CodeTokenizer (encoder, codes, decoder)")
    return model


def build_model(cfg: TrainConfig) -> CodeTokenizer:
    """The model stage ``cfg.stage`` trains (:class:`ContinuousStage`, :class:`QuantizedStage`)."""
    return STAGES[cfg.stage].build(cfg)


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> None:
    """Keep freed memory in the process (glibc): by default every freed block over the mmap threshold, and
    the top of the heap past the trim threshold, go back to the kernel, so each training step's activations
    are faulted in again page by page (about 16,000 page faults a step at ``tiny``, 35 ms of system time).
    Raising both thresholds (to 32 MiB, glibc's largest mmap threshold, and 1 GiB) keeps them for the next
    step: the CPU oracle step 1.09-1.15x faster, measured side by side (README, "Throughput"). Setting
    either turns glibc's dynamic adjustment of both off. A no-op outside Linux or where the C library is
    not glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_trim_threshold, trim_threshold)
    mallopt(m_mmap_threshold, mmap_threshold)


def check_batch_fits(batch_size: int, item: Any, device: torch.device) -> None:
    """Refuse a batch of items like ``item`` that alone exceed the device's memory (a step needs many times
    more), before any is read."""
    check_fits(batch_size, item, f"--batch-size {batch_size}: its items alone", "lower --batch-size", device)


def warn_if_bf16_is_emulated(device: torch.device, bf16: bool) -> None:
    """One warning when ``bf16`` autocast would run emulated on this CPU (:func:`stvq.flops.emulates_bf16`)."""
    if bf16 and emulates_bf16(device):
        warnings.warn("bf16 on this CPU is emulated (it has neither AVX512_BF16 nor AMX): its matrix products run "
                      "about 20x slower than float32's; leave bf16 off (--bf16, or --train bf16=true in the oracle)", stacklevel=2)


def make_optimizer(model: torch.nn.Module, cfg: LoopConfig, weight_decay: float | None = None) -> torch.optim.Optimizer:
    """AdamW, or with ``cfg.optimizer == "muon"`` Muon on the hidden matrices and convolution weights
    named by ``cfg.muon_params`` ("*": all of them; never an embedding table or the decoder's last layer,
    which writes the pixels) and AdamW on the rest (:class:`stvq.optim.MuonAdamW`); no weight decay on
    biases, norms and learned tokens (1-D or 3-D embeddings); a parameter whose name contains a key of
    ``cfg.lr_scales`` learns at that multiple of the learning rate. ``weight_decay`` replaces
    ``cfg.weight_decay`` (a discriminator trains without)."""
    decay = cfg.weight_decay if weight_decay is None else weight_decay
    groups: dict[tuple[float, float, bool], list[torch.nn.Parameter]] = {}
    output = model.decoder.last_layer() if isinstance(model, CodeTokenizer) else None
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = next((v for k, v in cfg.lr_scales.items() if k in name), 1.0)
            weight = p.ndim in (2, 4)  # a matrix or a convolution: not a bias, norm or learned token
            named = any(k == "*" or k in name for k in cfg.muon_params)
            muon = cfg.optimizer == "muon" and weight and named and p is not output and id(p) not in tables
            groups.setdefault((scale, decay if weight else 0.0, muon), []).append(p)
    params = [{"params": ps, "weight_decay": decay, "lr_scale": scale, "muon": muon} for (scale, decay, muon), ps in groups.items()]
    fused = cfg.fused_optimizer or None
    if cfg.optimizer == "muon":
        return MuonAdamW(params, cfg.lr, (0.9, cfg.beta2), fused)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, cfg.beta2), fused=fused)


def make_optimizers(parts: dict[str, torch.nn.Module], cfg: LoopConfig) -> dict[str, torch.optim.Optimizer]:
    """One optimizer per trained part: the model's (:func:`make_optimizer`), and for each companion (a
    discriminator) AdamW at the same rate, without weight decay, with no ``lr_scales``."""
    companion = replace(cfg, lr_scales={}, optimizer="adamw")
    return {name: make_optimizer(m, cfg) if name == "model" else make_optimizer(m, companion, weight_decay=0.0) for name, m in parts.items()}


def update(opts: dict[str, torch.optim.Optimizer], losses: dict[str, torch.Tensor], grad_clip: float) -> None:
    """One step of each part that has a loss this step, in order (the model before its discriminator, whose
    loss reads detached reconstructions): backward, clip the gradient norm (0: no clipping), step."""
    for name, loss in losses.items():
        opt = opts[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_and_step(opt, grad_clip)


def clip_and_step(opt: torch.optim.Optimizer, grad_clip: float) -> None:
    """Clip the gradient norm of ``opt``'s parameters (0: no clipping), then step."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    opt.step()


def split_batch(batch: torch.Tensor | tuple | list, parts: int) -> list:
    """A batch (a tensor, or a tuple or list of tensors of one length) in ``parts`` slices along its first
    dimension, as even as they come."""
    if isinstance(batch, torch.Tensor):
        return list(batch.tensor_split(parts))
    return [type(batch)(pieces) for pieces in zip(*(t.tensor_split(parts) for t in batch))]


def batch_length(batch: torch.Tensor | tuple | list) -> int:
    return len(batch if isinstance(batch, torch.Tensor) else batch[0])


def set_lr(opt: torch.optim.Optimizer, lr: float, scales_weight: float = 1.0) -> None:
    """The schedule's learning rate, times each group's ``lr_scale`` (moved towards 1 as
    ``scales_weight`` goes from 1 to 0)."""
    for group in opt.param_groups:
        scale = group.get("lr_scale", 1.0)  # checkpoints of earlier versions have none
        group["lr"] = lr * (1.0 + (scale - 1.0) * scales_weight)


class ImageObjective:
    """What a decoder learns from, the same in stage 1, stage 2 and the decoder oracle (so that a recipe
    found in the oracle carries over): :class:`ReconstructionLoss`, and where ``cfg.adversarial_weight`` >
    0 a registered discriminator (an :class:`AdversarialLoss` companion, trained beside the model with its
    own optimizer) whose term joins the model's loss from ``cfg.disc_start`` on."""

    def __init__(self, cfg: TrainConfig, image_size: int) -> None:
        self.reconstruction = ReconstructionLoss.from_config(cfg)
        self.adversarial = None
        if cfg.adversarial_weight > 0:
            require_subclass("discriminator", cfg.discriminator, Discriminator, "adversarial training needs images -> realness logits")
            critic = create("discriminator", cfg.discriminator, image_size=image_size, **cfg.discriminator_options)
            self.adversarial = AdversarialLoss(critic, cfg.adversarial_weight, cfg.disc_start, cfg.adaptive_weight, cfg.lecam_weight)

    def companions(self) -> dict[str, torch.nn.Module]:
        """The modules trained beside the model, by name (saved in the checkpoint, not in model.safetensors)."""
        return {"discriminator": self.adversarial} if self.adversarial is not None else {}

    def __call__(
        self, reconstruction: torch.Tensor, images: torch.Tensor, quantized, step: int, decoder: Decoder, critic: torch.nn.Module | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """({part: loss} for :func:`update`, the terms by name); ``decoder`` is the one that drew the
        reconstruction (its last layer weighs the adversarial term); ``critic`` is the companion as the loop
        runs it (wrapped for DDP), by default the companion itself."""
        loss, terms = self.reconstruction(reconstruction, images)
        losses = {"model": loss}
        adversarial = self.adversarial
        if adversarial is not None and adversarial.active(step):
            g_loss, g_terms = adversarial.generator_loss(reconstruction, loss, decoder.last_layer())
            d_loss, d_terms = (critic or adversarial)(images, reconstruction)
            losses = {"model": loss + g_loss, "discriminator": d_loss}
            terms = {**terms, **g_terms, **d_terms}
        if quantized is not None:
            losses["model"] = losses["model"] + quantized.loss
        return losses, terms


# ---------------------------------------------------------------------------------------- checkpoint


def _optim_prefix(name: str) -> tuple[str, str]:
    """(tensor prefix, metadata key) of a part's optimizer state; the model's keep their first names."""
    return ("optim", "param_groups") if name == "model" else (f"optim_{name}", f"param_groups.{name}")


def save_checkpoint(
    path: Path, parts: dict[str, torch.nn.Module], opts: dict[str, torch.optim.Optimizer], step: int, data_generator: torch.Generator,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Every part's weights and, for those in ``opts``, optimizer state (the model, companions such as a
    discriminator, the weights' moving average), the RNG state and ``extra`` tensors (a stream's reader
    positions) in one safetensors file: one atomic rename, never a torn mix."""
    tensors = dict(extra or {})
    metadata = {"step": str(step)}
    for name, module in parts.items():
        tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        if name not in opts:
            continue
        prefix, groups = _optim_prefix(name)
        state = opts[name].state_dict()
        for index, entries in state["state"].items():
            for key, value in entries.items():
                tensors[f"{prefix}.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        metadata[groups] = json.dumps(state["param_groups"])
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = data_generator.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_tensors(path, tensors, metadata)


def load_checkpoint(path: Path, parts: dict[str, torch.nn.Module], opts: dict[str, torch.optim.Optimizer], data_generator: torch.Generator) -> int:
    """Restore what :func:`save_checkpoint` wrote; returns the step to continue from."""
    if not path.is_file():
        raise CheckpointError(f"no {path.name} in {path.parent}: the run never reached its first checkpoint; start it again")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # a torn file or a header that lies: safetensors raises several types
        raise CheckpointError(f"{path} is not a readable stvq checkpoint ({type(err).__name__}: {first_line(err)}); start the run again in another directory") from None
    missing = [name for name in opts if _optim_prefix(name)[1] not in metadata]
    missing += [name for name in parts if not any(k.startswith(f"{name}.") for k in tensors)]
    if missing:
        raise CheckpointError(f"{path} holds no {missing[0]}: it was written by a run without one; resume with the run's own train.json")
    try:
        for name, module in parts.items():
            module.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}.")})
            if name not in opts:
                continue
            prefix, groups = _optim_prefix(name)
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in tensors.items():
                if key.startswith(f"{prefix}."):
                    _, index, entry = key.split(".", 2)
                    state.setdefault(int(index), {})[entry] = value
            opts[name].load_state_dict({"state": state, "param_groups": json.loads(metadata[groups])})
        torch.set_rng_state(tensors["rng.torch"])
        data_generator.set_state(tensors["rng.data"])
    except Exception as err:  # another model's tensors, missing entries: many types
        raise CheckpointError(f"{path} does not match this run ({type(err).__name__}: {first_line(err)}); start the run again in another directory") from None
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(metadata["step"])


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint holds, read from its header alone; None where there is no checkpoint."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return int(f.metadata()["step"])
    except Exception as err:  # a torn or foreign file: safetensors and int() raise their own types
        raise CheckpointError(f"{path} is not a readable stvq checkpoint ({first_line(err)}); start the run again in another directory") from None


# ------------------------------------------------------------------------------------------ training


class BaseTrainer:
    """One training job in the run directory ``run`` (``resume=True`` continues it from its checkpoint):
    the loop every stvq model shares. :meth:`fit` reads top to bottom: build, lock, restore, then per step
    :meth:`step`, the log record (with :meth:`evaluate` every ``eval_every``) and the checkpoint, and the
    summary. A subclass says what to build (:meth:`build`), what a step computes (:meth:`step`) and how
    to evaluate; :class:`Trainer` trains tokenizers, :class:`stvq.prior.PriorTrainer` priors."""

    def __init__(self, cfg: LoopConfig, run: str | Path, resume: bool = False, progress: bool = True, console=None) -> None:
        self.cfg, self.dir, self.resume = cfg, RunDir(run), resume
        self.rank, self.world, self.device = init_distributed()
        if cfg.num_workers is None:  # resolved before train.json is written: a resume reads the same number
            self.cfg = replace(cfg, num_workers=training_workers(None, self.device))
        self.is_main = self.rank == 0
        self.progress, self.console = progress and self.is_main, console
        if not resume and self.dir.checkpoint.exists():
            raise StvqError(f"{self.dir} already holds a run; continue it with --resume {self.dir} or pass another --run")

    # ----------------------------------------------------------------------- what a subclass says

    def build(self) -> tuple[torch.nn.Module, Dataset, Any]:
        """(model on self.device, training data set, validation data): bad data fails here, before the
        run directory is written."""
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module, dataset: Dataset, val: Any) -> tuple[Dataset, dict[str, Any]]:
        """After restoring: modes, cached inputs; returns the data set to train on and summary entries."""
        return dataset, {}

    def compile(self, model: torch.nn.Module) -> None:
        """``--compile``: compile the model in place (parameter names, and so checkpoints, stay the same)."""
        model.compile()

    def companions(self) -> dict[str, torch.nn.Module]:
        """Modules trained beside the model (a discriminator), by name, built in :meth:`build`: each has its
        own optimizer, and its weights and optimizer state live in the checkpoint, not in the model's files."""
        return {}

    def flops_per_item(self, model: torch.nn.Module) -> int:
        """The model FLOPs of one training item, forward and backward (:func:`stvq.flops.count_flops`),
        for MFU; counted after :meth:`prepare`, before :meth:`compile`."""
        raise NotImplementedError

    def step(
        self, net: torch.nn.Module, batch: Any, step: int, generator: torch.Generator | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
        """Forward and losses of one batch at ``step``: ({"model": loss, companion: its loss, ...} to
        minimise, in update order; record entries as detached tensors or numbers, read only on logged steps
        so that a GPU is not synchronised every step; batch size). The loop runs companions as ``self.nets``.
        ``generator``: where the forward's random draws come from when the step is split across threads
        (:meth:`split_refusal` says when it may be)."""
        raise NotImplementedError

    def split_refusal(self, model: torch.nn.Module) -> str | None:
        """Why a step of this trainer cannot be split across threads (``LoopConfig.step_threads``), or None
        where its batch's slices may run side by side: each slice's loss its mean, the forward drawing only
        from the generator :meth:`step` is given and changing no shared state."""
        return f"{type(self).__name__} runs its steps whole"

    def evaluate(self, model: torch.nn.Module, val: Any, step: int) -> dict[str, float]:
        """Validation numbers at ``step``, for the log record."""
        raise NotImplementedError

    def status(self, record: dict[str, Any], last_eval: dict[str, float]) -> str:
        """The progress bar's text."""
        return f"loss {record['loss']:.4f}  {record['images_per_s']:.0f} items/s"

    # -------------------------------------------------------------------------------- the loop

    def fit(self) -> dict[str, Any]:
        """Train; a resumed run that already holds ``cfg.steps`` steps is left untouched, and its summary
        comes back with ``"finished"``: the step it holds."""
        done = checkpoint_step(self.dir.checkpoint) if self.resume else None
        if done is not None and done >= self.cfg.steps:
            return {**(self.dir.read_summary() or {"run": str(self.dir)}), "finished": done}
        torch.manual_seed(self.cfg.seed)
        model, dataset, val = self.build()
        self.threads = self._step_threads(model)  # a split that cannot be is refused before the run is written
        with run_lock(self.dir.path) if self.is_main else nullcontext():  # one writer per run directory
            return self._train(model, dataset, val)

    def _train(self, model: torch.nn.Module, dataset: Dataset, val: Any) -> dict[str, Any]:
        cfg = self.cfg
        keep_freed_memory()
        parts = {"model": model, **self.companions()}
        opts = make_optimizers(parts, cfg)
        ema = ModelEmaV3(model, cfg.ema_decay, use_warmup=True, warmup_power=0.75) if cfg.ema_decay else None
        saved = {**parts, "ema": ema.module} if ema else parts  # what the checkpoint holds
        data_generator = torch.Generator().manual_seed(cfg.seed)  # the loader's own: keeps the global RNG exact
        start, logged_seconds = self._restore(saved, opts, data_generator)
        dataset, extras = self.prepare(model, dataset, val)
        flops = self._flops(model)
        peak, peak_source = device_peak(self.device, cfg.bf16)
        warn_if_bf16_is_emulated(self.device, cfg.bf16)
        if cfg.compile:
            self.compile(model)
        check_batch_fits(cfg.batch_size, next(iter(dataset), None) if is_stream(dataset) else dataset[0], self.device)  # None: an empty stream, refused by its reader
        batches, stream = self._batches(dataset, start, data_generator)
        self.nets = {name: DistributedDataParallel(m) if self.world > 1 else m for name, m in parts.items()}
        intra = max(1, torch.get_num_threads() // self.threads)  # set in each worker thread: the main thread keeps its own

        clock = _Clock(logged_seconds)
        last_eval: dict[str, float] = {}
        board = self._tensorboard(start)
        pool = ThreadPoolExecutor(self.threads, initializer=torch.set_num_threads, initargs=(intra,)) if self.threads > 1 else None
        with self._progress_bar() as bar, board or nullcontext(), pool or nullcontext():
            task = bar.add_task("train", total=cfg.steps, completed=start, status="")
            for step, batch in enumerate(batches, start=start):
                batch = stream.take(batch) if stream else batch
                for opt in opts.values():
                    set_lr(opt, cfg.lr_at(step), cfg.scales_weight_at(step))
                if pool:
                    losses, terms, size = self._split_step(pool, opts["model"], batch, step)
                else:
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                        losses, terms, size = self.step(self.nets["model"], batch, step)
                self._update(opts, losses, step, backward=pool is None)
                done = step + 1
                if ema:
                    ema.update(model, step=done)
                clock.count(size * self.world)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    evaluation = self._evaluate(model, ema, val, done) if done % cfg.eval_every == 0 or done == cfg.steps else {}
                    last_eval = evaluation or last_eval
                    record = {"step": done, "loss": losses["model"].item(), **{k: float(v) for k, v in terms.items()}, "lr": cfg.lr_at(step), **clock.lap(), **evaluation}
                    record["mfu"] = mfu(flops, record["images_per_s"], peak, self.world)
                    if self.is_main:
                        self.dir.log(record)
                        if board:
                            self._to_tensorboard(board, record, done)
                    bar.update(task, status=self.status(record, last_eval))
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    readers = {"data.positions": torch.from_numpy(np.stack(all_gather_objects(stream.positions)))} if stream else {}
                    if self.is_main:
                        save_checkpoint(self.dir.checkpoint, saved, opts, done, data_generator, readers)
                        (ema.module if ema else model).save_pretrained(self.dir.path)
                bar.update(task, completed=done)
        images_per_s = clock.images / max(clock.elapsed(), 1e-9)
        summary = {
            "run": str(self.dir), "steps": cfg.steps, "resumed_from": start, "seconds": clock.elapsed(), "images_per_s": images_per_s,
            "flops_per_item": flops, "peak_flops": peak, "peak_source": peak_source, "mfu": mfu(flops, images_per_s, peak, self.world),
            "step_threads": self.threads,
            **extras, **last_eval,
        }
        return self._finish(parts, summary)

    def _evaluate(self, model: torch.nn.Module, ema: ModelEmaV3 | None, val: Any, step: int) -> dict[str, float]:
        """:meth:`evaluate` of the weights the run saves: the moving average where there is one; at the last
        step the live weights too, as ``live_*``, so the summary says what the average gained."""
        if ema is None:
            return self.evaluate(model, val, step)
        live = {f"live_{k}": v for k, v in self.evaluate(model, val, step).items()} if step == self.cfg.steps else {}
        return {**live, **self.evaluate(ema.module, val, step)}  # the average's grid is the one kept

    def _flops(self, model: torch.nn.Module) -> int | None:
        """:meth:`flops_per_item`, or None with one warning for a model that cannot run on the meta device
        (a third party's, say): MFU is then not reported, and training goes on."""
        try:
            return self.flops_per_item(model)
        except Exception as err:  # a plugin's model may fail on meta tensors in any way
            warnings.warn(f"model FLOPs not counted, so no MFU is reported ({first_line(err)})", stacklevel=2)
            return None

    def _batches(self, dataset: Dataset, start: int, data_generator: torch.Generator) -> tuple[Any, StreamState | None]:
        """The batches from ``start`` on: by index (:class:`StepBatches`), or from a stream, whose readers'
        positions (a :class:`StreamState`, saved in each checkpoint) a resume continues from."""
        cfg = self.cfg
        if not is_stream(dataset):
            batches = StepBatches(len(dataset), cfg.batch_size, cfg.seed, start, cfg.steps, self.rank, self.world)
            return loader(dataset, cfg.num_workers, batch_sampler=batches, generator=data_generator), None
        readers = max(1, cfg.num_workers)
        state = StreamState(readers, self._stream_positions(readers) if start else None)
        reader = StreamBatches(dataset, cfg.batch_size, cfg.seed, self.rank, self.world, readers, start, state.positions, cfg.steps)
        return loader(reader, cfg.num_workers, batch_size=None, generator=data_generator), state

    def _stream_positions(self, readers: int) -> np.ndarray:
        """This rank's readers' positions in the checkpoint; a resume with other ranks or readers is refused."""
        with safe_open(str(self.dir.checkpoint), "pt") as f:
            positions = f.get_tensor("data.positions").numpy() if "data.positions" in f.keys() else None
        if positions is None or positions.shape[:2] != (self.world, readers):
            was = f"{positions.shape[0]} process(es) x {positions.shape[1]} reader(s)" if positions is not None else "no stream"
            raise StvqError(
                f"{self.dir} read its stream with {was}; resume it with the same torchrun --nproc_per_node and "
                f"--num-workers (readers = max(1, workers)), or the data order would change"
            )
        return positions[self.rank]

    def _tensorboard(self, start: int):
        """A SummaryWriter on RUN/tensorboard/ (rank 0, ``cfg.tensorboard``); a resume purges the events
        logged after its checkpoint, as it trims metrics.jsonl."""
        if not (self.cfg.tensorboard and self.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise StvqError("--tensorboard needs the tensorboard package: pip install 'stvq[tensorboard]'") from None
        return SummaryWriter(str(self.dir.path / "tensorboard"), purge_step=start + 1 if start else None)  # steps up to the checkpoint stay

    def _to_tensorboard(self, board, record: dict[str, Any], step: int) -> None:
        """The record's numbers as scalars, and the step's sample grid where one was written."""
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                board.add_scalar(key, value, step)
        grid = self.dir.sample(step)
        if grid.is_file():
            from PIL import Image

            board.add_image("samples", np.asarray(Image.open(grid).convert("RGB")), step, dataformats="HWC")
        board.flush()

    def _restore(self, parts: dict[str, torch.nn.Module], opts: dict[str, torch.optim.Optimizer], data_generator: torch.Generator) -> tuple[int, float]:
        """(first step, training seconds logged before it): a resume loads the checkpoint and cuts the
        metrics back to it; a new run writes its train.json."""
        if not self.resume:
            if self.is_main:
                self.dir.write_train_config(self.cfg)
            return 0, 0.0
        start = load_checkpoint(self.dir.checkpoint, parts, opts, data_generator)
        return start, self.dir.trim_metrics(start) if self.is_main else 0.0

    def _step_threads(self, model: torch.nn.Module) -> int:
        """How many threads a step's batch is split across: ``cfg.step_threads``, 0 resolved (2 where the step
        can be split and torch has two threads or more, else 1); a split asked for where it cannot be is refused in one line."""
        asked = self.cfg.step_threads
        if asked == 1:
            return 1
        reason = (
            "a GPU runs a step's kernels in one stream" if self.device.type != "cpu"
            else "torchrun's processes already share the cores" if self.world > 1
            else "torch.compile's graphs are run from one thread" if self.cfg.compile
            else self.split_refusal(model)
        )
        if asked == 0:  # auto: no more threads than torch's own count (OMP_NUM_THREADS=1 stays on one core)
            return min(2, self.cfg.batch_size, torch.get_num_threads()) if reason is None else 1
        if reason is None:
            return asked
        raise StvqError(f"step_threads={asked}: a step here cannot be split across threads ({reason}); use step_threads=1")

    def _split_step(
        self, pool: ThreadPoolExecutor, opt: torch.optim.Optimizer, batch: Any, step: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
        """:meth:`step` of the batch in ``self.threads`` slices, one per thread of ``pool``, each drawing from its
        own generator (seeded here from the global RNG, so that a run and its resume draw alike); each
        slice's gradient, weighted by its share of the batch, summed in slice order into the ``.grad`` of
        ``opt``'s parameters. Returns what :meth:`step` returns, the losses and terms averaged over the
        slices by their sizes."""
        slices = split_batch(batch, self.threads)
        total = batch_length(batch)
        seeds = torch.randint(0, MAX_SEED, (len(slices),)).tolist()
        params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        net = self.nets["model"]

        def run(part: Any, seed: int) -> tuple[torch.Tensor, dict[str, Any], tuple]:
            share = batch_length(part) / total
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
                losses, terms, _ = self.step(net, part, step, generator=torch.Generator().manual_seed(seed))
            grads = torch.autograd.grad(losses["model"] * share, params, allow_unused=True)
            return losses["model"].detach() * share, {k: v * share for k, v in terms.items()}, grads

        results = list(pool.map(run, slices, seeds))
        # a parameter no slice reaches keeps no gradient; one that some slices miss gets their zeros
        present = [i for i in range(len(params)) if any(r[2][i] is not None for r in results)]
        grads = [[r[2][i] if r[2][i] is not None else torch.zeros_like(params[i]) for i in present] for r in results]
        summed = [g.contiguous() for g in grads[0]]  # a broadcast view (a sum's gradient) becomes its own memory
        for more in grads[1:]:  # one fused add per slice, in slice order
            torch._foreach_add_(summed, more)
        opt.zero_grad(set_to_none=True)
        for i, grad in zip(present, summed):
            params[i].grad = grad
        terms = {k: sum(r[1][k] for r in results) for k in results[0][1]}
        return {"model": sum(r[0] for r in results)}, terms, total

    def _update(self, opts: dict[str, torch.optim.Optimizer], losses: dict[str, torch.Tensor], step: int, backward: bool = True) -> None:
        """:func:`update` (``backward=False``: the gradient is already in ``.grad``, from :meth:`_split_step`);
        a loss that is not finite stops the run with the last checkpoint kept."""
        for name, loss in losses.items():
            if not torch.isfinite(loss):
                what = "loss" if name == "model" else f"the {name}'s loss"
                raise TrainingDiverged(
                    f"{what} became {loss.item()} at step {step}; the last good checkpoint in {self.dir} is kept "
                    f"(resume with --resume {self.dir}); lower --lr or keep gradient clipping on"
                )
        if backward:
            update(opts, losses, self.cfg.grad_clip)
        else:
            clip_and_step(opts["model"], self.cfg.grad_clip)

    def _progress_bar(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        return Progress(
            TextColumn(self.dir.path.name), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, disable=not self.progress,
        )

    def _finish(self, parts: dict[str, torch.nn.Module], summary: dict[str, Any]) -> dict[str, Any]:
        if self.world > 1:
            summary["ranks_agree"] = all([self._ranks_agree(m) for m in parts.values()])  # every rank joins every gather
        if self.is_main:
            self.dir.write_summary(summary)
        if self.world > 1:
            dist.barrier()
        return summary

    def _ranks_agree(self, model: torch.nn.Module) -> bool:
        """All ranks hold the same weights (DDP's promise, checked): compare a checksum across ranks."""
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
        gathered = [torch.zeros_like(checksum) for _ in range(self.world)]
        dist.all_gather(gathered, checksum)
        return all(torch.equal(g, gathered[0]) for g in gathered)


class Trainer(BaseTrainer):
    """Trains a tokenizer, stage 1 or 2 (:class:`ContinuousStage`, :class:`QuantizedStage`)."""

    def __init__(self, cfg: TrainConfig, run: str | Path, resume: bool = False, progress: bool = True, console=None) -> None:
        super().__init__(cfg, run, resume, progress, console)
        self.stage = STAGES[cfg.stage]
        quantized = self.dir.path / RunDir.QUANTIZE
        if resume and quantized.is_file() and cfg.steps > (checkpoint_step(self.dir.checkpoint) or 0):
            raise StvqError(
                f"{self.dir} was quantized after its training ({quantized}); training it further would drop that codebook, fitted to the "
                f"encoder as it is: train stage 2 from it (--stage 2 --from {self.dir}), or delete {quantized} to extend it and quantize it again after"
            )

    def build(self) -> tuple[CodeTokenizer, Dataset, torch.Tensor]:
        cfg = self.cfg
        model = build_model(cfg).to(self.device)
        image_size = model.config.image_size
        self.objective, self.decoder = ImageObjective(cfg, image_size), model.decoder  # the decoder inside any DDP wrapper
        for companion in self.objective.companions().values():
            companion.to(self.device)
        dataset = make_dataset(cfg.data, image_size, "train", cfg.seed)
        val = make_dataset(cfg.data, image_size, "val", cfg.seed)
        self.reader = None
        if cfg.recognise:
            self.reader = val.recogniser() if isinstance(val, FactorDataset) else None
            if self.reader is None:
                raise StvqError(f"--train recognise=true reads the factors of the images back; --data {cfg.data} has no known factors and no recogniser (shapes has both)")
            self.val_factors = val.factor_table(VAL_IMAGES)
        return model, dataset, first_images(val, VAL_IMAGES).to(self.device)

    def prepare(self, model: CodeTokenizer, dataset: Dataset, val: torch.Tensor) -> tuple[Dataset, dict[str, Any]]:
        self.stage.set_modes(model)
        baseline = mean_image_psnr(dataset, val)
        dataset, cached = self.stage.with_cached_codes(self.cfg, model, dataset)
        self.cached = cached is not None
        return dataset, {
            "stage": self.cfg.stage, "val_psnr": None, "mean_image_psnr": baseline,
            "grid": str(self.dir.sample(self.cfg.steps)), "cached_codes": cached,
        }

    def compile(self, model: CodeTokenizer) -> None:
        model.encoder.compile()  # the parts, so that the decoder alone compiles where codes are cached
        model.decoder.compile()

    def companions(self) -> dict[str, torch.nn.Module]:
        return self.objective.companions()

    def split_refusal(self, model: CodeTokenizer) -> str | None:
        if self.companions():
            return "adversarial training: the discriminator's loss and the adaptive weight read the whole batch"
        if "generator" not in inspect.signature(model.forward).parameters:
            return f"{type(model).__name__}.forward takes no generator to draw its noise from"
        if self.stage.number == 2 and getattr(model.quantizer, "updates_in_forward", False):
            return f"the quantizer {type(model.quantizer).__name__} updates its codebook in each forward"
        return None

    def flops_per_item(self, model: CodeTokenizer) -> int:
        """Stage 1: encoder and decoder, forward and backward; stage 2: the decoder's, and the frozen
        encoder's forward unless the codes are cached (the quantizer's nearest-code search is not counted)."""
        images = torch.empty(1, 3, model.config.image_size, model.config.image_size)
        if self.cfg.stage == 1:
            return count_flops(model, images)
        decoder = count_flops(model.decoder, torch.empty(1, model.decoder.num_tokens, model.decoder.code_dim))
        return decoder if self.cached else decoder + count_flops(model.encoder, images, backward=False)

    def step(self, net, batch, step: int, generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
        images, codes = (batch[0], batch[1].to(self.device)) if self.cached else (batch, None)
        images = images.to(self.device, non_blocking=True)
        options = self.stage.forward_options(self.cfg, step) | ({"generator": generator} if generator is not None else {})
        out = net(images, codes=codes, **options)
        losses, terms = self.objective(out.reconstruction, images, out.quantized, step, self.decoder, self.nets.get("discriminator"))
        record = {k: v.detach() for k, v in terms.items()}
        record["psnr"] = psnr(out.reconstruction.detach().clamp(-1, 1), images).mean()
        if out.quantized is not None:
            record.update({f"q_{k}": v for k, v in out.quantized.stats.items()})
        return losses, record, len(images)

    @torch.no_grad()
    def evaluate(self, model: CodeTokenizer, images: torch.Tensor, step: int) -> dict[str, float]:
        """Validation PSNR and MSE on ``images``, and the grid of the first eight (samples/)."""
        model.eval()
        options = self.stage.forward_options(self.cfg, None)
        recon = torch.cat([model(batch, **options).reconstruction.float() for batch in images.split(32)])
        model.train()
        self.stage.set_modes(model)
        if self.is_main:
            save_image_grid(self.dir.sample(step), torch.cat([images[:8], recon[:8]]).cpu(), per_row=len(images[:8]))  # originals above
        out = {"val_psnr": psnr(recon.clamp(-1, 1), images).mean().item(), "val_mse": F.mse_loss(recon, images).item()}
        if self.reader is not None:
            from stvq.judge import reading_accuracy

            out.update({f"val_{k}": v for k, v in reading_accuracy(self.reader, recon.clamp(-1, 1), self.val_factors).items()})
        return out

    def status(self, record: dict[str, Any], last_eval: dict[str, float]) -> str:
        text = f"loss {record['loss']:.4f}  psnr {record['psnr']:.2f}  {record['images_per_s']:.0f} img/s"
        text += f"  val {last_eval['val_psnr']:.2f} dB" if last_eval else ""
        return text + (f"  shape read {last_eval['val_shape_accuracy']:.0%}" if "val_shape_accuracy" in last_eval else "")


class _Clock:
    """Training time and images: in all (this process's part of the run) and per logging window."""

    def __init__(self, logged_seconds: float) -> None:
        self.logged_seconds, self.started = logged_seconds, time.perf_counter()
        self.images, self.window_start, self.window_images = 0, self.started, 0

    def count(self, images: int) -> None:
        self.images += images
        self.window_images += images

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def lap(self) -> dict[str, float]:
        """images/s since the last lap, and training seconds so far across resumes; starts a new window."""
        now = time.perf_counter()
        out = {"images_per_s": self.window_images / max(now - self.window_start, 1e-9), "seconds": self.logged_seconds + now - self.started}
        self.window_start, self.window_images = now, 0
        return out
