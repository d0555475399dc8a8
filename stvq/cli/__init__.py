"""The ``stvq`` command line: the group, ``plugins`` and ``info`` here; the jobs' commands in
:mod:`stvq.cli.train`, :mod:`stvq.cli.tokens` and :mod:`stvq.cli.evaluate`, each a thin function that
parses, calls one job function and prints; plugins add commands and options through the
``register_commands`` hook. Heavy imports (torch) happen inside commands, so ``stvq --help`` and ``stvq
plugins`` stay fast."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import click
from rich.table import Table

from stvq.cli.evaluate import evaluate_command
from stvq.cli.options import console, meta_option, preset_option, set_option
from stvq.cli.prior import prior
from stvq.cli.tokens import PARTS, compose, decode, encode, tokenize
from stvq.cli.train import QUANTIZER_OPTIONS, quantize, train
from stvq.config import TrainConfig, env_count
from stvq.errors import ConfigError, OptionRangeError, StvqError
from stvq.plugins import add_plugin_commands, add_plugin_options
from stvq.registry import parse_overrides


class StvqGroup(click.Group):
    """Turns :class:`StvqError`, and an OS error on a file we read or write (no permission, a file where a
    folder should be, a full disk), into one line on stderr and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from stvq.distributed import rank_world, shutdown_distributed

        try:
            result = super().invoke(ctx)
        except (StvqError, OSError) as err:
            problem = _one_line(err)
            rank, world = rank_world()
            if world == 1:
                shutdown_distributed()
                raise problem from None
            # Under torchrun every rank raises alike (stvq.distributed.raise_on_any): rank 0 says it once,
            # then all meet, so that torchrun, which ends the others when one exits, never cuts it off.
            if rank == 0:
                problem.show()
                sys.stderr.flush()
            import torch.distributed as dist

            dist.barrier()
            shutdown_distributed()
            raise click.exceptions.Exit(problem.exit_code) from None
        shutdown_distributed()
        return result

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Under torchrun, the process ends with the command's exit status without the interpreter's
        teardown (:func:`stvq.distributed.exit_process`); otherwise click's ``main``."""
        try:
            world = env_count("WORLD_SIZE", 1, 1)
        except ConfigError as err:
            click.echo(f"Error: {err}", err=True)
            sys.exit(1)
        if world == 1:  # before importing torch: `stvq --help` stays fast
            return super().main(*args, **kwargs)
        from stvq.distributed import exit_process

        try:
            super().main(*args, **kwargs)
        except SystemExit as done:
            exit_process(done.code if isinstance(done.code, int) else int(done.code is not None))
        exit_process(0)


def _one_line(err: StvqError | OSError) -> click.ClickException:
    """Our error as click's: a range known only after loading is a usage error (exit status 2), any other
    exit status 1; an OS error names its file. One line always: a newline (in a file name) is shown as \\n."""
    if isinstance(err, OSError):
        text = f"{err.strerror}: {err.filename}" if err.filename and err.strerror else str(err)
    else:
        text = str(err)
    if "in DataLoader worker process" in text and "Original Traceback" in text:  # our error, raised in a worker
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    text = text.replace("\n", "\\n")
    return click.UsageError(text) if isinstance(err, OptionRangeError) else click.ClickException(text)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Every warning as one line (a file name holding a newline included), never Python's two."""
    click.echo("Warning: " + str(message).replace("\n", "\\n"), err=True)


warnings.showwarning = _one_line_warning  # from the first import: the plugins' warnings below included


@click.group(cls=StvqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="stvq")
def main() -> None:
    """stvq: the Styled VQ image tokenizer (36 ordered discrete tokens per image).

    \b
    Example:
      stvq plugins
      stvq info --preset reference
    """
    warnings.showwarning = _one_line_warning  # again: a caller (pytest, a notebook) may have swapped it since the import


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
    infos = plugin_infos()
    for info in infos:
        table.add_row(info.kind, info.name + (" (clash)" if info.clash else ""), info.package, info.version, style="red" if info.clash else None)
    console.print(table)
    for info in infos:
        if info.clash:
            click.echo(f"Clash: {info.clash}", err=True)


@main.command()
@preset_option
@set_option
@click.option("--tokenizer", default=TrainConfig.tokenizer, show_default=True, help="The registered tokenizer to build.")
def info(preset: str, overrides: tuple[str, ...], tokenizer: str) -> None:
    """Parameter counts per part, FLOPs per image, token count, code_dim and sequence lengths of a preset.

    No real weights are allocated and nothing is computed (the model is built on torch's meta device;
    torch's FLOP counter counts its matrix products, convolutions and attention).

    \b
    Example:
      stvq info --preset reference
      stvq info --preset tiny --set code_dim=8
    """
    import torch

    from stvq.describe import parameter_rows
    from stvq.flops import tokenizer_flops
    from stvq.registry import create

    with torch.device("meta"):
        model = create("tokenizer", tokenizer, preset=preset, **parse_overrides(overrides, "tokenizer", tokenizer))
    cfg = model.config
    table = Table(title=f"preset {preset}: parameters")
    for column in ("part", "modules", "parameters"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for part, modules, count, total in parameter_rows(model):
        table.add_row(*((f"[bold]{part}[/]", "", f"[bold]{count:,}[/]") if total else (part, modules, f"{count:,}")))
    console.print(table)
    flops = Table(title="FLOPs per image")
    for column in ("pass", "GFLOPs"):
        flops.add_column(column, justify="left" if column == "pass" else "right")
    counted = tokenizer_flops(model, cfg.image_size)
    for name, what in (("forward", "forward (encode + decode)"), ("train", "training step, stage 1 (forward + backward)"), ("decoder", "decode (decoder forward)")):
        flops.add_row(what, f"{counted[name] / 1e9:,.3f}")
    console.print(flops)
    shape = Table(title="shapes", show_header=False)
    for key, value in cfg.describe():
        shape.add_row(key, value)
    console.print(shape)


for command in (train, quantize, compose, encode, decode, tokenize, evaluate_command, prior):
    main.add_command(command)

#: The stock commands that read options plugins add (``register_options``), and where each reads them:
#: ``compose`` a part's options (key ``PART.KEY``), ``quantize`` the quantizer's (key ``KEY``).
PLUGIN_OPTIONS = {"compose": PARTS, "quantize": QUANTIZER_OPTIONS}


def register_option(command: str, flag: str, key: str, help: str, **click_options: Any) -> None:
    """The ``register`` of the ``register_options`` hook: ``flag`` joins ``stvq COMMAND``'s options."""
    if command not in PLUGIN_OPTIONS:
        raise StvqError(f"stvq {command} takes no plugin options; these commands do: {', '.join(PLUGIN_OPTIONS)}")
    if flag in {o for p in main.commands[command].params for o in p.opts}:
        raise StvqError(f"stvq {command} already has {flag}")
    main.commands[command].params.append(meta_option(flag, PLUGIN_OPTIONS[command], key, help, **click_options))


add_plugin_options(register_option)
add_plugin_commands(main)
