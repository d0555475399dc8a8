"""The ``stvq`` command line. Heavy imports (torch) happen inside commands, so ``stvq --help`` and
``stvq plugins`` stay fast."""

from __future__ import annotations

import sys
import warnings
from dataclasses import fields
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from stvq.errors import ConfigError, StvqError

console = Console()


class StvqGroup(click.Group):
    """Turns :class:`StvqError` into one line on stderr and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StvqError as err:
            raise click.ClickException(str(err)) from None


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"Warning: {message}", err=True)


def parse_overrides(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``("width=256", "attn_mask=causal-placeholders")`` -> typed ModelConfig overrides."""
    from stvq.config import ModelConfig

    types = {f.name: f.type for f in fields(ModelConfig)}
    casts = {"int": int, "float": float, "str": str}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r} is not KEY=VALUE, e.g. --set width=256")
        if key not in types:
            raise ConfigError(f"--set {key}: unknown config field; known fields: {', '.join(sorted(types))}")
        try:
            out[key] = casts[types[key]](value)
        except ValueError:
            raise ConfigError(f"--set {key}={value}: expected a value of type {types[key]}") from None
    return out


preset_option = click.option("--preset", default="tiny", show_default=True, help="Model preset: tiny, small or reference.")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a model config field; repeatable.")


@click.group(cls=StvqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="stvq")
def main() -> None:
    """stvq: the Styled VQ image tokenizer (36 ordered discrete tokens per image).

    \b
    Example:
      stvq plugins
      stvq info --preset reference
    """
    warnings.showwarning = _one_line_warning


@main.command()
def plugins() -> None:
    """List installed plugins: kind, name, providing package and version.

    \b
    Example:
      stvq plugins
    """
    from stvq.registry import plugin_infos

    table = Table(title="stvq plugins")
    for column in ("kind", "name", "package", "version"):
        table.add_column(column)
    for info in plugin_infos():
        table.add_row(info.kind, info.name, info.package, info.version)
    console.print(table)


@main.command()
@preset_option
@set_option
def info(preset: str, overrides: tuple[str, ...]) -> None:
    """Parameter counts per part, token count, code_dim and sequence lengths of a preset.

    No real weights are allocated (the model is built on torch's meta device).

    \b
    Example:
      stvq info --preset reference
      stvq info --preset tiny --set code_dim=8
    """
    import torch

    from stvq.config import make_config
    from stvq.registry import create

    cfg = make_config(preset=preset, **parse_overrides(overrides))
    with torch.device("meta"):
        model = create("tokenizer", "styled", config=cfg)

    table = Table(title=f"preset {preset}: parameters")
    table.add_column("part")
    table.add_column("modules", justify="right")
    table.add_column("parameters", justify="right")
    for top_name, top in model.named_children():
        for name, child in top.named_children():
            count = sum(p.numel() for p in child.parameters())
            n = len(child) if isinstance(child, torch.nn.ModuleList) else 1
            table.add_row(f"{top_name}.{name}", str(n), f"{count:,}")
        for name, param in top.named_parameters(recurse=False):
            table.add_row(f"{top_name}.{name}", "", f"{param.numel():,}")
        table.add_row(f"[bold]{top_name}[/]", "", f"[bold]{sum(p.numel() for p in top.parameters()):,}[/]")
    table.add_row("[bold]total[/]", "", f"[bold]{sum(p.numel() for p in model.parameters()):,}[/]")
    console.print(table)
    shape = Table(title="shapes", show_header=False)
    for key, value in (
        ("image", f"3 x {cfg.image_size} x {cfg.image_size}, patch {cfg.patch_size}"),
        ("tokens", f"{cfg.num_tokens} (2 x {cfg.condition_layers} condition layers)"),
        ("code_dim", str(cfg.code_dim)),
        ("encoder sequence", f"{cfg.seq_len} = {cfg.num_patches} patches + {cfg.num_tokens} special tokens"),
        ("decoder sequence", f"{cfg.seq_len} = {cfg.num_tokens} placeholders + {cfg.num_patches} positions"),
        ("width / heads", f"{cfg.width} / {cfg.heads}"),
        ("layers", f"encoder {cfg.encoder_layers}, decoder {cfg.condition_layers} condition + {cfg.plain_layers} plain"),
    ):
        shape.add_row(key, value)
    console.print(shape)


def parse_options(pairs: tuple[str, ...], flag: str) -> dict[str, Any]:
    """``("levels=[8,5,5,5]", "decay=0.9")`` -> {"levels": [8, 5, 5, 5], "decay": 0.9}; values are JSON
    where they parse as JSON, else strings."""
    import json

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"{flag} {pair!r} is not KEY=VALUE, e.g. {flag} levels=[8,5,5,5]")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _default_run(stage: int, preset: str) -> str:
    import time

    return f"runs/{preset}-stage{stage}-{time.strftime('%Y%m%d-%H%M%S')}"


