"""PySerial hardening: line settings, exclusive open, fan-out to several readers, slow
readers, bulk transfers, close/reopen, a far end that vanishes, the per-lease console log.

Everything runs over real pty pairs made by socat: the driver opens end ``a``, the test plays
the board on end ``b`` with a plain file descriptor.

What exclusive open blocks (tested below): a second PySerial driver (DeviceBusy, naming the
holder), any ``flock``-aware opener including root (pyserial ``exclusive=True``, another
exporter), and every ``open`` by a process without CAP_SYS_ADMIN (TIOCEXCL → EBUSY). What
it does not block: a plain ``open`` by root that does not take the flock (root bypasses
TIOCEXCL) — such a process can still read (and steal) bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from jumpstarter_exporter.drivers.base import READ_CHUNK, invoke
from jumpstarter_exporter.drivers.serial import PySerial, _line_attrs, _Tap
from jumpstarter_exporter.errors import DeviceBusy, DeviceUnavailable

MIB = 1 << 20


def run(coro: Any, timeout: float = 30) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Socat:
    """A socat pty pair ``a`` <-> ``b`` that can be killed and started again on the same paths."""

    def __init__(self, tmp_path: Path) -> None:
        self.a, self.b = str(tmp_path / "A"), str(tmp_path / "B")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["socat", f"pty,raw,echo=0,link={self.a}", f"pty,raw,echo=0,link={self.b}"],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while not (os.path.exists(self.a) and os.path.exists(self.b)):
            if self.proc.poll() is not None:
                pytest.fail("socat exited")
            if time.monotonic() > deadline:
                pytest.fail("socat did not create the pty links")
            time.sleep(0.01)

    def kill(self) -> None:
        """Vanish: socat dies, the pty masters close, the links go away."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        deadline = time.monotonic() + 5
        while os.path.lexists(self.a) and time.monotonic() < deadline:
            time.sleep(0.01)


@pytest.fixture
def socat(tmp_path: Path) -> Iterator[Socat]:
    pair = Socat(tmp_path)
    pair.start()
    try:
        yield pair
    finally:
        if pair.proc is not None and pair.proc.poll() is None:
            pair.proc.kill()
            pair.proc.wait()


class FarEnd:
    """The board's side of the line: a raw, blocking descriptor on pty end ``b``."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)

    def write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view[:65536]) :]

    def read_exact(self, size: int, timeout: float = 20) -> bytes:
        got = bytearray()
        deadline = time.monotonic() + timeout
        while len(got) < size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError(f"far end got {len(got)} of {size} bytes")
            got += os.read(self.fd, size - len(got))
        return bytes(got)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@contextlib.contextmanager
def far_end(path: str) -> Iterator[FarEnd]:
    end = FarEnd(path)
    try:
        yield end
    finally:
        end.close()


async def read_exact(stream: Any, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = await stream.read()
        assert chunk, f"unexpected EOF after {len(got)} of {size} bytes"
        got += chunk
    return bytes(got)


def cflag_of(path: str) -> tuple[int, int]:
    """(iflag, cflag) of the tty at ``path`` (root may open it despite TIOCEXCL)."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        attrs = termios.tcgetattr(fd)
        return attrs[0], attrs[2]
    finally:
        os.close(fd)


TIOCGEXCL = 0x80045440  # Linux: is TIOCEXCL set on this tty?


def tiocexcl_set(path: str) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, TIOCGEXCL, b"\0" * 4))[0] != 0
    finally:
        os.close(fd)


def flock_free(path: str) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


CMSPAR = 0o10000000000
# an interpreter outside /root, for running a probe as user nobody
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


# --- line settings --------------------------------------------------------------------------


def test_line_settings_config() -> None:
    cfg = PySerial.Config.model_validate({"url": "/dev/ttyS0"})
    assert (cfg.bytesize, cfg.parity, cfg.stopbits, cfg.xonxoff, cfg.rtscts) == (
        8,
        "N",
        1,
        False,
        False,
    )
    assert cfg.exclusive is True and cfg.console_log is None
    assert (cfg.console_log_max_bytes, cfg.console_log_backups) == (10 * MIB, 3)
    for given, letter in (("even", "E"), ("o", "O"), ("Mark", "M"), ("S", "S"), ("none", "N")):
        assert PySerial.Config.model_validate({"url": "x", "parity": given}).parity == letter
    assert PySerial.Config.model_validate({"url": "x", "stopbits": 1.5}).stopbits == 1.5
    for bad in (
        {"bytesize": 9},
        {"bytesize": 4},
        {"parity": "X"},
        {"stopbits": 3},
        {"console_log_max_bytes": 0},
        {"console_log_backups": -1},
        {"console_log": " "},
        {"slow_reader_timeout": 0},
    ):
        with pytest.raises(ValidationError):
            PySerial.Config.model_validate({"url": "x", **bad})


