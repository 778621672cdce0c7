"""Router stream framing (protocol-facts §4): byte streams carried by ``RouterService.Stream``.

The same framing serves three places:

- tunnels (§3.6), the client's side: :func:`bridge_to_router` pumps a local connection (a
  client's accepted connection) through the router, in the *client* role of the Stream RPC;
- tunnels, the exporter's side: :func:`serve_tunnel` answers the tunnel's HTTP/2 connection
  in-process (wire/h2server.py), also in the client role of the Stream RPC;
- driver byte streams (§5.4): :func:`serve_byte_stream` is the body of the exporter session's
  ``RouterService.Stream`` handler, in the *server* role, pumping a driver ``ByteStream``.

Frames: a chunk of bytes (at most 64 KiB read from a local side; at most 256 KiB of what
serve_tunnel's HTTP/2 side produced) is one DATA frame (``frame_type`` 0, i.e. omitted);
end of the local data is one GOAWAY frame (empty payload), followed in the client role by
gRPC half-close. On receipt DATA delivers its payload, GOAWAY or the end of the message stream
means end of data, PING and unknown types are ignored, and RST_STREAM aborts the stream.

Memory stays flat: each direction is one task that awaits the write on one side before it
reads the next chunk from the other, so the local socket's buffers, HTTP/2 flow control and
the ByteStream's own back-pressure are the only buffers. Each function owns its tasks and
ends them before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
import grpc.aio
import structlog

from jumpstarter_exporter._proto.jumpstarter.v1 import router_pb2
from jumpstarter_exporter.wire import h2server

log = structlog.get_logger("jumpstarter.frames")

CHUNK = 64 * 1024  # bytes read from the local side per DATA frame
TUNNEL_FRAME = 256 * 1024  # at most this per DATA frame from serve_tunnel (see write_frames)
DATA = router_pb2.FRAME_TYPE_DATA
GOAWAY = router_pb2.FRAME_TYPE_GOAWAY
RST_STREAM = router_pb2.FRAME_TYPE_RST_STREAM
PING = router_pb2.FRAME_TYPE_PING

ROUTER_STREAM_METHOD = "/jumpstarter.v1.RouterService/Stream"


class TunnelError(ConnectionError):
    """A tunnel that ended abnormally: the router was unreachable or refused the token, the
    RPC failed before the peer said goodbye, the peer reset the stream, or the local
    connection failed. The cause is chained (``__cause__``)."""


class _PeerReset(Exception):
    """An RST_STREAM frame arrived: the peer aborts the stream."""


# --- tunnels: the client role ----------------------------------------------------------------


async def bridge_to_router(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    channel: grpc.aio.Channel,
    token: str,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - bounds set-up and teardown, not the tunnel
) -> None:
    """Bridge a local connection through the router until both directions have ended.

    Opens ``RouterService.Stream`` on ``channel`` with the single metadata entry
    ``authorization: Bearer <token>`` (as upstream; use a TLS channel, the token is a
    credential) and pumps bytes both ways with §4 framing. The bridge owns ``reader`` and
    ``writer``: the writer is closed whenever the function returns, raises or is cancelled.

    Local EOF sends GOAWAY and half-closes the RPC; the peer's GOAWAY (or the end of the
    response stream) becomes a write-EOF on the local connection, which stays readable.

    Returns normally when the tunnel closed cleanly: the router ended the RPC with OK, or
    both sides sent GOAWAY, or the peer said goodbye (GOAWAY) and the RPC ended afterwards
    in whatever way (the peer is gone; nothing was lost that it wanted to send). If the
    router has not ended the RPC ``timeout`` seconds after both sides sent GOAWAY, the RPC
    is cancelled and the bridge returns normally.

    Raises :class:`TunnelError` (never logs it; the caller decides how loud a broken tunnel
    is) when the channel is not connected within ``timeout`` seconds, the RPC fails before
    the peer's GOAWAY (token refused, router or peer gone), an RST_STREAM frame arrives, or
    the local connection fails; the other direction is stopped and the RPC cancelled first.
    Cancelling the caller's task cancels the RPC (the router then ends the peer's side).
    """
    try:
        call = _open_stream(channel, token)
        await _Bridge(reader, writer, channel, call, timeout).run()
    finally:
        await _close_writer(writer, timeout)


def _open_stream(channel: grpc.aio.Channel, token: str) -> grpc.aio.StreamStreamCall:
    """``RouterService.Stream`` with the router token, as upstream sends it: the single
    metadata entry ``authorization: Bearer <token>`` (a credential: use a TLS channel)."""
    stream = channel.stream_stream(
        ROUTER_STREAM_METHOD,
        request_serializer=router_pb2.StreamRequest.SerializeToString,
        response_deserializer=router_pb2.StreamResponse.FromString,
    )
    return stream(metadata=(("authorization", f"Bearer {token}"),))


class _Bridge:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        channel: grpc.aio.Channel,
        call: grpc.aio.StreamStreamCall,
        timeout: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.channel = channel
        self.call = call
        self.timeout = timeout
        self.sent_goaway = False  # local EOF forwarded and the RPC half-closed
        self.got_goaway = False  # the peer said it sends nothing more
        self.lingered = False  # the router kept a finished RPC open too long: we cancelled it
        self._linger: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        up = asyncio.ensure_future(self._local_to_router())
        down = asyncio.ensure_future(self._router_to_local())
        guard = asyncio.ensure_future(asyncio.wait_for(self.channel.channel_ready(), self.timeout))
        try:
            pending: set[asyncio.Future] = {up, down, guard}
            while not down.done():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if guard in done and guard.exception() is not None:
                    raise TunnelError(
                        f"router not reachable within {self.timeout:g} s "
                        f"(channel {self.channel.get_state().name})"
                    )
                if up in done and (exc := up.exception()) is not None:
                    if not isinstance(exc, grpc.aio.AioRpcError | asyncio.InvalidStateError):
                        raise self._error(exc)  # the local side failed; finally stops the RPC
                    # The RPC ended under a write; the receiving side learns how.
                    await asyncio.gather(down, return_exceptions=True)
            exc = None if down.cancelled() else down.exception()
            if exc is not None and not self.got_goaway:
                raise self._error(exc)
            # Ended cleanly. If the local side still had data, the peer is gone: drop it.
        finally:
            if self._linger is not None:
                self._linger.cancel()
            for task in (up, down, guard):
                task.cancel()
            await asyncio.gather(up, down, guard, return_exceptions=True)
            self.call.cancel()  # a no-op once the RPC has ended

    @staticmethod
    def _error(cause: BaseException) -> TunnelError:
        if isinstance(cause, grpc.aio.AioRpcError):
            error = TunnelError(f"router stream failed: {cause.code().name}: {cause.details()}")
        elif isinstance(cause, _PeerReset):
            error = TunnelError("the peer reset the stream (RST_STREAM)")
        elif isinstance(cause, asyncio.CancelledError):
            error = TunnelError("the router stream was cancelled")
        else:
            error = TunnelError(f"local connection failed: {cause!r}")
        error.__cause__ = cause
        return error

    async def _local_to_router(self) -> None:
        while chunk := await self.reader.read(CHUNK):
            await self.call.write(router_pb2.StreamRequest(payload=chunk))
        await self.call.write(router_pb2.StreamRequest(frame_type=GOAWAY))
        await self.call.done_writing()
        self.sent_goaway = True
        self._arm_linger()

    async def _router_to_local(self) -> None:
        while True:
            try:
                frame = await self.call.read()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self.lingered and task is not None and task.cancelling() == 0:
                    return
                raise
            if frame is grpc.aio.EOF:
                break
            if frame.frame_type == DATA:
                if self.got_goaway:
                    log.debug("tunnel: data after GOAWAY ignored", size=len(frame.payload))
                elif frame.payload:
                    self.writer.write(frame.payload)
                    await self.writer.drain()
            elif frame.frame_type == GOAWAY:
                self._peer_goodbye()
            elif frame.frame_type == RST_STREAM:
                raise _PeerReset()
            else:
                log.debug("tunnel: frame ignored", frame_type=frame.frame_type)
        self._peer_goodbye()

    def _peer_goodbye(self) -> None:
        if self.got_goaway:
            return
        self.got_goaway = True
        if self.writer.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                self.writer.write_eof()
        self._arm_linger()

    def _arm_linger(self) -> None:
        if self.sent_goaway and self.got_goaway and self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(self.timeout, self._give_up)

    def _give_up(self) -> None:
        self.lingered = True
        self.call.cancel()


async def serve_tunnel(
    channel: grpc.aio.Channel,
    token: str,
    handlers: h2server.Handlers,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - bounds set-up and teardown, not the tunnel
) -> None:
    """Serve gRPC calls (``handlers``) on a tunnel: the HTTP/2 connection a client opened
    through the router is answered right here, in the client role of the Stream RPC, with
    no local socket in between (see wire/h2server.py for why).

    Same contract as :func:`bridge_to_router`: the peer's GOAWAY (or the end of the
    response stream) ends the connection's input, its calls end, what they sent is flushed,
    then GOAWAY and half-close go out. Raises :class:`TunnelError` when the router is not
    reachable within ``timeout``, the RPC fails before the peer's goodbye, or the peer
    resets the stream. Cancelling the caller cancels the RPC and every call on it.
    """
    call = _open_stream(channel, token)
    conn = h2server.H2GrpcConnection(handlers, lambda data: write_frames(call, data), peer="router")
    got_goaway = False

    async def receive() -> None:
        nonlocal got_goaway
        try:
            while (frame := await call.read()) is not grpc.aio.EOF:
                if frame.frame_type == DATA:
                    if frame.payload and not got_goaway:
                        conn.feed(frame.payload)
                elif frame.frame_type == GOAWAY:
                    got_goaway = True
                    conn.feed_eof()
                elif frame.frame_type == RST_STREAM:
                    raise _PeerReset()
            got_goaway = True
        finally:
            conn.feed_eof()

    served = asyncio.ensure_future(conn.serve())
    received = asyncio.ensure_future(receive())
    guard = asyncio.ensure_future(asyncio.wait_for(channel.channel_ready(), timeout))
    try:
        pending: set[asyncio.Future] = {served, received, guard}
        while not served.done():
            _done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if guard.done() and guard.exception() is not None:
                raise TunnelError(
                    f"router not reachable within {timeout:g} s "
                    f"(channel {channel.get_state().name})"
                )
            if received.done() and (exc := received.exception()) is not None and not got_goaway:
                raise _Bridge._error(exc)
        if (exc := served.exception()) is not None and not got_goaway:
            raise _Bridge._error(exc)
        if served.exception() is None:
            # Goodbye, as the bridge says it: GOAWAY, half-close, then the router ends it.
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.write(router_pb2.StreamRequest(frame_type=GOAWAY))
                await call.done_writing()
            # However the RPC ends now (OK, or an error racing our half-close), both sides
            # said goodbye: nothing is lost, so it is not an error.
            await asyncio.wait({received}, timeout=timeout)
    finally:
        for task in (served, received, guard):
            task.cancel()
        await asyncio.gather(served, received, guard, return_exceptions=True)
        call.cancel()  # a no-op once the RPC has ended


async def write_frames(call: Any, data: bytes) -> None:
    """Send ``data`` as DATA frames of at most TUNNEL_FRAME bytes each.

    What the HTTP/2 side produced between two writes goes out together (fewer frames), but
    one frame must stay well under gRPC's default 4 MiB message limit, which upstream's Go
    router and every gRPC client apply to the frames they receive."""
    if len(data) <= TUNNEL_FRAME:
        await call.write(router_pb2.StreamRequest(payload=data))
        return
    view = memoryview(data)
    for offset in range(0, len(view), TUNNEL_FRAME):
        piece = bytes(view[offset : offset + TUNNEL_FRAME])
        await call.write(router_pb2.StreamRequest(payload=piece))


async def _close_writer(writer: asyncio.StreamWriter, seconds: float) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), seconds)


# --- driver byte streams: the server role ----------------------------------------------------


class _ClientGone(Exception):
    """Reading from or writing to the client's call failed: the RPC is over."""


