"""Name -> factory tables filled by the plugins' hooks: ``create(kind, name, **options)``."""

from __future__ import annotations

import inspect
from typing import Any

from stvq.config import parse_pairs
from stvq.errors import ConfigError, PluginError, StvqError, UnknownPluginError
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
    ``create("quantizer", "fsq", levels=[8, 5, 5, 5])``. Options the factory does not take, or values it
    cannot use (a ValueError or TypeError while it is built), are a :class:`ConfigError` naming them."""
    factory = get(kind, name).resolve()
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C extensions have none: let the call decide
        signature = None
    if signature is not None:
        try:
            signature.bind(**options)
        except TypeError as err:
            takes = ", ".join(p for p in signature.parameters if p not in ("self", "args", "kwargs")) or "none"
            raise ConfigError(f"{kind} {name!r}: {err} (its options: {takes})") from None
    try:
        built = factory(**options)
    except StvqError:
        raise
    except (ValueError, TypeError) as err:
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items() if k not in ("config",))
        raise ConfigError(f"{kind} {name!r} cannot be built with {shown or 'these options'}: {err}") from None
    except SystemExit as err:  # a plugin's factory may not end the process
        raise PluginError(f"{kind} {name!r} of package {get(kind, name).package!r} tried to exit (SystemExit {err.code!r}) while it was built; fix the plugin") from None
    interface = interfaces()[kind]
    if not isinstance(built, interface):
        wanted = " or ".join(f"stvq.interfaces.{t.__name__}" for t in (interface if isinstance(interface, tuple) else (interface,)))
        raise PluginError(f"{kind} {name!r} of package {get(kind, name).package!r} returned a {type(built).__name__}, not an {wanted}; fix the plugin")
    return built


def interfaces() -> dict[str, type | tuple[type, ...]]:
    """What a plugin of each kind must build (:mod:`stvq.interfaces`)."""
    from stvq import interfaces as i

    return {
        "encoder": i.Encoder,
        "decoder": i.Decoder,
        "quantizer": i.Quantizer,
        "tokenizer": i.Tokenizer,
        "composer": i.Composer,
        "prior": i.Prior,
        "dataset": (i.ImageDataset, i.ImageStream),
        "discriminator": i.Discriminator,
    }


def require_subclass(kind: str, name: str, base: type, why: str) -> None:
    """Raise a :class:`ConfigError` unless the plugin ``kind``/``name`` is a class deriving from ``base``
    (an interface the caller needs), before anything is built; ``why`` says what the caller does."""
    factory = get(kind, name).resolve()
    if isinstance(factory, type) and not issubclass(factory, base):
        raise ConfigError(f"{kind} {name!r} ({factory.__name__}) is not a {base.__name__}: {why}")


def config_class(kind: str, name: str) -> type | None:
    """The config dataclass the plugin ``kind``/``name`` declares as ``config_class`` (a
    :class:`stvq.config.PluginConfig`: its fields type ``--set KEY=VALUE``, its presets ``--preset``), or
    None for a plugin that takes plain options."""
    return getattr(get(kind, name).resolve(), "config_class", None)


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


def parse_overrides(pairs: tuple[str, ...], kind: str = "tokenizer", name: str = "styled") -> dict[str, Any]:
    """``("width=256", "attn_mask=causal-placeholders")`` -> overrides of the config fields of the plugin
    ``kind``/``name``, typed by its ``config_class`` (:func:`stvq.registry.config_class`); a plugin that
    declares none takes them as JSON values or strings."""
    return parse_pairs(pairs, "--set", config_class(kind, name) if pairs else None, "width=256")
