"""stvq: the Styled VQ image tokenizer framework. The public API, re-exported here and nothing else;
``load_tokenizer`` (torch) is imported on first use, so ``import stvq`` and ``stvq plugins`` stay fast."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from stvq.errors import CheckpointError, ConfigError, OptionRangeError, PluginConflictError, PluginError, StvqError, TrainingDiverged, UnknownPluginError
from stvq.hookspecs import KINDS, hookimpl
from stvq.registry import create, list_plugins

__version__ = metadata.version("stvq")

__all__ = [
    "KINDS",
    "CheckpointError",
    "ConfigError",
    "OptionRangeError",
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


def __getattr__(name: str) -> Any:  # PEP 562: the one lazy re-export
    if name == "load_tokenizer":
        from stvq.pretrained import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'stvq' has no attribute {name!r}")