@pytest.mark.parametrize(
    ("settings", "size", "set_bits", "clear_bits"),
    [
        ({}, termios.CS8, 0, termios.PARENB | termios.CSTOPB | termios.CRTSCTS | CMSPAR),
        ({"bytesize": 7, "parity": "E"}, termios.CS7, termios.PARENB, termios.PARODD | CMSPAR),
        ({"bytesize": 6, "parity": "O"}, termios.CS6, termios.PARENB | termios.PARODD, CMSPAR),
        ({"bytesize": 5, "parity": "M"}, termios.CS5, termios.PARENB | termios.PARODD | CMSPAR, 0),
        ({"parity": "S", "stopbits": 2}, termios.CS8, termios.PARENB | CMSPAR | termios.CSTOPB,
         termios.PARODD),
        ({"stopbits": 1.5, "rtscts": True}, termios.CS8, termios.CSTOPB | termios.CRTSCTS, 0),
    ],
)  # fmt: skip
def test_line_attrs_bits(
    settings: dict[str, Any], size: int, set_bits: int, clear_bits: int
) -> None:
    cfg = PySerial.Config.model_validate({"url": "x", **settings})
    start = [
        termios.ISTRIP | termios.ICRNL | termios.IXON,
        termios.OPOST,
        termios.CS8 | termios.PARENB | termios.PARODD | CMSPAR | termios.CSTOPB | termios.CRTSCTS,
        termios.ECHO | termios.ICANON,
        0,
        0,
        [0] * 32,
    ]
    iflag, oflag, cflag, lflag, _, _, cc = _line_attrs(start, cfg)
    assert cflag & termios.CSIZE == size
    assert cflag & set_bits == set_bits
    assert not cflag & clear_bits
    assert cflag & termios.CLOCAL and cflag & termios.CREAD
    assert not iflag & (termios.ISTRIP | termios.ICRNL | termios.IXON)
    assert not oflag & termios.OPOST and not lflag & (termios.ECHO | termios.ICANON)
    assert (cc[termios.VMIN], cc[termios.VTIME]) == (1, 0)


