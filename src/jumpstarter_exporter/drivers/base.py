"""The driver model shared by every driver, and the contract the exporter relies on.

A driver is a class with:

- ``Config``: a pydantic model of its ``config:`` keys (strict: unknown keys are errors);
- ``client``: the ``jumpstarter.dev/client`` label upstream clients use to pick a client
  class (e.g. ``jumpstarter_driver_power.client.PowerClient``);
- methods marked ``@export`` (a DriverCall: plain or ``async def``; or a StreamingDriverCall:
  an async generator) and ``@exportstream`` (an async context manager yielding a
  ``ByteStream``, reached through RouterService.Stream);
- ``children``: named sub-drivers (a Composite has only children).

Contract used by the exporter (``exporter/session.py``):

- ``Driver.uuid`` (str, uuid4 at construction), ``Driver.name``, ``Driver.children``;
- ``Driver.walk()`` yields ``(driver, parent_uuid_or_None, name_or_None)`` depth-first,
  pre-order, root first (the order of GetReport);
- ``Driver.report(parent_uuid, name)`` → ``DriverInstanceReport`` for this driver;
- ``Driver.lookup(method, kind)`` → the bound callable, or raises ``MethodNotFound`` with
  upstream's texts (``method X not found on driver`` / ``method X missing marker Y``);
- ``await Driver.aclose()`` releases devices (called when a lease session ends);
- ``Driver.attach_watcher(watcher)``: before serving, the exporter offers its one
  ``hotplug.DeviceWatcher``; a driver backed by a device node registers a watch on it
  (default: offer it to the children), and an unused watcher is never started;
- ``ByteStream``: ``await read(n)`` → bytes (``b""`` at end of stream), ``await write(b)``
  (waits while the device cannot take more: back-pressure), ``await send_eof()``,
  ``await aclose()``.

Calling exported methods: ``invoke`` (DriverCall) and ``invoke_streaming``
(StreamingDriverCall) look the method up, coerce the positional JSON arguments to the
annotated types (``validate_call``: ``1.0`` → ``int`` 1, a bad argument → ``ValueError``) and
run plain ``def`` methods in a worker thread so a slow device never blocks the event loop.
``grpc_status_for`` maps whatever a method raised onto the gRPC status the client sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import re
import uuid as uuid_mod
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import grpc
import structlog
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, validate_call

from jumpstarter_exporter._proto.jumpstarter.v1 import jumpstarter_pb2
from jumpstarter_exporter.errors import (
    DeviceBusy,
    DeviceError,
    DeviceUnavailable,
    DriverCallError,
)

if TYPE_CHECKING:
    from jumpstarter_exporter.hotplug.monitor import DeviceWatcher

# Upstream's export markers: the attribute names and their common value (protocol-facts §5.2).
MARKER_VALUE = "07c9b9cc"
MARKER_DRIVERCALL = "marker_drivercall"
MARKER_STREAMINGDRIVERCALL = "marker_streamingdrivercall"
MARKER_STREAMCALL = "marker_streamcall"

CallKind = Literal["call", "streaming", "stream"]
_MARKER_FOR_KIND: dict[str, str] = {
    "call": MARKER_DRIVERCALL,
    "streaming": MARKER_STREAMINGDRIVERCALL,
    "stream": MARKER_STREAMCALL,
}

# How an exported function runs: "async" (coroutine), "sync" (thread), "asyncgen", "gen".
_STYLE_ATTR = "_jmp_style"

LABEL_CLIENT = "jumpstarter.dev/client"
LABEL_NAME = "jumpstarter.dev/name"

READ_CHUNK = 64 * 1024


class MethodNotFound(DriverCallError):
    """No exported method of that name and kind: NOT_FOUND with upstream's text."""


