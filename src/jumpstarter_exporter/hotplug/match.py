"""Declarative udev device matching, in labgrid's style (``match:`` in a driver's config).

A ``DeviceMatch`` maps keys to glob patterns; a device matches when every key does::

    match:
      SUBSYSTEM: tty
      ID_SERIAL_SHORT: "A10K*"        # a udev property (set by udev's rules)
      "@ID_PATH": "pci-0000:00:14.0-usb-0:2*"   # "@": any ancestor of the device
      "ATTR{port_number}": "1"        # a sysfs attribute of the device itself

Keys, with an optional leading ``@`` meaning "some ancestor (parent, grandparent, ...) of the
device, not the device itself"; each ``@`` key may be satisfied by a different ancestor,
as in labgrid:

- ``SUBSYSTEM``, ``KERNEL`` (alias ``sys_name``), ``DRIVER``, ``DEVTYPE``, ``DEVPATH``:
  the device's own fields, as in udev rules (``DEVPATH`` has no ``/sys`` prefix);
- ``DEVNAME``: the device node; a pattern without a leading ``/`` is matched against the
  name under ``/dev`` (``ttyUSB*`` and ``/dev/ttyUSB*`` both work);
- ``ATTR{name}``: the sysfs attribute ``name`` (trailing whitespace stripped; ``name`` may
  contain ``/`` as in ``power/control``);
- any other key: the udev property of that name (``ID_SERIAL_SHORT``, ``ID_PATH``,
  ``ID_VENDOR_ID``, ...), falling back to a sysfs attribute of the same name, which is how
  labgrid's ``@idVendor`` or ``@serial`` keys work.

Patterns are shell globs (``*``, ``?``, ``[...]``, case-sensitive) and, as in udev rules,
``|`` separates alternatives (``ttyUSB*|ttyACM*``). A key whose value the device does not
have never matches, even ``*``: ``ID_SERIAL_SHORT: "*"`` means "has a serial number".
Numbers in YAML (``ATTR{port_number}: 1``) are taken as their text.

Properties set by udev rules (every ``ID_*``) live in udev's database, which only a running
udevd fills in; ``SUBSYSTEM``/``KERNEL``/``DRIVER``/``DEVNAME``/``ATTR{}`` work from sysfs
alone. Putting a ``SUBSYSTEM`` (and a ``KERNEL``) without wildcards in a match lets the
enumeration ask libudev for just those devices, which keeps every re-scan cheap.

pyudev (and libudev with it) is imported only when devices are enumerated, never by
validating a config.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import PrivateAttr, RootModel, model_validator

from jumpstarter_exporter.errors import DeviceUnavailable

if TYPE_CHECKING:
    import pyudev

# Keys naming a device's own fields rather than a property: key → how to read it.
_FIELDS = {
    "SUBSYSTEM": "subsystem",
    "KERNEL": "sys_name",
    "sys_name": "sys_name",
    "DRIVER": "driver",
    "DEVTYPE": "device_type",
    "DEVPATH": "device_path",
    "DEVNAME": "device_node",
}
_ATTR = re.compile(r"^ATTR\{([^{}]+)\}$")
_GLOB_CHARS = frozenset("*?[|")


@dataclass(frozen=True)
class _Term:
    """One parsed ``key: pattern`` pair."""

    key: str  # as written in the config
    ancestor: bool  # "@" prefix
    kind: str  # "field", "attr" or "property"
    name: str  # field attribute, sysfs attribute or property name
    alternatives: tuple[str, ...]

    @property
    def literal(self) -> str | None:
        """The pattern if it is one plain value (no glob, no alternatives), else None."""
        if len(self.alternatives) == 1 and not _GLOB_CHARS & set(self.alternatives[0]):
            return self.alternatives[0]
        return None

    def accepts(self, value: str | None) -> bool:
        if value is None:
            return False
        return any(fnmatch.fnmatchcase(value, alt) for alt in self.alternatives)

    def read(self, device: pyudev.Device) -> str | None:
        """This term's value on ``device`` (None if the device has no such value)."""
        try:
            if self.kind == "field":
                value = getattr(device, self.name)
            elif self.kind == "attr":
                value = _attribute(device, self.name)
            else:
                value = device.properties.get(self.name)
                if value is None:
                    value = _attribute(device, self.name)
        # A device can vanish while it is being read (unplugged mid-scan), and pyudev then
        # raises its own errors or OSError: that reads as "no value", never as a crash.
        except Exception:  # noqa: BLE001
            return None
        return None if value is None else str(value)

    def matches(self, device: pyudev.Device) -> bool:
        if not self.ancestor:
            return self._accepts_on(device)
        return any(self._accepts_on(parent) for parent in device.ancestors)

    def _accepts_on(self, device: pyudev.Device) -> bool:
        value = self.read(device)
        if self.kind == "field" and self.name == "device_node" and value is not None:
            # DEVNAME patterns without a leading "/" are names under /dev (udev's own form)
            alts = self.alternatives
            return any(
                fnmatch.fnmatchcase(value if alt.startswith("/") else _under_dev(value), alt)
                for alt in alts
            )
        return self.accepts(value)


def _under_dev(node: str) -> str:
    return node[len("/dev/") :] if node.startswith("/dev/") else node


def _attribute(device: pyudev.Device, name: str) -> str | None:
    raw = device.attributes.get(name)
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    return str(raw).rstrip()


