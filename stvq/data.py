"""The ``--data`` strings the CLI accepts (:func:`make_dataset`: a registered ``dataset`` plugin by name,
or a folder) and what every data pass needs of a source: its first images, whether it is a stream, and
what ``stvq tokenize`` reads. The data sets themselves are plugins (the reference package registers
``shapes``, ``photos``, ``folder``, ``wds`` and ``hf``); image I/O is :mod:`stvq.images`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from stvq.config import FileSpec
from stvq.errors import ConfigError, StvqError
from stvq.interfaces import ImageDataset, ImageStream


def check_spec(spec: str) -> None:
    """Refuse a :class:`FileSpec` that names a command or a URL: the one place that decides what a data
    spec read from a file may be."""
    if isinstance(spec, FileSpec) and ("pipe:" in spec or "://" in spec):
        raise StvqError(
            f"{spec.origin} names the data {str(spec)!r}, which runs a command or opens a URL; stvq reads only local files from what a run directory says: "
            f"if you trust it, pass --data {str(spec)!r} yourself"
        )


def parse_data(spec: str) -> tuple[str, str | None]:
    """``--data`` -> (dataset plugin, location): ``NAME`` (or ``NAME:``), ``NAME:LOCATION`` for a registered
    ``NAME`` (``wds:train-{000..099}.tar``, ``hf:DIR:split``), or a folder path (the ``folder`` source). A
    bare ``NAME`` that is also an existing path is refused as ambiguous."""
    from stvq.plugins import plugin_table

    known = plugin_table()["dataset"]
    name, sep, location = spec.partition(":")
    if sep and name in known:
        return name, location or None  # "photos:": the registered data set, whatever folders are about
    if spec in known:
        if Path(spec).exists():
            raise StvqError(f"--data {spec} names both the registered data set and the path ./{spec}; write ./{spec} for the path, or {spec}: for the data set")
        return spec, None
    return "folder", spec


def make_dataset(spec: str, image_size: int, split: str = "train", seed: int = 0):
    """The images ``--data spec`` names (:func:`parse_data`), ``split`` being ``train``, ``val`` or
    ``all``: an :class:`stvq.interfaces.ImageDataset`, or an :class:`stvq.interfaces.ImageStream` for a
    source read in order (not for ``val``)."""
    from stvq.registry import create

    check_spec(spec)
    name, location = parse_data(spec)
    options = {"image_size": image_size, "split": split, "seed": seed}
    if location is not None:
        options["location"] = location
    dataset = create("dataset", name, **options)
    if split == "val" and not isinstance(dataset, ImageDataset):  # create() checked it is one of the two
        raise StvqError(f"dataset plugin {name!r} returned a {type(dataset).__name__} for the validation split, not an stvq.interfaces.ImageDataset; fix the plugin")
    return dataset


def is_stream(dataset) -> bool:
    return isinstance(dataset, ImageStream)


def device_memory(device: torch.device | None = None) -> int:
    """Bytes of memory on ``device``: a GPU's own, else the machine's."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(count: int, item: Any, what: str, fix: str, device: torch.device | None = None) -> None:
    """Refuse, before reading them, ``count`` items like ``item`` (a tensor or a tuple of them; None: none to
    measure) that alone take more than the device's memory: reading them would run for hours before it failed."""
    need = count * sum(t.nbytes for t in (item if isinstance(item, (tuple, list)) else (item,)) if isinstance(t, torch.Tensor))
    have = device_memory(device)
    if need > have:
        raise ConfigError(f"{what} take {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB of memory here; {fix}")


def first_images(dataset, count: int, num_workers: int = 0) -> torch.Tensor:
    """The first ``count`` images of a data set or stream (fewer where it holds fewer), (B, 3, S, S); an
    indexed data set is read by ``num_workers`` DataLoader workers. More than memory holds is refused."""
    from itertools import chain, islice

    from stvq.streams import index_batches

    if is_stream(dataset):
        stream = iter(dataset)
        first = next(stream, None)
        if first is None:
            raise StvqError("read no image from the stream (every shard empty or unreadable: the warnings say why); check --data")
        check_fits(count, first, f"{count:,} images", "ask for fewer")
        return torch.stack(list(islice(chain([first], stream), count)))
    rows = range(min(count, len(dataset)))
    if rows:
        check_fits(len(rows), dataset[0], f"{len(rows):,} images", "ask for fewer")
    return torch.cat(list(index_batches(dataset, [list(rows[i : i + 64]) for i in range(0, len(rows), 64)], num_workers)))


def tokenize_source(spec: str, image_size: int, max_images: int | None = None):
    """The images ``stvq tokenize`` reads (split ``all``), and their fingerprint for the shards' manifest:
    a folder (every image, sorted), a stream (every readable member of every shard), or the first
    ``max_images`` of a built-in source (endless, so the count is required)."""
    from torch.utils.data import Subset

    dataset = make_dataset(spec, image_size, "all")
    if isinstance(dataset, ImageDataset) and dataset.endless and max_images is None:
        raise StvqError(f"--data {spec} is endless; give --max-images N")
    fingerprint = dataset.fingerprint()
    if max_images is not None:
        if is_stream(dataset):
            raise StvqError(f"--max-images applies to sources read by index; --data {spec} is a stream and is tokenized whole (name fewer shards in the pattern)")
        dataset = Subset(dataset, range(min(max_images, len(dataset))))
    return dataset, fingerprint


def check_batch_fits(batch_size: int, item: Any, device: torch.device) -> None:
    """Refuse a batch of items like ``item`` that alone exceed the device's memory (a step needs many times
    more), before any is read."""
    check_fits(batch_size, item, f"--batch-size {batch_size}: its items alone", "lower --batch-size", device)
