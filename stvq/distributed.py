"""Processes under ``torchrun``: the process group, this process's rank, and gathering rows computed in
slices. Every data pass of stvq (train, quantize, tokenize, eval) uses these; with one process they are
no-ops."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from stvq.checkpoint import run_lock
from stvq.config import env_count, torchrun_world
from stvq.errors import StvqError


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun (NCCL on GPUs, gloo on
    CPU), whose rendezvous also joins several nodes."""
    world = torchrun_world()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        local = env_count("LOCAL_RANK", 0, 0)
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def shutdown_distributed() -> None:
    """Destroys the process group, if one was initialised; every command ends here once all ranks are
    done. (Its worker threads may outlive it: see :func:`exit_process`.)"""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a process that torchrun started with ``code``, skipping the interpreter's teardown.

    ``destroy_process_group`` stops gloo's worker threads only when the last reference to the group goes,
    and a module imported after the group was made (timm imports ``torch.distributed._shard``, torch
    2.14) keeps references to it. A worker thread that releases a finished collective's tensors while
    the interpreter tears down then aborts the process (``terminate called without an active
    exception``, SIGABRT: a failed torchrun after the command's work was done; seen about once in 30
    runs of ``tokenize`` on 2 cores). Every file is written and closed by then; the streams are flushed
    here."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def device_of(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s parameters are (the CPU for one without any)."""
    return next(module.parameters(), torch.empty(0)).device


def rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def _slices(count: int, world: int) -> list[range]:
    per = -(-count // world)
    return [range(min(count, r * per), min(count, (r + 1) * per)) for r in range(world)]


def slice_of(count: int) -> range:
    """This rank's contiguous part of ``range(count)``: ranks in order cover it once."""
    rank, world = rank_world()
    return _slices(count, world)[rank]


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows`` (any number each, the same trailing shape), concatenated in rank order on
    every rank; with :func:`slice_of` slices, that is the whole in order. The parts are padded to one
    length for the collective and cut back."""
    _, world = rank_world()
    if world == 1:
        return rows
    counts = all_gather_objects(len(rows))
    padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


@torch.no_grad()
def in_batches(fn, x: torch.Tensor, batch_size: int = 64, device: torch.device | None = None) -> torch.Tensor:
    """``fn`` over ``x`` in batches of ``batch_size`` along the first axis, concatenated: e.g.
    ``in_batches(model.encode_codes, images)`` or ``in_batches(tokenizer.decode, ids)``. Each batch goes to
    ``device`` (default: x's) and the whole comes back to x's. Under torchrun each rank computes a
    contiguous slice and every rank gets the whole (:func:`stvq.distributed.gather_rows`)."""
    device = device or x.device
    rows = slice_of(len(x))
    mine = x[rows.start : rows.stop]
    parts = [fn(batch.to(device)) for batch in mine.split(batch_size)] or [fn(x[:1].to(device))[:0]]
    return gather_rows(torch.cat(parts)).to(x.device)


def raise_on_any(problem: str | None) -> None:
    """Every rank raises :class:`StvqError` with the first rank's problem where any rank has one (a check
    that only rank 0 makes, such as taking the run's lock, must not leave the others in a collective)."""
    from stvq.errors import StvqError

    found = next((p for p in all_gather_objects(problem) if p), None)
    if found:
        raise StvqError(found)


def all_gather_objects(value):
    """``value`` of every rank, in rank order (small picklable values: counts, positions)."""
    _, world = rank_world()
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> None:
    """Keep freed memory in the process (glibc): by default every freed block over the mmap threshold, and
    the top of the heap past the trim threshold, go back to the kernel, so each training step's activations
    are faulted in again page by page (about 16,000 page faults a step at ``tiny``, 35 ms of system time).
    Raising both thresholds (to 32 MiB, glibc's largest mmap threshold, and 1 GiB) keeps them for the next
    step: the CPU oracle step 1.09-1.15x faster, measured side by side (docs/experiments/throughput.md). Setting
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


@contextmanager
def ranks_lock(directory: str | os.PathLike, prepare: Callable[[], None] | None = None, tree: bool = True) -> Iterator[Path]:
    """:func:`run_lock` for the ranks of a torchrun job: rank 0 holds the lock (and runs ``prepare``, a
    check or first write that only the writer makes), and every rank raises the problem of any rank, so
    none is left waiting in a collective. With one process it is ``run_lock`` followed by ``prepare``."""
    with ExitStack() as stack:
        problem = None
        if is_main():
            try:
                stack.enter_context(run_lock(directory, tree))
                if prepare:
                    prepare()
            except StvqError as err:
                problem = str(err)
        raise_on_any(problem)
        yield Path(directory)
