"""Leasing a board through a controller, and the local socket that reaches it.

``lease()`` does what upstream's ``jmp shell`` does (protocol-facts §3.6, §3.10, §7.5):

1. ClientService.CreateLease (selector, duration), then GetLease until an exporter is
   assigned (condition Ready) — Unsatisfiable means no exporter can ever match;
2. a private Unix socket (0700 directory); every connection to it is one tunnel: a fresh
   ControllerService.Dial (router endpoint + token) and ``frames.bridge_to_router``;
3. a ``Board`` (sync gRPC) on that socket; GetStatus until LEASE_READY;
4. on exit, even on an exception or Ctrl-C: EndSession, wait for AVAILABLE, DeleteLease.

The asyncio parts (controller calls, socket server, tunnels) run on one event loop in a
background thread owned by the ``Lease`` object; sync callers wait on it with timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import structlog
from google.protobuf import duration_pb2

from jumpstarter_exporter._proto.jumpstarter.client.v1 import client_pb2, client_pb2_grpc
from jumpstarter_exporter._proto.jumpstarter.v1 import jumpstarter_pb2, jumpstarter_pb2_grpc
from jumpstarter_exporter.client.board import AllowList, Board
from jumpstarter_exporter.client.errors import (
    ClientAuthError,
    ClientError,
    ClientUnavailable,
    LeaseEnded,
    LeaseNotFound,
    LeaseTimeout,
    NoMatchingExporter,
)
from jumpstarter_exporter.config import ClientConfig, load_client
from jumpstarter_exporter.errors import ConfigError, JumpstarterError
from jumpstarter_exporter.wire import frames
from jumpstarter_exporter.wire.channel import identity_credentials, open_secure_channel

log = structlog.get_logger("jumpstarter.client")

T = TypeVar("T")
CALL_TIMEOUT = 30.0  # every unary call to the controller
DEFAULT_DURATION = dt.timedelta(minutes=30)
POLL = 0.5  # GetLease while waiting for an exporter


# --- inputs ---------------------------------------------------------------------------------


def resolve_config(
    config: ClientConfig | str | Path | None, environ: Mapping[str, str] | None = None
) -> ClientConfig:
    """A ClientConfig; an alias (str) or a path (Path, or a str naming a .yaml file)."""
    if isinstance(config, ClientConfig):
        return config
    if config is None:
        return load_client(environ=environ).config
    if isinstance(config, Path) or str(config).endswith((".yaml", ".yml")) or "/" in str(config):
        return load_client(path=Path(config), environ=environ).config
    return load_client(alias=config, environ=environ).config


def selector_text(selector: Mapping[str, str] | str | None) -> str:
    """``{"k": "v"}`` or ``"k=v,..."`` → the label-selector text CreateLease takes."""
    if selector is None:
        return ""
    if isinstance(selector, str):
        return selector.strip()
    return ",".join(f"{key}={value}" for key, value in selector.items())


def duration_seconds(duration: dt.timedelta | float | int) -> float:
    seconds = duration.total_seconds() if isinstance(duration, dt.timedelta) else float(duration)
    if seconds <= 0:
        raise ConfigError(f"lease duration must be positive (got {seconds:g} s)")
    return seconds


def short_name(resource: str) -> str:
    """``namespaces/ns/leases/NAME`` → ``NAME``."""
    return resource.rsplit("/", 1)[-1]


def allow_list(config: ClientConfig, environ: Mapping[str, str] | None = None) -> AllowList:
    """The config's drivers.allow/unsafe. JMP_DRIVERS_ALLOW is already folded in by config
    loading for configs loaded from files; for a ClientConfig passed in, apply it here."""
    from_env = AllowList.from_env(environ)
    if from_env is not None:
        return from_env
    return AllowList(tuple(config.drivers.allow), config.drivers.unsafe)


def rpc_error(exc: grpc.aio.AioRpcError, what: str, config: ClientConfig) -> JumpstarterError:
    code = exc.code()
    who = f"client {config.metadata.namespace}/{config.metadata.name}"
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return ClientAuthError(
            f"the controller refused {what} for {who}: {exc.details()} "
            "(check token, metadata.name and metadata.namespace of the client config)"
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ClientUnavailable(
            f"controller {config.endpoint} unavailable during {what}: {code.name}: {exc.details()}"
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return LeaseNotFound(f"{what}: {exc.details()}")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return LeaseEnded(f"{what}: {exc.details()}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ClientError(f"the controller rejected {what}: {exc.details()}")
    return ClientError(f"{what} failed: {code.name}: {exc.details()}")


# --- the controller, asynchronously ---------------------------------------------------------


class Controller:
    """ClientService + ControllerService.Dial on one TLS channel with the client identity."""

    def __init__(self, config: ClientConfig) -> None:
        if not config.endpoint:
            raise ConfigError("the client config has no endpoint (the controller's host:port)")
        if not config.token:
            raise ConfigError("the client config has no token")
        self.config = config
        self.namespace = config.metadata.namespace or "default"
        self.parent = f"namespaces/{self.namespace}"
        self.channel: grpc.aio.Channel | None = None

    async def open(self) -> None:
        cfg = self.config
        creds = identity_credentials("Client", self.namespace, cfg.metadata.name, cfg.token or "")
        try:
            self.channel = await open_secure_channel(
                cfg.endpoint or "", cfg.tls, cfg.grpcOptions, creds
            )
        except ConnectionError as exc:
            raise ClientUnavailable(f"controller {cfg.endpoint}: {exc}") from None
        self.clients = client_pb2_grpc.ClientServiceStub(self.channel)
        self.control = jumpstarter_pb2_grpc.ControllerServiceStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    async def _call(self, what: str, method, request) -> Any:
        try:
            return await method(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, what, self.config) from None

    def lease_resource(self, name: str) -> str:
        return name if "/" in name else f"{self.parent}/leases/{name}"

    async def create_lease(
        self, selector: str, seconds: float, exporter_name: str = ""
    ) -> client_pb2.Lease:
        spec = client_pb2.Lease(selector=selector, exporter_name=exporter_name or None)
        spec.duration.CopyFrom(duration_pb2.Duration(seconds=int(seconds)))
        spec.duration.nanos = int((seconds % 1) * 1e9)
        request = client_pb2.CreateLeaseRequest(parent=self.parent, lease=spec)
        return await self._call("CreateLease", self.clients.CreateLease, request)

    async def get_lease(self, name: str) -> client_pb2.Lease:
        request = client_pb2.GetLeaseRequest(name=self.lease_resource(name))
        return await self._call("GetLease", self.clients.GetLease, request)

    async def list_leases(self, only_active: bool = True) -> list[client_pb2.Lease]:
        pages = self._pages(
            "ListLeases",
            self.clients.ListLeases,
            lambda token: client_pb2.ListLeasesRequest(
                parent=self.parent, page_token=token, only_active=only_active
            ),
        )
        return [lease async for page in pages for lease in page.leases]

    async def list_exporters(self, selector: str = "") -> list[client_pb2.Exporter]:
        pages = self._pages(
            "ListExporters",
            self.clients.ListExporters,
            lambda token: client_pb2.ListExportersRequest(
                parent=self.parent, page_token=token, filter=selector
            ),
        )
        return [exporter async for page in pages for exporter in page.exporters]

    async def _pages(self, what: str, method: Any, request: Any) -> AsyncIterator[Any]:
        """Every page of a List call, following next_page_token."""
        token = ""
        while True:
            page = await self._call(what, method, request(token))
            yield page
            token = page.next_page_token
            if not token:
                return

    async def delete_lease(self, name: str) -> None:
        request = client_pb2.DeleteLeaseRequest(name=self.lease_resource(name))
        await self._call("DeleteLease", self.clients.DeleteLease, request)

    async def dial(self, name: str) -> jumpstarter_pb2.DialResponse:
        request = jumpstarter_pb2.DialRequest(lease_name=short_name(name))
        return await self._call("Dial", self.control.Dial, request)

    async def wait_assigned(self, name: str, timeout: float) -> client_pb2.Lease:  # noqa: ASYNC109
        """GetLease until the lease has an exporter (condition Ready=True)."""
        deadline = time.monotonic() + timeout
        while True:
            lease = await self.get_lease(name)
            conditions = {c.type: c for c in lease.conditions if c.status == "True"}
            if "Ready" in conditions and lease.HasField("exporter"):
                return lease
            if "Unsatisfiable" in conditions or "Invalid" in conditions:
                cond = conditions.get("Unsatisfiable") or conditions["Invalid"]
                raise NoMatchingExporter(
                    f"no exporter matches selector '{lease.selector}' "
                    f"({cond.reason}: {cond.message})".replace(" (: )", "")
                )
            if lease.HasField("effective_end_time"):
                raise LeaseEnded(f"lease {short_name(name)} ended before an exporter was assigned")
            if time.monotonic() >= deadline:
                pending = next((c for c in lease.conditions if c.type == "Pending"), None)
                why = f": {pending.reason} ({pending.message})" if pending is not None else ""
                if pending is not None and pending.reason == "NoMatch":
                    raise NoMatchingExporter(
                        f"no exporter matches selector '{lease.selector}'{why}"
                    )
                raise LeaseTimeout(
                    f"no exporter matching '{lease.selector}' became free within {timeout:g} s"
                    f"{why} (lease {short_name(name)})"
                )
            await asyncio.sleep(POLL)


# --- the event loop thread --------------------------------------------------------------------


class LoopThread:
    """One asyncio loop in a daemon thread; ``run`` waits for a coroutine with a timeout."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name="jmp-client-loop", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise ClientUnavailable(f"no answer within {timeout:g} s") from None
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt while waiting: stop the coroutine too
            raise

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# --- the local socket ---------------------------------------------------------------------------


