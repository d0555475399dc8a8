"""The training loop every stvq model shares (:class:`BaseTrainer`), read top to bottom in :meth:`BaseTrainer.fit`:
build, lock, restore, then per step the forward and losses, the update, the log record (with validation)
and the checkpoint, and the summary. One run = one directory (:class:`stvq.run.RunDir`). Runs under
``torchrun`` with DistributedDataParallel (NCCL on GPUs, gloo on CPU); rank 0 alone writes. A job says
what to build and what a step computes: :class:`stvq.train.Trainer` (tokenizers), :class:`stvq.prior.PriorTrainer`.
"""

from __future__ import annotations

import operator
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import replace
from functools import reduce
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from stvq.checkpoint import run_lock
from stvq.config import MAX_SEED, LoopConfig
from stvq.data import check_batch_fits, is_stream
from stvq.distributed import all_gather_objects, init_distributed, keep_freed_memory
from stvq.errors import StvqError, TrainingDiverged, first_line
from stvq.flops import device_peak, mfu, warn_if_bf16_is_emulated
from stvq.optim import clip_and_step, make_optimizers, set_lr, update
from stvq.run import RunDir, checkpoint_step, load_checkpoint, save_checkpoint
from stvq.streams import StepBatches, StreamBatches, StreamState, loader, training_workers
from stvq.trackers import TensorBoardTracker, Tracker, WandbTracker, closed_on_error


def split_batch(batch: torch.Tensor | tuple | list, parts: int) -> list:
    """A batch (a tensor, or a tuple or list of tensors of one length) in ``parts`` slices along its first
    dimension, as even as they come."""
    if isinstance(batch, torch.Tensor):
        return list(batch.tensor_split(parts))
    return [type(batch)(pieces) for pieces in zip(*(t.tensor_split(parts) for t in batch))]


def batch_length(batch: torch.Tensor | tuple | list) -> int:
    return len(batch if isinstance(batch, torch.Tensor) else batch[0])


#: What a trainer trains (a CodeTokenizer, a Prior) and the config of its runs.
ModelT = TypeVar("ModelT", bound=torch.nn.Module)
ConfigT = TypeVar("ConfigT", bound=LoopConfig)


