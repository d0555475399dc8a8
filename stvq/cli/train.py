"""``stvq train`` and ``stvq quantize``: the two stages and the codebook between them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
from rich.panel import Panel
from rich.table import Table

from stvq.cli.options import LOOP_FLAGS, SEED, WritePath, config_options, console, fit, given_meta, resume_config, workers_option
from stvq.config import PERCEPTUAL_LOSSES, TrainConfig, parse_options, parse_pairs
from stvq.errors import ConfigError
from stvq.flops import mfu_text
from stvq.registry import parse_overrides

#: The TrainConfig fields that are flags of ``stvq train``, in the order --help lists them; every other field
#: is set with ``--train KEY=VALUE``. Types and defaults come from TrainConfig.
TRAIN_FLAGS: dict[str, dict[str, Any]] = {
    "stage": {"type": click.IntRange(1, 2), "help": "1: continuous codes; 2: quantized codes, frozen encoder."},
    "preset": {"help": "Model preset: tiny, small or reference."},
    "model": {"flag": "--set", "multiple": True, "metavar": "KEY=VALUE", "help": "Override a model config field; repeatable."},
    "data": {"help": "'shapes' (built in), 'photos' (scikit-image's), a folder of images, wds:SHARDS or hf:DIR[:split]."},
    "from_run": {"flag": "--from", "type": click.Path(file_okay=False), "help": "Stage 2: the stage-1 run to start from."},
    "tokenizer": {"help": "Stage 1: the registered tokenizer to train (a CodeTokenizer)."},
    "cache_codes": {"help": "Stage 2: run the frozen encoder every step instead of using the codes `stvq quantize` cached."},
    "noise_sigma": {"help": "Stage 1: std of the noise added to the codes."},
    "perceptual_weight": {"help": "Weight of the perceptual term (0: none; slow on CPU)."},
    "perceptual": {
        "type": click.Choice(PERCEPTUAL_LOSSES),
        "help": "The perceptual term: EfficientNet-Lite0's (offline), or LPIPS with VGG16 (lpips, as taming and LlamaGen) or AlexNet (pip install 'stvq[metrics]'; weights as stvq eval --lpips).",
    },
    "adversarial_weight": {"help": "Weight of the adversarial term (0: none); a discriminator trains beside the tokenizer (taming's hinge loss, adaptive weight)."},
    "disc_start": {"type": click.IntRange(min=0), "help": "First step of the adversarial term and of the discriminator's training."},
    "discriminator": {"help": "The registered discriminator (options: --train discriminator_options={...})."},
    "batch_size": {"help": "Per process."},
    "compile": {"help": "torch.compile the encoder and decoder."},
    **LOOP_FLAGS,
}


def _default_run(stage: int, name: str) -> str:
    """runs/PRESET-stage1-TIME, or runs/SOURCE-stage2-TIME for a stage-2 run started from SOURCE."""
    return f"runs/{name}-stage{stage}-{time.strftime('%Y%m%d-%H%M%S')}"


@click.command()
@config_options(TrainConfig, TRAIN_FLAGS)
@click.option(
    "--run-dir",
    "--run",
    "run_dir",
    type=WritePath(file_okay=False),
    help="Run directory (default runs/PRESET-stageN-TIME). Under torchrun write --run-dir: torchrun takes --run for its own --run-path.",
)
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue this run from its last checkpoint.")
@click.option("--quantizer", help="Stage 2: a quantizer plugin instead of the run's k-means codebook (fsq, ema-vq).")
@click.option("--quantizer-option", "quantizer_options", multiple=True, metavar="KEY=VALUE", help="Quantizer option, JSON value; repeatable.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--metric-weights", type=click.Path(file_okay=False), help="torch's hub folder to read the LPIPS weights from (the files in DIR/checkpoints/; default: torch's own, TORCH_HOME).")
@click.option(
    "--train", "train_fields", multiple=True, metavar="KEY=VALUE", help="Any TrainConfig field by name (JSON for dicts), applied after the other options, e.g. --train tail_drop=0.5; repeatable."
)
@click.pass_context
def train(ctx: click.Context, run_dir, resume_dir, quantizer, quantizer_options, no_progress, metric_weights, train_fields, **flags) -> None:
    """Train Styled VQ: stage 1 (encoder + decoder on noisy continuous codes) or stage 2 (decoder on
    quantized codes, encoder frozen). With no option: the tiny preset on the built-in shapes, a few
    minutes on a CPU. Runs under `torchrun --nproc_per_node N stvq train ...` with DDP.

    \b
    Example:
      stvq train --stage 1
      stvq quantize --run runs/tiny-stage1-... --k 1024
      stvq train --stage 2 --from runs/tiny-stage1-...
      stvq train --resume runs/tiny-stage1-...
      torchrun --nproc_per_node 2 $(which stvq) train --run-dir runs/ddp
    """
    from stvq.field_metrics import weights_from
    from stvq.train import Trainer

    if resume_dir:
        cfg, run = resume_config(ctx, resume_dir, TrainConfig, flags["steps"]), resume_dir
    else:
        if quantizer_options and not quantizer:
            raise ConfigError("--quantizer-option needs --quantizer NAME")
        q = {"name": quantizer, **parse_options(quantizer_options, "--quantizer-option")} if quantizer else None
        options = {**flags, "model": parse_overrides(flags["model"], "tokenizer", flags["tokenizer"]), "quantizer": q}
        cfg = TrainConfig(**{**options, **parse_pairs(train_fields, "--train", TrainConfig, "tail_drop=0.5")})  # --train last
        run = run_dir or _default_run(cfg.stage, cfg.preset if cfg.stage == 1 else Path(cfg.from_run or "").name)
    with weights_from(metric_weights):
        summary = fit(Trainer(cfg, run, resume=bool(resume_dir), progress=not no_progress, console=console), run)
    if summary:
        console.print(_summary_panel(summary))


def _summary_panel(summary: dict) -> Panel:
    val = summary["val_psnr"]
    lines = [
        f"run            {summary['run']}",
        f"steps          {summary['steps']} (stage {summary['stage']}, resumed from {summary['resumed_from']})",
        f"time           {summary['seconds']:.1f} s, {summary['images_per_s']:.1f} images/s",
        f"compute        {mfu_text(summary)}",
        f"val PSNR       {val:.2f} dB" if val is not None else "val PSNR       (no step run)",
        f"mean image     {summary['mean_image_psnr']:.2f} dB (baseline)",
        f"grid           {summary['grid']}",
    ] + ([f"cached codes   {summary['cached_codes']:,} images (encoder skipped)"] if summary.get("cached_codes") else [])
    return Panel("\n".join(lines), title="stvq train: done", expand=False)


#: Where plugins' options of ``stvq quantize`` (``register_options``)
#: put the quantizer's options, e.g. the reference plugin's ``--niter`` for k-means.
QUANTIZER_OPTIONS = "stvq.quantize.options"


@click.command()
@click.option("--run-dir", "--run", "run_dir", required=True, type=WritePath(file_okay=False), help="A stage-1 run (under torchrun write --run-dir).")
@click.option("--k", "k", type=click.IntRange(min=1), default=8192, show_default=True, help="Codebook size.")
@click.option("--data", help="Data to encode (default: the run's).")
@click.option("--max-images", type=click.IntRange(min=1), default=20000, show_default=True)
@click.option("--per-position", is_flag=True, help="One codebook per token position.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--seed", type=SEED, default=TrainConfig.seed, show_default=True)
@click.option("--quantizer", default="kmeans", show_default=True, help="The registered quantizer to fit (a FittableQuantizer).")
@click.option("--quantizer-option", "quantizer_options", multiple=True, metavar="KEY=VALUE", help="An option of the quantizer, JSON value; repeatable.")
@workers_option
def quantize(run_dir, k, data, max_images, per_position, batch_size, seed, quantizer, quantizer_options, num_workers) -> None:
    """Give a stage-1 run a codebook: encode the data with the frozen encoder, fit the quantizer on the
    codes (k-means with faiss by default), and write it into the run (then `stvq train --stage 2 --from RUN`).

    \b
    Example:
      stvq quantize --run runs/tiny-stage1-... --k 8192
      stvq quantize --run runs/tiny-stage1-... --k 256 --per-position
      torchrun --nproc_per_node 8 $(which stvq) quantize --run RUN --data 'wds:train-{000000..001023}.tar' --max-images 1281167

    Under torchrun each process encodes a slice of the images and rank 0 fits and writes.
    """
    from stvq.quantize import fit_codebook

    options = {**given_meta(QUANTIZER_OPTIONS), **parse_options(quantizer_options, "--quantizer-option")}
    started = time.perf_counter()
    result = fit_codebook(
        run_dir,
        k=k,
        data=data,
        max_images=max_images,
        per_position=per_position,
        batch_size=batch_size,
        seed=seed,
        console=console,
        quantizer=quantizer,
        options=options,
        num_workers=num_workers,
    )
    if result is None:  # a rank other than 0 under torchrun
        return
    table = Table(title=f"{quantizer} codebook written to {run_dir}")
    for column in ("K", "vectors", "time", "quantization MSE", "usage", "perplexity", "dead codes"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{k:,}" + (" per position" if per_position else ""),
        f"{result['vectors']:,}",
        f"{time.perf_counter() - started:.1f} s",
        f"{result['mse']:.5f}",
        f"{result['usage']:.1%}",
        f"{result['perplexity']:.1f}",
        f"{result['dead_codes']:,}",
    )
    console.print(table)