def _parse_key(key: str, pattern: str) -> _Term:
    ancestor = key.startswith("@")
    bare = key[1:] if ancestor else key
    if not bare:
        raise ValueError(f"empty key {key!r}")
    if bare in _FIELDS:
        kind, name = "field", _FIELDS[bare]
    elif attr := _ATTR.match(bare):
        kind, name = "attr", attr.group(1)
    elif "{" in bare or "}" in bare:
        raise ValueError(f"{key!r}: sysfs attributes are written ATTR{{name}}")
    else:
        kind, name = "property", bare
    alternatives = tuple(pattern.split("|"))
    if not all(alternatives):
        raise ValueError(f"{key!r}: empty alternative in pattern {pattern!r}")
    return _Term(key, ancestor, kind, name, alternatives)


class DeviceMatch(RootModel[dict[str, str]]):
    """udev keys → glob patterns; a device matches when every key does (module docstring)."""

    _terms: tuple[_Term, ...] = PrivateAttr(default=())

    @model_validator(mode="before")
    @classmethod
    def _numbers_as_text(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            out = {}
            for key, value in data.items():
                if isinstance(value, bool):  # YAML's yes/no: surely not meant as a pattern
                    raise ValueError(f"{key}: expected a pattern, got {value!r}")
                out[key] = str(value) if isinstance(value, int | float) else value
            return out
        return data

    @model_validator(mode="after")
    def _parse(self) -> DeviceMatch:
        if not self.root:
            raise ValueError("a match needs at least one key")
        problems, terms = [], []
        for key, pattern in self.root.items():
            try:
                terms.append(_parse_key(key, pattern))
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        self._terms = tuple(terms)
        return self

    @classmethod
    def coerce(cls, value: DeviceMatch | Mapping[str, Any]) -> DeviceMatch:
        return value if isinstance(value, DeviceMatch) else cls.model_validate(value)

    def __str__(self) -> str:
        return ", ".join(f"{key}={pattern}" for key, pattern in self.root.items())

    def literal(self, key: str) -> str | None:
        """The plain value of a non-ancestor ``key`` (e.g. ``SUBSYSTEM``) if it has no glob."""
        for term in self._terms:
            if not term.ancestor and term.key == key:
                return term.literal
        return None

    def matches(self, device: pyudev.Device) -> bool:
        """Whether ``device`` (a ``pyudev.Device``) satisfies every key."""
        return all(term.matches(device) for term in self._terms)


class AmbiguousMatch(DeviceUnavailable):
    """More than one device node matches: which one to use cannot be guessed.

    A ``DeviceUnavailable`` because that is what it means to a driver (it has no device),
    so calls fail with UNAVAILABLE naming the candidates rather than picking one at random.
    """

    def __init__(self, match: DeviceMatch, candidates: Iterable[Path]) -> None:
        self.match = match
        self.candidates = sorted(candidates)
        names = ", ".join(str(c) for c in self.candidates)
        super().__init__(
            f"{len(self.candidates)} devices match {match}: {names}; "
            "add keys to the match (e.g. ID_SERIAL_SHORT or ID_PATH) to pick one"
        )


def context() -> pyudev.Context:
    """A new ``pyudev.Context``; ``DeviceUnavailable`` if libudev cannot be loaded."""
    try:
        import pyudev

        return pyudev.Context()
    except (ImportError, OSError) as exc:
        raise DeviceUnavailable(f"udev is not available: {exc}") from exc


def enumeration_key(match: DeviceMatch) -> tuple[str | None, str | None]:
    """``(subsystem, sys_name)`` that libudev can filter on (None: any)."""
    return match.literal("SUBSYSTEM"), match.literal("KERNEL") or match.literal("sys_name")


def enumerate_devices(
    ctx: pyudev.Context, key: tuple[str | None, str | None]
) -> list[pyudev.Device]:
    """All devices, narrowed by libudev to ``enumeration_key``'s subsystem and name."""
    subsystem, sys_name = key
    enumerator = ctx.list_devices()
    if subsystem is not None:
        enumerator = enumerator.match_subsystem(subsystem)
    if sys_name is not None:
        enumerator = enumerator.match_sys_name(sys_name)
    return list(enumerator)


def find(ctx: pyudev.Context | None, match: DeviceMatch | Mapping[str, Any]) -> list[pyudev.Device]:
    """Every device (``pyudev.Device``) that ``match`` matches, sorted by sysfs path."""
    match = DeviceMatch.coerce(match)
    if ctx is None:
        ctx = context()
    devices = enumerate_devices(ctx, enumeration_key(match))
    return sorted((d for d in devices if match.matches(d)), key=lambda d: d.sys_path)


def pick_node(match: DeviceMatch, devices: Iterable[pyudev.Device]) -> Path | None:
    """The device node of the one matching device among ``devices`` that has a node.

    None if none matches; ``AmbiguousMatch`` (naming the nodes) if several do.
    """
    nodes = {Path(d.device_node) for d in devices if match.matches(d) and d.device_node}
    if len(nodes) > 1:
        raise AmbiguousMatch(match, nodes)
    return nodes.pop() if nodes else None


def resolve(
    match: DeviceMatch | Mapping[str, Any], ctx: pyudev.Context | None = None
) -> Path | None:
    """The device node of the single device with a node that ``match`` matches.

    None if there is none (absent is not an error here); ``AmbiguousMatch`` if there are
    several; ``DeviceUnavailable`` if udev itself cannot be used.
    """
    match = DeviceMatch.coerce(match)
    if ctx is None:
        ctx = context()
    return pick_node(match, enumerate_devices(ctx, enumeration_key(match)))


__all__ = [
    "AmbiguousMatch",
    "DeviceMatch",
    "context",
    "enumerate_devices",
    "enumeration_key",
    "find",
    "pick_node",
    "resolve",
]
