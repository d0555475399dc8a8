"""Name -> factory tables filled by the plugins' hooks: ``create(kind, name, **options)``."""

from __future__ import annotations

from typing import Any

from stvq.errors import UnknownPluginError
from stvq.hookspecs import KINDS
from stvq.plugins import PluginInfo, plugin_table


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UnknownPluginError(f"unknown plugin kind {kind!r}; choose one of: {', '.join(KINDS)}")


def get(kind: str, name: str) -> PluginInfo:
    """The :class:`PluginInfo` registered as ``kind``/``name``; an error lists the available names."""
    _check_kind(kind)
    table = plugin_table()[kind]
    if name not in table:
        available = ", ".join(sorted(table)) or "none installed"
        raise UnknownPluginError(f"no {kind} named {name!r}; available: {available}")
    return table[name]


def create(kind: str, name: str, **options: Any) -> Any:
    """Build the plugin registered as ``kind``/``name`` with ``options``, e.g.
    ``create("quantizer", "fsq", levels=[8, 5, 5, 5])``."""
    return get(kind, name).resolve()(**options)


def list_plugins(kind: str | None = None) -> dict[str, list[str]]:
    """``{kind: [name, ...]}`` over every kind (or only ``kind``), names sorted."""
    if kind is not None:
        _check_kind(kind)
    table = plugin_table()
    return {k: sorted(table[k]) for k in KINDS if kind in (None, k)}


def plugin_infos() -> list[PluginInfo]:
    """Every registered plugin, by kind then name."""
    table = plugin_table()
    return [table[k][n] for k in KINDS for n in sorted(table[k])]
