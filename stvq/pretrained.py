"""Loading what a directory written by stvq names (its ``config.json``: a plugin's kind, name and options),
or a registered tokenizer by name: the one place where a file on disk becomes a built plugin."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from stvq.checkpoint import CONFIG_NAME, read_config
from stvq.errors import CheckpointError, StvqError
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
        config = json.loads((Path(directory) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "kind" in config and "name" in config


def load_pretrained(directory: str | os.PathLike, kind: str | None = None) -> Any:
    """Rebuild whatever plugin ``directory/config.json`` names (of ``kind``, where given) and load its weights."""
    config = read_config(directory)
    if kind is not None and config["kind"] != kind:
        raise CheckpointError(f"{directory} holds a {config['kind']} ({config['name']}), not a {kind}; pass a directory that `stvq train` or `stvq compose` wrote")
    model = create(config["kind"], config["name"], **config["options"])
    model.load_weights(directory)
    return model.eval()