class _StreamFailed(Exception):
    """The ByteStream raised."""


async def serve_byte_stream(
    stream: Any,
    context: grpc.aio.ServicerContext,
    *,
    initial_metadata: Iterable[tuple[str, str]] = (),
    close_timeout: float = 10.0,
) -> None:
    """Serve ``stream`` (a ByteStream) on a ``RouterService.Stream`` call, the server role.

    Sends ``initial_metadata`` (normally empty) before anything else, then pumps: client
    DATA → ``stream.write``; client GOAWAY or half-close → ``stream.send_eof()`` (a stream
    that cannot half-close, NotImplementedError, is left as is; a bare half-close is passed
    on only after a 0.1 s grace, because a client's cancel first reads as a half-close and
    must not make a cut-off upload look complete); ``stream.read`` → DATA
    frames; ``b""`` → one GOAWAY frame. Returns once both directions ended, which ends the
    RPC with OK (upstream keeps it open until the client cancels; §9.1).

    The function owns ``stream``: ``aclose()`` is always awaited (bounded by ``close_timeout``)
    before it returns, raises or propagates cancellation, so a caller that also closes the
    stream (e.g. through the driver's context manager) needs an idempotent ``aclose``.

    Errors: a client that cancels makes the handler's task cancelled, which stops both
    directions and closes the stream (CancelledError propagates, as gRPC expects). A
    ByteStream that raises ends the RPC with ``context.abort``: ConnectionError →
    UNAVAILABLE, TimeoutError → DEADLINE_EXCEEDED, other OSError → INTERNAL, ValueError →
    INVALID_ARGUMENT, NotImplementedError → UNIMPLEMENTED, anything else → UNKNOWN (logged
    at warning). An RST_STREAM frame from the client ends the RPC with ABORTED. A call that
    broke under us (read/write failed) ends quietly.

    The RPC is ended while the task reading from the client may still be waiting in
    ``context.read()``; that read is cancelled only afterwards. Cancelling it first and
    then sending the status collides in gRPC core (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS), as
    in controller/router.py.
    """
    to_client: asyncio.Future | None = None
    to_stream: asyncio.Future | None = None
    closed = False
    try:
        await context.send_initial_metadata(tuple(initial_metadata))
        to_client = asyncio.ensure_future(_stream_to_client(stream, context))
        to_stream = asyncio.ensure_future(_client_to_stream(context, stream))
        pending: set[asyncio.Future] = {to_client, to_stream}
        failure: BaseException | None = None
        while pending and failure is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failure = next((t.exception() for t in done if t.exception() is not None), None)
        if failure is None:
            return
        # Stop the device side (plain asyncio, safe to cancel) and close the stream; the
        # client side is ended by ending the call, below.
        to_client.cancel()
        await asyncio.gather(to_client, return_exceptions=True)
        closed = True
        await _aclose(stream, close_timeout)
        if isinstance(failure, _ClientGone):
            log.debug("byte stream: client call broke", error=repr(failure.__cause__))
            return
        if isinstance(failure, _PeerReset):
            await context.abort(grpc.StatusCode.ABORTED, "stream reset by the client")
        cause = failure.__cause__ or failure
        code = _status_code(cause)
        details = str(cause) or type(cause).__name__
        log.warning("byte stream failed", error=repr(cause), code=code.name)
        await context.abort(code, details)
    finally:
        for task in (to_client, to_stream):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (to_client, to_stream) if t is not None), return_exceptions=True
        )
        if not closed:
            await _aclose(stream, close_timeout)