class InvalidArguments(ValueError):
    """The arguments of a call do not fit the method's signature (INVALID_ARGUMENT).

    One line, naming each bad argument by parameter name; input values are not echoed.
    """

    def __init__(self, method: str, exc: ValidationError, params: Sequence[str]) -> None:
        parts = []
        for err in exc.errors(include_url=False, include_input=False):
            loc = err["loc"]
            where = loc[0] if loc else ""
            if isinstance(where, int):
                # an index counts ``self``, so it is also the client's 1-based argument number
                where = params[where] if where < len(params) else f"argument {where}"
            parts.append(f"{where}: {err['msg']}" if where != "" else err["msg"])
        super().__init__(f"invalid arguments for {method}: " + "; ".join(parts))


# --- byte streams ---------------------------------------------------------------------------


@runtime_checkable
class ByteStream(Protocol):
    """A full-duplex byte stream (serial console, loopback, resource pipe).

    ``read`` returns up to ``max_bytes`` (at least one byte), or ``b""`` once the stream has
    ended (peer EOF, device gone, stream closed). ``write`` returns when all bytes were
    accepted, waiting while the other side cannot take more; it raises ``BrokenPipeError``
    once the stream or device is closed. ``send_eof`` ends our direction where the medium has
    such a thing (a serial line has none: there it is a no-op). ``aclose`` is idempotent.
    """

    async def read(self, max_bytes: int = READ_CHUNK) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def send_eof(self) -> None: ...

    async def aclose(self) -> None: ...


class MemoryPipe:
    """A bounded in-memory byte buffer that is its own peer: what is written is read back.

    It is a ``ByteStream`` (``loop://`` echo) and one direction of ``memory_stream_pair``.
    Writers wait while ``limit`` bytes are buffered (back-pressure). After ``send_eof`` the
    reader drains the buffer and then gets ``b""``; after ``aclose`` the reader gets ``b""``
    at once and writers get ``BrokenPipeError``.
    """

    def __init__(self, limit: int = 1 << 20) -> None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        self._limit = limit
        self._buffer = bytearray()
        self._eof = False
        self._closed = False
        self._changed = asyncio.Condition()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    async def read(self, max_bytes: int = READ_CHUNK) -> bytes:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        async with self._changed:
            await self._changed.wait_for(lambda: self._buffer or self._eof or self._closed)
            if self._closed or not self._buffer:
                return b""
            data = bytes(self._buffer[:max_bytes])
            del self._buffer[:max_bytes]
            self._changed.notify_all()
            return data

    async def write(self, data: bytes) -> None:
        view = memoryview(bytes(data))
        async with self._changed:
            while view:
                await self._changed.wait_for(
                    lambda: self._closed or self._eof or len(self._buffer) < self._limit
                )
                if self._closed or self._eof:
                    raise BrokenPipeError("stream is closed for writing")
                room = self._limit - len(self._buffer)
                self._buffer += view[:room]
                view = view[room:]
                self._changed.notify_all()

    async def send_eof(self) -> None:
        async with self._changed:
            self._eof = True
            self._changed.notify_all()

    async def aclose(self) -> None:
        async with self._changed:
            self._closed = True
            self._buffer.clear()
            self._changed.notify_all()


class _CrossedStream:
    """One end of a ``memory_stream_pair``: reads one pipe, writes the other."""

    def __init__(self, incoming: MemoryPipe, outgoing: MemoryPipe) -> None:
        self._incoming = incoming
        self._outgoing = outgoing

    async def read(self, max_bytes: int = READ_CHUNK) -> bytes:
        return await self._incoming.read(max_bytes)

    async def write(self, data: bytes) -> None:
        await self._outgoing.write(data)

    async def send_eof(self) -> None:
        await self._outgoing.send_eof()

    async def aclose(self) -> None:
        await self._outgoing.send_eof()
        await self._incoming.aclose()


