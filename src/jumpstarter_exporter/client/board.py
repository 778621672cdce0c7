"""The leased board as a Python object: driver clients built from GetReport (§5.5).

A ``Board`` talks to one exporter session over a synchronous gRPC channel: the local Unix
socket of a lease (bridged to the router by ``client.lease``), the socket ``jmp shell``
exports as ``JUMPSTARTER_HOST``, or ``host:port`` of a standalone exporter.

Driver allow-list (upstream's rule): the client class an exporter names for a driver
(``jumpstarter.dev/client``) must match one of the ``fnmatch`` patterns unless ``unsafe``.
As upstream, a refused driver does not stop the session; using it raises
``DriverNotAllowed`` naming the driver and the patterns.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import grpc
from google.protobuf import empty_pb2

from jumpstarter_exporter._proto.jumpstarter.v1 import (
    common_pb2,
    jumpstarter_pb2,
    jumpstarter_pb2_grpc,
)
from jumpstarter_exporter.client.drivers import CLIENT_CLASSES, DriverClient, SerialClient
from jumpstarter_exporter.client.errors import (
    ClientError,
    ClientUnavailable,
    DriverNotAllowed,
    DriverNotFound,
    ExporterNotReady,
)

LABEL_CLIENT = "jumpstarter.dev/client"
LABEL_NAME = "jumpstarter.dev/name"
READY = common_pb2.EXPORTER_STATUS_LEASE_READY
FAILED_BEFORE = common_pb2.EXPORTER_STATUS_BEFORE_LEASE_HOOK_FAILED
DONE_STATUSES = {
    common_pb2.EXPORTER_STATUS_AVAILABLE,
    common_pb2.EXPORTER_STATUS_AFTER_LEASE_HOOK_FAILED,
}
RPC_TIMEOUT = 10.0


@dataclass(frozen=True)
class AllowList:
    """``drivers.allow`` / ``drivers.unsafe`` of a client config (or ``JMP_DRIVERS_ALLOW``)."""

    patterns: tuple[str, ...] = ()
    unsafe: bool = False

    @classmethod
    def parse(cls, text: str) -> AllowList:
        """``JMP_DRIVERS_ALLOW``: a comma list; ``UNSAFE`` allows every driver."""
        items = tuple(item.strip() for item in text.split(",") if item.strip())
        return cls(tuple(i for i in items if i != "UNSAFE"), "UNSAFE" in items)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AllowList | None:
        env = os.environ if environ is None else environ
        if "JMP_DRIVERS_ALLOW" not in env:
            return None
        parsed = cls.parse(env["JMP_DRIVERS_ALLOW"])
        if env.get("JMP_DRIVERS_UNSAFE", "").strip().lower() in {"1", "true", "yes"}:
            return cls(parsed.patterns, True)
        return parsed

    def allows(self, client_class: str) -> bool:
        return self.unsafe or any(fnmatchcase(client_class, p) for p in self.patterns)

    def to_env(self) -> str:
        """The value ``jmp shell`` passes on in ``JMP_DRIVERS_ALLOW``."""
        return "UNSAFE" if self.unsafe else ",".join(self.patterns)


class Board:
    """One exporter session: ``board.power``, ``board["serial"]``, ``board.call(...)``."""

    def __init__(
        self,
        target: str,
        *,
        allow: AllowList,
        lease_name: str = "",
        exporter_name: str = "",
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float = 30.0,
    ) -> None:
        self.target = target
        self.allow = allow
        self.lease_name = lease_name
        self.exporter_name = exporter_name
        self.metadata = tuple(metadata)
        options = [("grpc.keepalive_time_ms", 20000), ("grpc.keepalive_permit_without_calls", 1)]
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self.stub = jumpstarter_pb2_grpc.ExporterServiceStub(self.channel)
        self._closed = False
        try:
            self.report = self._get_report(timeout)
            self.exporter_uuid = self.report.uuid
            self.labels = dict(self.report.labels)
            self._nodes, self.root = self._build(self.report)
        except BaseException:
            self.channel.close()
            raise

    # --- report → driver clients ----------------------------------------------------------

    def _get_report(self, timeout: float) -> jumpstarter_pb2.GetReportResponse:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.stub.GetReport(
                    empty_pb2.Empty(),
                    timeout=max(min(RPC_TIMEOUT, deadline - time.monotonic()), 0.1),
                    metadata=self.metadata,
                    wait_for_ready=True,
                )
            except grpc.RpcError as exc:
                if exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise ClientError(
                        f"GetReport on {self.target} failed: {exc.code().name}: {exc.details()}"
                    ) from None
                if time.monotonic() >= deadline:
                    raise ClientUnavailable(
                        f"the exporter session at {self.target} did not answer within "
                        f"{timeout:g} s ({exc.code().name}: {exc.details()})"
                    ) from None

    def _build(
        self, report: jumpstarter_pb2.GetReportResponse
    ) -> tuple[dict[str, DriverClient], DriverClient]:
        """Index the depth-first report list into dotted paths (``group.child``); a
        report's parent must come earlier, every non-root node needs a name (as upstream)."""
        paths: dict[str, str] = {}  # uuid → path ("" for the root)
        nodes: dict[str, DriverClient] = {}
        root: DriverClient | None = None
        for item in report.reports:
            labels = dict(item.labels)
            cls_name = labels.get(LABEL_CLIENT, "")
            if not item.parent_uuid:
                if root is not None:
                    raise ClientError("the exporter reported more than one root driver")
                path = ""
            else:
                if item.parent_uuid not in paths:
                    raise ClientError(
                        f"driver {item.uuid} names an unknown parent {item.parent_uuid}"
                    )
                name = labels.get(LABEL_NAME)
                if not name:
                    raise ClientError(f"driver {item.uuid} has no {LABEL_NAME} label")
                parent = paths[item.parent_uuid]
                path = f"{parent}.{name}" if parent else name
            # A ref: proxy repeats its target's uuid under a second name: keep the first path
            # for the uuid, but make the alias reachable too.
            paths.setdefault(item.uuid, path)
            client = CLIENT_CLASSES.get(cls_name, DriverClient)(
                self,
                path or "root",
                item.uuid,
                cls_name,
                item.description if item.HasField("description") else "",
                dict(item.methods_description),
            )
            if path:
                nodes[path] = client
            else:
                root = client
        if root is None:
            raise ClientError("the exporter reported no drivers")
        return nodes, root

    def check_allowed(self, driver: DriverClient) -> None:
        if not self.allow.allows(driver.client_class):
            raise DriverNotAllowed(driver.path, driver.client_class, self.allow.patterns)

    # --- access ---------------------------------------------------------------------------

    @property
    def drivers(self) -> Mapping[str, DriverClient]:
        """Every driver by dotted path (``power``, ``group.child``), in report order."""
        return dict(self._nodes)

    def __getitem__(self, path: str) -> DriverClient:
        driver = self._nodes.get(path)
        if driver is None:
            known = ", ".join(self._nodes) or "none"
            raise DriverNotFound(f"the exporter has no driver '{path}' (it has: {known})")
        return driver

    def __getattr__(self, name: str) -> DriverClient:
        # Only reached for names that are not attributes: driver names (board.power).
        if name.startswith("_") or "_nodes" not in self.__dict__:
            raise AttributeError(name)
        try:
            return self[name]
        except DriverNotFound as exc:
            raise AttributeError(str(exc)) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def call(self, path: str, method: str, *args: Any) -> Any:
        """DriverCall ``method(*args)`` on the driver at ``path``."""
        return self[path].call(method, *args)

    # --- session status ---------------------------------------------------------------------

    def status(self, timeout: float = RPC_TIMEOUT) -> jumpstarter_pb2.GetStatusResponse | None:
        """GetStatus, or None for an exporter that does not implement it (upstream treats
        that as LEASE_READY)."""
        try:
            return self.stub.GetStatus(
                jumpstarter_pb2.GetStatusRequest(), timeout=timeout, metadata=self.metadata
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Poll GetStatus until LEASE_READY (upstream's jmp shell does the same before it
        runs anything); a failed beforeLease hook raises ExporterNotReady."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                status = self.status()
            except grpc.RpcError as exc:
                status, last = False, f"{exc.code().name}: {exc.details()}"
            if status is None:
                return
            if status is not False:
                if status.status == READY:
                    return
                name = common_pb2.ExporterStatus.Name(status.status)
                last = f"{name} {status.message!r}"
                if status.status == FAILED_BEFORE:
                    raise ExporterNotReady(f"the exporter is not ready: {last}")
            if time.monotonic() >= deadline:
                raise ExporterNotReady(
                    f"the exporter did not become ready within {timeout:g} s (last: {last})"
                )
            time.sleep(0.3)

    def end_session(self, timeout: float = 30.0) -> bool:
        """EndSession, then wait until the exporter reports it is done (AVAILABLE or an
        afterLease failure). False when the exporter could not be asked (e.g. gone)."""
        for driver in self._nodes.values():
            if isinstance(driver, SerialClient):
                driver.close()
        try:
            self.stub.EndSession(
                jumpstarter_pb2.EndSessionRequest(), timeout=5.0, metadata=self.metadata
            )
        except grpc.RpcError as exc:
            # UNIMPLEMENTED: an old exporter; the others: it is gone already.
            return exc.code() == grpc.StatusCode.UNIMPLEMENTED
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status = self.status(timeout=5.0)
            except grpc.RpcError:
                return True  # the session closed: the exporter is done with it
            if status is None or status.status in DONE_STATUSES:
                return True
            time.sleep(0.2)
        return False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for driver in self._nodes.values():
            if isinstance(driver, SerialClient):
                driver.close()
        self.channel.close()

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AllowList", "Board"]
