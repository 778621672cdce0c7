"""Serial console driver, wire-compatible with upstream's ``jumpstarter_driver_pyserial.PySerial``.

``connect`` (a byte stream, protocol-facts §6.2) opens the port for the lifetime of the
stream. Three transports, by ``url``:

- ``loop://``: an in-memory echo (a bounded ``MemoryPipe``), no device involved;
- a device path (``/dev/ttyUSB0``, a pty): opened non-blocking by pyserial (which sets the
  baud rate, custom rates included), then forced raw with termios (8 bits clean, no flow
  control, no echo; HUPCL cleared on request), then read and written directly on the file
  descriptor from the event loop (``add_reader``/``add_writer``): reads of up to 64 KiB,
  writes that wait while the kernel buffer is full (back-pressure);
- any other pyserial URL (``rfc2217://``, ``socket://``, ...): ``serial_for_url`` with its
  blocking calls run in worker threads.

Absence is never fatal: opening a missing device raises ``DeviceUnavailable`` naming it
(``DeviceBusy`` if the kernel says it is busy); a device that goes away while streaming
(unplugged, the far end of a pty closed: ``EIO``) ends the stream: ``read`` returns ``b""``
and ``write`` raises ``BrokenPipeError``. ``check_present`` is honoured by ``check()`` with a
cheap existence test rather than by opening the port at construction (which would toggle
DTR and could reset the board at every session).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import Field

from jumpstarter_exporter.drivers.base import (
    READ_CHUNK,
    ByteStream,
    Driver,
    DriverConfig,
    MemoryPipe,
    export,
    exportstream,
)
from jumpstarter_exporter.errors import DeviceBusy, DeviceError, DeviceUnavailable

PYSERIAL_CLIENT = "jumpstarter_driver_pyserial.client.PySerialClient"

# errno values meaning "the device is not (or no longer) there".
_GONE = frozenset({errno.EIO, errno.ENXIO, errno.ENODEV, errno.EBADF, errno.ENOENT})


def _device_error(url: str, exc: BaseException) -> DeviceError:
    code = getattr(exc, "errno", None)
    reason = os.strerror(code) if isinstance(code, int) else str(exc)
    if code == errno.EBUSY:
        return DeviceBusy(f"serial device {url} is busy: {reason}")
    return DeviceUnavailable(f"serial device {url} is unavailable: {reason}")


def _make_raw(fd: int, disable_hupcl: bool) -> None:
    """8-bit clean, no translation, no flow control, no echo (pyserial leaves ISTRIP)."""
    import termios

    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = termios.tcgetattr(fd)
    iflag &= ~(
        termios.IGNBRK
        | termios.BRKINT
        | termios.PARMRK
        | termios.ISTRIP
        | termios.INLCR
        | termios.IGNCR
        | termios.ICRNL
        | termios.IXON
        | termios.IXOFF
        | termios.IXANY
        | termios.INPCK
    )
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag |= termios.CREAD | termios.CLOCAL
    if disable_hupcl:
        cflag &= ~termios.HUPCL
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])


class _FdStream:
    """A ``ByteStream`` over a non-blocking tty file descriptor, driven by the event loop."""

    def __init__(self, port: Any, label: str) -> None:
        self._port = port  # the open pyserial Serial owning the fd
        self._fd: int = port.fileno()
        self._label = label
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._read_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._waiters: set[asyncio.Future[None]] = set()
        os.set_blocking(self._fd, False)

    async def _wait(self, add: Callable[..., Any], remove: Callable[[int], Any]) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        add(self._fd, ready)
        self._waiters.add(fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)
            if not self._closed:  # after close the fd number may already be reused
                remove(self._fd)

    def _hung_up(self) -> bool:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return any(
            ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, ev in poller.poll(0)
        )

    async def read(self, max_bytes: int = READ_CHUNK) -> bytes:
        async with self._read_lock:
            while not self._closed:
                try:
                    data = os.read(self._fd, max_bytes)
                except BlockingIOError:
                    data = None
                except OSError as exc:
                    if exc.errno in _GONE:
                        return b""
                    raise
                if data:
                    return data
                # b"" is a hang-up, or "no data" if someone set VMIN=0 on the tty (any
                # other opener of the device can): only poll can tell them apart.
                if data == b"" and self._hung_up():
                    return b""
                await self._wait(self._loop.add_reader, self._loop.remove_reader)
            return b""

    async def write(self, data: bytes) -> None:
        view = memoryview(bytes(data))
        async with self._write_lock:
            while view:
                if self._closed:
                    raise BrokenPipeError(f"{self._label}: stream closed")
                try:
                    sent = os.write(self._fd, view)
                except BlockingIOError:
                    await self._wait(self._loop.add_writer, self._loop.remove_writer)
                    continue
                except OSError as exc:
                    if exc.errno in _GONE:
                        raise BrokenPipeError(f"{self._label}: device went away") from exc
                    raise
                view = view[sent:]

    async def send_eof(self) -> None:
        """A serial line has no half-close: nothing to do."""

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        for fut in list(self._waiters):
            if not fut.done():
                fut.set_result(None)
        # close() of a tty may wait for its output to drain: keep it off the event loop.
        await asyncio.to_thread(self._port.close)


class _ThreadStream:
    """A ``ByteStream`` over a pyserial URL object, blocking calls in worker threads."""

    POLL = 0.2  # seconds a blocked read waits before re-checking for close

    def __init__(self, port: Any, label: str) -> None:
        self._port = port
        self._label = label
        self._closed = False
        self._eof = False
        self._read_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()

    def _read_blocking(self, max_bytes: int) -> bytes:
        import serial

        # Disconnected, or closed under us (pyserial then fails in odd ways): end of stream,
        # after handing out what was read before.
        gone = (serial.SerialException, OSError, TypeError, AttributeError)
        data = b""
        while not data and not self._closed and not self._eof:
            try:
                data = self._port.read(1)  # waits up to POLL for the first byte
                # then whatever is waiting (a socket:// port says 1 while any is)
                while data and len(data) < max_bytes:
                    waiting = self._port.in_waiting
                    if not waiting:
                        break
                    data += self._port.read(min(waiting, max_bytes - len(data)))
            except gone:
                self._eof = True
        return data

    async def read(self, max_bytes: int = READ_CHUNK) -> bytes:
        async with self._read_lock:
            if self._closed:
                return b""
            return await asyncio.to_thread(self._read_blocking, max_bytes)

    def _write_blocking(self, data: bytes) -> None:
        import serial

        try:
            self._port.write(data)
        except (serial.SerialException, OSError) as exc:
            raise BrokenPipeError(f"{self._label}: {exc}") from exc

    async def write(self, data: bytes) -> None:
        async with self._write_lock:
            if self._closed:
                raise BrokenPipeError(f"{self._label}: stream closed")
            await asyncio.to_thread(self._write_blocking, bytes(data))

    async def send_eof(self) -> None:
        """A serial line has no half-close: nothing to do."""

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self._port.close)


class _Throttled:
    """Writes one byte at a time, ``cps`` bytes per second (upstream's ``cps``)."""

    def __init__(self, inner: ByteStream, cps: float) -> None:
        self._inner = inner
        self._delay = 1.0 / cps

    async def read(self, max_bytes: int = READ_CHUNK) -> bytes:
        return await self._inner.read(max_bytes)

    async def write(self, data: bytes) -> None:
        for i in range(len(data)):
            await self._inner.write(data[i : i + 1])
            await asyncio.sleep(self._delay)

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()


def is_device_path(url: str) -> bool:
    return "://" not in url


class PySerial(Driver):
    """A serial port (see the module docstring)."""

    client = PYSERIAL_CLIENT

    class Config(DriverConfig):
        url: str
        baudrate: int = Field(default=115200, gt=0)
        check_present: bool = True
        cps: float | None = Field(default=None, gt=0)
        disable_hupcl: bool = False

    config: Config

    LOOP_BUFFER = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._streams: set[ByteStream] = set()

    # -- opening -----------------------------------------------------------------------------

    def _open_device(self) -> Any:
        """Open the device path (in a worker thread): non-blocking, raw, at the baud rate."""
        import serial

        port = serial.Serial()
        port.port = self.config.url
        port.baudrate = self.config.baudrate
        port.timeout = 0
        try:
            port.open()
            _make_raw(port.fileno(), self.config.disable_hupcl)
        except (serial.SerialException, OSError) as exc:
            with contextlib.suppress(Exception):
                port.close()
            raise _device_error(self.config.url, exc) from None
        return port

    def _open_url(self) -> Any:
        import serial

        try:
            return serial.serial_for_url(
                self.config.url, baudrate=self.config.baudrate, timeout=_ThreadStream.POLL
            )
        except (serial.SerialException, OSError) as exc:
            raise _device_error(self.config.url, exc) from None

    async def open_stream(self) -> ByteStream:
        """Open the port as a ``ByteStream`` (what ``connect`` yields)."""
        url = self.config.url
        stream: ByteStream
        if url == "loop://" or url.startswith("loop://?"):
            stream = MemoryPipe(self.LOOP_BUFFER)
        elif is_device_path(url):
            stream = _FdStream(await asyncio.to_thread(self._open_device), url)
        else:
            stream = _ThreadStream(await asyncio.to_thread(self._open_url), url)
        if self.config.cps:
            stream = _Throttled(stream, self.config.cps)
        self.log.debug("serial opened", url=url)
        return stream

    # -- exported ----------------------------------------------------------------------------

    @exportstream
    async def connect(self) -> AsyncIterator[ByteStream]:
        stream = await self.open_stream()
        self._streams.add(stream)
        try:
            yield stream
        finally:
            self._streams.discard(stream)
            await stream.aclose()

    @export
    async def close(self) -> None:
        """Close every open connection of this port (no-op if none)."""
        streams, self._streams = list(self._streams), set()
        for stream in streams:
            await stream.aclose()

    @export
    async def set_dtr(self, value: bool) -> None:
        await self._set_line("dtr", value)

    @export
    async def set_rts(self, value: bool) -> None:
        await self._set_line("rts", value)

    async def _set_line(self, line: str, value: bool) -> None:
        """Like upstream: a separate handle is opened, the line set, the handle closed.

        On a device path this is a bare open + modem-control ioctl, so the port settings an
        open connection relies on are left alone (ptys have no modem lines: ignored).
        """
        url = self.config.url
        if url.startswith("loop://"):
            self.log.debug("set line", line=line, value=value)
            return
        run = self._set_tty_line if is_device_path(url) else self._set_url_line
        await asyncio.to_thread(run, line, value)
        self.log.debug("set line", line=line, value=value)

    def _set_tty_line(self, line: str, value: bool) -> None:
        import fcntl
        import struct
        import termios

        url = self.config.url
        try:
            fd = os.open(url, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            raise _device_error(url, exc) from None
        try:
            bit = termios.TIOCM_DTR if line == "dtr" else termios.TIOCM_RTS
            request = termios.TIOCMBIS if value else termios.TIOCMBIC
            try:
                fcntl.ioctl(fd, request, struct.pack("I", bit))
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTTY):
                    raise _device_error(url, exc) from None
            if self.config.disable_hupcl:
                attrs = termios.tcgetattr(fd)
                attrs[2] &= ~termios.HUPCL
                termios.tcsetattr(fd, termios.TCSANOW, attrs)
        finally:
            os.close(fd)

    def _set_url_line(self, line: str, value: bool) -> None:
        import serial

        url = self.config.url
        try:
            port = serial.serial_for_url(url, baudrate=self.config.baudrate, do_not_open=True)
            setattr(port, line, value)
            port.open()
            port.close()
        except (serial.SerialException, OSError) as exc:
            raise _device_error(url, exc) from None

    # -- lifecycle ---------------------------------------------------------------------------

    async def check(self) -> None:
        url = self.config.url
        if not (self.config.check_present and is_device_path(url)):
            return
        if not await asyncio.to_thread(os.path.exists, url):
            raise DeviceUnavailable(f"serial device {url} is not present")

    async def aclose(self) -> None:
        await self.close()
        await super().aclose()


__all__ = ["PYSERIAL_CLIENT", "PySerial"]
