"""Composition and whole-data-set tokenization: ``stvq compose``, ``stvq encode/decode/tokenize``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from stvq.checkpoint import load_npy, read_json, run_lock, save_npy, staged, weights_fingerprint, write_json
from stvq.data import is_stream
from stvq.distributed import all_gather_objects, device_of, rank_world, ranks_lock
from stvq.errors import StvqError
from stvq.images import codec_message
from stvq.interfaces import Tokenizer, check_ids
from stvq.pretrained import load_tokenizer, written_by_stvq
from stvq.registry import create, plugin_table
from stvq.streams import PieceBatches, index_batches, loader, sharing_cores


def load_part(name: str, source: str | None, **options: Any) -> Any:
    """One part of ``A+B``: a directory written by stvq, or a file or directory that the tokenizer plugin
    ``name`` loads with its own ``options`` (vqgan: a taming ``.ckpt`` with ``config=model.yaml``;
    diffusers-vq: a diffusers VQModel directory)."""
    if source is None:
        raise StvqError(f"part {name!r} needs a source: --part {name}=PATH")
    path = Path(source)
    if path.is_dir() and written_by_stvq(path):
        return load_tokenizer(path)
    return load_tokenizer(name, checkpoint=str(path), **options)  # a file, or a directory of another library's


def compose(spec: str, parts: dict[str, dict[str, Any]], composer: str = "concat", **options: Any) -> Any:
    """``spec`` = "styled+vqgan" -> one tokenizer; a single name just loads that tokenizer. ``parts`` maps
    a name to ``{"source": PATH, **options of its plugin}`` (:func:`load_part`)."""
    names = [n for n in spec.split("+") if n]
    if not names:
        raise StvqError(f"{spec!r} names no tokenizer; write A+B, e.g. styled+vqgan")
    known = plugin_table()["tokenizer"]
    for name in names:
        if name not in known:
            raise StvqError(f"no tokenizer named {name!r}; available: {', '.join(sorted(known))}")
    stray = sorted(set(parts) - set(names))
    if stray:
        raise StvqError(f"options were given for {', '.join(map(repr, stray))}, which {spec!r} does not name (its parts: {', '.join(names)}); drop them or add the part to the spec")
    loaded = []
    for name in names:
        part = dict(parts.get(name, {}))
        loaded.append(load_part(name, part.pop("source", None), **part))
    if len(loaded) == 1:
        return loaded[0]
    return create("composer", composer).compose(loaded, **options)


def read_images(paths: list[str], image_size: int) -> torch.Tensor:
    """Image files -> (B, 3, image_size, image_size) in [-1, 1], in the order given."""
    from stvq.images import load_image

    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise StvqError(f"no such image file: {missing[0]}")
    images = []
    for path in paths:
        try:
            images.append(load_image(Path(path), image_size))
        except Exception as err:  # PIL raises many types for files it cannot decode (DecompressionBombError: too many pixels)
            raise StvqError(f"cannot read the image {path}: {type(err).__name__}: {codec_message(err)}") from None
    return torch.stack(images)


def read_ids(path: str | Path, vocab_size: int) -> torch.Tensor:
    """A ``.npy`` array of ids (one row per image) -> int64 ids; refuses pickles, archives, text, floats,
    bools and integer types too narrow for ``vocab_size``."""
    if not Path(path).exists():
        raise StvqError(f"no such ids file: {path}")
    try:
        array = load_npy(path)
    except ValueError as err:
        raise StvqError(f"{path} is not a NumPy .npy array of ids ({err}); write ids with numpy.save or stvq encode") from None
    if array.dtype.kind not in "iu" or np.iinfo(array.dtype).max < vocab_size - 1:
        raise StvqError(f"ids in {path} are {array.dtype}, which cannot be ids of a vocabulary of {vocab_size:,}; stvq encode writes int64")
    return torch.from_numpy(array.astype(np.int64))


def decode_to_pngs(tokenizer: Tokenizer, ids: torch.Tensor, out: str | Path, batch_size: int = 64) -> Path:
    """ids (N, tokens) -> out/000000.png, 000001.png, ..., decoded ``batch_size`` rows at a time and
    written as they come (memory does not grow with N). One writer holds ``out``; the new images replace
    the old ones only when all are written, so a failure leaves the directory as it was."""
    from PIL import Image

    from stvq.images import to_uint8

    check_ids(ids, tokenizer.num_tokens, tokenizer.vocab_size)  # every row, before a file is written
    with run_lock(out, tree=False), staged(out) as tmp:
        for start in range(0, len(ids), batch_size):
            for i, image in enumerate(tokenizer.decode(ids[start : start + batch_size]), start):
                Image.fromarray(to_uint8(image)).save(tmp / f"{i:06d}.png")
    return Path(out)


def _shard_rows(out: Path, shard: int, num_tokens: int, dtype, rows: int | None) -> int | None:
    """The rows of a finished shard: its ids load (no pickles) with ``num_tokens`` columns, the dtype, and
    ``rows`` rows (for a stream: as many as its keys file names). None for a missing, truncated or
    foreign file, which is written again."""
    try:
        ids = load_npy(out / f"shard_{shard:05d}.npy")
        if rows is None:
            rows = len(read_json(out / f"shard_{shard:05d}.keys.json", "")["keys"])
    except (OSError, ValueError, KeyError, TypeError, StvqError):
        return None
    return rows if ids.shape == (rows, num_tokens) and ids.dtype == dtype else None


def _batches(dataset, pending: list[int], shard_size: int, batch_size: int, num_workers: int) -> Iterator[dict[str, Any]]:
    """The images of the ``pending`` shards, batch by batch, as :class:`stvq.streams.PieceBatches` items:
    shard ``i`` of an indexed data set is its rows ``i * shard_size ...``; of a stream, its piece ``i``."""
    if is_stream(dataset):
        yield from loader(PieceBatches(dataset, pending, batch_size), num_workers, batch_size=None)
        return
    plan = []
    for shard in pending:
        stop = min(len(dataset), (shard + 1) * shard_size)
        plan += [(shard, range(start, min(stop, start + batch_size))) for start in range(shard * shard_size, stop, batch_size)]
    for (shard, rows), images in zip(plan, index_batches(dataset, [list(r) for _, r in plan], num_workers)):
        yield {"piece": shard, "images": images, "keys": None, "last": rows.stop == min(len(dataset), (shard + 1) * shard_size), "unreadable": 0}


def tokenize_dataset(
    tokenizer,
    dataset,
    out: str | Path,
    shard_size: int = 1024,
    batch_size: int = 32,
    console=None,
    progress: bool = True,
    data_fingerprint: str = "",
    tokenizer_dir: str | Path | None = None,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Write ``shard_NNNNN.npy`` files of ids and ``manifest.json``. An indexed data set gives shards of
    ``shard_size`` rows; a stream (:class:`stvq.interfaces.ImageStream`) one shard per piece, with
    ``shard_NNNNN.keys.json`` naming each row's sample and the members that could not be decoded. Shards
    are written atomically and finished ones are skipped (a truncated one is written again), so an
    interrupted run resumes where it stopped; the manifest fingerprints the tokenizer's weights and the
    data (``data_fingerprint``), and a resume with either changed is refused. ``tokenizer_dir``, where the
    tokenizer was loaded from, is recorded so that a prior's samples can be decoded (``stvq prior``).

    Under torchrun each rank encodes shards ``rank, rank + world, ...`` and rank 0 writes the manifest:
    the ids are the same for any number of processes. ``num_workers`` DataLoader workers read the images."""
    out = Path(out)
    rank, world = rank_world()
    stream = is_stream(dataset)
    shards = len(dataset.pieces()) if stream else -(-len(dataset) // shard_size)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    manifest = {
        "num_images": None if stream else len(dataset),
        "num_shards": shards,
        "shard_size": None if stream else shard_size,
        "num_tokens": tokenizer.num_tokens,
        "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(dtype).name,
        "layout": tokenizer.manifest(),
        "tokenizer_sha256": weights_fingerprint(tokenizer),
        "data_fingerprint": data_fingerprint,
        "tokenizer": str(Path(tokenizer_dir).resolve()) if tokenizer_dir else None,
    }
    with ranks_lock(out, lambda: _start_manifest(out, manifest), tree=False):  # rank 0 writes the manifest, the ranks apart shards
        rows_of = (lambda i: None) if stream else (lambda i: min(len(dataset), (i + 1) * shard_size) - i * shard_size)
        mine = range(rank, shards, world)
        pending = [i for i in mine if _shard_rows(out, i, tokenizer.num_tokens, dtype, rows_of(i)) is None]
        with Progress(console=console, disable=not (progress and rank == 0)) as bar:
            task = bar.add_task("tokenizing", total=None if stream else sum(rows_of(i) or 0 for i in pending))
            _write_shards(tokenizer, _batches(dataset, pending, shard_size, batch_size, num_workers), out, dtype, num_workers, lambda n: bar.update(task, advance=n))
        skipped = sum(all_gather_objects(len(mine) - len(pending)))  # also waits for every rank's shards
        if rank == 0:
            manifest["shard_rows"] = [_shard_rows(out, i, tokenizer.num_tokens, dtype, rows_of(i)) for i in range(shards)]
            manifest["num_images"] = sum(manifest["shard_rows"])
            if stream:
                manifest["unreadable"] = sum(read_json(out / f"shard_{i:05d}.keys.json", "run the same stvq tokenize again")["unreadable"] for i in range(shards))
            if manifest["num_images"]:
                write_json(out / "manifest.json", manifest)
        result = all_gather_objects(manifest)[0]
        if not result["num_images"]:
            raise StvqError(f"read no image from the data ({result.get('unreadable') or 0} unreadable member(s); the warnings say why): nothing to tokenize into {out}")
        return {**result, "skipped_shards": skipped}


