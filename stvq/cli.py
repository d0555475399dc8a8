"""The ``stvq`` command line. Heavy imports (torch) happen inside commands, so ``stvq --help`` and
``stvq plugins`` stay fast."""

from __future__ import annotations

import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from stvq.config import TrainConfig
from stvq.errors import ConfigError, StvqError

console = Console()


class StvqGroup(click.Group):
    """Turns :class:`StvqError`, and an OS error on a file we read or write (no permission, a file where a
    folder should be, a full disk), into one line on stderr and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StvqError as err:
            raise click.ClickException(str(err)) from None
        except OSError as err:
            raise click.ClickException(f"{err.strerror}: {err.filename}" if err.filename and err.strerror else str(err)) from None


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"Warning: {message}", err=True)


def _parse_bool(value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(value)
    return value.lower() in ("true", "1")


CASTS = {"int": int, "float": float, "str": str, "bool": _parse_bool}


def parse_pairs(pairs: tuple[str, ...], flag: str, schema: type | None = None, example: str = "levels=[8,5,5,5]") -> dict[str, Any]:
    """The one KEY=VALUE parser: ``("width=256", "lr_scales={\"encoder.\": 0.3}")`` -> a dict. With a
    config dataclass ``schema``, keys must be its fields and values take the field's type (int, float,
    bool, str; other types as JSON); without one, values are JSON where they parse, else strings."""
    import json

    types = {f.name: f.type for f in fields(schema)} if schema else None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not (sep and key and value):
            raise ConfigError(f"{flag} {pair!r} is not KEY=VALUE, e.g. {flag} {example}")
        if types is not None and key not in types:
            raise ConfigError(f"{flag} {key}: unknown config field; known fields: {', '.join(sorted(types))}")
        kind = types[key] if types is not None else None
        try:
            out[key] = CASTS[kind](value) if kind in CASTS else json.loads(value)
        except ValueError:  # json.JSONDecodeError is a ValueError
            if kind is None:
                out[key] = value  # an option's plain string
            else:
                raise ConfigError(f"{flag} {key}={value}: expected a value of type {kind}") from None
    return out


def parse_overrides(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``("width=256", "attn_mask=causal-placeholders")`` -> typed ModelConfig overrides."""
    from stvq.config import ModelConfig

    return parse_pairs(pairs, "--set", ModelConfig, "width=256")


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
@click.option("--tokenizer", default=TrainConfig.tokenizer, show_default=True, help="The registered tokenizer to build.")
def info(preset: str, overrides: tuple[str, ...], tokenizer: str) -> None:
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
        model = create("tokenizer", tokenizer, config=cfg)

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
    """``("levels=[8,5,5,5]", "decay=0.9")`` -> {"levels": [8, 5, 5, 5], "decay": 0.9}: a plugin's options."""
    return parse_pairs(pairs, flag)


def _default_run(stage: int, name: str) -> str:
    """runs/PRESET-stage1-TIME, or runs/SOURCE-stage2-TIME for a stage-2 run started from SOURCE."""
    import time

    return f"runs/{name}-stage{stage}-{time.strftime('%Y%m%d-%H%M%S')}"


