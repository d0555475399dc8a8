"""Processes under ``torchrun``: the process group, this process's rank, and gathering rows computed in
slices. Every data pass of stvq (train, quantize, tokenize, eval) uses these; with one process they are
no-ops."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun (NCCL on GPUs, gloo on
    CPU), whose rendezvous also joins several nodes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


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


def gather_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """Every rank's :func:`slice_of` rows, concatenated in rank order on every rank: (count, ...). The
    slices are padded to one length for the collective and cut back."""
    _, world = rank_world()
    if world == 1:
        return rows
    per = -(-count // world)
    padded = torch.zeros((per, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: len(part_range)] for part, part_range in zip(parts, _slices(count, world))])


def all_gather_objects(value):
    """``value`` of every rank, in rank order (small picklable values: counts, positions)."""
    _, world = rank_world()
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out