def _write_shards(tokenizer, batches: Iterator[dict[str, Any]], out: Path, dtype, num_workers: int, advance) -> None:
    """Encode the batches (:func:`_batches`) and write each shard when its last batch is in: the ids, and
    for a stream the keys file first (the ids file is what marks a shard finished)."""
    device = device_of(tokenizer)
    ids: dict[int, list[np.ndarray]] = {}
    keys: dict[int, list[str]] = {}
    unreadable: dict[int, int] = {}
    with sharing_cores(num_workers, device):
        for batch in batches:
            shard, images = batch["piece"], batch["images"]
            if len(images):
                ids.setdefault(shard, []).append(tokenizer.encode(images.to(device, non_blocking=True)).cpu().numpy().astype(dtype))
            keys.setdefault(shard, []).extend(batch["keys"] or [])
            unreadable[shard] = unreadable.get(shard, 0) + batch["unreadable"]
            advance(len(images))
            if batch["last"]:
                rows = np.concatenate(ids.pop(shard, [np.zeros((0, tokenizer.num_tokens), dtype)]))
                shard_keys = {"keys": keys.pop(shard), "unreadable": unreadable.pop(shard)}
                if batch["keys"] is not None:
                    write_json(out / f"shard_{shard:05d}.keys.json", shard_keys)
                save_npy(out / f"shard_{shard:05d}.npy", rows)


def _start_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest a run starts with; refuse to resume into ``out`` when it holds shards of another
    tokenizer or data set."""
    path = out / "manifest.json"
    if path.is_file():
        old = read_json(path, f"pick a new -o directory, or delete {out} to tokenize into it afresh")
        keys = ("tokenizer_sha256", "data_fingerprint", "num_images", "shard_size", "num_tokens", "vocab_size", "num_shards")
        changed = [k for k in keys if manifest[k] is not None and old.get(k) != manifest[k]]
        if changed:
            raise StvqError(f"{out} holds shards of another tokenizer or data set ({', '.join(changed)} differ); pick a new -o directory")
    write_json(path, manifest)