def test_line_settings_on_the_tty(socat: Socat) -> None:
    """The settings reach the device. A Linux pty forces CS8 and clears PARENB itself, so
    those two are checked above on the computed attributes; the rest is read back here."""
    a = socat.a
    odd = {"url": a, "parity": "O", "stopbits": 2, "xonxoff": True, "rtscts": True}

    async def go() -> None:
        async with PySerial(odd).lookup("connect", "stream")():
            fd = os.open(a, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            try:
                cc = termios.tcgetattr(fd)[6]
            finally:
                os.close(fd)
            assert (cc[termios.VMIN], cc[termios.VTIME]) == (1, 0)  # pyserial leaves VMIN=0
            iflag, cflag = cflag_of(a)
            assert cflag & termios.CSTOPB and cflag & termios.PARODD
            assert not cflag & CMSPAR
            assert cflag & termios.CRTSCTS and cflag & termios.CLOCAL
            assert iflag & termios.IXON and iflag & termios.IXOFF
        async with PySerial({"url": a, "parity": "S"}).lookup("connect", "stream")():
            iflag, cflag = cflag_of(a)
            assert cflag & CMSPAR and not cflag & termios.PARODD
            assert not cflag & (termios.CSTOPB | termios.CRTSCTS)
            assert not iflag & (termios.IXON | termios.IXOFF)

    run(go())


def test_line_settings_reach_pyserial_urls() -> None:
    async def go() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        async with server:
            host, port = server.sockets[0].getsockname()[:2]
            url = f"socket://{host}:{port}"
            driver = PySerial({"url": url, "bytesize": 7, "parity": "E", "stopbits": 2})
            async with driver.lookup("connect", "stream")():
                handle = driver._hub.device.port  # type: ignore[union-attr]
                assert (handle.bytesize, handle.parity, handle.stopbits) == (7, "E", 2)
            await driver.aclose()

    run(go())


# --- exclusive open -------------------------------------------------------------------------


def test_exclusive_against_a_second_driver(socat: Socat) -> None:
    a = socat.a

    async def go() -> None:
        first, second = PySerial({"url": a}), PySerial({"url": a})
        async with first.lookup("connect", "stream")():
            with pytest.raises(DeviceBusy) as info:
                async with second.lookup("connect", "stream")():
                    pass
            text = str(info.value)
            assert f"serial device {a} is busy: held by another process" in text
            assert f"pid {os.getpid()}" in text  # found in /proc/locks
            # a second handle for DTR respects the lock too
            with pytest.raises(DeviceBusy, match=re.escape(a)):
                await invoke(second, "set_dtr", [True])
            await invoke(first, "set_dtr", [True])  # the holder uses its own handle
        # released on close: the second driver gets it now, and holds it in turn
        async with second.lookup("connect", "stream")():
            assert not flock_free(a)
            with pytest.raises(DeviceBusy):
                async with first.lookup("connect", "stream")():
                    pass
        assert flock_free(a)
        # exclusive: false takes no lock at all (and, as root, is not stopped by TIOCEXCL)
        loose = PySerial({"url": a, "exclusive": False})
        async with loose.lookup("connect", "stream")():
            assert flock_free(a)

    run(go())


def test_exclusive_against_another_process(socat: Socat) -> None:
    """A flock held by another process (as another exporter or pyserial exclusive=True
    would hold it) makes connect DeviceBusy naming that process."""
    a = socat.a
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
            a,
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"

        async def busy() -> None:
            with pytest.raises(DeviceBusy, match=rf"held by another process \(pid {holder.pid}"):
                async with PySerial({"url": a}).lookup("connect", "stream")():
                    pass

        run(busy())
    finally:
        holder.kill()
        holder.wait()

    async def free() -> None:
        async with PySerial({"url": a}).lookup("connect", "stream")():
            pass

    run(free())


def test_exclusive_against_plain_opens(socat: Socat) -> None:
    """Root: a plain open succeeds (TIOCEXCL does not apply), its flock does not. Non-root:
    the open itself fails with EBUSY while the driver holds the port, and works after."""
    a = socat.a
    real = os.path.realpath(a)
    probe = (
        "import errno, os, sys\n"
        "try:\n"
        "    os.close(os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK))\n"
        "except OSError as exc:\n"
        "    print(errno.errorcode[exc.errno])\n"
        "else:\n"
        "    print('opened')\n"
    )

    def open_as_nobody() -> str:
        out = subprocess.run(
            [SYSTEM_PYTHON, "-c", probe, real],
            user="nobody",
            capture_output=True,
            text=True,
            check=True,
            cwd="/",
        )
        return out.stdout.strip()

    if os.geteuid() == 0 and SYSTEM_PYTHON is None:
        pytest.fail("no system python3 that user nobody can run")

    async def go() -> None:
        async with PySerial({"url": a}).lookup("connect", "stream")():
            if os.geteuid() == 0:
                fd = os.open(a, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)  # not blocked
                try:
                    with pytest.raises(BlockingIOError):
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                finally:
                    os.close(fd)
                os.chmod(real, 0o666)  # so that only TIOCEXCL can stop nobody
                assert await asyncio.to_thread(open_as_nobody) == "EBUSY"
            else:
                with pytest.raises(OSError) as info:
                    os.open(a, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
                assert info.value.errno == errno.EBUSY
        # TIOCNXCL on close: the pty (which outlives our descriptor) is open to all again
        if os.geteuid() == 0:
            assert await asyncio.to_thread(open_as_nobody) == "opened"
        else:
            os.close(os.open(a, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK))

    run(go())


# --- fan-out --------------------------------------------------------------------------------


def test_two_readers_each_get_every_byte_and_both_write(socat: Socat) -> None:
    payload = os.urandom(2 * MIB)
    digest = hashlib.sha256(payload).hexdigest()

    async def go() -> None:
        driver = PySerial({"url": socat.a})
        connect = driver.lookup("connect", "stream")
        with far_end(socat.b) as board:
            async with connect() as one, connect() as two:
                writer = asyncio.create_task(asyncio.to_thread(board.write_all, payload))
                got_one, got_two = await asyncio.gather(
                    read_exact(one, len(payload)), read_exact(two, len(payload))
                )
                await writer
                assert hashlib.sha256(got_one).hexdigest() == digest  # not split: both whole
                assert hashlib.sha256(got_two).hexdigest() == digest

                await one.write(b"from one;")
                await two.write(b"from two;")
                assert await asyncio.to_thread(board.read_exact, 18) == b"from one;from two;"

                # concurrent writes are never interleaved: each write reaches the line whole
                big_a, big_b = b"A" * 300_000, b"B" * 300_000
                reader = asyncio.create_task(asyncio.to_thread(board.read_exact, 600_000))
                await asyncio.gather(one.write(big_a), two.write(big_b))
                line = await reader
                assert line in (big_a + big_b, big_b + big_a)
            # the last stream closed: the device is released
            assert driver._hub.device is None and flock_free(socat.a)
        await driver.aclose()

    run(go(), timeout=60)


def test_loop_is_one_shared_echo() -> None:
    async def go() -> None:
        driver = PySerial({"url": "loop://"})
        connect = driver.lookup("connect", "stream")
        async with connect() as one, connect() as two:
            await one.write(b"ping")
            assert await read_exact(one, 4) == b"ping"
            assert await read_exact(two, 4) == b"ping"  # everyone hears the echo
            await two.write(b"pong")
            await two.send_eof()  # a half-close ends the loop once the echo is read
            assert await read_exact(one, 4) == b"pong"
            assert await one.read() == b""
            assert await read_exact(two, 4) == b"pong"
            assert await two.read() == b""
        async with connect() as three:  # a fresh loop
            await three.write(b"again")
            assert await read_exact(three, 5) == b"again"
        await driver.aclose()

    run(go())


class SmallBuffers(PySerial):
    TAP_BUFFER = 64 * 1024


def test_slow_reader_is_dropped_for_not_waited_for(socat: Socat) -> None:
    """Policy: a stream full for slow_reader_timeout while another waits becomes lossy; the
    others get everything; memory per stream stays within TAP_BUFFER + one device read."""
    payload = os.urandom(4 * MIB)
    bound = SmallBuffers.TAP_BUFFER + READ_CHUNK

    async def go() -> None:
        driver = SmallBuffers({"url": socat.a, "slow_reader_timeout": 0.3})
        connect = driver.lookup("connect", "stream")
        with far_end(socat.b) as board:
            async with connect() as fast, connect() as slow:
                assert isinstance(slow, _Tap)
                peak = 0

                async def watch() -> None:
                    nonlocal peak
                    while True:
                        peak = max(peak, slow.buffered)
                        await asyncio.sleep(0.005)

                watcher = asyncio.create_task(watch())
                writer = asyncio.create_task(asyncio.to_thread(board.write_all, payload))
                got = await read_exact(fast, len(payload))
                await writer
                watcher.cancel()
                assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
                assert slow.lossy and slow.dropped_total > 0
                assert peak <= bound and slow.buffered <= bound

                # the slow reader: the bytes it kept, then a marker counting the gap
                kept = await read_exact(slow, slow.buffered)
                assert kept == payload[: len(kept)]
                await asyncio.to_thread(board.write_all, b"tail\n")
                assert await read_exact(fast, 5) == b"tail\n"
                marker = b""
                while not marker.endswith(b"tail\n"):
                    marker += await slow.read()
                found = re.fullmatch(
                    rb"\r\n\[jumpstarter-exporter: (\d+) bytes dropped: this reader was too slow"
                    rb"\]\r\ntail\n",
                    marker,
                )
                assert found, marker
                assert len(kept) + int(found.group(1)) == len(payload)
        await driver.aclose()

    run(go(), timeout=60)


def test_lone_stalled_reader_gets_back_pressure_not_drops(socat: Socat) -> None:
    """With nobody else waiting, a stalled reader is never given up on: the far end waits."""
    payload = os.urandom(4 * MIB)
    bound = SmallBuffers.TAP_BUFFER + READ_CHUNK

    async def go() -> None:
        driver = SmallBuffers({"url": socat.a, "slow_reader_timeout": 0.1})
        with far_end(socat.b) as board:
            async with driver.lookup("connect", "stream")() as stream:
                writer = asyncio.create_task(asyncio.to_thread(board.write_all, payload))
                await asyncio.sleep(1.0)
                assert not writer.done()  # the far end is held back, nothing is dropped
                assert not stream.lossy and stream.buffered <= bound
                got = await read_exact(stream, len(payload))
                await writer
                assert got == payload
        await driver.aclose()

    run(go(), timeout=60)


# --- bulk, close/reopen ---------------------------------------------------------------------


def test_8mib_both_ways_with_sha256(socat: Socat) -> None:
    payload = os.urandom(8 * MIB)
    digest = hashlib.sha256(payload).hexdigest()

    async def go() -> tuple[float, float]:
        driver = PySerial({"url": socat.a})
        loop = asyncio.get_running_loop()
        with far_end(socat.b) as board:
            async with driver.lookup("connect", "stream")() as stream:
                start = loop.time()
                writer = asyncio.create_task(asyncio.to_thread(board.write_all, payload))
                sha, count = hashlib.sha256(), 0
                while count < len(payload):
                    chunk = await stream.read()
                    assert chunk
                    sha.update(chunk)
                    count += len(chunk)
                await writer
                inbound = len(payload) / (loop.time() - start) / MIB
                assert (count, sha.hexdigest()) == (len(payload), digest)

                start = loop.time()
                reader = asyncio.create_task(asyncio.to_thread(board.read_exact, len(payload), 60))
                await stream.write(payload)
                got = await reader
                outbound = len(payload) / (loop.time() - start) / MIB
                assert hashlib.sha256(got).hexdigest() == digest
        await driver.aclose()
        return inbound, outbound

    inbound, outbound = run(go(), timeout=120)
    print(
        f"\npty 8 MiB: far end -> driver {inbound:.1f} MB/s, driver -> far end {outbound:.1f} MB/s"
    )
    assert inbound > 1 and outbound > 1


def test_close_and_reopen(socat: Socat) -> None:
    async def go() -> None:
        driver = PySerial({"url": socat.a})
        connect = driver.lookup("connect", "stream")
        with far_end(socat.b) as board:
            for i in range(20):
                async with connect() as stream:
                    msg = b"round %d\n" % i
                    await stream.write(msg)
                    assert await asyncio.to_thread(board.read_exact, len(msg)) == msg
                    await asyncio.to_thread(board.write_all, msg[::-1])
                    assert await read_exact(stream, len(msg)) == msg[::-1]
                assert flock_free(socat.a)
            # close() ends every stream (pending reads get EOF) and releases the port
            async with connect() as one, connect() as two:
                pending = asyncio.create_task(one.read())
                await asyncio.sleep(0.05)
                await invoke(driver, "close", [])
                assert await asyncio.wait_for(pending, 5) == b""
                assert await two.read() == b""
                with pytest.raises(BrokenPipeError):
                    await two.write(b"x")
                assert flock_free(socat.a)
                async with connect() as three:  # and the port opens again at once
                    await asyncio.to_thread(board.write_all, b"again")
                    assert await read_exact(three, 5) == b"again"
        await driver.aclose()
        await driver.aclose()  # idempotent

    run(go(), timeout=60)


class SlowOpen(PySerial):
    def _open_tty(self) -> Any:
        time.sleep(0.3)
        return super()._open_tty()


def test_a_connect_cancelled_while_opening_leaks_no_port(socat: Socat) -> None:
    async def go() -> None:
        driver = SlowOpen({"url": socat.a})

        async def connect() -> None:
            async with driver.lookup("connect", "stream")():
                await asyncio.sleep(10)

        task = asyncio.create_task(connect())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)  # the open finishes in its thread, then is released
        assert flock_free(socat.a) and not tiocexcl_set(socat.a)
        async with driver.lookup("connect", "stream")():
            assert not flock_free(socat.a) and tiocexcl_set(socat.a)
        await driver.aclose()

    run(go())


# --- the far end vanishing ------------------------------------------------------------------


def test_far_end_vanishing_ends_streams_then_reopens(socat: Socat) -> None:
    async def go() -> None:
        driver = PySerial({"url": socat.a})
        connect = driver.lookup("connect", "stream")
        async with connect() as one, connect() as two:
            readers = [asyncio.create_task(s.read()) for s in (one, two)]
            # a write blocked by back-pressure (nobody reads the far end) must end too
            blocked = asyncio.create_task(one.write(os.urandom(4 * MIB)))
            await asyncio.sleep(0.3)
            assert not blocked.done() and not any(r.done() for r in readers)
            await asyncio.to_thread(socat.kill)
            assert await asyncio.wait_for(asyncio.gather(*readers), 5) == [b"", b""]
            with pytest.raises(BrokenPipeError):
                await asyncio.wait_for(blocked, 5)
            with pytest.raises(BrokenPipeError):
                await two.write(b"x")
            assert await one.read() == b""
        for _ in range(2):  # still gone: unavailable, naming the device, every time
            with pytest.raises(DeviceUnavailable, match=re.escape(socat.a)):
                async with connect():
                    pass
        await asyncio.to_thread(socat.start)  # back, on the same path
        with far_end(socat.b) as board:
            async with connect() as stream:
                await stream.write(b"hello again")
                assert await asyncio.to_thread(board.read_exact, 11) == b"hello again"
                await asyncio.to_thread(board.write_all, b"hi")
                assert await read_exact(stream, 2) == b"hi"
        await driver.aclose()

    run(go(), timeout=60)


def test_socket_reset_ends_the_stream_then_reopens() -> None:
    async def go() -> None:
        async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)
            writer.write(b"bye")
            await writer.drain()
            await asyncio.sleep(0.2)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST

        server = await asyncio.start_server(reset, "127.0.0.1", 0)
        host, port = server.sockets[0].getsockname()[:2]
        driver = PySerial({"url": f"socket://{host}:{port}"})
        connect = driver.lookup("connect", "stream")
        async with connect() as stream:
            await stream.write(b"?")
            got = b""
            while chunk := await asyncio.wait_for(stream.read(), 5):
                got += chunk
            assert got == b"bye"
            with pytest.raises(BrokenPipeError):
                await stream.write(b"x")
        server.close()
        await server.wait_closed()
        with pytest.raises(DeviceUnavailable, match=re.escape(f"{host}:{port}")):
            async with connect():
                pass
        echo_server = await asyncio.start_server(echo, host, port)  # back on the same port
        async with echo_server, connect() as stream:
            await stream.write(b"ping")
            assert await read_exact(stream, 4) == b"ping"
        await driver.aclose()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    run(go())