class Tunnels:
    """A Unix socket whose every connection is bridged to the exporter through the router."""

    def __init__(self, controller: Controller, lease_name: str, dial_timeout: float) -> None:
        self.controller = controller
        self.lease_name = lease_name
        self.dial_timeout = dial_timeout
        self.tmpdir = tempfile.TemporaryDirectory(
            prefix="jmp-shell-", dir=os.environ.get("XDG_RUNTIME_DIR") or None
        )
        self.path = Path(self.tmpdir.name) / "socket"
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()
        self.routers: dict[str, grpc.aio.Channel] = {}

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._accept, path=str(self.path))
        os.chmod(self.path, 0o600)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The server's callback: the bridge is a task owned (tracked, cancelled) by us.
        task = asyncio.ensure_future(self._bridge(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _router(self, endpoint: str) -> grpc.aio.Channel:
        channel = self.routers.get(endpoint)
        if channel is None:
            cfg = self.controller.config
            channel = await open_secure_channel(endpoint, cfg.tls, cfg.grpcOptions)
            self.routers[endpoint] = channel
        return channel

    async def _bridge(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.dial_timeout):
                dial = await self.controller.dial(self.lease_name)
                channel = await self._router(dial.router_endpoint)
        except (JumpstarterError, ConnectionError, TimeoutError) as exc:
            log.warning("dial failed", lease=self.lease_name, error=str(exc))
            writer.close()
            return
        try:
            await frames.bridge_to_router(reader, writer, channel, dial.router_token)
        except frames.TunnelError as exc:
            log.debug("tunnel ended", error=str(exc))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.routers.values():
            await channel.close()
        self.routers.clear()
        self.tmpdir.cleanup()


# --- the sync context manager ---------------------------------------------------------------


class Lease:
    """``with lease(...) as board``: the lease, its socket and the Board; see ``lease()``."""

    def __init__(
        self,
        config: ClientConfig | str | Path | None = None,
        selector: Mapping[str, str] | str | None = None,
        duration: dt.timedelta | float = DEFAULT_DURATION,
        timeout: float = 60.0,
        *,
        exporter_name: str = "",
        existing: str = "",
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = resolve_config(config, environ)
        self.selector = selector_text(selector)
        # ``existing``: a lease made beforehand (``jmp create lease``); it is used, not
        # created, and left alone at the end (no EndSession, no delete), as upstream does.
        self.existing = short_name(existing) if existing else ""
        if not self.selector and not exporter_name and not self.existing:
            raise ConfigError("lease: give a selector (e.g. board=rpi4) or an exporter name")
        self.seconds = duration_seconds(duration)
        self.timeout = timeout
        self.exporter_name = exporter_name
        self.allow = allow_list(self.config, environ)
        self.controller = Controller(self.config)
        self.loop: LoopThread | None = None
        self.tunnels: Tunnels | None = None
        self.name = ""  # the lease's short name, once created
        self.board: Board | None = None

    @property
    def socket_path(self) -> Path | None:
        return self.tunnels.path if self.tunnels is not None else None

    def __enter__(self) -> Board:
        try:
            return self._acquire()
        except BaseException:
            self._release(end_session=False)
            raise

    def __exit__(self, *exc: object) -> None:
        self._release(end_session=True)

    def _acquire(self) -> Board:
        self.loop = LoopThread()
        self.loop.run(self.controller.open(), 30)
        if self.existing:
            self.loop.run(self.controller.get_lease(self.existing), CALL_TIMEOUT + 5)
            return self._connect(self.existing)
        if self.selector and not self.exporter_name:
            # Fail at once, without a lease left waiting, when nothing could ever match
            # (the controller would keep such a lease pending, as upstream's does).
            known = self.loop.run(self.controller.list_exporters(self.selector), CALL_TIMEOUT + 5)
            if not known:
                raise NoMatchingExporter(
                    f"no exporter matches selector '{self.selector}' "
                    f"(controller {self.config.endpoint}, namespace {self.controller.namespace})"
                )
        created = self.loop.run(
            self.controller.create_lease(self.selector, self.seconds, self.exporter_name),
            CALL_TIMEOUT + 5,
        )
        self.name = short_name(created.name)
        log.info("lease created", lease=self.name, selector=self.selector)
        return self._connect(self.name)

    def _connect(self, name: str) -> Board:
        assert self.loop is not None
        assigned = self.loop.run(
            self.controller.wait_assigned(name, self.timeout), self.timeout + CALL_TIMEOUT
        )
        exporter = short_name(assigned.exporter)
        log.info("lease ready", lease=name, exporter=exporter)
        dial_timeout = max(self.config.leases.dial_timeout, 5.0)
        self.tunnels = Tunnels(self.controller, name, dial_timeout)
        self.loop.run(self.tunnels.start(), 10)
        self.board = Board(
            f"unix://{self.tunnels.path}",
            allow=self.allow,
            lease_name=name,
            exporter_name=exporter,
            timeout=max(self.timeout, dial_timeout),
        )
        self.board.wait_ready(max(self.timeout, 300.0))
        return self.board

    def _release(self, *, end_session: bool) -> None:
        """EndSession (so afterLease hooks run while we wait), then DeleteLease. Never
        raises for a lease that is already gone; every step is bounded."""
        if self.board is not None:
            if end_session and not self.existing:
                with contextlib.suppress(grpc.RpcError, ClientError):
                    self.board.end_session()
            self.board.close()
            self.board = None
        if self.loop is None:
            return
        try:
            if self.tunnels is not None:
                with contextlib.suppress(ClientError):
                    self.loop.run(self.tunnels.stop(), 10)
                self.tunnels = None
            if self.name:
                self._delete()
            with contextlib.suppress(ClientError):
                self.loop.run(self.controller.close(), 10)
        finally:
            self.loop.stop()
            self.loop = None

    def _delete(self) -> None:
        assert self.loop is not None
        try:
            self.loop.run(self.controller.delete_lease(self.name), CALL_TIMEOUT + 5)
            log.info("lease released", lease=self.name)
        except (LeaseEnded, LeaseNotFound):
            pass  # the exporter released it first (afterLease hook), or it expired
        except ClientError as exc:
            log.warning("could not release the lease", lease=self.name, error=str(exc))
        self.name = ""


def lease(
    config: ClientConfig | str | Path | None = None,
    selector: Mapping[str, str] | str | None = None,
    duration: dt.timedelta | float = DEFAULT_DURATION,
    timeout: float = 60.0,
) -> Lease:
    """Lease a board matching ``selector`` for ``duration`` (a timedelta or seconds).

    ``config``: a ClientConfig, an alias, a path, or None (JMP_CLIENT_CONFIG / JMP_CLIENT /
    the current client). ``timeout``: how long to wait for a free matching exporter (and for
    it to become ready). Use it as a context manager; leaving the block ends the session and
    deletes the lease, also on exceptions and Ctrl-C.
    """
    return Lease(config, selector, duration, timeout)


__all__ = ["DEFAULT_DURATION", "Controller", "Lease", "LoopThread", "lease", "resolve_config"]
