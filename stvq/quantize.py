"""``stvq quantize``: the stage-2 codebook from a frozen stage-1 encoder's codes over a data set."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from stvq.checkpoint import load_pretrained, run_lock
from stvq.data import is_stream, make_dataset
from stvq.distributed import barrier, gather_rows, init_distributed, raise_on_any, rank_world, slice_of
from stvq.errors import StvqError
from stvq.interfaces import CodeTokenizer, FittableQuantizer
from stvq.registry import require_subclass
from stvq.run import RunDir, cache_key
from stvq.streams import PieceBatches, index_batches, loader, sharing_cores


@torch.no_grad()
def encode_dataset(model, dataset, max_images: int, batch_size: int, console=None, progress: bool = True, num_workers: int = 0) -> torch.Tensor:
    """Codes (M, N, code_dim) of the first ``max_images`` images of ``dataset``, on every rank. Under
    torchrun each rank encodes a contiguous slice (:func:`stvq.distributed.slice_of`), so the codes are
    the same for any number of processes. A stream gives the first readable images of each rank's pieces
    (``max_images`` split evenly over the ranks): which images, for a stream, depends on the ranks and
    workers."""
    device = next(model.parameters()).device
    rank, world = rank_world()
    if is_stream(dataset):
        batches = (b["images"] for b in loader(PieceBatches(dataset, list(range(rank, len(dataset.pieces()), world)), batch_size), num_workers, batch_size=None))
        count = -(-max_images // world)
    else:
        rows = slice_of(min(max_images, len(dataset)))
        batches = index_batches(dataset, [list(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)], num_workers)
        count = len(rows)
    chunks, done = [], 0
    with Progress(console=console, disable=not (progress and rank == 0)) as bar, sharing_cores(num_workers, device):
        task = bar.add_task("encoding", total=count)
        for images in batches:
            images = images[: count - done]
            if len(images):
                chunks.append(model.encode_codes(images.to(device, non_blocking=True)).float())
                done += len(images)
                bar.update(task, advance=len(images))
            if done == count:
                break
    codes = torch.cat(chunks) if chunks else torch.empty(0, model.num_tokens, model.config.code_dim, device=device)
    return gather_rows(codes).cpu()


def fit_codebook(
    run: str | Path, k: int = 8192, data: str | None = None, max_images: int = 20000, per_position: bool = False,
    batch_size: int = 256, seed: int = 0, console=None, progress: bool = True, quantizer: str = "kmeans", options: dict[str, Any] | None = None,
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
    with ExitStack() as stack:
        problem = None
        if rank == 0:  # one writer: a run being trained or quantized elsewhere is refused
            try:
                stack.enter_context(run_lock(run))
            except StvqError as err:
                problem = str(err)
        raise_on_any(problem)
        model = load_pretrained(run).to(device)
        if not isinstance(model, CodeTokenizer):
            raise StvqError(f"{run} holds a {type(model).__name__}; stvq quantize fits a codebook for a tokenizer with continuous codes (a CodeTokenizer)")
        spec = data or cfg.data
        dataset = make_dataset(spec, model.config.image_size, "train", cfg.seed)
        key = cache_key(model.encoder, spec, model.config.image_size, cfg.seed)
        count = max_images if is_stream(dataset) else min(max_images, len(dataset))
        cached = None if is_stream(dataset) else run_dir.load_codes(key)  # a stream's codes are not by index
        from_cache = cached is not None and len(cached) >= count
        if from_cache:
            codes = cached[:count]  # the frozen encoder's codes for these images are already known
        else:
            codes = encode_dataset(model, dataset, count, batch_size, console, progress, num_workers)
        if rank != 0:
            barrier()  # rank 0 fits and writes
            return None
        if not from_cache and not is_stream(dataset):
            run_dir.save_codes(key, codes)
        per_codebook = len(codes) if per_position else codes.shape[0] * codes.shape[1]
        if k > per_codebook:
            barrier()
            raise StvqError(f"--k {k} is larger than the {per_codebook:,} code vectors collected per codebook; raise --max-images or lower --k")
        model.set_quantizer({"name": quantizer, **(options or {}), "codebook_size": k, "positions": model.num_tokens if per_position else 0, "seed": seed})
        model.quantizer.to(device).fit(codes)
        stats = model.quantizer.eval()(codes.to(device)).stats
        model.save_pretrained(run)
        result = {"k": k, "vectors": int(codes.shape[0] * codes.shape[1]), "images": len(codes), "codes_from_cache": from_cache, **stats}
        run_dir.write_quantize(result)
        barrier()
        return result