# --- console log ----------------------------------------------------------------------------


class QuickReopen(PySerial):
    REOPEN_INTERVAL = 0.05


async def wait_for_log(driver: PySerial, needle: bytes, within: float = 5) -> bytes:
    log = driver.console_log
    assert log is not None
    deadline = time.monotonic() + within
    while True:
        text = b"".join(p.read_bytes() for p in log.files())
        if needle in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in the console log: {text[-200:]!r}")
        await asyncio.sleep(0.02)


def test_console_log_captures_bytes_while_no_client_is_connected(
    socat: Socat, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"

    async def go() -> None:
        driver = QuickReopen({"url": socat.a, "console_log": f"{logs}/"})
        driver.name = "dut"
        with far_end(socat.b) as board:
            await driver.start()  # lease start: the port is opened and read for the log
            await driver.start()  # idempotent
            log = driver.console_log
            assert log is not None and log.path is not None
            assert re.fullmatch(r"dut-\d{8}T\d{6}\.\d{6}Z\.log", log.path.name)
            assert not flock_free(socat.a)  # held for the whole lease, not per connection
            await asyncio.to_thread(board.write_all, b"U-Boot 2024.01\r\n")
            await wait_for_log(driver, b"U-Boot")
            async with driver.lookup("connect", "stream")() as stream:
                await asyncio.to_thread(board.write_all, b"login: ")
                assert await read_exact(stream, 7) == b"login: "
                await stream.write(b"root\n")  # what the client types is not console output
                assert await asyncio.to_thread(board.read_exact, 5) == b"root\n"
            assert driver._hub.device is not None  # the log keeps it open
            await asyncio.to_thread(board.write_all, b"Kernel panic - not syncing\r\n")
            await wait_for_log(driver, b"Kernel panic")
        await driver.aclose()  # lease end: the log file is closed, the port released
        assert driver.console_log is None and flock_free(socat.a)
        files = sorted(logs.iterdir())
        assert [f.name for f in files] == [log.path.name]
        assert files[0].read_bytes() == (b"U-Boot 2024.01\r\nlogin: Kernel panic - not syncing\r\n")

    run(go())


def test_console_log_rotates_and_keeps_at_most_n_backups(socat: Socat, tmp_path: Path) -> None:
    payload = os.urandom(10_000)
    target = tmp_path / "var" / "console.log"  # a file path: files are console-<stamp>.log

    async def go() -> None:
        cfg = {
            "url": socat.a,
            "console_log": str(target),
            "console_log_max_bytes": 1000,
            "console_log_backups": 2,
        }
        driver = QuickReopen(cfg)
        with far_end(socat.b) as board:
            await driver.start()
            for i in range(0, len(payload), 700):
                await asyncio.to_thread(board.write_all, payload[i : i + 700])
            await wait_for_log(driver, payload[-50:])
            files = driver.console_log.files()  # type: ignore[union-attr]
            assert len(files) == 3  # the current one and 2 backups
            assert all(re.fullmatch(r"console-\d{8}T\d{6}\.\d{6}Z\.log", f.name) for f in files)
            assert [f.stat().st_size for f in files] == [1000, 1000, 1000]
            assert b"".join(f.read_bytes() for f in files) == payload[-3000:]
            await driver.aclose()

            # the next lease starts a new file; the bound holds across leases
            for lease in range(3):
                await driver.start()
                await asyncio.to_thread(board.write_all, b"lease %d\n" % lease)
                await wait_for_log(driver, b"lease %d\n" % lease)
                newest = driver.console_log.path  # type: ignore[union-attr]
                await driver.aclose()
                assert newest.read_bytes() == b"lease %d\n" % lease
                assert len(list(target.parent.iterdir())) == 3
        assert not target.exists()

    run(go(), timeout=60)


def test_console_log_follows_the_device_away_and_back(socat: Socat, tmp_path: Path) -> None:
    async def go() -> None:
        driver = QuickReopen({"url": socat.a, "console_log": str(tmp_path / "logs") + "/"})
        await driver.start()
        with far_end(socat.b) as board:
            await asyncio.to_thread(board.write_all, b"before\n")
            await wait_for_log(driver, b"before\n")
        await asyncio.to_thread(socat.kill)
        await asyncio.sleep(0.3)  # several reopen attempts fail quietly
        with pytest.raises(DeviceUnavailable):
            async with driver.lookup("connect", "stream")():
                pass
        await asyncio.to_thread(socat.start)
        await asyncio.sleep(0.3)  # reopened by the log
        with far_end(socat.b) as board:
            await asyncio.to_thread(board.write_all, b"after\n")
            text = await wait_for_log(driver, b"after\n")
        assert text == b"before\nafter\n"
        await driver.aclose()

    run(go())


def test_console_log_starts_at_first_connect_without_start(socat: Socat, tmp_path: Path) -> None:
    """Until the exporter calls start() at lease start, the first connect starts the log."""

    async def go() -> None:
        driver = SmallBuffers(
            {"url": socat.a, "console_log": str(tmp_path) + "/", "slow_reader_timeout": 0.2}
        )
        assert driver.console_log is None
        with far_end(socat.b) as board:
            async with driver.lookup("connect", "stream")() as stream:
                assert driver.console_log is not None
                # a lone stalled client while the log runs: the log is not held back
                burst = os.urandom(1 * MIB)
                await asyncio.to_thread(board.write_all, burst)
                await wait_for_log(driver, burst[-64:])
                assert stream.lossy
            await asyncio.to_thread(board.write_all, b"between connections\n")
            text = await wait_for_log(driver, b"between connections\n")
            assert text == burst + b"between connections\n"
        await driver.aclose()

    run(go(), timeout=60)


def test_console_log_directory_problem_does_not_break_connect(socat: Socat, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")

    async def go() -> None:
        driver = PySerial({"url": socat.a, "console_log": f"{blocker}/sub/"})
        await driver.start()  # cannot create the directory: logged, no log, no exception
        assert driver.console_log is None
        with far_end(socat.b) as board:
            async with driver.lookup("connect", "stream")() as stream:
                await asyncio.to_thread(board.write_all, b"ok")
                assert await read_exact(stream, 2) == b"ok"
        await driver.aclose()

    run(go())
