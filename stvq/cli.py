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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
