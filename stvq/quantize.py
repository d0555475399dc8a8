"""``stvq quantize``: the stage-2 codebook from a frozen stage-1 encoder's codes over a data set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from stvq.data import is_stream, make_dataset
from stvq.distributed import all_gather_objects, barrier, device_of, gather_rows, init_distributed, rank_world, ranks_lock, slice_of
from stvq.errors import StvqError
from stvq.interfaces import CodeTokenizer, FittableQuantizer
from stvq.pretrained import load_pretrained
from stvq.registry import require_subclass
from stvq.run import RunDir, cache_key
from stvq.streams import PieceBatches, index_batches, loader, sharing_cores


@torch.no_grad()
def encode_dataset(model, dataset, max_images: int, batch_size: int, console=None, progress: bool = True, num_workers: int = 0) -> torch.Tensor:
    """Codes (M, N, code_dim) of the first ``max_images`` images of ``dataset`` (a stream: its first
    readable images, pieces in order), on every rank, the same for any number of processes and workers.
    Under torchrun each rank encodes a contiguous slice (:func:`stvq.distributed.slice_of`), or of a
    stream every world-th piece."""
    device = device_of(model)
    encode = lambda images: model.encode_codes(images.to(device, non_blocking=True)).float()  # noqa: E731
    with Progress(console=console, disable=not (progress and rank_world()[0] == 0)) as bar, sharing_cores(num_workers, device):
        task = bar.add_task("encoding", total=max_images if is_stream(dataset) else min(max_images, len(dataset)))
        if is_stream(dataset):
            return _encode_stream(encode, dataset, max_images, batch_size, num_workers, lambda n: bar.update(task, advance=n))
        rows = slice_of(min(max_images, len(dataset)))
        chunks = []
        for images in index_batches(dataset, [list(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)], num_workers):
            chunks.append(encode(images))
            bar.update(task, advance=len(images) * rank_world()[1])
        codes = torch.cat(chunks) if chunks else _no_codes(encode, model.image_size)
    return gather_rows(codes).cpu()


def _no_codes(encode, image_size: int) -> torch.Tensor:
    """(0, N, D): what a rank with no images contributes to the gather."""
    return encode(torch.zeros(1, 3, image_size, image_size))[:0]


def _encode_stream(encode, stream, max_images: int, batch_size: int, num_workers: int, advance) -> torch.Tensor:
    """The codes of a stream's first ``max_images`` readable images. Rounds of world x workers pieces:
    rank r encodes the round's pieces p with p mod world = r (its workers one piece each), then the ranks
    share how many images each piece held, and stop once the pieces so far hold enough; the codes come
    back in piece order and are cut at ``max_images``."""
    rank, world = rank_world()
    pieces, per_round = len(stream.pieces()), world * max(1, num_workers)
    mine: dict[int, list[torch.Tensor]] = {}
    held: dict[int, int] = {}
    for first in range(0, pieces, per_round):
        round_pieces = [p for p in range(first, min(pieces, first + per_round)) if p % world == rank]
        for batch in loader(PieceBatches(stream, round_pieces, batch_size), num_workers, batch_size=None):
            if len(batch["images"]):
                mine.setdefault(batch["piece"], []).append(encode(batch["images"]))
                advance(len(batch["images"]))
        for counts in all_gather_objects({p: sum(len(c) for c in mine.get(p, [])) for p in round_pieces}):
            held.update(counts)
        if sum(held.values()) >= max_images:
            break
    local = [torch.cat(mine[p]) for p in sorted(mine)]
    gathered = gather_rows(torch.cat(local) if local else _no_codes(encode, stream.image_size)).cpu()
    by_rank = gathered.split([sum(held[p] for p in held if p % world == r) for r in range(world)])
    parts = {r: iter(part.split([held[p] for p in sorted(held) if p % world == r])) for r, part in enumerate(by_rank)}
    return torch.cat([next(parts[p % world]) for p in sorted(held)])[:max_images]


def fit_codebook(
    run: str | Path,
    k: int = 8192,
    data: str | None = None,
    max_images: int = 20000,
    per_position: bool = False,
    batch_size: int = 256,
    seed: int = 0,
    console=None,
    progress: bool = True,
    quantizer: str = "kmeans",
    options: dict[str, Any] | None = None,
    num_workers: int = 0,
) -> dict[str, Any] | None:
    """Encode, fit the registered :class:`FittableQuantizer` ``quantizer`` (k-means by default) built with
    its own ``options`` (k-means: ``niter``, ``spherical``, ``max_points_per_centroid``) and write it into
    ``run``; returns the codebook statistics. Under torchrun every rank encodes its slice and rank 0 fits
    and writes (the other ranks return None)."""
    _, _, device = init_distributed()
    run_dir = RunDir(run)
    cfg = run_dir.read_train_config()
    require_subclass("quantizer", quantizer, FittableQuantizer, f"it is not fitted offline; train it in stage 2 instead: stvq train --stage 2 --from {run} --quantizer {quantizer}")
    if cfg.stage != 1:
        raise StvqError(f"{run} is a stage-{cfg.stage} run; quantize the stage-1 run it came from ({cfg.from_run})")
    rank, _ = rank_world()
    with ranks_lock(run):  # one writer: a run being trained or quantized elsewhere is refused
        model = load_pretrained(run).to(device)
        if not isinstance(model, CodeTokenizer):
            raise StvqError(f"{run} holds a {type(model).__name__}; stvq quantize fits a codebook for a tokenizer with continuous codes (a CodeTokenizer)")
        spec = data or cfg.data
        dataset = make_dataset(spec, model.config.image_size, "train", cfg.seed)
        key = cache_key(model.encoder, spec, model.config.image_size, cfg.seed)
        count = max_images if is_stream(dataset) else min(max_images, len(dataset))
        cached = run_dir.load_codes(key, model.num_tokens, model.encoder.code_dim)  # a stream's first images are as fixed as an indexed set's
        from_cache = cached is not None and len(cached) >= count
        if cached is not None and from_cache:
            codes = cached[:count]  # the frozen encoder's codes for these images are already known
        else:
            codes = encode_dataset(model, dataset, count, batch_size, console, progress, num_workers)
        if rank != 0:
            barrier()  # rank 0 fits and writes
            return None
        if not from_cache:
            run_dir.save_codes(key, codes)
        per_codebook = len(codes) if per_position else codes.shape[0] * codes.shape[1]
        if k > per_codebook:
            barrier()
            raise StvqError(f"--k {k} is larger than the {per_codebook:,} code vectors collected per codebook; raise --max-images or lower --k")
        model.set_quantizer({"name": quantizer, **(options or {}), "codebook_size": k, "positions": model.num_tokens if per_position else 0, "seed": seed})
        fitted = model.quantizer
        assert isinstance(fitted, FittableQuantizer)  # set_quantizer built the one require_subclass checked
        fitted.to(device).fit(codes)
        stats = fitted.eval()(codes.to(device)).stats
        model.save_pretrained(run)
        result = {"k": k, "vectors": int(codes.shape[0] * codes.shape[1]), "images": len(codes), "codes_from_cache": from_cache, **stats}
        run_dir.write_quantize(result)
        barrier()
        return result
