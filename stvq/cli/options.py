"""What the commands share: the console, options derived from a config
dataclass (one source of defaults), and options that plugins add to a command (``register_commands``)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from stvq.config import MAX_SEED
from stvq.errors import ConfigError

console = Console()


class FiniteFloat(click.FloatRange):
    """A float range that also refuses nan and inf (click's lets NaN through: no comparison with it fails)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number

    def _describe_range(self) -> str:
        """What --help shows beside the default (click's reads "x<=None" for a range without bounds)."""
        return "finite" if self.min is None and self.max is None else super()._describe_range()


class WritePath(click.Path):
    """A path stvq writes to: an empty one (which would write into the current directory) is refused."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path; name the directory or file to write", param, ctx)
        return super().convert(value, param, ctx)


#: ``--seed``: what torch and NumPy accept.
SEED = click.IntRange(0, MAX_SEED)
#: ``--num-workers``: at most four worker processes a core of this machine (at least 8).
WORKERS = click.IntRange(0, max(8, 4 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)))


preset_option = click.option("--preset", default="tiny", show_default=True, help="Model preset: tiny, small or reference.")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a model config field; repeatable.")


#: The flags of every training command, for the fields of :class:`stvq.config.LoopConfig` (each command
#: adds its own before these).
LOOP_FLAGS: dict[str, dict[str, Any]] = {
    "steps": {},
    "lr": {"help": "Peak learning rate (warmup, then cosine decay)."},
    "bf16": {"help": "Autocast to bfloat16."},
    "ema_decay": {"help": "Keep a moving average of the weights with this decay (e.g. 0.999); validation and the saved model use it. 0: off."},
    "seed": {"type": SEED},
    "eval_every": {},
    "checkpoint_every": {},
    "log_every": {},
    "num_workers": {"type": WORKERS, "help": "DataLoader worker processes (a wds: stream: one reader each; default: 0 on a CPU, one per core, at most 8, on a GPU)."},
    "tensorboard": {"help": "Also log to RUN/tensorboard/ (pip install 'stvq[tensorboard]')."},
    "wandb": {
        "is_flag": False,
        "flag_value": "stvq",
        "metavar": "[PROJECT]",
        "help": "Also log to Weights & Biases, project PROJECT (default stvq); WANDB_MODE=offline keeps it in RUN/wandb/ (pip install 'stvq[wandb]').",
    },
}


def config_options(schema: type, flags: dict[str, dict[str, Any]]) -> Callable:
    """Click options for the fields of the dataclass ``schema`` named in ``flags`` (in that order), each
    with the field's type and default: the dataclass is the one source of defaults. ``flags[name]`` holds
    extra click arguments (``help``, ``type``) and ``flag`` for another spelling than ``--field-name``.
    A bool field that defaults to True becomes ``--no-field-name``."""
    by_name = {f.name: f for f in fields(schema)}

    def decorate(command: Callable) -> Callable:
        for name, extra in reversed(flags.items()):
            f, extra = by_name[name], dict(extra)
            default = f.default if f.default is not MISSING else None
            flag = extra.pop("flag", "--" + name.replace("_", "-"))
            if f.type == "bool":
                option = click.option(flag if not default else "--no-" + flag[2:], name, is_flag=True, flag_value=not default, default=default, **extra)
            else:
                kind = extra.pop("type", {"int": int, "float": FiniteFloat()}.get(str(f.type), str))
                option = click.option(flag, name, type=kind, default=default, show_default=default is not None, **extra)
            command = option(command)
        return command

    return decorate


def _workers(ctx: click.Context, param: click.Parameter, value: int | None) -> int:
    from stvq.streams import default_workers

    return default_workers() if value is None else value


workers_option = click.option(
    "--num-workers",
    type=WORKERS,
    callback=_workers,
    help="DataLoader worker processes that decode and resize images (default: one per core, the cores shared among torchrun's processes, at most 8; 0: in the main process).",
)


def distributed_tokenizer(path: str):
    """The tokenizer in ``path`` on this process's device, the process group started under torchrun."""
    from stvq.distributed import init_distributed

    _, _, device = init_distributed()
    return load_tokenizer_dir(path).to(device)


def meta_option(flag: str, key: str, name: str, help: str, **click_args: Any) -> click.Option:
    """An option a plugin adds to a command (``register_commands``): a value the user gives is stored as
    ``ctx.meta[key][name]``, which the command reads with :func:`given_meta`. E.g. the reference plugin's
    ``--vqgan-config`` stores ``{"vqgan": {"config": PATH}}`` under ``stvq.compose.parts`` as
    ``name="vqgan.config"``: a dotted name nests."""

    def record(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if ctx.get_parameter_source(param.name) is click.core.ParameterSource.DEFAULT:
            return  # a plugin's default is the plugin's own business
        target = ctx.meta.setdefault(key, {})
        *parents, leaf = name.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value

    return click.Option([flag, "_" + flag.strip("-").replace("-", "_")], expose_value=False, callback=record, help=help, **click_args)


def given_meta(key: str) -> dict[str, Any]:
    """What the plugins' :func:`meta_option` options of the running command stored under ``key``."""
    return click.get_current_context().meta.get(key, {})


def load_tokenizer_dir(path: str):
    """The tokenizer in ``path``, a run or a directory written by ``stvq compose``."""
    from stvq.pretrained import load_tokenizer

    if not Path(path).is_dir():
        raise ConfigError(f"--tokenizer {path} is not a directory; pass a run or a directory written by `stvq compose`")
    return load_tokenizer(path)


# --------------------------------------------------------------------------------- training commands


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


def resume_config(ctx: click.Context, run: str, schema: type, steps: int):
    """The config a ``--resume RUN`` continues with: the run's own (read as ``schema``), with ``--steps``
    the one change it accepts (to extend the run); any other option given is refused."""
    from stvq.run import RunDir

    given = [p.opts[0] for p in ctx.command.params if p.name not in ("resume_dir", "steps", "no_progress") and _given(ctx, p.name)]
    if given:
        raise ConfigError(f"--resume continues {run} with its own train.json; drop {', '.join(given)} (only --steps may change, to extend the run)")
    cfg = RunDir(run).read_train_config(schema)
    if _given(ctx, "steps"):
        cfg.steps = steps
    return cfg


def fit(trainer, run: str, command: str = "stvq train") -> dict | None:
    """Run ``trainer.fit()``; the summary on rank 0 of a run that trained, None otherwise. Ctrl-C names the
    last checkpoint and the --resume command (exit status 130); a finished run says how to extend it."""
    from stvq.run import RunDir, checkpoint_step

    try:
        summary = trainer.fit()
    except KeyboardInterrupt:
        step = checkpoint_step(RunDir(run).checkpoint)
        where = f"the last checkpoint (step {step}) is in {run}: continue with {command} --resume {run}" if step else "no checkpoint was written yet: start the run again"
        click.echo(f"Interrupted; {where}", err=True)
        sys.exit(130)
    if not trainer.is_main:
        return None
    if "finished" in summary:
        click.echo(f"{run} is finished (step {summary['finished']}); nothing to do: extend it with --resume {run} --steps N")
        return None
    return summary