class BaseTrainer(Generic[ModelT, ConfigT]):
    """One training job in the run directory ``run`` (``resume=True`` continues it from its checkpoint):
    the loop every stvq model shares. :meth:`fit` reads top to bottom: build, lock, restore, then per step
    :meth:`step`, the log record (with :meth:`evaluate` every ``eval_every``) and the checkpoint, and the
    summary. A subclass says what to build (:meth:`build`), what a step computes (:meth:`step`) and how
    to evaluate; :class:`Trainer` trains tokenizers, :class:`stvq.prior.PriorTrainer` priors."""

    cfg: ConfigT

    def __init__(self, cfg: ConfigT, run: str | Path, resume: bool = False, progress: bool = True, console=None) -> None:
        self.cfg, self.dir, self.resume = cfg, RunDir(run), resume
        self.rank, self.world, self.device = init_distributed()
        if cfg.num_workers is None:  # resolved before train.json is written: a resume reads the same number
            self.cfg = replace(cfg, num_workers=training_workers(None, self.device))
        self.is_main = self.rank == 0
        self.progress, self.console = progress and self.is_main, console
        if not resume and self.dir.checkpoint.exists():
            raise StvqError(f"{self.dir} already holds a run; continue it with --resume {self.dir} or pass another --run")

    # ----------------------------------------------------------------------- what a subclass says

    def build(self) -> tuple[ModelT, Dataset, Any]:
        """(model on self.device, training data set, validation data): bad data fails here, before the
        run directory is written."""
        raise NotImplementedError

    def prepare(self, model: ModelT, dataset: Dataset, val: Any) -> tuple[Dataset, dict[str, Any]]:
        """After restoring: modes, cached inputs; returns the data set to train on and summary entries."""
        return dataset, {}

    def compile(self, model: ModelT) -> None:
        """``--compile``: compile the model in place (parameter names, and so checkpoints, stay the same)."""
        model.compile()

    def companions(self) -> dict[str, torch.nn.Module]:
        """Modules trained beside the model (a discriminator), by name, built in :meth:`build`: each has its
        own optimizer, and its weights and optimizer state live in the checkpoint, not in the model's files."""
        return {}

    def flops_per_item(self, model: ModelT) -> int:
        """The model FLOPs of one training item, forward and backward (:func:`stvq.flops.count_flops`),
        for MFU; counted after :meth:`prepare`, before :meth:`compile`."""
        raise NotImplementedError

    def step(self, net: torch.nn.Module, batch: Any, step: int, generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
        """Forward and losses of one batch at ``step``: ({"model": loss, companion: its loss, ...} to
        minimise, in update order; record entries as detached tensors or numbers, read only on logged steps
        so that a GPU is not synchronised every step; batch size). The loop runs companions as ``self.nets``.
        ``generator``: where the forward's random draws come from when the step is split across threads
        (:meth:`split_refusal` says when it may be)."""
        raise NotImplementedError

    def split_refusal(self, model: ModelT) -> str | None:
        """Why a step of this trainer cannot be split across threads (``LoopConfig.step_threads``), or None
        where its batch's slices may run side by side: each slice's loss its mean, the forward drawing only
        from the generator :meth:`step` is given and changing no shared state."""
        return f"{type(self).__name__} runs its steps whole"

    def evaluate(self, model: ModelT, val: Any, step: int) -> dict[str, float]:
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

    def _train(self, model: ModelT, dataset: Dataset, val: Any) -> dict[str, Any]:
        cfg = self.cfg
        keep_freed_memory()
        parts: dict[str, torch.nn.Module] = {"model": model, **self.companions()}
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
        self.nets: dict[str, torch.nn.Module] = {name: DistributedDataParallel(m) if self.world > 1 else m for name, m in parts.items()}
        intra = max(1, torch.get_num_threads() // self.threads)  # set in each worker thread: the main thread keeps its own

        clock = _Clock(logged_seconds)
        last_eval: dict[str, float] = {}
        trackers = self._trackers(start)
        pool = ThreadPoolExecutor(self.threads, initializer=torch.set_num_threads, initargs=(intra,)) if self.threads > 1 else None
        with self._progress_bar() as bar, pool or nullcontext(), closed_on_error(trackers):
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
                    record: dict[str, Any] = {"step": done, "loss": losses["model"].item(), **{k: float(v) for k, v in terms.items()}, "lr": cfg.lr_at(step), **clock.lap(), **evaluation}
                    record["mfu"] = mfu(flops, record["images_per_s"], peak, self.world)
                    if self.is_main:
                        self.dir.log(record)
                        grid = self.dir.sample(done) if trackers else None
                        shown = grid if grid is not None and grid.is_file() else None  # a step with validation wrote one
                        for tracker in trackers:
                            tracker.log(record, done, shown)
                    bar.update(task, status=self.status(record, last_eval))
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    readers = {"data.positions": torch.from_numpy(np.stack(all_gather_objects(stream.positions)))} if stream else {}
                    if self.is_main:
                        save_checkpoint(self.dir.checkpoint, saved, opts, done, data_generator, readers)
                        exported: Any = ema.module if ema else model  # a model with save_pretrained
                        exported.save_pretrained(self.dir.path)
                bar.update(task, completed=done)
        images_per_s = clock.images / max(clock.elapsed(), 1e-9)
        summary = {
            "run": str(self.dir),
            "steps": cfg.steps,
            "resumed_from": start,
            "seconds": clock.elapsed(),
            "images_per_s": images_per_s,
            "flops_per_item": flops,
            "peak_flops": peak,
            "peak_source": peak_source,
            "mfu": mfu(flops, images_per_s, peak, self.world),
            "step_threads": self.threads,
            **extras,
            **last_eval,
        }
        for tracker in trackers:
            tracker.close(summary)
        return self._finish(parts, summary)

    def _evaluate(self, model: ModelT, ema: ModelEmaV3 | None, val: Any, step: int) -> dict[str, float]:
        """:meth:`evaluate` of the weights the run saves: the moving average where there is one; at the last
        step the live weights too, as ``live_*``, so the summary says what the average gained."""
        if ema is None:
            return self.evaluate(model, val, step)
        live = {f"live_{k}": v for k, v in self.evaluate(model, val, step).items()} if step == self.cfg.steps else {}
        return {**live, **self.evaluate(ema.module, val, step)}  # the average's grid is the one kept

    def _flops(self, model: ModelT) -> int | None:
        """:meth:`flops_per_item`, or None with one warning for a model that cannot run on the meta device
        (a third party's, say): MFU is then not reported, and training goes on."""
        try:
            return self.flops_per_item(model)
        except Exception as err:  # a plugin's model may fail on meta tensors in any way
            warnings.warn(f"model FLOPs not counted, so no MFU is reported ({first_line(err)})", stacklevel=2)
            return None

    def _batches(self, dataset: Any, start: int, data_generator: torch.Generator) -> tuple[Any, StreamState | None]:
        """The batches from ``start`` on: by index (:class:`StepBatches`), or from a stream, whose readers'
        positions (a :class:`StreamState`, saved in each checkpoint) a resume continues from."""
        cfg, workers = self.cfg, self.cfg.num_workers or 0  # resolved in __init__
        if not is_stream(dataset):
            batches = StepBatches(len(dataset), cfg.batch_size, cfg.seed, start, cfg.steps, self.rank, self.world)
            return loader(dataset, workers, batch_sampler=batches, generator=data_generator), None
        readers = max(1, workers)
        state = StreamState(readers, self._stream_positions(readers) if start else None)
        reader = StreamBatches(dataset, cfg.batch_size, cfg.seed, self.rank, self.world, readers, start, state.positions, cfg.steps)
        return loader(reader, workers, batch_size=None, generator=data_generator), state

    def _stream_positions(self, readers: int) -> np.ndarray:
        """This rank's readers' positions in the checkpoint; a resume with other ranks or readers is refused."""
        with safe_open(str(self.dir.checkpoint), "pt") as f:
            positions = f.get_tensor("data.positions").numpy() if "data.positions" in f.keys() else None
        if positions is None or positions.shape[:2] != (self.world, readers):
            was = f"{positions.shape[0]} process(es) x {positions.shape[1]} reader(s)" if positions is not None else "no stream"
            raise StvqError(f"{self.dir} read its stream with {was}; resume it with the same torchrun --nproc_per_node and --num-workers (readers = max(1, workers)), or the data order would change")
        return positions[self.rank]

    def _trackers(self, start: int) -> list[Tracker]:
        """The experiment trackers of rank 0 (``cfg.tensorboard``, ``cfg.wandb``: :mod:`stvq.trackers`)."""
        if not self.is_main:
            return []
        trackers: list[Tracker] = []
        if self.cfg.tensorboard:
            trackers.append(TensorBoardTracker(self.dir.path, start))
        if self.cfg.wandb:
            trackers.append(WandbTracker(self.dir.path, self.cfg.wandb, self.cfg, start))
        return trackers

    def _restore(self, parts: dict[str, torch.nn.Module], opts: dict[str, torch.optim.Optimizer], data_generator: torch.Generator) -> tuple[int, float]:
        """(first step, training seconds logged before it): a resume loads the checkpoint and cuts the
        metrics back to it; a new run writes its train.json."""
        if not self.resume:
            if self.is_main:  # a run started again after a kill before its first checkpoint logs afresh
                self.dir.write_train_config(self.cfg)
                self.dir.trim_metrics(-1)
            return 0, 0.0
        start = load_checkpoint(self.dir.checkpoint, parts, opts, data_generator)
        return start, self.dir.trim_metrics(start) if self.is_main else 0.0

    def _step_threads(self, model: ModelT) -> int:
        """How many threads a step's batch is split across: ``cfg.step_threads``, 0 resolved (2 where the step
        can be split and torch has two threads or more, else 1); a split asked for where it cannot be is refused in one line."""
        asked = self.cfg.step_threads
        if asked == 1:
            return 1
        reason = (
            "a GPU runs a step's kernels in one stream"
            if self.device.type != "cpu"
            else "torchrun's processes already share the cores"
            if self.world > 1
            else "torch.compile's graphs are run from one thread"
            if self.cfg.compile
            else self.split_refusal(model)
        )
        if asked == 0:  # auto: no more threads than torch's own count (OMP_NUM_THREADS=1 stays on one core)
            return min(2, self.cfg.batch_size, torch.get_num_threads()) if reason is None else 1
        if reason is None:
            return asked
        raise StvqError(f"step_threads={asked}: a step here cannot be split across threads ({reason}); use step_threads=1")

    def _split_step(self, pool: ThreadPoolExecutor, opt: torch.optim.Optimizer, batch: Any, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
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
        return {"model": reduce(operator.add, (r[0] for r in results))}, terms, total

    def _update(self, opts: dict[str, torch.optim.Optimizer], losses: dict[str, torch.Tensor], step: int, backward: bool = True) -> None:
        """:func:`update` (``backward=False``: the gradient is already in ``.grad``, from :meth:`_split_step`);
        a loss that is not finite stops the run with the last checkpoint kept."""
        for name, loss in losses.items():
            if not torch.isfinite(loss):
                what = "loss" if name == "model" else f"the {name}'s loss"
                raise TrainingDiverged(
                    f"{what} became {loss.item()} at step {step}; the last good checkpoint in {self.dir} is kept (resume with --resume {self.dir}); lower --lr or keep gradient clipping on"
                )
        if backward:
            update(opts, losses, self.cfg.grad_clip)
        else:
            clip_and_step(opts["model"], self.cfg.grad_clip)

    def _progress_bar(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        return Progress(
            TextColumn(self.dir.path.name),
            BarColumn(),
            TextColumn("step {task.completed}/{task.total}"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.progress,
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
