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


def load_part(name: str, source: str | None, config: str | None = None) -> Any:
    """One part of ``A+B``: a directory written by stvq, or (vqgan) a taming ``.ckpt`` with its YAML."""
    if source is None:
        raise StvqError(f"part {name!r} needs a source: --{name} PATH (or --part {name}=PATH)")
    path = Path(source)
    if path.is_dir():
        return load_tokenizer(path)
    if config is None:
        hint = f"; a taming checkpoint also needs --{name}-config model.yaml" if name == "vqgan" else ""
        raise StvqError(f"{source} is not a directory written by stvq{hint}")
    return load_tokenizer(name, checkpoint=str(path), config=config)


def compose(spec: str, sources: dict[str, str], configs: dict[str, str] | None = None, composer: str = "concat", **options: Any) -> Any:
    """``spec`` = "styled+vqgan" -> one tokenizer; a single name just loads that tokenizer."""
    names = [n for n in spec.split("+") if n]
    if not names:
        raise StvqError(f"{spec!r} names no tokenizer; write A+B, e.g. styled+vqgan")
    known = plugin_table()["tokenizer"]
    for name in names:
        if name not in known:
            raise StvqError(f"no tokenizer named {name!r}; available: {', '.join(sorted(known))}")
    parts = [load_part(n, sources.get(n), (configs or {}).get(n)) for n in names]
    if len(parts) == 1:
        return parts[0]
    return create("composer", composer).compose(parts, **options)


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


def tokenize_dataset(tokenizer, dataset, out: str | Path, shard_size: int = 1024, batch_size: int = 32, console=None, progress: bool = True, data_fingerprint: str = "") -> dict[str, Any]:
    """Write ``shard_NNNNN.npy`` files of ``shard_size`` rows of ids, and ``manifest.json``. Shards are
    written atomically and finished ones are skipped (a truncated one is written again), so an interrupted
    run resumes where it stopped; the manifest fingerprints the tokenizer's weights and the data
    (``data_fingerprint``), and a resume with either changed is refused."""
    out = Path(out)
    count = len(dataset)
    shards = (count + shard_size - 1) // shard_size
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    manifest = {
        "num_images": count, "num_shards": shards, "shard_size": shard_size, "num_tokens": tokenizer.num_tokens,
        "vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name,
        "layout": tokenizer.manifest(),
        "tokenizer_sha256": weights_fingerprint(tokenizer), "data_fingerprint": data_fingerprint,
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
