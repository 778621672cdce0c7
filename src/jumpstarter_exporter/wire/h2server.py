"""A gRPC server for one HTTP/2 connection whose bytes arrive by any transport.

Why this exists: a client reaches a leased exporter through a router tunnel, i.e. the bytes
of one HTTP/2 connection carried in ``RouterService.Stream`` frames (protocol-facts §3.6,
§4). Upstream (and this project before) bridged each tunnel onto a local Unix socket where a
second gRPC server parsed the same HTTP/2 again: every call crossed the socket twice and two
gRPC cores. Here the tunnel's bytes are fed straight into an HTTP/2 server state machine
(the ``h2`` package) and the calls are dispatched to the same servicer objects that
``grpc.aio`` would run (benchmarks/README.md, finding 2). The session's Unix socket for
hooks is served the same way, so one server implementation carries every lease-mode call.

What is implemented is what gRPC clients (C-core, as upstream's Python client) need:
unary and streaming methods in both directions, initial metadata, ``grpc-status`` /
``grpc-message`` trailers (trailers-only when no message was sent), ``grpc-timeout``,
cancellation by RST_STREAM, HTTP/2 flow control in both directions (a handler that does not
read stops the client's sending: nothing queues without bound), PING (answered by h2), a
client's GOAWAY (the connection's input ends, its calls are cancelled) and a GOAWAY naming
the error when the client breaks the protocol. Not implemented: message compression (a
compressed message ends the call with UNIMPLEMENTED; we never advertise an encoding, so
clients do not compress) and interceptors. The gRPC over HTTP/2 wire format:
grpc/grpc doc/PROTOCOL-HTTP2.md.

The servicer objects see a :class:`Context` with the part of ``grpc.aio.ServicerContext``
they use: ``abort``, ``set_code``/``set_details``, ``invocation_metadata``, ``read``,
``write``, ``send_initial_metadata``, ``set_trailing_metadata``, ``cancelled``, ``peer``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import quote

import grpc
import grpc.aio
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import structlog

log = structlog.get_logger("jumpstarter.h2server")

# Receive side: each stream may hold this much unread data before the client must wait
# (HTTP/2 flow control, RFC 9113 §5.2); the connection window covers 16 such streams.
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
# Complete messages a handler has not read yet: above this, received bytes are not handed
# back to the client's window, so a slow handler (a full pty) slows the client.
QUEUED_LIMIT = 1 << 20
MAX_CONCURRENT_STREAMS = 100
MAX_MESSAGE = 4 << 20  # gRPC's default receive limit
# A response message at least this large waits for the transport (see Context.write).
BULK = 4096
# Larger DATA frames than HTTP/2's 16 KiB default: fewer frames (and h2 events) per MiB.
MAX_FRAME = 1 << 20

_PREFIX = struct.Struct(">BI")
_RESERVED = frozenset({"te", "content-type", "user-agent", "grpc-timeout", "grpc-encoding"})
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_EOF = grpc.aio.EOF
# grpc-message is percent-encoded except printable ASCII other than "%" (PROTOCOL-HTTP2.md).
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class Handlers:
    """The methods one server answers, collected from generated ``add_*Servicer_to_server``
    functions (which call ``add_generic_rpc_handlers`` on what they are given)."""

    def __init__(self) -> None:
        self._generic: list[grpc.GenericRpcHandler] = []
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)
        self._cache.clear()

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        pass  # the generic handlers above carry the same methods

    def lookup(self, method: str) -> grpc.RpcMethodHandler | None:
        found = self._cache.get(method)
        if found is None:
            details = _CallDetails(method, ())
            for generic in self._generic:
                found = generic.service(details)
                if found is not None:
                    self._cache[method] = found  # only methods that exist: paths are input
                    break
        return found


class _CallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str, invocation_metadata: tuple) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _StreamGone(ConnectionError):
    """The client reset the stream or the connection ended: the call is over."""


class Context:
    """What a servicer method sees of its call (a subset of ``grpc.aio.ServicerContext``)."""

    def __init__(self, conn: H2GrpcConnection, stream_id: int, metadata: tuple, peer: str):
        self._conn = conn
        self._id = stream_id
        self._metadata = metadata
        self._peer = peer
        self._messages: deque[bytes] = deque()
        self._arrived = asyncio.Event()
        self._remote_ended = False
        self._cancelled = False
        self._headers_sent = False
        self._ended = False
        self._initial: list[tuple[str, str]] = []
        self._trailing: list[tuple[str, str]] = []
        self._queued = 0  # bytes of complete messages not read yet
        self._unacked = 0  # flow-controlled bytes received but not handed back yet
        self._partial = bytearray()
        self._window_open = asyncio.Event()
        self._task: asyncio.Task | None = None
        # set_code/set_details (generated servicer bases use them for UNIMPLEMENTED).
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self.request_deserializer: Callable[[bytes], Any] | None = None
        self.response_serializer: Callable[[Any], bytes] | None = None

    # --- the servicer-facing surface ----------------------------------------------------

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def cancelled(self) -> bool:
        return self._cancelled

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        if trailing_metadata:
            self.set_trailing_metadata(trailing_metadata)
        raise _Abort(code, details)

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        self._trailing = _encode_metadata(metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    async def send_initial_metadata(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        if self._headers_sent:
            raise RuntimeError("initial metadata already sent")
        self._initial = _encode_metadata(metadata)
        self._send_headers()
        self._conn.flush()

    async def read(self) -> Any:
        """The next request message, or ``grpc.aio.EOF`` once the client half-closed."""
        data = await self._next_message()
        if data is None:
            return _EOF
        assert self.request_deserializer is not None
        return self.request_deserializer(data)

    async def write(self, message: Any) -> None:
        assert self.response_serializer is not None
        payload = self.response_serializer(message)
        await self._send_message(payload)
        if len(payload) >= BULK:
            # Bulk data (a console transfer) waits until the transport took it: meanwhile
            # the source gathers more, so the next message is larger. Fewer, larger messages
            # cost every hop less (the client pays per message); small ones (an echo, a
            # reading, a unary answer) go on at once.
            await self._conn.drained()

    # --- receiving ------------------------------------------------------------------------

    def _data(self, data: bytes, flow_controlled: int) -> None:
        self._unacked += flow_controlled
        self._partial += data
        while len(self._partial) >= 5:
            compressed, size = _PREFIX.unpack_from(self._partial)
            if size > MAX_MESSAGE:
                self._conn.fail_stream(
                    self, grpc.StatusCode.RESOURCE_EXHAUSTED, f"message of {size} bytes"
                )
                self._release()
                return
            if len(self._partial) < 5 + size:
                break
            if compressed:
                self._conn.fail_stream(
                    self, grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not supported"
                )
                self._release()
                return
            self._messages.append(bytes(self._partial[5 : 5 + size]))
            del self._partial[: 5 + size]
            self._queued += 5 + size
        self._ack()
        self._arrived.set()

    def _ack(self) -> None:
        # Received bytes go back to the client's window while the handler keeps up; once
        # it is QUEUED_LIMIT behind, they wait until it reads (at most that plus a window
        # is ever held for one call).
        if self._unacked and self._queued < QUEUED_LIMIT:
            self._conn.acknowledge(self._id, self._unacked)
            self._unacked = 0

    def _release(self) -> None:
        """The call is over: what it still owes the client's windows goes back, or the
        connection's window would shrink with every call that ended with data unread."""
        if self._unacked:
            self._conn.acknowledge(self._id, self._unacked)
            self._unacked = 0
            self._conn.flush()

    def _remote_end(self) -> None:
        self._remote_ended = True
        self._arrived.set()

    def _cancel(self) -> None:
        """The client reset the call or the connection ended: stop the handler (as grpc
        does, by cancelling its task) and wake whatever it waits for."""
        self._cancelled = True
        self._arrived.set()
        self._window_open.set()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def _next_message(self) -> bytes | None:
        while not self._messages:
            if self._cancelled:
                raise _StreamGone("the call was cancelled")
            if self._remote_ended:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        data = self._messages.popleft()
        self._queued -= 5 + len(data)
        if self._unacked:
            self._ack()
            self._conn.flush()
        return data

    async def _requests(self) -> AsyncIterator[Any]:
        while (message := await self.read()) is not _EOF:
            yield message

    # --- sending ------------------------------------------------------------------------

    def _send_headers(self) -> None:
        headers = [(":status", "200"), ("content-type", "application/grpc"), *self._initial]
        self._conn.send_headers(self._id, headers, end_stream=False)
        self._headers_sent = True

    async def _send_message(self, payload: bytes) -> None:
        if self._cancelled:
            raise _StreamGone("the call was cancelled")
        if not self._headers_sent:
            self._send_headers()
        await self._conn.send_data(self, _PREFIX.pack(0, len(payload)) + payload)

    def _finish(self, code: grpc.StatusCode, details: str) -> None:
        if self._ended or self._cancelled:
            return
        self._ended = True
        trailers = [("grpc-status", str(code.value[0]))]
        if details:
            trailers.append(("grpc-message", quote(details, safe=_MESSAGE_SAFE)))
        trailers += self._trailing
        if not self._headers_sent:  # trailers-only response
            trailers = [(":status", "200"), ("content-type", "application/grpc"), *trailers]
        self._conn.send_headers(self._id, trailers, end_stream=True)
        if not self._remote_ended:
            # The client may still be sending; it learns the call is over (as grpc does).
            self._conn.reset(self._id, h2.errors.ErrorCodes.NO_ERROR)
        self._conn.flush()


