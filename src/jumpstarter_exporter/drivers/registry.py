"""Driver ``type:`` strings → classes, and the driver tree of an exporter config.

Both upstream's class paths (``jumpstarter_driver_power.driver.MockPower``) and ours
(``jumpstarter_exporter.drivers.power.MockPower``) name the same class. Only registered types
are accepted: a config file never makes the exporter import an arbitrary module. Driver
modules are imported on first use, so ``validate`` and ``jmp`` stay cheap.

``validate(config)`` reports every problem of the ``export`` tree (one line each, keyed by
path) without opening any device; ``build_tree(config)`` validates, then builds the implicit
root ``Composite`` with fresh driver objects (new uuids) and binds ``ref:`` proxies.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import ValidationError

from jumpstarter_exporter.config.models import (
    CompositeEntry,
    DriverEntry,
    ExporterConfig,
    RefEntry,
)
from jumpstarter_exporter.errors import ConfigError

if TYPE_CHECKING:
    from jumpstarter_exporter.drivers.base import Driver
    from jumpstarter_exporter.drivers.composite import RefProxy

_OURS = "jumpstarter_exporter.drivers"

# type string → "module:Class" (imported lazily).
_TYPES: dict[str, str] = {}


def register(type_name: str, target: str) -> None:
    """Accept ``type_name`` in configs for the class at ``target`` (``"module:Class"``)."""
    _TYPES[type_name] = target


for _upstream, _ours in (
    ("jumpstarter_driver_composite.driver.Composite", "composite:Composite"),
    ("jumpstarter_driver_power.driver.MockPower", "power:MockPower"),
    ("jumpstarter_driver_power.driver.PduPower", "pdu:PduPower"),
    ("jumpstarter_driver_snmp.driver.SNMPServer", "pdu:SNMPServer"),
    ("jumpstarter_driver_power.driver.SyncMockPower", "power:SyncMockPower"),
    ("jumpstarter_driver_pyserial.driver.PySerial", "serial:PySerial"),
):
    _module, _cls = _ours.split(":")
    register(_upstream, f"{_OURS}.{_module}:{_cls}")
    register(f"{_OURS}.{_module}.{_cls}", f"{_OURS}.{_module}:{_cls}")


def known_types() -> list[str]:
    return sorted(_TYPES)


def driver_class(type_name: str) -> type[Driver]:
    """The class for ``type_name``; ``KeyError`` if the type is not registered."""
    module, _, attr = _TYPES[type_name].partition(":")
    return getattr(importlib.import_module(module), attr)


def _unknown(path: str, type_name: str) -> str:
    return (
        f"export.{path}.type: unknown driver type {type_name!r} (known: {', '.join(known_types())})"
    )


def _problems(entries: Mapping[str, object], prefix: str, all_paths: set[str]) -> list[str]:
    problems: list[str] = []
    for name, entry in entries.items():
        path = f"{prefix}{name}"
        if isinstance(entry, DriverEntry):
            try:
                cls = driver_class(entry.type)
            except KeyError:
                problems.append(_unknown(path, entry.type))
            else:
                try:
                    cls.Config.model_validate(entry.config)
                except ValidationError as exc:
                    for err in exc.errors(include_url=False, include_input=False):
                        loc = ".".join(str(p) for p in err["loc"])
                        key = f"export.{path}.config" + (f".{loc}" if loc else "")
                        problems.append(f"{key}: {err['msg'].removeprefix('Value error, ')}")
            problems.extend(_problems(entry.children, f"{path}.", all_paths))
        elif isinstance(entry, CompositeEntry):
            problems.extend(_problems(entry.children, f"{path}.", all_paths))
        elif isinstance(entry, RefEntry):
            if entry.ref not in all_paths:
                problems.append(f"export.{path}: ref {entry.ref!r} names no entry")
            elif path == entry.ref or path.startswith(f"{entry.ref}."):
                problems.append(f"export.{path}: ref {entry.ref!r} names an entry containing it")
    return problems


def _paths(entries: Mapping[str, object], prefix: str = "") -> set[str]:
    found: set[str] = set()
    for name, entry in entries.items():
        path = f"{prefix}{name}"
        found.add(path)
        if isinstance(entry, DriverEntry | CompositeEntry):
            found |= _paths(entry.children, f"{path}.")
    return found


def validate(config: ExporterConfig) -> list[str]:
    """Every problem of ``config.export``, one line each (empty: the tree can be built).

    Checks driver types and each driver's ``config:`` keys; opens no device.
    """
    return _problems(config.export, "", _paths(config.export))


def _build(entries: Mapping[str, object], proxies: list[RefProxy]) -> dict[str, Driver]:
    from jumpstarter_exporter.drivers.composite import Composite, RefProxy

    built: dict[str, Driver] = {}
    for name, entry in entries.items():
        if isinstance(entry, DriverEntry):
            cls = driver_class(entry.type)
            built[name] = cls(
                cls.Config.model_validate(entry.config),
                description=entry.description,
                methods_description=entry.methods_description,
                children=_build(entry.children, proxies),
            )
        elif isinstance(entry, CompositeEntry):
            built[name] = Composite(
                description=entry.description, children=_build(entry.children, proxies)
            )
        elif isinstance(entry, RefEntry):
            proxy = RefProxy(entry.ref)
            proxies.append(proxy)
            built[name] = proxy
    return built


def build_tree(config: ExporterConfig) -> Driver:
    """The root ``Composite`` (description = ``config.description``) of fresh drivers.

    Raises ``ConfigError`` listing every problem ``validate`` finds. Constructing drivers
    opens no device; ports are opened when a client connects.
    """
    from jumpstarter_exporter.drivers.composite import Composite, resolve

    problems = validate(config)
    if problems:
        raise ConfigError("invalid driver configuration", problems=problems)
    proxies: list[RefProxy] = []
    root = Composite(description=config.description, children=_build(config.export, proxies))
    for proxy in proxies:
        proxy.bind(resolve(root, proxy.ref))
    return root


__all__ = ["build_tree", "driver_class", "known_types", "register", "validate"]
