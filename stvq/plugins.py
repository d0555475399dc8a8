"""The plugin manager: discovers entry points of the ``stvq`` group, warns about broken ones, and
collects what each plugin registers, remembering which distribution provided it."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from importlib import metadata
from typing import Any

import pluggy

from stvq import hookspecs
from stvq.errors import PluginConflictError, PluginError

ENTRY_POINT_GROUP = "stvq"


class StvqPluginWarning(UserWarning):
    """A plugin package failed to load; the other plugins keep working."""


@dataclass(frozen=True)
class PluginInfo:
    """One registered factory: ``kind``/``name`` and the distribution that provides it. ``clash`` names
    the packages when more than one registered the name: then using it is a :class:`PluginConflictError`,
    while listing it (``stvq plugins``) shows the clash."""

    kind: str
    name: str
    factory: Any  # a callable, or a "module:attribute" string resolved on first use
    package: str
    version: str
    entry_point: str
    clash: str = ""

    def resolve(self) -> Callable:
        if self.clash:
            raise PluginConflictError(self.clash)
        if not isinstance(self.factory, str):
            return self.factory
        module, _, attr = self.factory.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as err:
            raise PluginError(
                f"{self.kind} {self.name!r} of package {self.package!r} names the factory {self.factory!r}, which cannot be loaded ({type(err).__name__}: {err}); fix or uninstall {self.package}"
            ) from None
        return obj


def _distribution(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"], dist.version


def _warn(message: str) -> None:
    warnings.warn(message, StvqPluginWarning, stacklevel=3)


def load_entry_points(pm: pluggy.PluginManager) -> dict[str, tuple[str, str]]:
    """Import and register every ``stvq`` entry point, stvq's own first; return entry-point name ->
    (package, version).

    Whatever a third-party package gets wrong costs only its own plugins, with one
    :class:`StvqPluginWarning`: a module that fails to import, an entry-point name another package
    already uses (pluggy would skip the second silently), a hook implementation whose arguments the hook
    does not have, a ``register_*`` function stvq has no hook for (a misspelling).
    """
    known = {name for name in dir(hookspecs) if name.startswith("register_")}
    providers: dict[str, tuple[str, str]] = {}
    values: dict[str, str] = {}
    points = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: _distribution(ep)[0] != "stvq")
    for ep in points:
        package, version = _distribution(ep)
        if ep.name in providers:
            if providers[ep.name][0] != package or values[ep.name] != ep.value:  # else: the same distribution seen twice on sys.path
                _warn(
                    f"stvq plugin package {package!r} uses the entry-point name {ep.name!r}, which {providers[ep.name][0]!r} already uses; its plugins are unavailable: rename it in its [project.entry-points.stvq]"
                )
            continue
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except (Exception, SystemExit) as err:  # any import-time failure of a third-party package; pluggy's PluginValidationError
            _warn(
                f"stvq plugin package {package!r} (entry point {ep.name} = {ep.value}) failed to load: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; its plugins are unavailable"
            )
            continue
        for attr in dir(module):
            if getattr(getattr(module, attr, None), f"{hookspecs.PROJECT}_impl", None) is not None and attr not in known:
                _warn(f"stvq plugin package {package!r} implements {attr}, which is no stvq hook (known: {', '.join(sorted(known))}); it is never called")
        providers[ep.name] = (package, version)
        values[ep.name] = ep.value
    return providers


def collect(pm: pluggy.PluginManager, providers: dict[str, tuple[str, str]]) -> dict[str, dict[str, PluginInfo]]:
    """Call every ``register_*`` hook implementation and gather kind -> name -> PluginInfo. A hook that
    raises costs its package's plugins of that kind (one warning); a name two packages register is kept
    as a clash (:attr:`PluginInfo.clash`), refused only where it is used."""
    table: dict[str, dict[str, PluginInfo]] = {kind: {} for kind in hookspecs.KINDS}
    for kind in hookspecs.KINDS:
        caller = getattr(pm.hook, f"register_{kind}s")
        for impl in caller.get_hookimpls():  # in registration order: stvq's own first
            package, version = providers.get(impl.plugin_name, (impl.plugin_name, "?"))
            mine: dict[str, PluginInfo] = {}

            def register(name: str, factory: Any, *, _kind=kind, _pkg=package, _ver=version, _ep=impl.plugin_name, _mine=mine):
                if name in _mine:
                    raise ValueError(f"it registers {_kind} {name!r} twice")
                _mine[name] = PluginInfo(_kind, name, factory, _pkg, _ver, _ep)

            try:
                impl.function(**{arg: register for arg in impl.argnames})
            except (Exception, SystemExit) as err:  # any failure of a third-party package, exiting included
                _warn(f"stvq plugin package {package!r} failed to register its {kind}s: {type(err).__name__}: {err}; they are unavailable")
                continue
            for name, info in mine.items():
                existing = table[kind].get(name)
                if existing is not None:
                    info = replace(
                        info, package=f"{existing.package}, {package}", clash=f"{kind} {name!r} is registered by both {existing.package!r} and {package!r}; uninstall one of them or rename the plugin"
                    )
                table[kind][name] = info
    return table


@cache
def plugin_manager() -> tuple[pluggy.PluginManager, dict[str, tuple[str, str]]]:
    """The plugin manager with every entry point registered, and their providers; once per process."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm, load_entry_points(pm)


