"""Synchronous driver clients on an exporter session channel (protocol-facts §5, §6).

A driver is reached through its uuid from GetReport. Calls are positional (DriverCall /
StreamingDriverCall); a byte stream (serial ``connect``) is ``RouterService.Stream`` on the
same channel with the ``request`` metadata (§5.4), framed as in §4.

Every method that touches the network has a timeout. Failures become the client's own errors
(``DriverCallFailed`` with the gRPC status name, ``DriverNotFound`` for NOT_FOUND).
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc

from jumpstarter_exporter._proto.jumpstarter.v1 import jumpstarter_pb2, router_pb2
from jumpstarter_exporter.client.errors import (
    ClientUnavailable,
    DriverCallFailed,
    DriverNotFound,
    ExporterNotReady,
)
from jumpstarter_exporter.wire import values

if TYPE_CHECKING:
    from jumpstarter_exporter.client.board import Board

CALL_TIMEOUT = 60.0  # a driver call; cycling or flashing can take a while
STREAM_METHOD = "/jumpstarter.v1.RouterService/Stream"
# Kept from the serial line while nobody reads it; older bytes are dropped first.
SERIAL_BUFFER_LIMIT = 16 * 1024 * 1024


def call_error(exc: grpc.RpcError, what: str) -> Exception:
    """The client error for a failed call on the exporter session."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.NOT_FOUND:
        return DriverNotFound(f"{what}: {details}")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return ExporterNotReady(f"{what}: {details}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ClientUnavailable(f"{what}: the exporter did not answer ({code.name}: {details})")
    return DriverCallFailed(f"{what} failed: {code.name}: {details}", code.name)


class DriverClient:
    """Any driver: generic calls by method name. Subclasses add typed helpers."""

    def __init__(
        self,
        board: Board,
        path: str,
        uuid: str,
        client_class: str,
        description: str = "",
        methods: dict[str, str] | None = None,
    ) -> None:
        self._board = board
        self.path = path
        self.uuid = uuid
        self.client_class = client_class
        self.description = description
        self.methods = dict(methods or {})

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} ({self.client_class})>"

    def call(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        """DriverCall ``method(*args)``; returns the decoded result (numbers as float)."""
        self._board.check_allowed(self)
        request = jumpstarter_pb2.DriverCallRequest(
            uuid=self.uuid, method=method, args=values.to_values(args)
        )
        try:
            response = self._board.stub.DriverCall(
                request, timeout=timeout, metadata=self._board.metadata
            )
        except grpc.RpcError as exc:
            raise call_error(exc, f"{self.path}.{method}") from None
        return values.from_value(response.result)

    def streaming_call(
        self, method: str, *args: Any, timeout: float = CALL_TIMEOUT
    ) -> Iterator[Any]:
        """StreamingDriverCall ``method(*args)``: the decoded items as they arrive."""
        self._board.check_allowed(self)
        request = jumpstarter_pb2.StreamingDriverCallRequest(
            uuid=self.uuid, method=method, args=values.to_values(args)
        )
        responses = self._board.stub.StreamingDriverCall(
            request, timeout=timeout, metadata=self._board.metadata
        )
        try:
            for response in responses:
                yield values.from_value(response.result)
        except grpc.RpcError as exc:
            raise call_error(exc, f"{self.path}.{method}") from None
        finally:
            responses.cancel()

    def open_stream(self, method: str = "connect") -> ByteStream:
        """A byte stream (``@exportstream`` method, e.g. serial ``connect``)."""
        self._board.check_allowed(self)
        return ByteStream(self._board, self, method)


class PowerClient(DriverClient):
    """Upstream's power interface: on/off (DriverCall), read (streaming), cycle client-side."""

    def on(self) -> None:
        self.call("on")

    def off(self) -> None:
        self.call("off")

    def cycle(self, wait: float = 1.0) -> None:
        """Off, wait, on, done here (as upstream's client does), so it works with every
        power driver, including upstream's which have no server-side cycle."""
        self.off()
        time.sleep(wait)
        self.on()

    def read(self, timeout: float = CALL_TIMEOUT) -> list[dict[str, float]]:
        """The readings the driver reports: ``[{"voltage": V, "current": A}, ...]``."""
        return list(self.streaming_call("read", timeout=timeout))


class ByteStream:
    """A full-duplex byte stream to a driver over ``RouterService.Stream``.

    A reader thread moves device bytes into a buffer; ``read``/``expect`` take from it.
    ``write`` queues frames for the request iterator gRPC consumes. ``close`` sends GOAWAY,
    half-closes, and cancels the call if the exporter does not end it.
    """

    def __init__(self, board: Board, driver: DriverClient, method: str) -> None:
        self.driver = driver
        self._outgoing: queue.Queue[bytes | None] = queue.Queue()
        self._buffer = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._error: Exception | None = None
        request = json.dumps(
            {"kind": "driver", "uuid": driver.uuid, "method": method}, separators=(",", ":")
        )
        stream = board.channel.stream_stream(
            STREAM_METHOD,
            request_serializer=router_pb2.StreamRequest.SerializeToString,
            response_deserializer=router_pb2.StreamResponse.FromString,
        )
        self._call = stream(self._requests(), metadata=(*board.metadata, ("request", request)))
        self._reader = threading.Thread(
            target=self._read_loop, name=f"jmp-stream-{driver.path}", daemon=True
        )
        self._reader.start()

    def _requests(self) -> Iterator[router_pb2.StreamRequest]:
        while True:
            chunk = self._outgoing.get()
            if chunk is None:
                yield router_pb2.StreamRequest(frame_type=router_pb2.FRAME_TYPE_GOAWAY)
                return
            yield router_pb2.StreamRequest(payload=chunk)

    def _read_loop(self) -> None:
        try:
            for frame in self._call:
                if frame.frame_type == router_pb2.FRAME_TYPE_GOAWAY:
                    break
                if frame.frame_type == router_pb2.FRAME_TYPE_RST_STREAM:
                    raise DriverCallFailed(f"{self.driver.path}: the exporter reset the stream")
                if frame.frame_type == router_pb2.FRAME_TYPE_DATA and frame.payload:
                    with self._cond:
                        self._buffer += frame.payload
                        overflow = len(self._buffer) - SERIAL_BUFFER_LIMIT
                        if overflow > 0:
                            del self._buffer[:overflow]
                        self._cond.notify_all()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self._error = call_error(exc, f"{self.driver.path} stream")
        except DriverCallFailed as exc:
            self._error = exc
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    @property
    def eof(self) -> bool:
        """True once the exporter ended the stream and the buffer is empty."""
        with self._cond:
            return self._eof and not self._buffer

    def write(self, data: bytes) -> None:
        if self._eof:
            raise self._error or DriverCallFailed(f"{self.driver.path}: the stream is closed")
        for start in range(0, len(data), 64 * 1024):
            self._outgoing.put(bytes(data[start : start + 64 * 1024]))

    def read(self, timeout: float = 1.0, size: int = -1) -> bytes:
        """What arrived so far (waiting up to ``timeout`` s for the first byte); ``b""`` at
        end of stream or when nothing came in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._buffer and not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if not self._buffer and self._error is not None:
                raise self._error
            take = len(self._buffer) if size < 0 else min(size, len(self._buffer))
            data = bytes(self._buffer[:take])
            del self._buffer[:take]
            return data

    def expect(self, pattern: bytes | re.Pattern[bytes], timeout: float = 30.0) -> bytes:
        """Wait for ``pattern`` (bytes, or a compiled bytes regex); return the bytes up to and
        including the match and consume them. TimeoutError says what was seen instead."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        shown = regex.pattern if isinstance(pattern, re.Pattern) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                match = regex.search(self._buffer)
                if match is not None:
                    data = bytes(self._buffer[: match.end()])
                    del self._buffer[: match.end()]
                    return data
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    seen = bytes(self._buffer[-400:])
                    why = "the stream ended" if self._eof else f"{timeout:g} s passed"
                    if self._error is not None:
                        why += f" ({self._error})"
                    raise TimeoutError(
                        f"{self.driver.path}: {shown!r} not seen before {why}; "
                        f"last {len(seen)} bytes seen: {seen!r}"
                    )
                self._cond.wait(left)

    def close(self, grace: float = 0.5, timeout: float = 5.0) -> None:
        """Send GOAWAY and half-close; cancel the call if the exporter keeps it open.

        The grace is short on purpose: a serial port has no end of its own (a pty never
        reads EOF), so the exporter keeps the device→client direction open after our GOAWAY
        and waiting longer only delays every release (the lab saw 5 s per lease).
        """
        self._outgoing.put(None)
        self._reader.join(grace)
        self._call.cancel()
        self._reader.join(timeout)


class SerialClient(DriverClient):
    """A serial console (upstream's PySerial interface: the ``connect`` byte stream).

    The stream is opened on first use and kept open until ``close()`` (or the end of the
    lease), so nothing the device prints between two ``expect`` calls is lost.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stream: ByteStream | None = None
        self._lock = threading.Lock()

    @property
    def stream(self) -> ByteStream:
        with self._lock:
            if self._stream is None or self._stream.eof:
                self._stream = self.open_stream("connect")
            return self._stream

    def write(self, data: bytes) -> None:
        self.stream.write(data)

    def read(self, timeout: float = 1.0) -> bytes:
        return self.stream.read(timeout)

    def expect(self, pattern: bytes | re.Pattern[bytes], timeout: float = 30.0) -> bytes:
        return self.stream.expect(pattern, timeout)

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None


# Which Python class serves which upstream client class (the ``jumpstarter.dev/client`` label).
CLIENT_CLASSES: dict[str, type[DriverClient]] = {
    "jumpstarter_driver_power.client.PowerClient": PowerClient,
    "jumpstarter_driver_pyserial.client.PySerialClient": SerialClient,
}

__all__ = ["CLIENT_CLASSES", "ByteStream", "DriverClient", "PowerClient", "SerialClient"]