def memory_stream_pair(limit: int = 1 << 20) -> tuple[ByteStream, ByteStream]:
    """Two connected ``ByteStream`` ends: bytes written to one are read from the other."""
    a_to_b, b_to_a = MemoryPipe(limit), MemoryPipe(limit)
    return _CrossedStream(b_to_a, a_to_b), _CrossedStream(a_to_b, b_to_a)


# --- export decorators ----------------------------------------------------------------------


def _style(func: Callable[..., Any]) -> str:
    if inspect.isasyncgenfunction(func):
        return "asyncgen"
    if inspect.isgeneratorfunction(func):
        return "gen"
    if inspect.iscoroutinefunction(func):
        return "async"
    return "sync"


def export(func: Callable[..., Any]) -> Callable[..., Any]:
    """Export a method to clients.

    ``def``/``async def`` → a DriverCall; a generator/async generator → a
    StreamingDriverCall. Arguments are validated and coerced against the annotations
    (positional JSON numbers arrive as floats); a bad argument raises ``ValueError``.
    """
    style = _style(func)
    checked = validate_call(config=ConfigDict(arbitrary_types_allowed=True))(func)
    params = list(inspect.signature(func).parameters)

    def translate(exc: ValidationError) -> Exception:
        if exc.title != checked.__qualname__:
            return exc  # raised inside the method, not by argument validation
        return InvalidArguments(func.__name__, exc, params)

    if style == "async":

        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await checked(*args, **kwargs)
            except ValidationError as exc:
                raise translate(exc) from None

    else:

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return checked(*args, **kwargs)
            except ValidationError as exc:
                raise translate(exc) from None

    marker = MARKER_STREAMINGDRIVERCALL if style in ("asyncgen", "gen") else MARKER_DRIVERCALL
    setattr(wrapper, marker, MARKER_VALUE)
    setattr(wrapper, _STYLE_ATTR, style)
    return wrapper


def exportstream(func: Callable[..., Any]) -> Callable[..., Any]:
    """Export a byte stream: ``func`` is an async generator yielding one ``ByteStream`` (it
    becomes an async context manager), or already returns an async context manager."""
    if inspect.isasyncgenfunction(func):
        func = contextlib.asynccontextmanager(func)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> contextlib.AbstractAsyncContextManager[ByteStream]:
        return func(*args, **kwargs)

    setattr(wrapper, MARKER_STREAMCALL, MARKER_VALUE)
    return wrapper


# --- drivers --------------------------------------------------------------------------------

_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "WARN": 30, "ERROR": 40, "CRITICAL": 50}


class DriverLog:
    """A driver's logger: structlog events carrying ``driver=<name>`` (and
    ``driver_type``), filtered by the driver's ``log_level``. The session's LogStream picks
    driver events out by the ``driver`` key and sends them with source DRIVER."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver

    def _emit(self, level: int, event: str, **kw: Any) -> None:
        if level < self._driver.log_level:
            return
        name = self._driver.name or "root"
        logger = structlog.get_logger(f"driver.{name}")
        method = logging.getLevelName(level).lower()
        kw.setdefault("driver", name)
        kw.setdefault("driver_type", type(self._driver).__name__)
        getattr(logger, method)(event, **kw)

    def debug(self, event: str, **kw: Any) -> None:
        self._emit(logging.DEBUG, event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._emit(logging.INFO, event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit(logging.WARNING, event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._emit(logging.ERROR, event, **kw)


class DriverConfig(BaseModel):
    """Keys every driver accepts. ``log_level`` is upstream's generic driver key."""

    model_config = ConfigDict(extra="forbid")

    log_level: str | None = None

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str | None) -> str | None:
        if value is not None and value.upper() not in _LEVELS:
            raise ValueError(f"must be one of {', '.join(sorted(set(_LEVELS) - {'WARN'}))}")
        return value


