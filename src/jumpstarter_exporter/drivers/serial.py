"""Serial console driver, wire-compatible with upstream's ``jumpstarter_driver_pyserial.PySerial``.

``connect`` (a byte stream, protocol-facts §6.2) gives a client the serial line. The port is
given by exactly one of ``url`` (below) or ``match``: udev keys in labgrid's style
(``{SUBSYSTEM: tty, ID_SERIAL_SHORT: A10K1}``, ``"@ID_PATH": ...`` for an ancestor; see
``hotplug.match``), resolved to a device node when the port is opened. Transports, by ``url``:

- ``loop://``: an in-memory echo (a bounded ``MemoryPipe``), no device involved; a
  stream's half-close is passed on, so the loop ends once its echo has been read;
- a device path (``/dev/ttyUSB0``, a pty): opened non-blocking by pyserial (which sets the
  baud rate, custom rates included, and takes the exclusive lock, below), then forced raw
  with termios with the configured line settings (``bytesize``, ``parity``, ``stopbits``,
  ``xonxoff``, ``rtscts``; no translation, no echo; HUPCL cleared on request; 1.5 stop bits
  are 2 on POSIX; a pty keeps CS8 without parity whatever is asked), then read and written
  directly on the file descriptor from the event loop (``add_reader``/``add_writer``);
- any other pyserial URL (``rfc2217://``, ``socket://``, ...): ``serial_for_url`` with the
  same line settings, its blocking calls run in worker threads.

**One device handle, many readers.** The driver opens the device once, however many
``connect`` streams are open, and one reader task fans every byte out to every stream (each
stream sees the whole console; upstream's separate opens split the bytes between readers).
Writes from any stream go to the device one whole ``write`` at a time, in arrival order. The
device is opened by the first ``connect`` and closed when the last stream closes, unless the
console log (below) is running, which keeps it open and read until the lease ends.

**Back-pressure and slow readers.** Each stream buffers at most ``TAP_BUFFER`` bytes (plus one
device read). The reader task reads the device only while every stream has room, so a slow
client slows the device read and nothing grows: a pty or a socket then makes its far end wait,
a UART without flow control drops in the kernel (as it would with any slow reader). A stream
that stays full for ``slow_reader_timeout`` seconds *while someone else is waiting for data*
(another stream, or the console log) is given up on: from then on, bytes that do not fit in
its buffer are dropped for that stream only, and when it has room again it first receives one
marker line ``\\r\\n[jumpstarter-exporter: N bytes dropped: this reader was too slow]\\r\\n``;
the others never wait for it again. A lone stalled reader (and no log) is never given up on.

**Exclusive open** (``exclusive: true``, the default; device paths only): the descriptor
takes ``flock(LOCK_EX | LOCK_NB)`` before anything on the port is changed, then
``TIOCEXCL``. TIOCEXCL makes the kernel refuse any further ``open`` of the tty by processes
without CAP_SYS_ADMIN (EBUSY); root bypasses it, so the flock is what keeps out another
exporter, a pyserial ``exclusive=True`` user or ``flock``-aware tools running as root. A
plain ``open`` by root (``cat``, ``screen`` as root) is not blocked by either. Opening a port
someone else holds raises ``DeviceBusy`` naming the device and, when ``/proc/locks`` says so,
the holding process. TIOCNXCL is issued before the device is closed.

**Console log** (``console_log: <dir or file>``): while it runs, every byte read from the
device is appended to a log file, whether or not any client is connected, so a crash between
client connections is kept. Each lease writes new files named ``<stem>-<UTC timestamp>.log``
(in the directory, stem = the driver's name; or next to the file path, stem = its name): a
file is closed and a new one started at ``console_log_max_bytes``, and after each new file
only the newest ``console_log_backups + 1`` files of that stem are kept, across leases too,
so the disk use is bounded by ``(backups + 1) * max_bytes``. Files are byte-exact (no
annotations; events go to the driver log). The log is started by ``start()`` (the exporter's
per-lease hook) or, failing that, by the first ``connect``, and stopped by ``aclose()`` (lease
end). While it runs, a device that went away is reopened every ``REOPEN_INTERVAL`` seconds,
and the exported ``close()`` ends the streams but leaves the port open (closing it would drop
DTR, which resets some boards). Two drivers of the same name logging into one directory
share one budget: give each its own directory or file path. Writes to the log are plain
``os.write`` calls from the event loop: keep the log on a local file system.

**Hotplug.** Under an exporter, a device node (a path or a ``match``) is watched by the
exporter's ``DeviceWatcher`` (``attach_watcher``): while it is absent the driver is
unavailable, not broken: ``connect`` and the other calls raise ``DeviceUnavailable`` naming
the driver, the path or match and why, and the report carries
``jumpstarter.dev/available=false``. When it goes away (or a match moves to another node) the
open streams end cleanly (end of stream) and the handle is closed; when it returns, the next
``connect`` works, and a running console log reopens it at once. Without a watcher (a driver
built on its own) a ``match`` is resolved at each open.

Absence is never fatal: opening a missing device raises ``DeviceUnavailable`` naming it
(``DeviceBusy`` if it is held); a device that goes away while streaming (unplugged, the far
end of a pty closed: ``EIO``, a socket reset) ends every stream: ``read`` returns what was
buffered and then ``b""``, ``write`` raises ``BrokenPipeError``; the next ``connect`` opens
the device again. ``check_present`` is honoured by ``check()`` with a cheap existence test
rather than by opening the port at construction (which would toggle DTR and could reset the
board at every session).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import os
import re
import select
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from jumpstarter_exporter.drivers.base import (
    READ_CHUNK,
    ByteStream,
    Driver,
    DriverConfig,
    DriverLog,
    MemoryPipe,
    export,
    exportstream,
)
from jumpstarter_exporter.errors import DeviceBusy, DeviceError, DeviceUnavailable
from jumpstarter_exporter.hotplug.match import DeviceMatch

if TYPE_CHECKING:
    from jumpstarter_exporter.hotplug.monitor import DeviceWatch, DeviceWatcher

PYSERIAL_CLIENT = "jumpstarter_driver_pyserial.client.PySerialClient"
# Reported (GetReport) while the watched device is absent; upstream clients ignore it.
LABEL_AVAILABLE = "jumpstarter.dev/available"

# errno values meaning "the device is not (or no longer) there".
_GONE = frozenset({errno.EIO, errno.ENXIO, errno.ENODEV, errno.EBADF, errno.ENOENT})
# flock(LOCK_NB) on a port another descriptor holds.
_LOCKED = frozenset({errno.EAGAIN, errno.EWOULDBLOCK})

_CMSPAR = 0o10000000000  # Linux "stick" (mark/space) parity; termios does not export it
_PARITY_NAMES = {"NONE": "N", "EVEN": "E", "ODD": "O", "MARK": "M", "SPACE": "S"}


# --- errors ---------------------------------------------------------------------------------


def _lock_holder(path: str) -> str:
    """``" (pid N, comm)"`` of the process holding a flock on ``path``, or ``""``.

    Best effort from ``/proc/locks`` (pids of other pid namespaces may be wrong or 0).
    """
    try:
        st = os.stat(path)
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                found = re.search(r"\bFLOCK\s+\S+\s+WRITE\s+(\d+)\s+(\S+)\s", line)
                if found and "->" not in line and found.group(2) == key:
                    pid = int(found.group(1))
                    try:
                        comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    except OSError:
                        return f" (pid {pid})"
                    return f" (pid {pid}, {comm})"
    except (OSError, ValueError):
        pass
    return ""


def _device_error(url: str, exc: BaseException) -> DeviceError:
    code = getattr(exc, "errno", None)
    reason = os.strerror(code) if isinstance(code, int) else str(exc)
    if code in _LOCKED:
        return DeviceBusy(
            f"serial device {url} is busy: held by another process{_lock_holder(url)} "
            "(exclusive lock)"
        )
    if code == errno.EBUSY:
        return DeviceBusy(f"serial device {url} is busy: held by another process ({reason})")
    return DeviceUnavailable(f"serial device {url} is unavailable: {reason}")


# --- line settings --------------------------------------------------------------------------


def _line_attrs(attrs: list[Any], config: PySerial.Config) -> list[Any]:
    """``attrs`` (as from ``tcgetattr``) made raw with the configured line settings.

    8-bit clean unless ``bytesize`` says otherwise, no translation, no echo, no signals,
    CLOCAL (modem lines never end the stream), VMIN=1; software flow control only with
    ``xonxoff``, hardware only with ``rtscts``. 1.5 stop bits are 2 on POSIX (as pyserial).
    """
    import termios

    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
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
    if config.xonxoff:
        iflag |= termios.IXON | termios.IXOFF
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag &= ~(
        termios.CSIZE | termios.CSTOPB | termios.PARENB | termios.PARODD | _CMSPAR | termios.CRTSCTS
    )
    cflag |= termios.CREAD | termios.CLOCAL
    cflag |= {5: termios.CS5, 6: termios.CS6, 7: termios.CS7, 8: termios.CS8}[config.bytesize]
    if config.stopbits != 1:
        cflag |= termios.CSTOPB
    cflag |= {
        "N": 0,
        "E": termios.PARENB,
        "O": termios.PARENB | termios.PARODD,
        "M": termios.PARENB | _CMSPAR | termios.PARODD,
        "S": termios.PARENB | _CMSPAR,
    }[config.parity]
    if config.rtscts:
        cflag |= termios.CRTSCTS
    if config.disable_hupcl:
        cflag &= ~termios.HUPCL
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


def _configure_tty(fd: int, config: PySerial.Config) -> None:
    """Apply ``_line_attrs``. A pty always runs CS8 without parity: the kernel ignores those
    two and glibc then reports EINVAL although the rest was applied, which is accepted."""
    import termios

    want = _line_attrs(termios.tcgetattr(fd), config)
    try:
        termios.tcsetattr(fd, termios.TCSANOW, want)
    except termios.error as exc:
        if exc.args[0] != errno.EINVAL:
            raise OSError(exc.args[0], str(exc.args[1])) from None
        got = termios.tcgetattr(fd)
        forced = termios.CSIZE | termios.PARENB
        if got[:2] != want[:2] or got[3] != want[3] or (got[2] | forced) != (want[2] | forced):
            raise OSError(errno.EINVAL, "the device refuses these line settings") from None


# --- device handles -------------------------------------------------------------------------


def _release_port(port: Any, exclusive: bool = False) -> None:
    """Close a pyserial port (blocking), clearing TIOCEXCL first: a pty's outlives us."""
    if exclusive:
        import fcntl
        import termios

        with contextlib.suppress(Exception):
            fcntl.ioctl(port.fileno(), termios.TIOCNXCL)
    with contextlib.suppress(Exception):
        port.close()  # also drops the flock