@main.command()
@click.option("--stage", type=click.IntRange(1, 2), default=1, show_default=True, help="1: continuous codes; 2: quantized codes, frozen encoder.")
@preset_option
@set_option
@click.option("--data", default="shapes", show_default=True, help="'shapes' (built in), 'photos' (scikit-image's) or a folder of images.")
@click.option("--run-dir", "--run", "run_dir", type=click.Path(file_okay=False), help="Run directory (default runs/PRESET-stageN-TIME). Under torchrun write --run-dir: torchrun takes --run for its own --run-path.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue this run from its last checkpoint.")
@click.option("--from", "from_run", type=click.Path(file_okay=False), help="Stage 2: the stage-1 run to start from.")
@click.option("--tokenizer", default=TrainConfig.tokenizer, show_default=True, help="Stage 1: the registered tokenizer to train (a CodeTokenizer).")
@click.option("--quantizer", help="Stage 2: a quantizer plugin instead of the run's k-means codebook (fsq, ema-vq).")
@click.option("--quantizer-option", "quantizer_options", multiple=True, metavar="KEY=VALUE", help="Quantizer option, JSON value; repeatable.")
@click.option("--no-cache-codes", is_flag=True, help="Stage 2: run the frozen encoder every step instead of using the codes `stvq quantize` cached.")
@click.option("--steps", type=int, default=TrainConfig.steps, show_default=True)
@click.option("--batch-size", type=int, default=TrainConfig.batch_size, show_default=True, help="Per process.")
@click.option("--lr", type=float, default=TrainConfig.lr, show_default=True, help="Peak learning rate (warmup, then cosine decay).")
@click.option("--noise-sigma", type=float, default=TrainConfig.noise_sigma, show_default=True, help="Stage 1: std of the noise added to the codes.")
@click.option("--perceptual-weight", type=float, default=0.0, show_default=True, help="Weight of the EfficientNet-Lite0 feature loss (slow on CPU).")
@click.option("--bf16", is_flag=True, help="Autocast to bfloat16.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the encoder and decoder.")
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True)
@click.option("--eval-every", type=int, default=TrainConfig.eval_every, show_default=True)
@click.option("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every, show_default=True)
@click.option("--log-every", type=int, default=TrainConfig.log_every, show_default=True)
@click.option("--num-workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--train", "train_fields", multiple=True, metavar="KEY=VALUE", help="Any TrainConfig field by name (JSON for dicts), applied after the other options, e.g. --train tail_drop=0.5; repeatable.")
@click.pass_context
def train(ctx: click.Context, stage, preset, overrides, data, run_dir, resume_dir, from_run, tokenizer, quantizer, quantizer_options, no_cache_codes, steps, batch_size, lr, noise_sigma, perceptual_weight, bf16, compile_, seed, eval_every, checkpoint_every, log_every, num_workers, no_progress, train_fields) -> None:
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

    from stvq.run import RunDir
    from stvq.train import Trainer

    if resume_dir:
        given = [p.opts[0] for p in ctx.command.params if p.name not in ("resume_dir", "steps", "no_progress") and ctx.get_parameter_source(p.name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise ConfigError(f"--resume continues {resume_dir} with its own train.json; drop {', '.join(given)} (only --steps may change, to extend the run)")
        cfg = RunDir(resume_dir).read_train_config()
        if ctx.get_parameter_source("steps") is not click.core.ParameterSource.DEFAULT:
            cfg.steps = steps  # extending a finished run is the one change a resume accepts
        run = resume_dir
    else:
        q = {"name": quantizer, **parse_options(quantizer_options, "--quantizer-option")} if quantizer else None
        if quantizer_options and not quantizer:
            raise ConfigError("--quantizer-option needs --quantizer NAME")
        options = dict(
            stage=stage, tokenizer=tokenizer, preset=preset, model=parse_overrides(overrides), data=data, steps=steps, batch_size=batch_size,
            lr=lr, noise_sigma=noise_sigma, perceptual_weight=perceptual_weight, bf16=bf16, compile=compile_, seed=seed, eval_every=eval_every, checkpoint_every=checkpoint_every,
            log_every=log_every, num_workers=num_workers, from_run=from_run, quantizer=q, cache_codes=not no_cache_codes,
        )
        cfg = TrainConfig(**{**options, **parse_pairs(train_fields, "--train", TrainConfig, "tail_drop=0.5")})  # --train last
        run = run_dir or _default_run(stage, preset if stage == 1 else Path(from_run).name)
    trainer = Trainer(cfg, run, resume=bool(resume_dir), progress=not no_progress, console=console)
    try:
        summary = trainer.fit()
    except KeyboardInterrupt:
        from stvq.train import checkpoint_step

        step = checkpoint_step(RunDir(run).checkpoint)
        where = f"the last checkpoint (step {step}) is in {run}: continue with stvq train --resume {run}" if step else "no checkpoint was written yet: start the run again"
        click.echo(f"Interrupted; {where}", err=True)
        sys.exit(130)
    if "finished" in summary:
        if trainer.is_main:
            click.echo(f"{run} is finished (step {summary['finished']}); nothing to do: extend it with --resume {run} --steps N")
        return
    if trainer.is_main:
        val = summary["val_psnr"]
        lines = [
            f"run            {summary['run']}",
            f"steps          {summary['steps']} (stage {summary['stage']}, resumed from {summary['resumed_from']})",
            f"time           {summary['seconds']:.1f} s, {summary['images_per_s']:.1f} images/s",
            f"val PSNR       {val:.2f} dB" if val is not None else "val PSNR       (no step run)",
            f"mean image     {summary['mean_image_psnr']:.2f} dB (baseline)",
            f"grid           {summary['grid']}",
        ] + ([f"cached codes   {summary['cached_codes']:,} images (encoder skipped)"] if summary.get("cached_codes") else [])
        console.print(Panel("\n".join(lines), title="stvq train: done", expand=False))


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="A stage-1 run.")
@click.option("--k", "k", type=click.IntRange(min=1), default=8192, show_default=True, help="Codebook size.")
@click.option("--data", help="Data to encode (default: the run's).")
@click.option("--max-images", type=click.IntRange(min=1), default=20000, show_default=True)
@click.option("--per-position", is_flag=True, help="One codebook per token position.")
@click.option("--niter", type=click.IntRange(min=1), default=20, show_default=True, help="k-means iterations.")
@click.option("--spherical", is_flag=True, help="Spherical k-means (unit-norm centroids).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True)
@click.option("--quantizer", default="kmeans", show_default=True, help="The registered quantizer to fit (a FittableQuantizer); --niter and --spherical are k-means options.")
def quantize(run_dir, k, data, max_images, per_position, niter, spherical, batch_size, seed, quantizer) -> None:
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
    result = fit_codebook(run_dir, k=k, data=data, max_images=max_images, per_position=per_position, niter=niter, spherical=spherical, batch_size=batch_size, seed=seed, console=console, quantizer=quantizer)
    table = Table(title=f"k-means codebook written to {run_dir}")
    for column in ("K", "vectors", "time", "quantization MSE", "usage", "perplexity", "dead codes"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{k:,}" + (" per position" if per_position else ""), f"{result['vectors']:,}", f"{time.perf_counter() - started:.1f} s",
        f"{result['mse']:.5f}", f"{result['usage']:.1%}", f"{result['perplexity']:.1f}", f"{result['dead_codes']:,}",
    )
    console.print(table)


def _load_tokenizer(path: str):
    from stvq.checkpoint import load_tokenizer

    if not Path(path).is_dir():
        raise ConfigError(f"--tokenizer {path} is not a directory; pass a run or a directory written by `stvq compose`")
    return load_tokenizer(path)


@main.command()
@click.argument("spec")
@click.option("--styled", type=click.Path(), help="The styled part: a run directory (stage 2, or stage 1 + `stvq quantize`).")
@click.option("--vqgan", type=click.Path(), help="The vqgan part: a taming .ckpt (with --vqgan-config) or a directory.")
@click.option("--vqgan-config", type=click.Path(), help="The taming YAML config of --vqgan.")
@click.option("--part", "parts", multiple=True, metavar="NAME=PATH", help="Any other registered tokenizer's directory; repeatable.")
@click.option("--begin", is_flag=True, help="Start every sequence with a begin id.")
@click.option("--separator", is_flag=True, help="Put a separator id between the parts.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Directory to write.")
def compose(spec, styled, vqgan, vqgan_config, parts, begin, separator, output) -> None:
    """Join tokenizers into one sequence over one vocabulary (SPEC is A+B[+C], e.g. styled+vqgan), and
    write a directory that `stvq.load_tokenizer` and --tokenizer accept. A single name converts that
    tokenizer (e.g. a taming .ckpt to safetensors).

    \b
    Example:
      stvq compose styled+vqgan --styled runs/NAME --vqgan model.ckpt --vqgan-config model.yaml -o tok/
      stvq compose vqgan --vqgan model.ckpt --vqgan-config model.yaml -o vqgan/
    """
    from stvq.compose import compose as do_compose

    named = {k: str(v) for k, v in parse_pairs(parts, "--part", example="titok=runs/titok").items()}
    sources = {"styled": styled, "vqgan": vqgan, **named}
    options = {"begin": begin, "separator": separator} if "+" in spec else {}
    tokenizer = do_compose(spec, {k: v for k, v in sources.items() if v}, {"vqgan": vqgan_config} if vqgan_config else {}, **options)
    tokenizer.save_pretrained(output)
    table = Table(title=f"{spec} -> {output}")
    for column in ("part", "tokens", "vocabulary", "id range", "image size"):
        table.add_column(column, justify="right")
    for p in tokenizer.manifest()["parts"]:
        table.add_row(p["name"], str(p["num_tokens"]), f"{p['vocab_size']:,}", f"[{p['offset']:,}, {p['offset'] + p['vocab_size']:,})", str(p["image_size"]))
    table.add_row("[bold]total[/]", str(tokenizer.num_tokens), f"{tokenizer.vocab_size:,}", "", str(tokenizer.image_size))
    console.print(table)


@main.command()
@click.option("--tokenizer", "tokenizer_dir", required=True, type=click.Path(), help="A run or a composed tokenizer directory.")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="A .npy file of ids (N, tokens).")
def encode(tokenizer_dir, images, output) -> None:
    """Images -> token ids, saved as a NumPy array (one row per image, in argument order).

    \b
    Example:
      stvq encode --tokenizer runs/NAME cat.jpg dog.png -o ids.npy
    """
    import numpy as np
    import torch

    from stvq.data import load_image

    tokenizer = _load_tokenizer(tokenizer_dir)
    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"no such image file: {missing[0]}")
    try:
        batch = torch.stack([load_image(Path(p), tokenizer.image_size) for p in images])
    except Exception as err:
        raise ConfigError(f"cannot read an image: {err}") from None
    ids = tokenizer.encode(batch).cpu().numpy()
    np.save(output, ids)
    click.echo(f"{len(images)} image(s) -> {output}: ids {ids.shape}, vocabulary {tokenizer.vocab_size:,}")


@main.command()
@click.option("--tokenizer", "tokenizer_dir", required=True, type=click.Path(), help="A run or a composed tokenizer directory.")
@click.argument("ids_file", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Directory for the PNG files.")
def decode(tokenizer_dir, ids_file, output) -> None:
    """Token ids (.npy, one row per image) -> PNG images 000000.png, 000001.png, ...

    \b
    Example:
      stvq decode --tokenizer runs/NAME ids.npy -o decoded/
    """
    import numpy as np
    import torch
    from PIL import Image

    from stvq.data import to_uint8

    tokenizer = _load_tokenizer(tokenizer_dir)
    if not Path(ids_file).is_file():
        raise ConfigError(f"no such ids file: {ids_file}")
    try:
        array = np.load(ids_file)  # allow_pickle stays False: a pickled array is refused, never run
    except (ValueError, OSError, EOFError) as err:
        raise ConfigError(f"{ids_file} is not a NumPy .npy array of ids ({err}); write ids with numpy.save or stvq encode") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise ConfigError(f"{ids_file} is an .npz archive; pass one .npy array of ids (numpy.save)")
    if array.dtype.kind not in "iu" or np.iinfo(array.dtype).max < tokenizer.vocab_size - 1:
        raise ConfigError(f"ids in {ids_file} are {array.dtype}, which cannot be ids of a vocabulary of {tokenizer.vocab_size:,}; stvq encode writes int64")
    ids = torch.from_numpy(array.astype(np.int64))
    images = tokenizer.decode(ids)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(to_uint8(image)).save(out / f"{i:06d}.png")
    click.echo(f"{len(images)} image(s) -> {out}/")


@main.command()
@click.option("--tokenizer", "tokenizer_dir", required=True, type=click.Path(), help="A run or a composed tokenizer directory.")
@click.option("--data", required=True, help="A folder of images ('shapes' or 'photos' with --max-images).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Directory for shards and manifest.json.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1024, show_default=True, help="Images per .npy shard.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-images", type=click.IntRange(min=1), help="Tokenize only the first N images.")
def tokenize(tokenizer_dir, data, output, shard_size, batch_size, max_images) -> None:
    """A whole data set -> sharded token files (shard_NNNNN.npy + manifest.json with the vocabulary and
    layout), for an autoregressive model's data loader. Re-running resumes: finished shards are kept.

    \b
    Example:
      stvq tokenize --tokenizer tok/ --data images/ -o shards/
    """
    from torch.utils.data import Subset

    from stvq.compose import tokenize_dataset
    from stvq.data import ImageFolderDataset, make_dataset

    tokenizer = _load_tokenizer(tokenizer_dir)
    if data in ("shapes", "photos"):
        if max_images is None:
            raise ConfigError(f"--data {data} is endless; give --max-images N")
        dataset = make_dataset(data, tokenizer.image_size, "train")
        fingerprint = f"{data}:train:seed0"
    else:
        dataset = ImageFolderDataset(data, tokenizer.image_size, split="all")
        fingerprint = dataset.fingerprint()
    if max_images is not None:
        dataset = Subset(dataset, range(min(max_images, len(dataset))))
    result = tokenize_dataset(tokenizer, dataset, output, shard_size=shard_size, batch_size=batch_size, console=console, data_fingerprint=fingerprint)
    click.echo(f"{result['num_images']:,} images -> {result['num_shards']} shard(s) in {output} ({result['skipped_shards']} already there), {result['num_tokens']} tokens each, vocabulary {result['vocab_size']:,}")


@main.command("eval")
@click.argument("runs", nargs=-1, type=click.Path())
@click.option("--run", "run_options", multiple=True, type=click.Path(), help="A run to evaluate; repeatable.")
@click.option("--tokenizer", "tokenizer_options", multiple=True, type=click.Path(), help="A Styled VQ directory; repeatable.")
@click.option("--compare", is_flag=True, help="Compare the runs: one table, one plot with every curve.")
@click.option("--data", help="'shapes', 'photos' or a folder (default: the run's training data).")
@click.option("--images", type=click.IntRange(min=1), default=256, show_default=True, help="Validation images for the metrics.")
@click.option("--prefix-images", type=click.IntRange(min=1), default=64, show_default=True, help="Images for the prefix curves (37 x 2 decodes each).")
@click.option("--probe-images", type=click.IntRange(min=1), default=2000, show_default=True, help="shapes images to fit the factor probes on.")
@click.option("--no-perceptual", is_flag=True, help="Skip the EfficientNet-Lite0 feature distances.")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Where --compare writes (default eval-compare/).")
def evaluate_command(runs, run_options, tokenizer_options, compare, data, images, prefix_images, probe_images, no_perceptual, output) -> None:
    """Measure a Styled VQ: PSNR, SSIM, MAE, EfficientNet-Lite0 feature distances, codebook health, the
    prefix-decoding curve (first / last n of 36 tokens known) and, on shapes, which token carries which
    factor. Writes eval.json, prefix_curve.png and factor_probe.png into the run.

    \b
    Example:
      stvq eval --run runs/NAME
      stvq eval --compare runs/styled runs/unordered -o compare/
    """
    from stvq.checkpoint import load_tokenizer
    from stvq.evaluate import evaluate, plot_prefix, summary_rows
    from stvq.interfaces import CodeTokenizer
    from stvq.run import RunDir

    targets = [*runs, *run_options, *tokenizer_options]
    if not targets:
        raise ConfigError("name a run to evaluate: stvq eval --run runs/NAME")
    if compare and len(targets) < 2:
        raise ConfigError("--compare needs at least two runs")
    results = []
    for target in targets:
        path = Path(target)
        if not path.is_dir():
            raise ConfigError(f"{target} is not a directory; pass a run or a Styled VQ directory")
        model = load_tokenizer(path)
        if not isinstance(model, CodeTokenizer):
            raise ConfigError(f"{target} holds a {type(model).__name__}; stvq eval measures a tokenizer with continuous codes (a CodeTokenizer, e.g. a Styled VQ run)")
        run_dir = RunDir(path)
        source = data or (run_dir.read_train_config().data if run_dir.is_run() else "shapes")
        console.print(f"evaluating {target} on {source} ...")
        results.append(evaluate(model, path, source, images, prefix_images, probe_images, not no_perceptual, name=path.name))
    table = Table(title="stvq eval" + (" (compare)" if len(results) > 1 else ""))
    table.add_column("metric")
    rows = [summary_rows(r) for r in results]
    for r in results:
        table.add_column(r["name"], justify="right")
    for key in rows[0]:
        table.add_row(key, *(row.get(key, "") for row in rows))
    console.print(table)
    if len(results) > 1:
        from stvq.checkpoint import write_json

        out = Path(output or "eval-compare")
        out.mkdir(parents=True, exist_ok=True)
        plot_prefix({r["name"]: r["prefix"] for r in results}, out / "prefix_compare.png", results[0]["mean_image_psnr"])
        write_json(out / "compare.json", {r["name"]: r for r in results})
        console.print(f"wrote {out / 'compare.json'} and {out / 'prefix_compare.png'}")
    else:
        console.print(f"wrote eval.json and plots into {targets[0]}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
