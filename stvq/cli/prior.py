"""``stvq prior train|sample|eval``: an autoregressive prior on the token shards of ``stvq tokenize``."""

from __future__ import annotations

import time
from typing import Any

import click
from rich.panel import Panel
from rich.table import Table

from stvq.cli.options import LOOP_FLAGS, SEED, FiniteFloat, WritePath, config_options, console, fit, resume_config
from stvq.config import PriorTrainConfig, parse_pairs
from stvq.flops import mfu_text

#: The PriorTrainConfig fields that are flags of ``stvq prior train``; others: --train KEY=VALUE.
PRIOR_FLAGS: dict[str, dict[str, Any]] = {
    "shards": {"type": click.Path(file_okay=False), "help": "Token shards written by stvq tokenize."},
    "prior": {"help": "The registered prior to train."},
    "preset": {"help": "The prior's preset (gpt: tiny, small, base)."},
    "model": {"flag": "--set", "multiple": True, "metavar": "KEY=VALUE", "help": "A prior option, e.g. width=256; repeatable."},
    "heldout": {"help": "Images at the end of the shards kept out of training for evaluation (at most a tenth)."},
    "batch_size": {"help": "Sequences per process."},
    "compile": {"help": "torch.compile the prior."},
    **LOOP_FLAGS,
}


@click.group()
def prior() -> None:
    """An autoregressive prior over token ids: train it on `stvq tokenize` shards, sample images, measure
    its held-out likelihood per token position.

    \b
    Example:
      stvq prior train --shards shards/ --run-dir runs/prior
      stvq prior sample --prior runs/prior -n 64 -o samples/
      stvq prior eval --prior runs/prior
    """


@prior.command("train")
@config_options(PriorTrainConfig, PRIOR_FLAGS)
@click.option("--run-dir", "--run", "run_dir", type=WritePath(file_okay=False), help="Run directory (default runs/prior-PRESET-TIME).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue this run from its last checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--train", "train_fields", multiple=True, metavar="KEY=VALUE", help="Any PriorTrainConfig field by name; repeatable.")
@click.pass_context
def train_prior(ctx: click.Context, run_dir, resume_dir, no_progress, train_fields, **flags) -> None:
    """Train a prior (a GPT by default) on token shards; the last images of the shards are held out.
    Same run directory as `stvq train`: train.json, checkpoint, metrics.jsonl, --resume, torchrun.

    \b
    Example:
      stvq prior train --shards shards/ --steps 3000 --run-dir runs/prior
      stvq prior train --resume runs/prior --steps 6000
    """
    from stvq.prior import PriorTrainer

    if resume_dir:
        cfg, run = resume_config(ctx, resume_dir, PriorTrainConfig, flags["steps"]), resume_dir
    else:
        options = {**flags, "model": parse_pairs(flags["model"], "--set", example="width=256"), "shards": flags["shards"] or ""}
        cfg = PriorTrainConfig(**{**options, **parse_pairs(train_fields, "--train", PriorTrainConfig, "heldout=500")})
        run = run_dir or f"runs/prior-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = fit(PriorTrainer(cfg, run, resume=bool(resume_dir), progress=not no_progress, console=console), run, "stvq prior train")
    if summary:
        lines = [
            f"run            {summary['run']}",
            f"data           {summary['train_images']:,} images x {summary['num_tokens']} ids over {summary['vocab_size']:,} ({summary['heldout_images']:,} held out)",
            f"prior          {summary['parameters']:,} parameters, {summary['steps']} steps (resumed from {summary['resumed_from']})",
            f"time           {summary['seconds']:.1f} s, {summary['images_per_s']:.1f} sequences/s",
            f"compute        {mfu_text(summary, 'sequence')}",
            f"held-out       {summary.get('val_bits_per_image', float('nan')):.1f} bits/image ({summary.get('val_nll', float('nan')):.3f} nats/token)",
        ]
        console.print(Panel("\n".join(lines), title="stvq prior train: done", expand=False))


