"""stvq: the Styled VQ image tokenizer framework. The public API, re-exported here; heavy modules
(torch) are imported only when a function that needs them is called."""

from __future__ import annotations

import os
from typing import Any

from stvq.errors import CheckpointError, ConfigError, PluginConflictError, PluginError, StvqError, TrainingDiverged, UnknownPluginError
from stvq.hookspecs import KINDS, hookimpl

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "CheckpointError",
    "ConfigError",
    "PluginConflictError",
    "PluginError",
    "StvqError",
    "TrainingDiverged",
    "UnknownPluginError",
    "__version__",
    "create",
    "hookimpl",
    "list_plugins",
    "load_tokenizer",
]


def list_plugins(kind: str | None = None) -> dict[str, list[str]]:
    """``{kind: [name, ...]}`` for encoder, decoder, quantizer, tokenizer, composer."""
    from stvq.registry import list_plugins as _list

    return _list(kind)


def create(kind: str, name: str, **options: Any) -> Any:
    """Build a registered plugin, e.g. ``stvq.create("quantizer", "fsq", levels=[8, 5, 5, 5])``."""
    from stvq.registry import create as _create

    return _create(kind, name, **options)


def load_tokenizer(path_or_spec: str | os.PathLike, **options: Any) -> Any:
    """A tokenizer from a directory written by stvq, or from a registered tokenizer's name and options,
    e.g. ``load_tokenizer("vqgan", checkpoint="x.ckpt", config="x.yaml")``."""
    from stvq.checkpoint import load_tokenizer as _load

    return _load(path_or_spec, **options)
