"""Loading for every pass over a data set: DataLoader workers decode and resize off the main process, each
rank of a ``torchrun`` job reads its own part, and a stream (:class:`stvq.interfaces.ImageStream`) is
read piece by piece with each reader's position known, so that training over it resumes exactly."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from stvq.config import env_count
from stvq.errors import StvqError

#: (epoch, piece index in the reader's list, member index) of the last sample a reader handed out; a new
#: reader starts after START.
START = (0, 0, -1)


def default_workers() -> int:
    """DataLoader workers when ``--num-workers`` is not given: one per core of this process's share, at
    most 8 (docs/data.md, has the measurement)."""
    return min(8, cores())


def training_workers(asked: int | None, device: torch.device) -> int:
    """A training run's DataLoader workers: ``asked``, or where it is None 0 on a CPU (docs/data.md, "Data at
    scale": a step there outweighs reading its batch, and workers only take its cores) and
    :func:`default_workers` on a GPU, whose steps outrun one process's decoding."""
    if asked is not None:
        return asked
    return default_workers() if device.type == "cuda" else 0


def cores() -> int:
    """This process's share of the cores it may run on: under torchrun, split between the node's processes."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, available // env_count("LOCAL_WORLD_SIZE", 1, 1))


@contextmanager
def sharing_cores(num_workers: int, device: torch.device):
    """While workers decode on the CPU, the main process computes on the cores they leave (at least one):
    its OpenMP threads would otherwise spin against them (docs/data.md: 1.7x -> 1.85x)."""
    before = torch.get_num_threads()
    if num_workers and device.type == "cpu":
        torch.set_num_threads(max(1, min(before, cores() - num_workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def loader(dataset: Dataset, num_workers: int, **options: Any) -> DataLoader:
    """A DataLoader with ``num_workers`` processes, pinned memory when a GPU takes the batches, and its own
    generator unless given one: a loader seeds its workers from its generator, and drawing from the
    global RNG would shift a resumed run's noise away from the uninterrupted run's."""
    options.setdefault("generator", torch.Generator().manual_seed(0))
    return DataLoader(dataset, num_workers=num_workers, pin_memory=torch.cuda.is_available(), **options)


def index_batches(dataset: Dataset, batches: list[list[int]], num_workers: int) -> Iterator[torch.Tensor]:
    """The items of each list of indices in ``batches``, stacked, in order."""
    return iter(loader(dataset, num_workers, batch_sampler=batches))


class StreamBatches(IterableDataset):
    """Training batches from a stream, endless and deterministic. Epoch e reads the pieces in the order of
    a permutation seeded by (seed, e); rank r takes every world-th piece of it, and reader k of the rank's
    ``readers`` (one per DataLoader worker) every readers-th of those, members in shard order. The
    DataLoader hands out worker batches in turn, so step s comes from reader s mod readers; worker w of a
    loader started at ``first_step`` plays reader (w + first_step) mod readers, and stops after its last
    step before ``stop_step`` (None: never), so that no worker decodes past the run. Each batch carries
    (reader, epoch, piece, member) of its last image: the trainer keeps the latest per reader
    (:class:`StreamState`) and a resume continues each reader right after it."""

    def __init__(
        self,
        stream: Any,
        batch_size: int,
        seed: int,
        rank: int,
        world: int,
        readers: int,
        first_step: int,
        positions: np.ndarray,
        stop_step: int | None = None,
    ) -> None:
        count = len(stream.pieces())
        if count < world * readers:
            raise StvqError(f"the stream has {count} shard(s), too few for {world} process(es) x {readers} reader(s); lower --num-workers (readers = max(1, workers)) or write more, smaller shards")
        self.stream, self.batch_size, self.seed, self.rank, self.world = stream, batch_size, seed, rank, world
        self.readers, self.first_step, self.positions, self.stop_step = readers, first_step, positions, stop_step

    def _pieces(self, epoch: int, reader: int) -> list[str]:
        pieces = self.stream.pieces()
        order = np.random.default_rng([self.seed, epoch]).permutation(len(pieces))
        return [pieces[i] for i in order[self.rank :: self.world][reader :: self.readers]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info else 0
        reader = (worker + self.first_step) % self.readers
        batches = None if self.stop_step is None else len(range(worker, self.stop_step - self.first_step, self.readers))
        epoch, first_piece, last_member = (int(v) for v in self.positions[reader])
        images: list[torch.Tensor] = []
        while batches != 0:
            pieces = self._pieces(epoch, reader)
            for index in range(first_piece, len(pieces)):
                skip = last_member + 1 if index == first_piece else 0
                for member, _, image in self.stream.read(pieces[index], skip):
                    if image is None:
                        continue
                    images.append(image)
                    if len(images) == self.batch_size:
                        yield torch.stack(images), torch.tensor([reader, epoch, index, member])
                        images, batches = [], None if batches is None else batches - 1
                        if batches == 0:
                            return
            epoch, first_piece, last_member = epoch + 1, 0, -1


class StreamState:
    """Where each reader of this rank stands: (readers, 3) positions, updated as batches are consumed."""

    def __init__(self, readers: int, positions: np.ndarray | None = None) -> None:
        self.positions = np.array([START] * readers, dtype=np.int64) if positions is None else positions.copy()

    def take(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, where = batch
        self.positions[int(where[0])] = where[1:].numpy()
        return images


class PieceBatches(IterableDataset):
    """Whole pieces for a pass that writes per piece (``stvq tokenize``) or samples a stream (``stvq
    quantize``): DataLoader worker w reads ``pieces[w::workers]``; each item is one batch of a piece,
    ``{"piece": i, "images", "keys", "last": the piece ends here, "unreadable": members skipped}``. A piece
    with no readable member gives one empty, last batch."""

    def __init__(self, stream: Any, pieces: list[int], batch_size: int) -> None:
        self.stream, self.pieces, self.batch_size = stream, pieces, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        names = self.stream.pieces()
        mine = self.pieces[info.id :: info.num_workers] if info else self.pieces
        for piece in mine:
            images, keys, unreadable = [], [], 0
            for _, key, image in self.stream.read(names[piece]):
                if image is None:
                    unreadable += 1
                    continue
                images.append(image)
                keys.append(key)
                if len(images) == self.batch_size:
                    yield self._batch(piece, images, keys, unreadable, last=False)
                    images, keys, unreadable = [], [], 0
            yield self._batch(piece, images, keys, unreadable, last=True)

    def _batch(self, piece: int, images: list[torch.Tensor], keys: list[str], unreadable: int, last: bool) -> dict[str, Any]:
        size = self.stream.image_size
        stacked = torch.stack(images) if images else torch.empty(0, 3, size, size)
        return {"piece": piece, "images": stacked, "keys": keys, "last": last, "unreadable": unreadable}


class StepBatches:
    """Deterministic batches by step: epoch e is a permutation seeded by (seed, e); step s takes the next
    ``batch_size * world`` indices and this rank its slice. Resuming at step s gives the same batches."""

    def __init__(self, length: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1) -> None:
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self._epoch, self._perm = -1, np.arange(0)

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
