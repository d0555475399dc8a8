"""``stvq quantize``: the stage-2 codebook from a frozen stage-1 encoder's codes over a data set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from stvq.checkpoint import load_pretrained, run_lock
from stvq.data import make_dataset
from stvq.errors import StvqError
from stvq.interfaces import CodeTokenizer, FittableQuantizer
from stvq.registry import require_subclass
from stvq.run import RunDir, cache_key


@torch.no_grad()
def encode_dataset(model, dataset, max_images: int, batch_size: int, console=None, progress: bool = True) -> torch.Tensor:
    """Codes (M, N, code_dim) of the first ``max_images`` items of ``dataset``."""
    count = min(max_images, len(dataset))
    chunks = []
    with Progress(console=console, disable=not progress) as bar:
        task = bar.add_task("encoding", total=count)
        for start in range(0, count, batch_size):
            images = torch.stack([dataset[i] for i in range(start, min(start + batch_size, count))])
            chunks.append(model.encode_codes(images))
            bar.update(task, advance=len(images))
    return torch.cat(chunks)


def fit_codebook(
    run: str | Path, k: int = 8192, data: str | None = None, max_images: int = 20000, per_position: bool = False,
    batch_size: int = 256, seed: int = 0, console=None, progress: bool = True, quantizer: str = "kmeans", options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Encode, fit the registered :class:`FittableQuantizer` ``quantizer`` (k-means by default) built with
    its own ``options`` (k-means: ``niter``, ``spherical``) and write it into ``run``; returns the codebook
    statistics."""
    run_dir = RunDir(run)
    cfg = run_dir.read_train_config()
    require_subclass("quantizer", quantizer, FittableQuantizer, f"it is not fitted offline; train it in stage 2 instead: stvq train --stage 2 --from {run} --quantizer {quantizer}")
    if cfg.stage != 1:
        raise StvqError(f"{run} is a stage-{cfg.stage} run; quantize the stage-1 run it came from ({cfg.from_run})")
    with run_lock(run):  # one writer: a run being trained or quantized elsewhere is refused
        model = load_pretrained(run)
        if not isinstance(model, CodeTokenizer):
            raise StvqError(f"{run} holds a {type(model).__name__}; stvq quantize fits a codebook for a tokenizer with continuous codes (a CodeTokenizer)")
        spec = data or cfg.data
        dataset = make_dataset(spec, model.config.image_size, "train", cfg.seed)
        key = cache_key(model.encoder, spec, model.config.image_size, cfg.seed)
        cached = run_dir.load_codes(key)
        count = min(max_images, len(dataset))
        from_cache = cached is not None and len(cached) >= count
        if from_cache:
            codes = cached[:count]  # the frozen encoder's codes for these images are already known
        else:
            codes = encode_dataset(model, dataset, count, batch_size, console, progress)
            run_dir.save_codes(key, codes)
        per_codebook = len(codes) if per_position else codes.shape[0] * codes.shape[1]
        if k > per_codebook:
            raise StvqError(f"--k {k} is larger than the {per_codebook:,} code vectors collected per codebook; raise --max-images or lower --k")
        model.set_quantizer({"name": quantizer, **(options or {}), "codebook_size": k, "positions": model.num_tokens if per_position else 0, "seed": seed})
        model.quantizer.fit(codes)
        stats = model.quantizer.eval()(codes).stats
        model.save_pretrained(run)
        result = {"k": k, "vectors": int(codes.shape[0] * codes.shape[1]), "images": len(codes), "codes_from_cache": from_cache, **stats}
        run_dir.write_quantize(result)
        return result