async def _stream_to_client(stream: Any, context: grpc.aio.ServicerContext) -> None:
    while True:
        try:
            chunk = await stream.read(CHUNK)
        except Exception as exc:  # any driver error ends the RPC with a status
            raise _StreamFailed() from exc
        frame = router_pb2.StreamResponse(payload=bytes(chunk)) if chunk else _GOAWAY_RESPONSE
        try:
            await context.write(frame)
        except Exception as exc:  # the call is over, whatever gRPC says
            raise _ClientGone() from exc
        if not chunk:
            return


async def _client_to_stream(context: grpc.aio.ServicerContext, stream: Any) -> None:
    while True:
        try:
            frame = await context.read()
        except Exception as exc:  # the call is over, whatever gRPC says
            raise _ClientGone() from exc
        if frame is grpc.aio.EOF:
            # A client's cancel also reads as EOF here, a moment before the cancel itself
            # arrives; passing it on as EOF would make a cut-off upload look complete.
            await asyncio.sleep(_HALF_CLOSE_GRACE)
            if context.cancelled():
                raise _ClientGone()
            break
        if frame.frame_type == GOAWAY:
            break
        if frame.frame_type == DATA:
            if frame.payload:
                try:
                    await stream.write(frame.payload)
                except Exception as exc:  # any driver error ends the RPC
                    raise _StreamFailed() from exc
        elif frame.frame_type == RST_STREAM:
            raise _PeerReset()
        else:
            log.debug("byte stream: frame ignored", frame_type=frame.frame_type)
    try:
        await stream.send_eof()
    except NotImplementedError:
        log.debug("byte stream: the stream cannot half-close; EOF not passed on")
    except Exception as exc:  # any driver error ends the RPC
        raise _StreamFailed() from exc