class Driver:
    """Base class of every driver; see the module docstring for the contract."""

    Config: ClassVar[type[BaseModel]] = DriverConfig
    client: ClassVar[str] = ""

    def __init__(
        self,
        config: BaseModel | Mapping[str, Any] | None = None,
        *,
        description: str | None = None,
        methods_description: Mapping[str, str] | None = None,
        children: Mapping[str, Driver] | None = None,
    ) -> None:
        if config is None:
            config = {}
        if not isinstance(config, self.Config):
            raw = config.model_dump() if isinstance(config, BaseModel) else dict(config)
            config = self.Config.model_validate(raw)
        self.config = config
        self.uuid: str = str(uuid_mod.uuid4())
        self.name: str = ""  # set by the parent (the first name it is given); root: ""
        self.description = description
        self.methods_description: dict[str, str] = dict(methods_description or {})
        self.children: dict[str, Driver] = dict(children or {})
        for child_name, child in self.children.items():
            if not child.name:
                child.name = child_name
        level = getattr(config, "log_level", None)
        self.log_level: int = _LEVELS[level.upper()] if level else logging.DEBUG
        self.log = DriverLog(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name or 'root'} {self.uuid}>"

    # -- tree --------------------------------------------------------------------------------

    def walk(
        self, parent_uuid: str | None = None, name: str | None = None
    ) -> Iterator[tuple[Driver, str | None, str | None]]:
        """``(driver, parent_uuid, name)`` depth-first, pre-order, this driver first."""
        yield self, parent_uuid, name
        for child_name, child in self.children.items():
            yield from child.walk(self.uuid, child_name)

    def labels(self) -> dict[str, str]:
        """Extra labels of this driver (the client and name labels are added by report)."""
        return {}

    def report(
        self, parent_uuid: str | None = None, name: str | None = None
    ) -> jumpstarter_pb2.DriverInstanceReport:
        labels = {**self.labels(), LABEL_CLIENT: self.client}
        if name is not None:
            labels[LABEL_NAME] = name
        report = jumpstarter_pb2.DriverInstanceReport(
            uuid=self.uuid, labels=labels, methods_description=self.methods_description
        )
        if parent_uuid is not None:
            report.parent_uuid = parent_uuid
        if self.description:
            report.description = self.description
        return report

    # -- dispatch ----------------------------------------------------------------------------

    def lookup(self, method: str, kind: CallKind) -> Callable[..., Any]:
        """The bound exported method ``method`` of ``kind`` ("call", "streaming", "stream")."""
        marker = _MARKER_FOR_KIND[kind]
        try:
            found = getattr(self, method)
        except AttributeError:
            raise MethodNotFound(f"method {method} not found on driver") from None
        if getattr(found, marker, None) != MARKER_VALUE:
            raise MethodNotFound(f"method {method} missing marker {marker}")
        return found

    def attach_watcher(self, watcher: DeviceWatcher) -> None:
        """Register the devices this driver needs with the exporter's ``DeviceWatcher``
        (``watcher.watch(...)``), kept for the process's life. Default: the children do."""
        for child in self.children.values():
            child.attach_watcher(watcher)

    async def check(self) -> None:
        """Cheap health check of the device (no side effects on it); raises
        ``DeviceUnavailable`` if it is known to be absent. Default: nothing to check."""

    async def start(self) -> None:
        """Called when a lease session starts (e.g. a serial console log begins recording).
        Default: start the children."""
        for child in self.children.values():
            await child.start()

    async def aclose(self) -> None:
        """Release devices held by this driver and its children (idempotent)."""
        for child in self.children.values():
            await child.aclose()


# --- invoking exported methods --------------------------------------------------------------


async def invoke(driver: Driver, method: str, args: Sequence[Any] = ()) -> Any:
    """Run DriverCall ``method`` with positional ``args``; plain ``def`` runs in a thread."""
    func = driver.lookup(method, "call")
    if getattr(func, _STYLE_ATTR, None) == "async" or inspect.iscoroutinefunction(func):
        return await func(*args)
    result = await asyncio.to_thread(func, *args)
    if inspect.isawaitable(result):
        result = await result
    return result


