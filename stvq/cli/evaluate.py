"""``stvq eval``: measure runs, alone or side by side."""

from __future__ import annotations

import click
from rich.table import Table

from stvq.cli.options import WritePath, console, workers_option
from stvq.errors import ConfigError


@click.command("eval")
@click.argument("runs", nargs=-1, type=click.Path())
@click.option("--run", "run_options", multiple=True, type=click.Path(), help="A run to evaluate; repeatable.")
@click.option("--tokenizer", "tokenizer_options", multiple=True, type=click.Path(), help="A Styled VQ directory; repeatable.")
@click.option("--compare", is_flag=True, help="Compare the runs: one table, one plot with every curve.")
@click.option("--data", help="'shapes', 'photos', a folder, wds:SHARDS or hf:DIR[:split] (default: the run's training data).")
@click.option("--images", type=click.IntRange(min=1), default=256, show_default=True, help="Validation images for the metrics.")
@click.option("--prefix-images", type=click.IntRange(min=1), default=64, show_default=True, help="Images for the prefix curves (37 x 2 decodes each).")
@click.option("--probe-images", type=click.IntRange(min=1), default=2000, show_default=True, help="shapes images to fit the factor probes on.")
@click.option("--no-perceptual", is_flag=True, help="Skip the EfficientNet-Lite0 feature distances.")
@click.option("--no-recogniser", is_flag=True, help="On shapes: skip reading originals and reconstructions with the factor recogniser (trained once, about 6 CPU-minutes, cached).")
@click.option("--rfid", is_flag=True, help="Report rFID (pytorch-fid's Inception-V3); without it, reported where its weights are cached.")
@click.option("--lpips", type=click.Choice(["alex", "vgg"]), is_flag=False, flag_value="alex", help="Report LPIPS with this trunk (default alex); without it, reported where the weights are cached.")
@click.option(
    "--metric-weights", type=click.Path(file_okay=False), help="torch's hub folder to read rFID's and LPIPS's weights from (the files in DIR/checkpoints/; default: torch's own, TORCH_HOME)."
)
@click.option("-o", "--output", type=WritePath(file_okay=False), help="Where the comparison of two or more runs is written (default eval-compare/).")
@workers_option
def evaluate_command(runs, run_options, tokenizer_options, compare, data, images, prefix_images, probe_images, no_perceptual, no_recogniser, rfid, lpips, metric_weights, output, num_workers) -> None:
    """Measure a Styled VQ: PSNR, SSIM, MAE, EfficientNet-Lite0 feature distances, codebook health, the
    prefix-decoding curve (first / last n of 36 tokens known) and, on shapes, which token carries which
    factor and how often the factor recogniser reads each factor of the reconstructions right. Writes
    eval.json, prefix_curve.png and factor_probe.png into the run.

    \b
    Example:
      stvq eval --run runs/NAME
      stvq eval --compare runs/styled runs/unordered -o compare/
      torchrun --nproc_per_node 2 $(which stvq) eval runs/NAME
    """
    from stvq.distributed import init_distributed, is_main
    from stvq.evaluate import evaluate_path, summary_rows, unique_names, write_comparison
    from stvq.field_metrics import weights_from

    _, _, device = init_distributed()  # under torchrun the ranks share each pass over the images; rank 0 writes
    asked = (("rfid",) if rfid else ()) + ((f"lpips-{lpips}",) if lpips else ())
    targets = [*runs, *run_options, *tokenizer_options]
    if not targets:
        raise ConfigError("name a run to evaluate: stvq eval --run runs/NAME")
    if compare and len(targets) < 2:
        raise ConfigError("--compare needs at least two runs")
    if output and len(targets) < 2:
        raise ConfigError(f"-o names where a comparison of two or more runs is written; one run's eval.json and plots go into the run itself ({targets[0]}): drop -o")
    results = []
    with weights_from(metric_weights):
        for target, name in zip(targets, unique_names(targets)):
            if is_main():
                console.print(f"evaluating {target} ...")
            results.append(
                evaluate_path(
                    target,
                    data,
                    name=name,
                    images=images,
                    prefix_images=prefix_images,
                    probe_images=probe_images,
                    perceptual=not no_perceptual,
                    recognise=not no_recogniser,
                    field=asked or None,
                    num_workers=num_workers,
                    device=device,
                )
            )
    if not is_main():
        return
    table = Table(title="stvq eval" + (" (compare)" if len(results) > 1 else ""))
    table.add_column("metric")
    rows = [summary_rows(r) for r in results]
    for r in results:
        table.add_column(r["name"], justify="right")
    for key in rows[0]:
        table.add_row(key, *(row.get(key, "") for row in rows))
    console.print(table)
    if len(results) > 1:
        written = write_comparison(results, output or "eval-compare")
        console.print(f"wrote {' and '.join(map(str, written))}")
    else:
        console.print(f"wrote eval.json and plots into {targets[0]}")