class H2GrpcConnection:
    """The server side of one HTTP/2 connection carrying gRPC calls.

    ``write`` sends bytes towards the client; awaiting it is the transport's back-pressure.
    Feed received bytes with :meth:`feed`, the end of them with :meth:`feed_eof`, and run
    :meth:`serve` until the connection is over. The connection owns one task per call and a
    flusher task; all end before :meth:`serve` returns.
    """

    def __init__(
        self,
        handlers: Handlers,
        write: Callable[[bytes], Awaitable[None]],
        *,
        peer: str = "",
    ) -> None:
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding="utf-8",
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self._h2 = h2.connection.H2Connection(config=config)
        self._handlers = handlers
        self._write = write
        self._peer = peer
        self._calls: dict[int, Context] = {}
        self._tasks: set[asyncio.Task] = set()
        self._dirty = asyncio.Event()
        self._drained = asyncio.Event()  # everything h2 produced has been written
        self._closed = asyncio.Event()  # no more input: EOF, GOAWAY or a protocol error
        self._conn_window = asyncio.Event()
        self._h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
            },
        )
        # h2 applies initial_values as current, so its frame-size limit is set by hand.
        self._h2.max_inbound_frame_size = MAX_FRAME
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._dirty.set()

    # --- input --------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self._closed.is_set():
            return
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.debug("h2: protocol error from the client", error=repr(exc))
            self._end_input()
            self.flush()  # h2 queued a GOAWAY naming the error
            return
        for event in events:
            self._event(event)
        self.flush()

    def feed_eof(self) -> None:
        self._end_input()

    def _event(self, event: h2.events.Event) -> None:
        kind = type(event)
        if kind is h2.events.DataReceived:
            call = self._calls.get(event.stream_id)
            if call is not None:
                call._data(event.data, event.flow_controlled_length)
            else:  # a stream we already ended: hand the window back all the same
                self.acknowledge(event.stream_id, event.flow_controlled_length)
            if event.stream_ended is not None and call is not None:
                call._remote_end()
        elif kind is h2.events.RequestReceived:
            self._start_call(event.stream_id, event.headers)
            if event.stream_ended is not None:
                self._calls[event.stream_id]._remote_end()
        elif kind is h2.events.StreamEnded:
            if (call := self._calls.get(event.stream_id)) is not None:
                call._remote_end()
        elif kind is h2.events.StreamReset:
            if (call := self._calls.pop(event.stream_id, None)) is not None:
                call._cancel()
        elif kind is h2.events.WindowUpdated or kind is h2.events.RemoteSettingsChanged:
            self._window_changed()
        elif kind is h2.events.ConnectionTerminated:
            self._end_input()

    def _end_input(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for call in self._calls.values():
            call._cancel()
        self._calls.clear()
        self._window_changed()
        self.flush()  # wakes serve(), which ends once the calls have

    # --- calls --------------------------------------------------------------------------

    def _start_call(self, stream_id: int, headers: list[tuple[str, str]]) -> None:
        path = ""
        metadata: list[tuple[str, str | bytes]] = []
        timeout: float | None = None
        refusal: tuple[grpc.StatusCode, str] | None = None
        for key, value in headers:
            if key == ":path":
                path = value
            elif key == "grpc-timeout":
                timeout = _parse_timeout(value)
            elif key.startswith(":") or key in _RESERVED:
                continue
            elif key.endswith("-bin"):
                try:
                    metadata.append((key, base64.b64decode(value + "=" * (-len(value) % 4))))
                except ValueError:  # binascii.Error: this call is refused, not the connection
                    refusal = (grpc.StatusCode.INVALID_ARGUMENT, f"metadata {key}: not base64")
            else:
                metadata.append((key, value))
        call = Context(self, stream_id, tuple(metadata), self._peer)
        self._calls[stream_id] = call
        task = asyncio.get_running_loop().create_task(self._run_call(call, path, timeout, refusal))
        call._task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_call(
        self,
        call: Context,
        path: str,
        deadline: float | None,
        refusal: tuple[grpc.StatusCode, str] | None = None,
    ) -> None:
        try:
            outcome = refusal or await self._outcome(call, path, deadline)
            if outcome is not None and not self._closed.is_set():
                call._finish(*outcome)
        except asyncio.CancelledError:
            if not call._cancelled:  # the connection is going away, not the call
                raise
        finally:
            if self._calls.get(call._id) is call:
                del self._calls[call._id]
            call._release()

    async def _outcome(
        self, call: Context, path: str, deadline: float | None
    ) -> tuple[grpc.StatusCode, str] | None:
        """The status a call ends with, or None when there is nobody left to tell."""
        handler = self._handlers.lookup(path)
        if handler is None:
            return grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {path}"
        # None means raw bytes, as in grpc (e.g. a handler registered without serializers).
        call.request_deserializer = handler.request_deserializer or _identity
        call.response_serializer = handler.response_serializer or _identity
        try:
            async with asyncio.timeout(deadline):
                await self._dispatch(handler, call)
        except _Abort as exc:
            return exc.code, exc.details
        except TimeoutError:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
        except _StreamGone:
            return None
        except Exception as exc:  # noqa: BLE001 - a servicer's bug is the client's UNKNOWN
            if call._code is not None:  # set_code, then raise: what grpc reports too
                return call._code, call._details
            log.warning("h2: method raised", method=path, error=repr(exc))
            return grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}"
        return call._code or grpc.StatusCode.OK, call._details

    async def _dispatch(self, handler: grpc.RpcMethodHandler, call: Context) -> None:
        if handler.request_streaming:
            request: Any = call._requests()
        else:
            data = await call._next_message()
            if data is None:
                raise _Abort(grpc.StatusCode.INTERNAL, "the request carried no message")
            request = call.request_deserializer(data)
        if handler.request_streaming and handler.response_streaming:
            method = handler.stream_stream
        elif handler.request_streaming:
            method = handler.stream_unary
        elif handler.response_streaming:
            method = handler.unary_stream
        else:
            method = handler.unary_unary
        result = method(request, call)
        if inspect.isasyncgen(result):
            async for item in result:
                await call.write(item)
            return
        response = await result
        if not handler.response_streaming and response is not None:
            await call.write(response)

    def fail_stream(self, call: Context, code: grpc.StatusCode, details: str) -> None:
        """Refuse a call's input (too large, compressed): end it with a status now."""
        call._finish(code, details)
        self._calls.pop(call._id, None)
        call._cancel()

    # --- output -------------------------------------------------------------------------

    def send_headers(self, stream_id: int, headers: list, *, end_stream: bool) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._h2.send_headers(stream_id, headers, end_stream=end_stream)

    def reset(self, stream_id: int, code: h2.errors.ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream_id, code)

    def acknowledge(self, stream_id: int, size: int) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._h2.acknowledge_received_data(size, stream_id)

    async def send_data(self, call: Context, data: bytes) -> None:
        """Send within the client's flow-control windows, waiting for them to open."""
        view = memoryview(data)
        while view:
            if call._cancelled or self._closed.is_set():
                raise _StreamGone("the call ended while sending")
            try:
                window = min(
                    self._h2.local_flow_control_window(call._id), self._h2.max_outbound_frame_size
                )
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                raise _StreamGone("the stream is closed") from None
            if window <= 0:
                call._window_open.clear()
                self._conn_window.clear()
                self.flush()
                await _first(call._window_open, self._conn_window)
                continue
            self._h2.send_data(call._id, view[:window].tobytes())
            view = view[window:]
            self.flush()

    def _window_changed(self) -> None:
        self._conn_window.set()
        for call in self._calls.values():
            call._window_open.set()

    def flush(self) -> None:
        self._dirty.set()
        self._drained.clear()

    async def drained(self) -> None:
        """Wait until what was sent so far has been handed to the transport."""
        await self._drained.wait()

    # --- running --------------------------------------------------------------------------

    async def serve(self) -> None:
        """Send what the calls produce until the input has ended and every call is over;
        cancelling it cancels every call. Raises what ``write`` raises."""
        try:
            while True:
                self._dirty.clear()  # before looking: a flush from now on wakes us again
                data = self._h2.data_to_send()
                if data:
                    await self._write(data)
                    continue
                self._drained.set()
                if not self._closed.is_set():
                    await self._dirty.wait()
                elif self._tasks:
                    await asyncio.wait(set(self._tasks))
                else:
                    return
        finally:
            self._drained.set()  # nobody may wait for a transport that is gone
            self._end_input()
            tasks = set(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _encode_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> list[tuple[str, str]]:
    # -bin values travel base64-encoded (PROTOCOL-HTTP2.md), as grpc's server sends them.
    return [
        (key, _b64(value)) if key.endswith("-bin") else (key, str(value)) for key, value in metadata
    ]


def _b64(value: str | bytes) -> str:
    raw = value if isinstance(value, bytes) else value.encode()
    return base64.b64encode(raw).decode("ascii")


def _identity(data: bytes) -> bytes:
    return data


def _parse_timeout(value: str) -> float | None:
    try:
        return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]
    except (KeyError, ValueError, IndexError):
        return None


async def serve_stream(
    handlers: Handlers, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Serve one connection accepted on a socket (the session's Unix socket for hooks)."""

    async def write(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    conn = H2GrpcConnection(handlers, write, peer="unix:")
    served = asyncio.ensure_future(conn.serve())
    try:
        while data := await reader.read(65536):
            conn.feed(data)
            if served.done():
                break
        conn.feed_eof()
        await served
    except (ConnectionError, OSError) as exc:
        log.debug("h2: socket connection failed", error=repr(exc))
    finally:
        served.cancel()
        await asyncio.gather(served, return_exceptions=True)
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1)
