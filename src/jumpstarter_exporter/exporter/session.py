"""A lease session: the exporter's own gRPC server for one lease (or for standalone mode).

Clients reach it through router tunnels (each tunnel is one HTTP/2 connection, answered in
this process by wire/h2server.py with no local socket in between, :meth:`Session.serve_tunnel`)
and hooks through a private Unix socket served the same way; in standalone mode clients
connect directly over TCP to a grpc.aio server. Both run the same servicers. It serves
``ExporterService`` (GetReport, DriverCall, StreamingDriverCall, LogStream, GetStatus,
EndSession; Reset answers UNIMPLEMENTED as upstream's does) and ``RouterService.Stream`` for
driver byte streams (protocol-facts §3.7, §5).

Differences from upstream on purpose: driver calls are really refused outside LEASE_READY
and the hook states (upstream's gate is a no-op, §9.1); every LogStream reader sees every
record (upstream's readers split them); an unknown driver uuid is NOT_FOUND, not UNKNOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid as uuidlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import structlog

from jumpstarter_exporter import log as logsetup
from jumpstarter_exporter._proto.jumpstarter.v1 import (
    common_pb2,
    jumpstarter_pb2,
    jumpstarter_pb2_grpc,
    router_pb2_grpc,
)
from jumpstarter_exporter.drivers.base import (
    Driver,
    MethodNotFound,
    grpc_status_for,
    invoke,
    invoke_streaming,
)
from jumpstarter_exporter.wire import frames, h2server, values

log = structlog.get_logger("jumpstarter.exporter")

# Statuses in which a client may call drivers (upstream's intended gate).
CALLABLE = {
    common_pb2.EXPORTER_STATUS_LEASE_READY,
    common_pb2.EXPORTER_STATUS_BEFORE_LEASE_HOOK,
    common_pb2.EXPORTER_STATUS_AFTER_LEASE_HOOK,
}
LOG_BUFFER = 256  # records a slow LogStream reader may lag behind before the oldest drop


@dataclass
class Status:
    code: int = common_pb2.EXPORTER_STATUS_AVAILABLE
    message: str = ""
    version: int = 0
    previous: int | None = None


class LogBus:
    """Fan-out of log records to every LogStream reader (bounded per reader)."""

    def __init__(self) -> None:
        self.readers: set[asyncio.Queue[jumpstarter_pb2.LogStreamResponse]] = set()

    def publish(self, record: jumpstarter_pb2.LogStreamResponse) -> None:
        for queue in self.readers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(record)

    def sink(self, level: str, event: dict) -> None:
        logger = str(event.get("logger", ""))
        from_driver = logger.startswith("driver") or "driver" in event
        source = common_pb2.LOG_SOURCE_DRIVER if from_driver else common_pb2.LOG_SOURCE_SYSTEM
        message = str(event.get("event", ""))
        self.publish(
            jumpstarter_pb2.LogStreamResponse(
                severity=level.upper(), message=message, source=source
            )
        )


class Session:
    def __init__(
        self,
        root: Driver,
        exporter_uuid: str,
        labels: dict[str, str],
        motd: str = "",
    ) -> None:
        self.root = root
        self.exporter_uuid = exporter_uuid
        self.labels = labels
        self.motd = motd
        self.status = Status()
        self.end_requested = asyncio.Event()
        # Set once clients may use the session (after a beforeLease hook, if any).
        self.clients_allowed = asyncio.Event()
        self.seen_version = 0  # newest status version a client has read
        self._seen = asyncio.Event()
        self.logs = LogBus()
        self.drivers: dict[str, Driver] = {}
        for driver, _parent, _name in root.walk():
            self.drivers.setdefault(driver.uuid, driver)
        self.server: grpc.aio.Server | None = None
        self.handlers = h2server.Handlers()
        jumpstarter_pb2_grpc.add_ExporterServiceServicer_to_server(
            _ExporterService(self), self.handlers
        )
        router_pb2_grpc.add_RouterServiceServicer_to_server(_DriverStreams(self), self.handlers)
        self._unix: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self.socket_path: Path | None = None
        self.streams = 0

    @property
    def reports(self) -> list[jumpstarter_pb2.DriverInstanceReport]:
        """The driver reports as of now (built per GetReport: a driver's labels can change,
        e.g. ``jumpstarter.dev/available=false`` while its device is unplugged; the uuids
        are the drivers' own and never change)."""
        return [driver.report(parent, name) for driver, parent, name in self.root.walk()]

    # --- status -------------------------------------------------------------------------

    def status_seen(self, version: int) -> None:
        self.seen_version = max(self.seen_version, version)
        self._seen.set()

    async def wait_status_seen(self) -> None:
        """Wait until a client has read the current status (GetStatus); bound it outside."""
        while self.seen_version < self.status.version:
            self._seen.clear()
            await self._seen.wait()

    def set_status(self, code: int, message: str) -> None:
        if (code, message) == (self.status.code, self.status.message):
            return
        self.status = Status(code, message, self.status.version + 1, self.status.code)

    def publish(self, message: str, source: int, severity: str = "INFO") -> None:
        """A line for every LogStream reader (hook output, system messages)."""
        self.logs.publish(
            jumpstarter_pb2.LogStreamResponse(severity=severity, message=message, source=source)
        )

    # --- server -------------------------------------------------------------------------

    async def start_unix(self) -> Path:
        """Serve on a private Unix socket (0700 directory), for hooks (lease mode)."""
        path = self._make_socket_path()
        self._unix = await asyncio.start_unix_server(self._accept, path=str(path))
        logsetup.add_sink(self.logs.sink)
        return path

    @contextlib.contextmanager
    def _connection(self) -> Iterator[None]:
        """The current task serves one connection; stop() ends those still running."""
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            yield
        finally:
            self._connections.discard(task)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # stop() cancels a hook's connection that outlived the lease. asyncio's server owns
        # this task and would log its cancellation as an error (the 3.11 streams callback
        # reads task.exception()), so the connection just ends here.
        with self._connection(), contextlib.suppress(asyncio.CancelledError):
            await h2server.serve_stream(self.handlers, reader, writer)

    async def serve_tunnel(self, channel: grpc.aio.Channel, token: str) -> None:
        """Answer one client connection that arrives through the router (see frames)."""
        with self._connection():
            await frames.serve_tunnel(channel, token, self.handlers)

    async def start_tcp(
        self,
        address: str,
        credentials: grpc.ServerCredentials | None,
        interceptors=(),
        *,
        unix: bool = False,
    ) -> int:
        """Serve on TCP (standalone mode); ``unix=True`` adds the private socket for hooks."""
        extra = [f"unix://{self._make_socket_path()}"] if unix else []
        return await self._start(address, credentials, interceptors, extra)

    def _make_socket_path(self) -> Path:
        base = os.environ.get("XDG_RUNTIME_DIR") or None
        self._tmpdir = tempfile.TemporaryDirectory(prefix="jumpstarter-", dir=base)
        self.socket_path = Path(self._tmpdir.name) / "socket"
        return self.socket_path

    async def _start(self, address: str, credentials, interceptors=(), extra=()) -> int:
        self.server = grpc.aio.server(
            interceptors=list(interceptors),
            options=[
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10000),
                ("grpc.so_reuseport", 0),
            ],
        )
        jumpstarter_pb2_grpc.add_ExporterServiceServicer_to_server(
            _ExporterService(self), self.server
        )
        router_pb2_grpc.add_RouterServiceServicer_to_server(_DriverStreams(self), self.server)
        if credentials is None:
            port = self.server.add_insecure_port(address)
        else:
            port = self.server.add_secure_port(address, credentials)
        for other in extra:
            self.server.add_insecure_port(other)
        await self.server.start()
        logsetup.add_sink(self.logs.sink)
        return port

    async def stop(self, grace: float = 1.0) -> None:
        logsetup.remove_sink(self.logs.sink)
        if self._unix is not None:
            self._unix.close()
            self._unix = None
        connections = set(self._connections)
        if connections:
            _done, late = await asyncio.wait(connections, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def driver(self, uuid: str) -> Driver | None:
        return self.drivers.get(uuid)


class _ExporterService(jumpstarter_pb2_grpc.ExporterServiceServicer):
    def __init__(self, session: Session) -> None:
        self.s = session

    async def GetReport(self, request, context):
        return jumpstarter_pb2.GetReportResponse(
            uuid=self.s.exporter_uuid,
            labels=self.s.labels,
            reports=self.s.reports,
            motd=self.s.motd,
        )

    async def _target(self, request, context) -> Driver:
        if self.s.status.code not in CALLABLE:
            name = common_pb2.ExporterStatus.Name(self.s.status.code)
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Exporter not ready for driver calls (status: {name})",
            )
        driver = self.s.driver(request.uuid)
        if driver is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no driver with uuid {request.uuid}")
        return driver

    async def DriverCall(self, request, context):
        driver = await self._target(request, context)
        args = [values.from_value(v) for v in request.args]
        bound = structlog.contextvars.bound_contextvars(method=request.method)
        with bound:
            try:
                result = await invoke(driver, request.method, args)
                value = values.to_value(result)
            except MethodNotFound as exc:
                await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            except Exception as exc:  # noqa: BLE001 - a driver's failure is the client's answer
                code, details = grpc_status_for(exc)
                log.info("driver call failed", method=request.method, code=code.name, error=details)
                await context.abort(code, details)
        return jumpstarter_pb2.DriverCallResponse(uuid=str(uuidlib.uuid4()), result=value)

    async def StreamingDriverCall(self, request, context):
        driver = await self._target(request, context)
        args = [values.from_value(v) for v in request.args]
        try:
            async for item in invoke_streaming(driver, request.method, args):
                yield jumpstarter_pb2.StreamingDriverCallResponse(
                    uuid=str(uuidlib.uuid4()), result=values.to_value(item)
                )
        except MethodNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except Exception as exc:  # noqa: BLE001 - a driver's failure is the client's answer
            code, details = grpc_status_for(exc)
            await context.abort(code, details)

    async def LogStream(self, request, context) -> AsyncIterator:
        queue: asyncio.Queue = asyncio.Queue(LOG_BUFFER)
        self.s.logs.readers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self.s.logs.readers.discard(queue)

    async def GetStatus(self, request, context):
        status = self.s.status
        self.s.status_seen(status.version)
        response = jumpstarter_pb2.GetStatusResponse(
            status=status.code, message=status.message, status_version=status.version
        )
        if status.previous is not None:
            response.previous_status = status.previous
        return response

    async def EndSession(self, request, context):
        if self.s.end_requested.is_set():
            return jumpstarter_pb2.EndSessionResponse(
                success=True, message="Session already ending"
            )
        self.s.end_requested.set()
        return jumpstarter_pb2.EndSessionResponse(success=True, message="Session end triggered")


class _DriverStreams(router_pb2_grpc.RouterServiceServicer):
    """Driver byte streams (e.g. serial ``connect``) over RouterService.Stream (§5.4)."""

    def __init__(self, session: Session) -> None:
        self.s = session

    async def Stream(self, request_iterator, context):
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        try:
            request = frames.parse_stream_request(metadata)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.get("kind") != "driver":
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f"stream kind {request.get('kind')!r} is not served"
            )
        driver = self.s.driver(str(request.get("uuid")))
        if driver is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no driver with uuid {request.get('uuid')}"
            )
        try:
            opener = driver.lookup(str(request.get("method")), "stream")
        except MethodNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        self.s.streams += 1
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    stream = await stack.enter_async_context(opener())
                except Exception as exc:  # noqa: BLE001 - e.g. the device is unplugged
                    code, details = grpc_status_for(exc)
                    log.info(
                        "driver stream failed",
                        method=request.get("method"),
                        code=code.name,
                        error=details,
                    )
                    await context.abort(code, details)
                await frames.serve_byte_stream(stream, context)
        finally:
            self.s.streams -= 1