_DONE = object()


async def invoke_streaming(
    driver: Driver, method: str, args: Sequence[Any] = ()
) -> AsyncIterator[Any]:
    """Run StreamingDriverCall ``method`` and yield its items; a plain generator is stepped in
    a worker thread. Lookup and argument errors surface at the first ``__anext__``."""
    func = driver.lookup(method, "streaming")
    if getattr(func, _STYLE_ATTR, None) == "gen" or inspect.isgeneratorfunction(func):
        gen = await asyncio.to_thread(func, *args)
        try:
            while True:
                item = await asyncio.to_thread(next, gen, _DONE)
                if item is _DONE:
                    return
                yield item
        finally:
            await asyncio.to_thread(gen.close)
    else:
        agen = func(*args)
        try:
            async for item in agen:
                yield item
        finally:
            await agen.aclose()


# --- errors → gRPC status -------------------------------------------------------------------

_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\"]+")


def _validation_text(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return f"invalid arguments for {exc.title}: " + "; ".join(parts)


def grpc_status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status (code, details) a client sees for an exception from a driver method.

    ================================================  ====================  ==================
    exception                                          code                  upstream client
    ================================================  ====================  ==================
    MethodNotFound                                     NOT_FOUND             MethodNotImpl.
    NotImplementedError                                UNIMPLEMENTED         MethodNotImpl.
    ValueError (incl. pydantic ValidationError)        INVALID_ARGUMENT      InvalidArgument
    TimeoutError                                       DEADLINE_EXCEEDED     DriverError
    DeviceUnavailable, ConnectionError                 UNAVAILABLE           DriverError
    DeviceBusy                                         RESOURCE_EXHAUSTED    DriverError
    other DeviceError, other OSError                   INTERNAL              DriverError
    asyncio.CancelledError                             CANCELLED             DriverError
    anything else (incl. other DriverCallError)        UNKNOWN               DriverError
    ================================================  ====================  ==================

    FAILED_PRECONDITION is never produced here: upstream clients read it as "exporter not
    ready", which is the session's business, not a driver's. Details are ``str(exc)`` (the
    class name if empty; a pydantic error as one line without input values) with any
    ``Bearer`` token masked.
    """
    if isinstance(exc, MethodNotFound):
        code = grpc.StatusCode.NOT_FOUND
    elif isinstance(exc, NotImplementedError):
        code = grpc.StatusCode.UNIMPLEMENTED
    elif isinstance(exc, ValueError):
        code = grpc.StatusCode.INVALID_ARGUMENT
    elif isinstance(exc, TimeoutError):
        code = grpc.StatusCode.DEADLINE_EXCEEDED
    elif isinstance(exc, DeviceUnavailable | ConnectionError):
        code = grpc.StatusCode.UNAVAILABLE
    elif isinstance(exc, DeviceBusy):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    elif isinstance(exc, DeviceError | OSError):
        code = grpc.StatusCode.INTERNAL
    elif isinstance(exc, asyncio.CancelledError):
        code = grpc.StatusCode.CANCELLED
    else:
        code = grpc.StatusCode.UNKNOWN
    if isinstance(exc, ValidationError):
        details = _validation_text(exc)
    else:
        details = str(exc) or type(exc).__name__
    return code, _BEARER.sub(r"\1<redacted>", details)


__all__ = [
    "MARKER_DRIVERCALL",
    "MARKER_STREAMCALL",
    "MARKER_STREAMINGDRIVERCALL",
    "MARKER_VALUE",
    "READ_CHUNK",
    "ByteStream",
    "CallKind",
    "Driver",
    "DriverConfig",
    "DriverLog",
    "InvalidArguments",
    "MemoryPipe",
    "MethodNotFound",
    "export",
    "exportstream",
    "grpc_status_for",
    "invoke",
    "invoke_streaming",
    "memory_stream_pair",
]
