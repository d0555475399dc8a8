"""The plugin manager: discovers entry points of the ``stvq`` group, warns about broken ones, and
collects what each plugin registers, remembering which distribution provided it."""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any, Callable

import pluggy

from stvq import hookspecs
from stvq.errors import PluginConflictError

ENTRY_POINT_GROUP = "stvq"


class StvqPluginWarning(UserWarning):
    """A plugin package failed to load; the other plugins keep working."""


@dataclass(frozen=True)
class PluginInfo:
    """One registered factory: ``kind``/``name`` and the distribution that provides it."""

    kind: str
    name: str
    factory: Any  # a callable, or a "module:attribute" string resolved on first use
    package: str
    version: str
    entry_point: str

    def resolve(self) -> Callable:
        if not isinstance(self.factory, str):
            return self.factory
        module, _, attr = self.factory.partition(":")
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj


def _distribution(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"], dist.version


def load_entry_points(pm: pluggy.PluginManager) -> dict[str, tuple[str, str]]:
    """Import and register every ``stvq`` entry point; return entry-point name -> (package, version).

    A module that fails to import gives one :class:`StvqPluginWarning` and is skipped. Two packages that
    use the same entry-point name raise :class:`PluginConflictError` (pluggy would skip the second
    silently).
    """
    providers: dict[str, tuple[str, str]] = {}
    values: dict[str, str] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        package, version = _distribution(ep)
        if ep.name in providers:
            if providers[ep.name][0] == package and values[ep.name] == ep.value:
                continue  # the same distribution seen twice on sys.path
            raise PluginConflictError(
                f"entry point {ep.name!r} of group 'stvq' is declared by both {providers[ep.name][0]!r} and "
                f"{package!r}; rename it in one package's [project.entry-points.stvq]"
            )
        try:
            module = ep.load()
        except Exception as err:  # any import-time failure of a third-party package
            warnings.warn(
                f"stvq plugin package {package!r} (entry point {ep.name} = {ep.value}) failed to load: "
                f"{type(err).__name__}: {err}; its plugins are unavailable",
                StvqPluginWarning,
                stacklevel=2,
            )
            continue
        pm.register(module, name=ep.name)
        providers[ep.name] = (package, version)
        values[ep.name] = ep.value
    return providers


def collect(pm: pluggy.PluginManager, providers: dict[str, tuple[str, str]]) -> dict[str, dict[str, PluginInfo]]:
    """Call every ``register_*`` hook implementation and gather kind -> name -> PluginInfo."""
    table: dict[str, dict[str, PluginInfo]] = {kind: {} for kind in hookspecs.KINDS}
    for kind in hookspecs.KINDS:
        caller = getattr(pm.hook, f"register_{kind}s")
        for impl in caller.get_hookimpls():
            package, version = providers.get(impl.plugin_name, (impl.plugin_name, "?"))

            def register(name: str, factory: Any, *, _kind=kind, _pkg=package, _ver=version, _ep=impl.plugin_name):
                existing = table[_kind].get(name)
                if existing is not None:
                    raise PluginConflictError(
                        f"{_kind} {name!r} is registered by both {existing.package!r} and {_pkg!r}; "
                        f"uninstall one of them or rename the plugin"
                    )
                table[_kind][name] = PluginInfo(_kind, name, factory, _pkg, _ver, _ep)

            impl.function(**{arg: register for arg in impl.argnames})
    return table


@lru_cache(maxsize=None)
def plugin_manager() -> tuple[pluggy.PluginManager, dict[str, tuple[str, str]]]:
    """The plugin manager with every entry point registered, and their providers; once per process."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm, load_entry_points(pm)


@lru_cache(maxsize=None)
def plugin_table() -> dict[str, dict[str, PluginInfo]]:
    """The registry's contents, discovered once per process."""
    return collect(*plugin_manager())


def add_plugin_commands(cli: Any) -> None:
    """Let every plugin add its commands and options to ``cli`` (``register_commands``). A package whose
    hook fails gives one :class:`StvqPluginWarning`; the command line keeps working without it."""
    pm, providers = plugin_manager()
    for impl in pm.hook.register_commands.get_hookimpls():
        try:
            impl.function(cli=cli)
        except Exception as err:  # any failure of a third-party package
            package = providers.get(impl.plugin_name, (impl.plugin_name, "?"))[0]
            warnings.warn(f"stvq plugin package {package!r} failed to add its commands: {type(err).__name__}: {err}", StvqPluginWarning, stacklevel=2)
