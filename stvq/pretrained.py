"""Loading what a directory written by stvq names (its ``config.json``: a plugin's kind, name and options),
or a registered tokenizer by name: the one place where a file on disk becomes a built plugin."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stvq.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_config, read_json
from stvq.errors import CheckpointError, StvqError, first_line
from stvq.registry import create, plugin_table


def load_tokenizer(path_or_spec: str | os.PathLike, **options: Any) -> Any:
    """``stvq.load_tokenizer``: a directory written by stvq, or a registered tokenizer's name and options."""
    if Path(path_or_spec).is_dir():
        if options:
            raise StvqError(f"options {sorted(options)} are not used when loading the directory {path_or_spec}")
        return load_pretrained(path_or_spec, kind="tokenizer")
    if str(path_or_spec) in plugin_table()["tokenizer"]:
        return create("tokenizer", str(path_or_spec), **options)
    raise StvqError(f"{str(path_or_spec)!r} is neither a directory written by stvq nor a registered tokenizer ({', '.join(sorted(plugin_table()['tokenizer'])) or 'none installed'})")


def written_by_stvq(directory: str | os.PathLike) -> bool:
    """Whether ``directory/config.json`` is stvq's (it names a plugin's kind and name), not another library's."""
    try:
        config = read_json(Path(directory) / CONFIG_NAME, "")
    except (OSError, StvqError):
        return False
    return isinstance(config, dict) and "kind" in config and "name" in config


def load_pretrained(directory: str | os.PathLike, kind: str | None = None) -> Any:
    """Rebuild whatever plugin ``directory/config.json`` names (of ``kind``, where given) and load its weights."""
    config = read_config(directory)
    if kind is not None and config["kind"] != kind:
        raise CheckpointError(f"{directory} holds a {config['kind']} ({config['name']}), not a {kind}; pass a directory that `stvq train` or `stvq compose` wrote")
    check_size(directory, config)
    try:
        model = create(config["kind"], config["name"], **config["options"])
    except (RuntimeError, ValueError, OverflowError, MemoryError) as err:  # torch's own refusals of a size or shape
        raise CheckpointError(f"{Path(directory) / CONFIG_NAME}: its options do not build a {config['name']} ({first_line(err)}); re-save the model") from None
    model.load_weights(directory)
    return model.eval()


def check_size(directory: str | os.PathLike, config: dict[str, Any]) -> None:
    """Refuse, before anything is allocated, a ``config.json`` whose options build a model with more bytes
    of weights than its ``model.safetensors`` holds (an edited width of 10^18, or another model's config).
    The model is built on the meta device, which allocates nothing; a plugin that cannot be built there is
    left to its own checks."""
    import torch

    weights = Path(directory) / WEIGHTS_NAME
    try:
        with torch.device("meta"):
            shell = create(config["kind"], config["name"], **config["options"])
        need = sum(t.numel() * t.element_size() for t in shell.state_dict().values())
    except StvqError:
        raise
    except Exception as err:
        if "overflow" in str(err).lower():
            raise CheckpointError(f"{Path(directory) / CONFIG_NAME}: its options describe a {config['name']} too large to build ({first_line(err)}); re-save the model") from None
        return
    have = weights.stat().st_size if weights.is_file() else 0
    if need > have:
        raise CheckpointError(
            f"{Path(directory) / CONFIG_NAME} describes a {config['name']} of {need / 2**20:,.1f} MiB of weights, and {weights} holds {have / 2**20:,.1f} MiB: the config was edited or belongs to other weights; re-save the model"
        )