@cache
def plugin_table() -> dict[str, dict[str, PluginInfo]]:
    """The registry's contents, discovered once per process."""
    return collect(*plugin_manager())


def _call_each(hook: str, what: str, guard: Callable[[str], None] | None = None, **arguments: Any) -> None:
    """Call every plugin's implementation of ``hook`` with ``arguments``; a package whose implementation
    fails (or tries to exit) gives one :class:`StvqPluginWarning` ("failed to add its ``what``") and the
    command line keeps working without it. ``guard(package)`` runs after each implementation."""
    pm, providers = plugin_manager()
    for impl in getattr(pm.hook, hook).get_hookimpls():
        package = providers.get(impl.plugin_name, (impl.plugin_name, "?"))[0]
        try:
            impl.function(**arguments)
        except (Exception, SystemExit) as err:  # any failure of a third-party package, exiting included
            warnings.warn(f"stvq plugin package {package!r} failed to add its {what}: {type(err).__name__}: {err}", StvqPluginWarning, stacklevel=3)
        if guard is not None:
            guard(package)


def add_plugin_options(register: Callable[..., None]) -> None:
    """Let every plugin add options to stock commands (``register_options``) through ``register``; one that
    names a command which takes no plugin options fails alone."""
    _call_each("register_options", "options", register=register)


def add_plugin_commands(cli: Any) -> None:
    """Let every plugin add its commands to ``cli`` (``register_commands``). A plugin adds, never replaces:
    a stock command (or subcommand) it replaced, or whose options it changed, is put back, with one warning."""
    import click

    def commands(group: click.Group) -> dict[str, tuple[click.Command, list[click.Parameter]]]:
        found = {}
        for name, command in group.commands.items():
            found[name] = (command, list(command.params))
            if isinstance(command, click.Group):
                found.update({f"{name} {sub}": held for sub, held in commands(command).items()})
        return found

    stock = commands(cli)

    def guard(package: str) -> None:
        for path, (command, params) in stock.items():
            *groups, name = path.split(" ")
            group = cli
            for part in groups:
                group = group.commands[part]
            if group.commands.get(name) is not command or command.params != params:
                group.commands[name], command.params[:] = command, params
                warnings.warn(
                    f"stvq plugin package {package!r} replaced or changed the stock command `stvq {path}`; the stock one is kept (a plugin may add commands, not replace them)",
                    StvqPluginWarning,
                    stacklevel=3,
                )

    _call_each("register_commands", "commands", guard=guard, cli=cli)