async def _open_in_thread(opener: Callable[[], Any], release: Callable[[Any], None]) -> Any:
    """``opener()`` in a worker thread; if we are cancelled meanwhile, whatever it opens
    is released (in a thread) instead of leaking an open, locked port."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(asyncio.to_thread(opener))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:

        def discard(done: asyncio.Future[Any]) -> None:
            if not done.cancelled() and done.exception() is None:
                loop.run_in_executor(None, release, done.result())

        task.add_done_callback(discard)
        raise


class _FdStream:
    """A ``ByteStream`` over a non-blocking tty file descriptor, driven by the event loop."""

    def __init__(self, port: Any, label: str, exclusive: bool = False) -> None:
        self._port = port  # the open pyserial Serial owning the fd
        self._fd: int = port.fileno()
        self._label = label
        self._exclusive = exclusive
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._read_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._waiters: set[asyncio.Future[None]] = set()
        os.set_blocking(self._fd, False)

    @property
    def fd(self) -> int | None:
        return None if self._closed else self._fd

    @property
    def label(self) -> str:
        """The device path this stream was opened on."""
        return self._label

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

    def _close_port(self) -> None:
        _release_port(self._port, self._exclusive)

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
        await asyncio.to_thread(self._close_port)


class _ThreadStream:
    """A ``ByteStream`` over a pyserial URL object, blocking calls in worker threads."""

    POLL = 0.2  # seconds a blocked read waits before re-checking for close

    def __init__(self, port: Any, label: str) -> None:
        self.port = port
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
                data = self.port.read(1)  # waits up to POLL for the first byte
                # then whatever is waiting (a socket:// port says 1 while any is)
                while data and len(data) < max_bytes:
                    waiting = self.port.in_waiting
                    if not waiting:
                        break
                    data += self.port.read(min(waiting, max_bytes - len(data)))
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
            self.port.write(data)
        except (serial.SerialException, OSError) as exc:
            raise BrokenPipeError(f"{self._label}: {exc}") from exc

    async def write(self, data: bytes) -> None:
        async with self._write_lock:
            if self._closed or self._eof:
                raise BrokenPipeError(f"{self._label}: stream closed")
            await asyncio.to_thread(self._write_blocking, bytes(data))

    async def send_eof(self) -> None:
        """A serial line has no half-close: nothing to do."""

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.port.close)


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


# --- console log ----------------------------------------------------------------------------

_STAMP = r"\d{8}T\d{6}\.\d{6}Z"


class ConsoleLog:
    """Size-rotated, count-bounded files of raw console bytes (see the module docstring).

    ``target`` is a directory (existing, or written with a trailing ``/``: files are
    ``<dir>/<name>-<stamp>.log``) or a file path (``/var/log/dut.log``: files are
    ``/var/log/dut-<stamp>.log``). Each instance (one per lease) starts a new file.
    """

    def __init__(self, target: str, name: str, max_bytes: int, backups: int) -> None:
        path = Path(target)
        if target.endswith(("/", os.sep)) or path.is_dir():
            self.directory, self._stem, self._suffix = path, name, ".log"
        else:
            self.directory, self._stem = path.parent, path.stem
            self._suffix = path.suffix or ".log"
        self._pattern = re.compile(re.escape(self._stem) + "-" + _STAMP + re.escape(self._suffix))
        self.max_bytes = max_bytes
        self.backups = backups
        self.path: Path | None = None
        self._fd: int | None = None
        self._size = 0
        self._last_us = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self._new_file()

    def files(self) -> list[Path]:
        """This log's files (this lease's and earlier ones), oldest first."""
        names = sorted(n for n in os.listdir(self.directory) if self._pattern.fullmatch(n))
        return [self.directory / n for n in names]

    def _new_file(self) -> None:
        self._close_file()
        for _ in range(100):
            # strictly increasing microsecond stamps: unique, and name order is time order
            us = max(time.time_ns() // 1000, self._last_us + 1)
            self._last_us = us
            secs, micros = divmod(us, 1_000_000)
            when = dt.datetime.fromtimestamp(secs, dt.UTC).strftime("%Y%m%dT%H%M%S")
            path = self.directory / f"{self._stem}-{when}.{micros:06d}Z{self._suffix}"
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
                self._fd = os.open(path, flags, 0o640)
            except FileExistsError:
                continue
            self.path, self._size = path, 0
            break
        else:
            raise FileExistsError(f"no free console log file name in {self.directory}")
        for old in self.files()[: -(self.backups + 1)]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()

    def write(self, data: bytes) -> None:
        """Append ``data``, starting a new file whenever one reaches ``max_bytes``."""
        view = memoryview(data)
        while view:
            if self._fd is None or self._size >= self.max_bytes:
                self._new_file()
            assert self._fd is not None
            written = os.write(self._fd, view[: self.max_bytes - self._size])
            self._size += written
            view = view[written:]

    def _close_file(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def close(self) -> None:
        self._close_file()


# --- fan-out --------------------------------------------------------------------------------


def _drop_marker(count: int) -> bytes:
    text = f"\r\n[jumpstarter-exporter: {count} bytes dropped: this reader was too slow]\r\n"
    return text.encode()


class _Tap:
    """One ``connect`` stream: every byte the device sends, writes to the shared device."""

    def __init__(self, hub: _Hub, device: ByteStream) -> None:
        self._hub = hub
        self.device = device
        self.limit = hub.driver.TAP_BUFFER
        self._chunks: deque[bytes] = deque()
        self.buffered = 0
        self._ready = asyncio.Event()
        self._read_lock = asyncio.Lock()
        self._eof = False
        self._closed = False
        self.lossy = False  # given up on once: drops what does not fit, never waited for
        self.dropped = 0  # bytes dropped since the last marker
        self.dropped_total = 0

    @property
    def full(self) -> bool:
        return self.buffered >= self.limit

    def _push(self, data: bytes) -> None:
        self._chunks.append(data)
        self.buffered += len(data)
        self._ready.set()

    def feed(self, data: bytes) -> None:
        """Queue bytes read from the device (called by the hub's reader task only)."""
        if self._closed or self._eof:
            return
        if self.lossy:
            if self.full:
                self.dropped += len(data)
                self.dropped_total += len(data)
                return
            if self.dropped:
                self._push(_drop_marker(self.dropped))
                self.dropped = 0
        self._push(data)

    def end(self) -> None:
        """The device is gone or closed: the reader gets what is buffered, then ``b""``."""
        self._eof = True
        self._ready.set()

    async def read(self, max_bytes: int = READ_CHUNK) -> bytes:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        async with self._read_lock:
            while not self._chunks:
                if self._eof or self._closed:
                    return b""
                self._ready.clear()
                await self._ready.wait()
            if self._closed:
                return b""
            parts: list[bytes] = []
            size = 0
            while self._chunks and size < max_bytes:
                chunk = self._chunks[0]
                if size + len(chunk) <= max_bytes:
                    parts.append(self._chunks.popleft())
                    size += len(chunk)
                else:
                    take = max_bytes - size
                    parts.append(chunk[:take])
                    self._chunks[0] = chunk[take:]
                    size += take
            self.buffered -= size
            self._hub.wake()
            return parts[0] if len(parts) == 1 else b"".join(parts)

    async def write(self, data: bytes) -> None:
        if self._closed or self._eof:
            raise BrokenPipeError(f"{self._hub.driver.target_text}: stream closed")
        await self._hub.write(self.device, data)

    async def send_eof(self) -> None:
        """A serial line has no half-close: nothing to do. On ``loop://`` (an echo) it is
        passed on, as before the port was shared: once everything written has come back,
        every stream on the loop ends (``b""``); the next ``connect`` gets a fresh loop."""
        if isinstance(self.device, MemoryPipe) and not (self._closed or self._eof):
            await self._hub.send_eof(self.device)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._chunks.clear()
        self.buffered = 0
        self._ready.set()
        await self._hub.detach(self)


class _Hub:
    """The driver's one device handle, its reader task, its streams and its console log.

    Created inside the event loop on first use, dropped by ``PySerial.aclose`` (so a driver
    can serve the next lease on another loop).
    """

    def __init__(self, driver: PySerial) -> None:
        self.driver = driver
        self.device: ByteStream | None = None
        self.taps: set[_Tap] = set()
        self.log: ConsoleLog | None = None
        self._reader: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._open_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._room = asyncio.Event()
        self._unavailable = False  # the log's reopen attempts failed (warned once)
        self._tasks: set[asyncio.Task[None]] = set()  # device-change handling in flight

    @property
    def _log(self) -> DriverLog:
        return self.driver.log

    def wake(self) -> None:
        self._room.set()

    # -- device --------------------------------------------------------------------------

    async def _open(self) -> ByteStream:
        """Open the device (``_open_lock`` held) and start its reader task."""
        device = await self.driver.open_device()
        self.device = device
        self._reader = asyncio.create_task(self._read_device(device), name="serial-reader")
        return device

    async def _close_device(self) -> None:
        """Deliberately close the device (``_open_lock`` held): every stream ends."""
        device, self.device = self.device, None
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        ended, self.taps = self.taps, set()
        for tap in ended:
            tap.end()
        if device is not None:
            await device.aclose()
            self._log.debug("serial closed", url=self.driver.target_text)

    def device_changed(self, watch: DeviceWatch) -> None:
        """The watched device went away, moved to another node or came back (called on
        the loop by the watcher): end the streams on a stale handle; reopen for the log."""
        task = asyncio.get_running_loop().create_task(
            self._follow_device(watch), name="serial-device-change"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow_device(self, watch: DeviceWatch) -> None:
        device = self.device
        stale = (
            device is not None
            and not isinstance(device, MemoryPipe)
            and (not watch.available or Path(getattr(device, "label", "")) != watch.node)
        )
        if stale:
            async with self._open_lock:
                if self.device is device:
                    self._log.warning(
                        "serial device went away: ending its streams",
                        url=self.driver.target_text,
                        reason=watch.reason or f"now {watch.node}",
                    )
                    await self._close_device()
        if watch.available and self.log is not None:
            await self._reopen()

    async def _wait_for_room(self) -> None:
        """Wait until every stream has room, giving up on stalled ones (module docstring)."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            blocking = [t for t in self.taps if t.full and not t.lossy]
            if not blocking:
                return
            others_wait = self.log is not None or len(blocking) < len(self.taps)
            if not others_wait:
                deadline = None
            elif deadline is None:
                deadline = loop.time() + self.driver.config.slow_reader_timeout
            if deadline is not None and loop.time() >= deadline:
                for tap in blocking:
                    tap.lossy = True
                self._log.warning(
                    "serial reader too slow: dropping bytes for it, the others go on",
                    url=self.driver.target_text,
                    readers=len(blocking),
                )
                return
            self._room.clear()
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), timeout)

    async def _read_device(self, device: ByteStream) -> None:
        try:
            while True:
                await self._wait_for_room()
                data = await device.read(READ_CHUNK)
                if not data:
                    break
                if self.log is not None:
                    try:
                        self.log.write(data)
                    except OSError as exc:
                        self._log.error(
                            "console log write failed: logging stops for this lease",
                            path=str(self.log.path),
                            error=str(exc),
                        )
                        self._stop_log_file()
                for tap in list(self.taps):
                    tap.feed(data)
        except Exception as exc:  # noqa: BLE001 - a failed read ends the streams, not the daemon
            self._log.warning("serial read failed", url=self.driver.target_text, error=repr(exc))
        if self.device is not device:
            return  # closed on purpose: the closer cleans up
        # The device went away under us: end every stream, release the handle (under the
        # open lock, so a reopen never races the close of the old descriptor and its lock).
        async with self._open_lock:
            if self.device is not device:
                return
            self.device, self._reader = None, None
            ended, self.taps = self.taps, set()
            for tap in ended:
                tap.end()
            if isinstance(device, MemoryPipe):
                self._log.debug("loop ended after a half-close", url=self.driver.target_text)
            else:
                self._log.warning("serial device went away", url=self.driver.target_text)
            with contextlib.suppress(Exception):
                await device.aclose()

    async def send_eof(self, device: ByteStream) -> None:
        async with self._write_lock:
            if device is self.device:
                await device.send_eof()

    async def write(self, device: ByteStream, data: bytes) -> None:
        """Write from one stream: whole writes, in arrival order, to the current device."""
        async with self._write_lock:
            if device is not self.device:
                raise BrokenPipeError(f"{self.driver.target_text}: device went away")
            await device.write(data)

    # -- streams -------------------------------------------------------------------------

    async def attach(self) -> _Tap:
        async with self._open_lock:
            device = self.device or await self._open()
            tap = _Tap(self, device)
            self.taps.add(tap)
            self._room.set()
        return tap

    async def detach(self, tap: _Tap) -> None:
        self.taps.discard(tap)
        self._room.set()
        if self.taps or self.log is not None or self.device is None:
            return
        async with self._open_lock:
            if not self.taps and self.log is None and self.device is not None:
                await self._close_device()

    async def end_streams(self) -> None:
        """End every stream; release the device unless the console log holds it."""
        async with self._open_lock:
            if self.log is None:
                await self._close_device()
                return
            ended, self.taps = self.taps, set()
        for tap in ended:
            tap.end()
        self._room.set()

    # -- console log ---------------------------------------------------------------------

    async def start_log(self) -> None:
        """Start the console log (a new file) and open the port for it, if it is there."""
        if self.log is not None or self._supervisor is not None:
            return
        cfg = self.driver.config
        assert cfg.console_log is not None
        try:
            self.log = ConsoleLog(
                cfg.console_log,
                self.driver.name or "serial",
                cfg.console_log_max_bytes,
                cfg.console_log_backups,
            )
        except OSError as exc:
            self._log.error("console log cannot be opened", path=cfg.console_log, error=str(exc))
            return
        self._log.info("console log started", path=str(self.log.path))
        self._room.set()
        await self._reopen()
        self._supervisor = asyncio.create_task(self._keep_open(), name="serial-console-log")

    def _stop_log_file(self) -> None:
        log, self.log = self.log, None
        if log is not None:
            with contextlib.suppress(OSError):
                log.close()

    async def _reopen(self) -> None:
        """For the log: open the device if it is closed (a failure is logged once)."""
        if self.device is not None:
            return
        async with self._open_lock:
            if self.device is not None or self.log is None:
                return
            try:
                await self._open()
            except Exception as exc:  # noqa: BLE001 - the log waits for the device, whatever
                if not self._unavailable:
                    self._log.warning(
                        "console log: serial device not available, retrying", error=str(exc)
                    )
                    self._unavailable = True
                return
            if self._unavailable:
                self._log.info("console log: serial device is back", url=self.driver.target_text)
            self._unavailable = False

    async def _keep_open(self) -> None:
        """While the log runs: reopen the device whenever it is closed or went away.

        A watched device that is absent is not tried: its return reopens it at once
        (``device_changed``); polling only retries a device that is there but failed to
        open (busy, say), or an unwatched one.
        """
        while self.log is not None:
            await asyncio.sleep(self.driver.REOPEN_INTERVAL)
            if self.driver.available is False:
                continue
            await self._reopen()

    # -- end -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        tasks = [self._supervisor, *self._tasks]
        self._supervisor = None
        for task in tasks:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
        async with self._open_lock:
            self._stop_log_file()
            await self._close_device()


# --- the driver -----------------------------------------------------------------------------


def is_device_path(url: str) -> bool:
    return "://" not in url


def _is_loop(url: str) -> bool:
    return url == "loop://" or url.startswith("loop://?")


class PySerial(Driver):
    """A serial port (see the module docstring)."""

    client = PYSERIAL_CLIENT

    class Config(DriverConfig):
        # exactly one of: a pyserial URL or device path, or a udev match (hotplug.match)
        url: str | None = None
        match: DeviceMatch | None = None
        baudrate: int = Field(default=115200, gt=0)
        check_present: bool = True
        cps: float | None = Field(default=None, gt=0)
        disable_hupcl: bool = False
        # line settings (applied with termios on a device path, passed to pyserial for URLs)
        bytesize: Literal[5, 6, 7, 8] = 8
        parity: Literal["N", "E", "O", "M", "S"] = "N"
        stopbits: float = 1.0
        xonxoff: bool = False
        rtscts: bool = False
        # flock + TIOCEXCL on a device path
        exclusive: bool = True
        # console log, per lease
        console_log: str | None = None
        console_log_max_bytes: int = Field(default=10 << 20, gt=0)
        console_log_backups: int = Field(default=3, ge=0)
        # seconds a full stream may hold back the others before bytes are dropped for it
        slow_reader_timeout: float = Field(default=5.0, gt=0)

        @model_validator(mode="after")
        def _url_or_match(self) -> PySerial.Config:
            if (self.url is None) == (self.match is None):
                raise ValueError(
                    "exactly one of `url` (a device path or pyserial URL) or `match` "
                    "(udev keys, e.g. {ID_SERIAL_SHORT: ...}) is required"
                )
            if self.url is not None and not self.url.strip():
                raise ValueError("url: must be a device path or pyserial URL")
            return self

        @field_validator("parity", mode="before")
        @classmethod
        def _parity_letter(cls, value: Any) -> Any:
            if isinstance(value, str):
                upper = value.strip().upper()
                return _PARITY_NAMES.get(upper, upper)
            return value

        @field_validator("stopbits")
        @classmethod
        def _stopbits(cls, value: float) -> float:
            if value not in (1, 1.5, 2):
                raise ValueError("must be 1, 1.5 or 2")
            return value

        @field_validator("console_log")
        @classmethod
        def _console_log(cls, value: str | None) -> str | None:
            if value is not None and not value.strip():
                raise ValueError("must be a directory or file path")
            return value

    config: Config

    LOOP_BUFFER = 64 * 1024
    TAP_BUFFER = 256 * 1024  # bytes one stream may have waiting (plus one device read)
    REOPEN_INTERVAL = 1.0  # seconds between reopen attempts while the console log runs

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hub_state: _Hub | None = None
        self._watch: DeviceWatch | None = None
        self._opening = ""  # the device node open_device is opening

    # -- which device ------------------------------------------------------------------------

    @property
    def kind(self) -> Literal["loop", "path", "url"]:
        """``loop`` (in-memory echo), ``path`` (a device node, by path or match), ``url``."""
        url = self.config.url
        if url is None:
            return "path"
        if _is_loop(url):
            return "loop"
        return "path" if is_device_path(url) else "url"

    @property
    def target_text(self) -> str:
        """The configured device, for messages: the url/path, or ``match {keys}``."""
        if self.config.url is not None:
            return self.config.url
        return f"match {{{self.config.match}}}"

    def _label(self) -> str:
        return f"serial driver {self.name or 'serial'!r} ({self.target_text})"

    def attach_watcher(self, watcher: DeviceWatcher) -> None:
        """Watch the device node (a path or a ``match``) so absence is observed, not met."""
        if self.kind != "path" or self._watch is not None:
            return
        target = self.config.match if self.config.match is not None else self.config.url
        assert target is not None
        self._watch = watcher.watch(target, name=self.name or "serial")
        watcher.on_change(self._on_device_change)

    @property
    def available(self) -> bool | None:
        """Whether the watched device is present now (None: not watched)."""
        watch = self._watch
        if watch is None or watch.watcher.closed:
            return None
        return watch.available

    def labels(self) -> dict[str, str]:
        if self.available is False:
            return {LABEL_AVAILABLE: "false"}
        return {}

    def _device_path(self) -> str:
        """The device node to open now (``DeviceUnavailable`` naming why there is none).

        From the exporter's watch when there is one (no I/O); else resolved on the spot.
        """
        watch = self._watch
        if watch is not None and not watch.watcher.closed:
            if watch.node is None:
                raise DeviceUnavailable(f"{self._label()} is unavailable: {watch.reason}")
            return str(watch.node)
        if self.config.match is None:
            assert self.config.url is not None
            return self.config.url
        from jumpstarter_exporter.hotplug.match import resolve

        node = resolve(self.config.match)  # AmbiguousMatch / DeviceUnavailable propagate
        if node is None:
            raise DeviceUnavailable(
                f"{self._label()} is unavailable: no device matches {self.config.match}"
            )
        return str(node)

    def _on_device_change(self, watch: DeviceWatch) -> None:
        if watch is not self._watch:
            return
        hub = self._hub_state
        if hub is not None:
            hub.device_changed(watch)

    @property
    def _hub(self) -> _Hub:
        if self._hub_state is None:
            self._hub_state = _Hub(self)
        return self._hub_state

    # -- opening -----------------------------------------------------------------------------

    def _line_kwargs(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "baudrate": cfg.baudrate,
            "bytesize": cfg.bytesize,
            "parity": cfg.parity,
            "stopbits": 1.5 if cfg.stopbits == 1.5 else int(cfg.stopbits),
            "xonxoff": cfg.xonxoff,
            "rtscts": cfg.rtscts,
        }

    def _open_tty(self, path: str | None = None) -> Any:
        """Open the device path (in a worker thread): locked, non-blocking, raw, configured.

        ``path``: the node resolved by ``open_device`` (default: the one it is opening)."""
        import fcntl
        import termios

        import serial

        if path is None:
            path = self._opening

        port = serial.Serial()
        port.port = path
        for key, value in self._line_kwargs().items():
            setattr(port, key, value)
        port.timeout = 0
        # pyserial's exclusive= is flock(LOCK_EX|LOCK_NB), taken before any setting changes
        port.exclusive = True if self.config.exclusive else None
        try:
            port.open()
            if self.config.exclusive:
                fcntl.ioctl(port.fileno(), termios.TIOCEXCL)
            _configure_tty(port.fileno(), self.config)
        except (serial.SerialException, OSError) as exc:
            with contextlib.suppress(Exception):
                port.close()
            raise _device_error(path, exc) from None
        return port

    def _open_url(self) -> Any:
        import serial

        try:
            return serial.serial_for_url(
                self.target_text, timeout=_ThreadStream.POLL, **self._line_kwargs()
            )
        except (serial.SerialException, OSError) as exc:
            raise _device_error(self.target_text, exc) from None

    async def _resolve_path(self) -> str:
        if self._watch is not None and not self._watch.watcher.closed:
            return self._device_path()
        if self.config.match is not None:
            return await asyncio.to_thread(self._device_path)  # enumerates udev
        return self._device_path()

    async def open_device(self) -> ByteStream:
        """Open the port itself: the one handle the driver's streams share."""
        kind = self.kind
        device: ByteStream
        if kind == "loop":
            device = MemoryPipe(self.LOOP_BUFFER)
            url = self.target_text
        elif kind == "path":
            url = await self._resolve_path()
            exclusive = self.config.exclusive
            self._opening = url
            port = await _open_in_thread(self._open_tty, lambda p: _release_port(p, exclusive))
            device = _FdStream(port, url, exclusive)
        else:
            url = self.target_text
            port = await _open_in_thread(self._open_url, _release_port)
            device = _ThreadStream(port, url)
        self.log.debug("serial opened", url=url)
        return device

    async def open_stream(self) -> ByteStream:
        """A new stream on the shared port (what ``connect`` yields); opens it if needed."""
        if self.config.console_log is not None:
            await self._hub.start_log()  # no start() from the exporter: from the first connect
        stream: ByteStream = await self._hub.attach()
        if self.config.cps:
            stream = _Throttled(stream, self.config.cps)
        return stream

    # -- exported ----------------------------------------------------------------------------

    @exportstream
    async def connect(self) -> AsyncIterator[ByteStream]:
        stream = await self.open_stream()
        try:
            yield stream
        finally:
            await stream.aclose()

    @export
    async def close(self) -> None:
        """End every open connection of this port and release it (no-op if none).

        A running console log keeps the port open (closing it would drop DTR and could reset
        the board); it is released at the end of the lease.
        """
        if self._hub_state is not None:
            await self._hub_state.end_streams()

    @export
    async def set_dtr(self, value: bool) -> None:
        await self._set_line("dtr", value)

    @export
    async def set_rts(self, value: bool) -> None:
        await self._set_line("rts", value)

    async def _set_line(self, line: str, value: bool) -> None:
        """Set a modem line, on the open handle if there is one, else on a separate one.

        On a device path this is a bare modem-control ioctl, so the port settings an open
        connection relies on are left alone (ptys have no modem lines: ignored). A separate
        handle respects the exclusive lock of another process (``DeviceBusy``).
        """
        kind = self.kind
        if kind == "loop":
            self.log.debug("set line", line=line, value=value)
            return
        device = self._hub_state.device if self._hub_state is not None else None
        if isinstance(device, _FdStream) and device.fd is not None:
            self._tty_line(device.fd, line, value, device.label)
        elif isinstance(device, _ThreadStream):
            await asyncio.to_thread(setattr, device.port, line, value)
        elif kind == "path":
            path = await self._resolve_path()
            await asyncio.to_thread(self._set_tty_line, path, line, value)
        else:
            await asyncio.to_thread(self._set_url_line, line, value)
        self.log.debug("set line", line=line, value=value)

    def _tty_line(self, fd: int, line: str, value: bool, path: str) -> None:
        import fcntl
        import struct
        import termios

        bit = termios.TIOCM_DTR if line == "dtr" else termios.TIOCM_RTS
        request = termios.TIOCMBIS if value else termios.TIOCMBIC
        try:
            fcntl.ioctl(fd, request, struct.pack("I", bit))
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTTY):
                raise _device_error(path, exc) from None

    def _set_tty_line(self, url: str, line: str, value: bool) -> None:
        import fcntl
        import termios

        try:
            fd = os.open(url, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            raise _device_error(url, exc) from None
        try:
            if self.config.exclusive:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    raise _device_error(url, exc) from None
            self._tty_line(fd, line, value, url)
            if self.config.disable_hupcl:
                attrs = termios.tcgetattr(fd)
                attrs[2] &= ~termios.HUPCL
                termios.tcsetattr(fd, termios.TCSANOW, attrs)
        finally:
            os.close(fd)

    def _set_url_line(self, line: str, value: bool) -> None:
        import serial

        url = self.target_text
        try:
            port = serial.serial_for_url(url, do_not_open=True, **self._line_kwargs())
            setattr(port, line, value)
            port.open()
            port.close()
        except (serial.SerialException, OSError) as exc:
            raise _device_error(url, exc) from None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def console_log(self) -> ConsoleLog | None:
        """The running console log, if any (its ``path`` is the file being written)."""
        return self._hub_state.log if self._hub_state is not None else None

    async def start(self) -> None:
        """Lease start: begin the console log (a new file), opening the port for it.

        No-op without ``console_log`` or when already running; never raises for a missing
        device (the log waits for it). Meant to be called by the exporter when a lease
        session starts; ``aclose()`` at the lease end stops it.
        """
        if self.config.console_log is not None:
            await self._hub.start_log()

    async def check(self) -> None:
        if not (self.config.check_present and self.kind == "path"):
            return
        path = await self._resolve_path()
        if not await asyncio.to_thread(os.path.exists, path):
            raise DeviceUnavailable(f"serial device {path} is not present")

    async def aclose(self) -> None:
        """Lease end: end every stream, stop the console log, release the port."""
        hub, self._hub_state = self._hub_state, None
        if hub is not None:
            await hub.aclose()
        await super().aclose()


__all__ = ["LABEL_AVAILABLE", "PYSERIAL_CLIENT", "ConsoleLog", "PySerial"]