@prior.command("sample")
@click.option("--prior", "prior_dir", required=True, type=click.Path(file_okay=False), help="A run of stvq prior train.")
@click.option("-n", "count", type=click.IntRange(min=1), default=64, show_default=True, help="Images to sample.")
@click.option("--temperature", type=FiniteFloat(min=0), default=1.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="Keep the K likeliest ids (0: all).")
@click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=1.0, show_default=True, help="Nucleus: the smallest set of ids with this probability.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--keep", type=click.IntRange(min=0), default=0, show_default=True, help="Keep the first N ids of the --from images and sample the rest.")
@click.option("--from", "source", help="Real images for --keep: a folder, 'shapes' or 'photos' (validation split).")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(file_okay=False), help="Decode with this tokenizer (default: the one that wrote the shards; checked).")
@click.option("-o", "--output", required=True, type=WritePath(file_okay=False), help="Directory for ids.npy, samples.png, sample.json.")
def sample_prior(prior_dir, count, temperature, top_k, top_p, seed, keep, source, tokenizer_dir, output) -> None:
    """Sample images: ids from the prior, decoded by the tokenizer that wrote its shards. With --keep N
    --from IMAGES, each image keeps its first N ids: variations on it.

    \b
    Example:
      stvq prior sample --prior runs/prior -n 64 -o samples/
      stvq prior sample --prior runs/prior -n 16 --keep 8 --from shapes -o variations/
    """
    from stvq.prior import sample_run

    result = sample_run(prior_dir, output, count, temperature, top_k, top_p, seed, keep, source, tokenizer_dir)
    extra = f", first {keep} ids kept from {source} (sources.png)" if keep else ""
    click.echo(f"{count} sample(s) -> {output}/samples.png and ids.npy {tuple(result['ids'].shape)}{extra}")


@prior.command("eval")
@click.option("--prior", "prior_dir", required=True, type=click.Path(file_okay=False), help="A run of stvq prior train.")
@click.option("--shards", type=click.Path(file_okay=False), help="Other shards to measure on, every image (default: the run's held-out images).")
@click.option("--samples", type=click.IntRange(min=0), default=0, show_default=True, help="On shapes: judge this many samples with the factor recogniser.")
@click.option("--keep", "keeps", type=click.IntRange(min=0), multiple=True, help="On shapes: factor survival when the first N ids of real images are kept; repeatable.")
@click.option("--seed", type=SEED, default=0, show_default=True)
def eval_prior(prior_dir, shards, samples, keeps, seed) -> None:
    """Held-out negative log-likelihood per token position (table, prior_nll.png) and bits per image; on
    shapes, samples judged by a factor recogniser (clean scenes, factor distributions, Frechet distance)
    and variations that keep the first N ids (which factors survive).

    \b
    Example:
      stvq prior eval --prior runs/prior
      stvq prior eval --prior runs/prior --samples 512 --keep 2 --keep 8 --keep 18
    """
    from stvq.prior import evaluate_prior

    r = evaluate_prior(prior_dir, shards, samples, keeps, seed)
    bits = r["bits_per_position"]
    table = Table(title=f"{prior_dir}: held-out NLL on {r['images']:,} images")
    table.add_column("positions")
    table.add_column("bits per token", justify="right")
    step = max(1, -(-len(bits) // 12))
    for first in range(0, len(bits), step):
        chunk = bits[first : first + step]
        table.add_row(f"{first}" if len(chunk) == 1 else f"{first}-{first + len(chunk) - 1}", f"{sum(chunk) / len(chunk):.3f}")
    table.add_row("[bold]per image[/]", f"[bold]{r['bits_per_image']:.1f}[/] (uniform {r['uniform_bits_per_image']:.0f})")
    console.print(table)
    if "recogniser" in r:
        console.print(_judge_table(r))
    console.print(f"wrote prior_eval.json and the plots into {prior_dir}")


def _judge_table(r: dict) -> Table:
    factors = list(r["keep"][next(iter(r["keep"]))]["survival"]) if r["keep"] else list(r["judge"]["total_variation"])
    table = Table(
        title="samples read by the factor recogniser (accuracy on real images: " + ", ".join(f"{k.split('_')[0]} {v:.2f}" for k, v in r["recogniser"].items() if k.endswith("accuracy")) + ")"
    )
    table.add_column("")
    for name in factors:
        table.add_column(name, justify="right")
    table.add_column("clean scenes", justify="right")
    if "judge" in r:
        j = r["judge"]
        table.add_row("TV", *(f"{j['total_variation'][n]:.3f}" for n in factors), f"{j['clean_share']:.1%} (real {j['clean_share_real']:.1%})")
    for keep, k in r["keep"].items():
        table.add_row(f"keep {keep}", *(f"{k['survival'][n]:.1%}" for n in factors), f"{k['clean_share']:.1%}")
    notes = ["TV: total variation between the factors read on samples and on data", "keep N: share of variations of real images that keep the factor"]
    if "judge" in r:
        notes.append(f"Frechet distance (EfficientNet-Lite0) samples vs data: {r['judge']['fd_effnet_lite0']:.2f}")
    table.caption = "\n".join(notes)
    return table
