"""Composite (a group of children, also the implicit root) and ``ref:`` proxies.

A ``RefProxy`` is another name for a driver elsewhere in the tree (protocol-facts §5.6): it
reports the **target's** uuid, client label, description and methods_description under its
own ``jumpstarter.dev/name``, and every lookup goes to the target, so a call addressed to
that uuid reaches the target whichever of the two the session indexed. Like upstream, its
walk repeats the target's subtree under the proxy's name, so ``client.alias.child`` works in
upstream clients (which attach children to the last report seen with a uuid).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from jumpstarter_exporter._proto.jumpstarter.v1 import jumpstarter_pb2
from jumpstarter_exporter.drivers.base import CallKind, Driver

COMPOSITE_CLIENT = "jumpstarter_driver_composite.client.CompositeClient"


class Composite(Driver):
    """Groups children; exports nothing of its own."""

    client = COMPOSITE_CLIENT


class RefProxy(Driver):
    """Stands for the driver at dot path ``ref`` (bound with ``bind`` once the tree exists)."""

    def __init__(self, ref: str) -> None:
        super().__init__()
        self.ref = ref
        self._target: Driver | None = None

    @property
    def target(self) -> Driver:
        if self._target is None:
            raise RuntimeError(f"ref {self.ref!r} is not bound to a driver yet")
        return self._target

    def bind(self, target: Driver) -> None:
        while isinstance(target, RefProxy):
            target = target.target
        self._target = target
        self.uuid = target.uuid

    @property
    def client(self) -> str:  # type: ignore[override]
        return self.target.client

    def walk(
        self, parent_uuid: str | None = None, name: str | None = None
    ) -> Iterator[tuple[Driver, str | None, str | None]]:
        yield self, parent_uuid, name
        for child_name, child in self.target.children.items():
            yield from child.walk(self.target.uuid, child_name)

    def report(
        self, parent_uuid: str | None = None, name: str | None = None
    ) -> jumpstarter_pb2.DriverInstanceReport:
        return self.target.report(parent_uuid, name)

    def lookup(self, method: str, kind: CallKind) -> Callable[..., Any]:
        return self.target.lookup(method, kind)

    def attach_watcher(self, watcher: Any) -> None:
        """The target registers its devices where it sits in the tree."""

    async def check(self) -> None:
        """The target checks itself where it sits in the tree."""

    async def start(self) -> None:
        """The target is started where it sits in the tree, not through its aliases."""

    async def aclose(self) -> None:
        """The target is closed where it sits in the tree, not through its aliases."""


def resolve(root: Driver, path: str) -> Driver:
    """The driver at dot path ``path`` (``power``, ``group.inner``) under ``root``."""
    node = root
    for part in path.split("."):
        try:
            node = node.children[part]
        except KeyError:
            raise KeyError(path) from None
    return node


__all__ = ["COMPOSITE_CLIENT", "Composite", "RefProxy", "resolve"]