_GOAWAY_RESPONSE = router_pb2.StreamResponse(frame_type=GOAWAY)
# How long a bare half-close (no GOAWAY frame first) waits to be sure it is not a cancel.
# Upstream clients always send GOAWAY first, so they never wait.
_HALF_CLOSE_GRACE = 0.1


async def _aclose(stream: Any, seconds: float) -> None:
    try:
        await asyncio.wait_for(stream.aclose(), seconds)
    except TimeoutError:
        log.warning("byte stream: aclose timed out", seconds=seconds)
    except Exception as exc:  # noqa: BLE001 - closing must not hide the original outcome
        log.warning("byte stream: aclose failed", error=repr(exc))


def _status_code(exc: BaseException) -> grpc.StatusCode:
    """§5.2's mapping (upstream HEAD) of a driver exception to a status code."""
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, ConnectionError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, OSError):
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.UNKNOWN


# --- the ``request`` metadata of a byte stream -----------------------------------------------


def parse_stream_request(
    metadata: Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]],
) -> dict[str, Any]:
    """The ``request`` metadata of a byte-stream call (§5.4), validated and normalised.

    ``metadata`` is a mapping or the call's ``(key, value)`` pairs. Returns
    ``{"kind": "driver", "uuid": <canonical uuid str>, "method": <str>}`` or
    ``{"kind": "resource", "uuid": ..., "x_jmp_content_encoding": <str or None>}``; other
    keys are ignored, as upstream's pydantic models do. Raises ValueError naming the problem.
    """
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    values = [value for key, value in items if key.lower() == "request"]
    if not values:
        raise ValueError("missing 'request' metadata (the JSON description of the stream)")
    if len(values) > 1:
        raise ValueError("more than one 'request' metadata entry")
    text = values[0]
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"'request' metadata is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("'request' metadata must be a JSON object")
    kind = data.get("kind")
    if kind not in ("driver", "resource"):
        raise ValueError(f"'request' metadata: unknown kind {kind!r} (expected driver or resource)")
    raw_uuid = data.get("uuid")
    try:
        if not isinstance(raw_uuid, str):
            raise ValueError
        driver_uuid = str(uuid.UUID(raw_uuid))
    except ValueError:
        raise ValueError(f"'request' metadata: uuid {raw_uuid!r} is not a UUID") from None
    if kind == "driver":
        method = data.get("method")
        if not isinstance(method, str) or not method:
            raise ValueError(f"'request' metadata: method {method!r} is not a method name")
        return {"kind": "driver", "uuid": driver_uuid, "method": method}
    encoding = data.get("x_jmp_content_encoding")
    if encoding is not None and not isinstance(encoding, str):
        raise ValueError(
            f"'request' metadata: x_jmp_content_encoding {encoding!r} is not a string or null"
        )
    return {"kind": "resource", "uuid": driver_uuid, "x_jmp_content_encoding": encoding}
