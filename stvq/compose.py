"""Composition and whole-data-set tokenization: ``stvq compose``, ``stvq encode/decode/tokenize``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from stvq.checkpoint import atomic_write, load_tokenizer, run_lock, weights_fingerprint, write_json
from stvq.errors import StvqError
from stvq.registry import create, plugin_table


def load_part(name: str, source: str | None, **options: Any) -> Any:
    """One part of ``A+B``: a directory written by stvq, or a file that the tokenizer plugin ``name`` loads
    with its own ``options`` (vqgan: a taming ``.ckpt`` with ``config=model.yaml``)."""
    if source is None:
        raise StvqError(f"part {name!r} needs a source: --part {name}=PATH")
    path = Path(source)
    if path.is_dir():
        return load_tokenizer(path)
    return load_tokenizer(name, checkpoint=str(path), **options)


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
    loaded = []
    for name in names:
        part = dict(parts.get(name, {}))
        loaded.append(load_part(name, part.pop("source", None), **part))
    if len(loaded) == 1:
        return loaded[0]
    return create("composer", composer).compose(loaded, **options)


def read_images(paths: list[str], image_size: int) -> torch.Tensor:
    """Image files -> (B, 3, image_size, image_size) in [-1, 1], in the order given."""
    from stvq.data import load_image

    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise StvqError(f"no such image file: {missing[0]}")
    try:
        return torch.stack([load_image(Path(p), image_size) for p in paths])
    except Exception as err:  # PIL raises many types for files it cannot decode
        raise StvqError(f"cannot read an image: {err}") from None


def read_ids(path: str | Path, vocab_size: int) -> torch.Tensor:
    """A ``.npy`` array of ids (one row per image) -> int64 ids; refuses pickles, archives, text, floats,
    bools and integer types too narrow for ``vocab_size``."""
    if not Path(path).is_file():
        raise StvqError(f"no such ids file: {path}")
    try:
        array = np.load(path)  # allow_pickle stays False: a pickled array is refused, never run
    except (ValueError, OSError, EOFError) as err:
        raise StvqError(f"{path} is not a NumPy .npy array of ids ({err}); write ids with numpy.save or stvq encode") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise StvqError(f"{path} is an .npz archive; pass one .npy array of ids (numpy.save)")
    if array.dtype.kind not in "iu" or np.iinfo(array.dtype).max < vocab_size - 1:
        raise StvqError(f"ids in {path} are {array.dtype}, which cannot be ids of a vocabulary of {vocab_size:,}; stvq encode writes int64")
    return torch.from_numpy(array.astype(np.int64))


def write_pngs(images: torch.Tensor, out: str | Path) -> Path:
    """(B, 3, H, W) in [-1, 1] -> out/000000.png, 000001.png, ..."""
    from PIL import Image

    from stvq.data import to_uint8

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(to_uint8(image)).save(out / f"{i:06d}.png")
    return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save on a path would append ".npy" to the temp name
        np.save(f, array)


def _shard_ok(path: Path, shape: tuple[int, int], dtype) -> bool:
    """A finished shard: it loads (no pickles) with the rows, tokens and dtype it must have. A truncated or
    foreign file is not, and is written again."""
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return ids.shape == shape and ids.dtype == dtype


def tokenize_dataset(
    tokenizer, dataset, out: str | Path, shard_size: int = 1024, batch_size: int = 32, console=None, progress: bool = True,
    data_fingerprint: str = "", tokenizer_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``shard_NNNNN.npy`` files of ``shard_size`` rows of ids, and ``manifest.json``. Shards are
    written atomically and finished ones are skipped (a truncated one is written again), so an interrupted
    run resumes where it stopped; the manifest fingerprints the tokenizer's weights and the data
    (``data_fingerprint``), and a resume with either changed is refused. ``tokenizer_dir``, where the
    tokenizer was loaded from, is recorded so that a prior's samples can be decoded (``stvq prior``)."""
    out = Path(out)
    count = len(dataset)
    shards = (count + shard_size - 1) // shard_size
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    manifest = {
        "num_images": count, "num_shards": shards, "shard_size": shard_size, "num_tokens": tokenizer.num_tokens,
        "vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name,
        "layout": tokenizer.manifest(),
        "tokenizer_sha256": weights_fingerprint(tokenizer), "data_fingerprint": data_fingerprint,
        "tokenizer": str(Path(tokenizer_dir).resolve()) if tokenizer_dir else None,
    }
    with run_lock(out):  # one writer per output directory
        manifest_path = out / "manifest.json"
        if manifest_path.is_file():
            old = json.loads(manifest_path.read_text())
            keys = ("tokenizer_sha256", "data_fingerprint", "num_images", "shard_size", "num_tokens", "vocab_size")
            changed = [k for k in keys if old.get(k) != manifest[k]]
            if changed:
                raise StvqError(f"{out} holds shards of another tokenizer or data set ({', '.join(changed)} differ); pick a new -o directory")
        write_json(manifest_path, manifest)
        skipped = 0
        with Progress(console=console, disable=not progress) as bar:
            task = bar.add_task("tokenizing", total=count)
            for shard in range(shards):
                path = out / f"shard_{shard:05d}.npy"
                first, last = shard * shard_size, min(count, (shard + 1) * shard_size)
                if _shard_ok(path, (last - first, tokenizer.num_tokens), dtype):
                    skipped += 1
                    bar.update(task, advance=last - first)
                    continue
                rows = []
                for start in range(first, last, batch_size):
                    images = torch.stack([dataset[i] for i in range(start, min(last, start + batch_size))])
                    rows.append(tokenizer.encode(images).cpu().numpy().astype(dtype))
                    bar.update(task, advance=len(images))
                ids = np.concatenate(rows)
                atomic_write(path, lambda tmp, ids=ids: _save_npy(tmp, ids))
        return {**manifest, "skipped_shards": skipped}