@main.command()
@click.option("--stage", type=click.IntRange(1, 2), default=1, show_default=True, help="1: continuous codes; 2: quantized codes, frozen encoder.")
@preset_option
@set_option
@click.option("--data", default="shapes", show_default=True, help="'shapes' (built in), 'photos' (scikit-image's) or a folder of images.")
@click.option("--run-dir", "--run", "run_dir", type=click.Path(file_okay=False), help="Run directory (default runs/PRESET-stageN-TIME). Under torchrun write --run-dir: torchrun takes --run for its own --run-path.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue this run from its last checkpoint.")
@click.option("--from", "from_run", type=click.Path(file_okay=False), help="Stage 2: the stage-1 run to start from.")
@click.option("--quantizer", help="Stage 2: a quantizer plugin instead of the run's k-means codebook (fsq, ema-vq).")
@click.option("--quantizer-option", "quantizer_options", multiple=True, metavar="KEY=VALUE", help="Quantizer option, JSON value; repeatable.")
@click.option("--steps", type=int, default=360, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Per process.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--noise-sigma", type=float, default=0.1, show_default=True, help="Stage 1: std of the noise added to the codes.")
@click.option("--bf16", is_flag=True, help="Autocast to bfloat16.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-every", type=int, default=120, show_default=True)
@click.option("--checkpoint-every", type=int, default=60, show_default=True)
@click.option("--log-every", type=int, default=10, show_default=True)
@click.option("--num-workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.pass_context
def train(ctx: click.Context, stage, preset, overrides, data, run_dir, resume_dir, from_run, quantizer, quantizer_options, steps, batch_size, lr, noise_sigma, bf16, seed, eval_every, checkpoint_every, log_every, num_workers, no_progress) -> None:
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
    from rich.panel import Panel

    from stvq.train import TrainConfig, Trainer, read_train_config

    if resume_dir:
        cfg = read_train_config(resume_dir)
        if ctx.get_parameter_source("steps") is not click.core.ParameterSource.DEFAULT:
            cfg.steps = steps  # extending a finished run is the one change a resume accepts
        run = resume_dir
    else:
        q = {"name": quantizer, **parse_options(quantizer_options, "--quantizer-option")} if quantizer else None
        if quantizer_options and not quantizer:
            raise ConfigError("--quantizer-option needs --quantizer NAME")
        cfg = TrainConfig(
            stage=stage, preset=preset, model=parse_overrides(overrides), data=data, steps=steps, batch_size=batch_size,
            lr=lr, noise_sigma=noise_sigma, bf16=bf16, seed=seed, eval_every=eval_every, checkpoint_every=checkpoint_every,
            log_every=log_every, num_workers=num_workers, from_run=from_run, quantizer=q,
        )
        run = run_dir or _default_run(stage, preset if stage == 1 else "from")
    trainer = Trainer(cfg, run, resume=bool(resume_dir), progress=not no_progress, console=console)
    summary = trainer.fit()
    if trainer.is_main:
        val = summary["val_psnr"]
        lines = [
            f"run            {summary['run']}",
            f"steps          {summary['steps']} (stage {summary['stage']}, resumed from {summary['resumed_from']})",
            f"time           {summary['seconds']:.1f} s, {summary['images_per_s']:.1f} images/s",
            f"val PSNR       {val:.2f} dB" if val is not None else "val PSNR       (no step run)",
            f"mean image     {summary['mean_image_psnr']:.2f} dB (baseline)",
            f"grid           {summary['grid']}",
        ]
        console.print(Panel("\n".join(lines), title="stvq train: done", expand=False))


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="A stage-1 run.")
@click.option("--k", "k", type=int, default=8192, show_default=True, help="Codebook size.")
@click.option("--data", help="Data to encode (default: the run's).")
@click.option("--max-images", type=int, default=20000, show_default=True)
@click.option("--per-position", is_flag=True, help="One codebook per token position.")
@click.option("--niter", type=int, default=20, show_default=True, help="k-means iterations.")
@click.option("--spherical", is_flag=True, help="Spherical k-means (unit-norm centroids).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def quantize(run_dir, k, data, max_images, per_position, niter, spherical, batch_size, seed) -> None:
    """Give a stage-1 run a k-means codebook: encode the data with the frozen encoder, cluster the codes
    with faiss, and write the codebook into the run (then `stvq train --stage 2 --from RUN`).

    \b
    Example:
      stvq quantize --run runs/tiny-stage1-... --k 8192
      stvq quantize --run runs/tiny-stage1-... --k 256 --per-position
    """
    import time

    from stvq.quantize import fit_codebook

    started = time.perf_counter()
    result = fit_codebook(run_dir, k=k, data=data, max_images=max_images, per_position=per_position, niter=niter, spherical=spherical, batch_size=batch_size, seed=seed, console=console)
    table = Table(title=f"k-means codebook written to {run_dir}")
    for column in ("K", "vectors", "time", "quantization MSE", "usage", "perplexity", "dead codes"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{k:,}" + (" per position" if per_position else ""), f"{result['vectors']:,}", f"{time.perf_counter() - started:.1f} s",
        f"{result['mse']:.5f}", f"{result['usage']:.1%}", f"{result['perplexity']:.1f}", f"{result['dead_codes']:,}",
    )
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
