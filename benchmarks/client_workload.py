"""The client workload, run by the upstream 0.9 venv's python against either exporter.

It uses upstream's own Python client API (``ClientConfigV1Alpha1.lease()``, ``lease.connect()``,
``client.power.on()``, ``client.serial.stream()``), so the client is the same program whichever
exporter answers. It also plays the board: it holds the far end of the socat pty pair whose
other end is the exporter's serial port, so both ends of a serial measurement are timed with
one clock.

The orchestrator (benchmarks/main.py) drives it one command per stdin line and reads one JSON
object per stdout line, so it can sample the exporter's CPU and memory between steps. This file
must not import jumpstarter_exporter: it runs in the other venv.
"""

from __future__ import annotations

import json
import os
import select
import sys
import threading
import time
import tty
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from jumpstarter.config.client import ClientConfigV1Alpha1

CHUNK = 1 << 16
BLOCK = os.urandom(1 << 20)  # a transfer repeats this block; its CRC is computed as it flows


def say(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def payload(total: int):
    """``total`` bytes in CHUNK pieces, cut from BLOCK, without building them all at once."""
    sent = 0
    while sent < total:
        offset = sent % len(BLOCK)
        piece = BLOCK[offset : offset + min(CHUNK, total - sent, len(BLOCK) - offset)]
        sent += len(piece)
        yield piece


def expected_crc(total: int) -> int:
    crc = 0
    for piece in payload(total):
        crc = zlib.crc32(piece, crc)
    return crc


class Board:
    """The far end of the pty pair: the 'device' the serial port is wired to."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        # fully raw: with IXON left on, an XOFF byte in the data stops this end's output
        tty.setraw(self.fd)

    def drain(self) -> None:
        while select.select([self.fd], [], [], 0.05)[0]:
            if not os.read(self.fd, CHUNK):
                return

    def sink(self, total: int, done: dict) -> None:
        got, crc = 0, 0
        while got < total:
            data = os.read(self.fd, CHUNK)
            got += len(data)
            crc = zlib.crc32(data, crc)
        done.update(t=time.perf_counter(), crc=crc, got=got)

    def source(self, total: int) -> None:
        for piece in payload(total):
            view = memoryview(piece)
            while view:
                view = view[os.write(self.fd, view) :]

    def echo(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if select.select([self.fd], [], [], 0.1)[0]:
                data = os.read(self.fd, CHUNK)
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view) :]


def timed(fn, count: int) -> list[float]:
    out = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def concurrent(fn, callers: int, seconds: float) -> dict:
    deadline = time.perf_counter() + seconds

    def worker() -> int:
        calls = 0
        while time.perf_counter() < deadline:
            fn()
            calls += 1
        return calls

    start = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        counts = list(pool.map(lambda _: worker(), range(callers)))
    elapsed = time.perf_counter() - start
    return {"calls": sum(counts), "seconds": elapsed}


def up(stream, board: Board, total: int) -> dict:
    board.drain()
    done: dict = {}
    reader = threading.Thread(target=board.sink, args=(total, done), daemon=True)
    reader.start()
    start = time.perf_counter()
    for piece in payload(total):
        stream.send(piece)
    reader.join(120)
    if reader.is_alive():
        raise RuntimeError(f"client->device: the board got only part of {total} bytes")
    return {
        "bytes": total,
        "seconds": done["t"] - start,
        "crc_ok": done["crc"] == expected_crc(total),
    }


def down(stream, board: Board, total: int) -> dict:
    board.drain()
    writer = threading.Thread(target=board.source, args=(total,), daemon=True)
    got, crc, frames = 0, 0, 0
    start = time.perf_counter()
    writer.start()
    while got < total:
        data = stream.receive()
        got += len(data)
        frames += 1
        crc = zlib.crc32(data, crc)
    end = time.perf_counter()
    writer.join(30)
    return {
        "bytes": got,
        "seconds": end - start,
        "crc_ok": crc == expected_crc(total),
        "frames": frames,  # receives, i.e. router frames as the client saw them
    }


def echo(stream, board: Board, count: int) -> dict:
    board.drain()
    stop = threading.Event()
    echoer = threading.Thread(target=board.echo, args=(stop,), daemon=True)
    echoer.start()
    message = bytes(range(32))
    lat, ok = [], True
    try:
        for _ in range(count + 10):
            start = time.perf_counter()
            stream.send(message)
            got = b""
            while len(got) < len(message):
                got += stream.receive()
            lat.append(time.perf_counter() - start)
            ok = ok and got == message
    finally:
        stop.set()
        echoer.join(5)
    return {"lat": lat[10:], "ok": ok}  # the first ten warm the path up


def main() -> None:
    config = ClientConfigV1Alpha1.from_file(sys.argv[1])
    selector, board = sys.argv[2], Board(sys.argv[3])
    lease_cm = connect_cm = client = serial_cm = serial = None
    say(ev="hello")
    for line in sys.stdin:
        cmd, *args = line.split()
        try:
            if cmd == "lease":
                start = time.time()
                lease_cm = config.lease(selector=selector)
                lease = lease_cm.__enter__()
                connect_cm = lease.connect()
                client = connect_cm.__enter__()
                client.power.on()  # warm: first call builds channels
                say(ev="lease", seconds=time.time() - start)
            elif cmd == "on":
                say(ev="on", lat=timed(client.power.on, int(args[0])))
            elif cmd == "read":
                power = client.power
                say(ev="read", lat=timed(lambda p=power: list(p.read()), int(args[0])))
            elif cmd == "concurrent":
                say(ev="concurrent", **concurrent(client.power.on, int(args[0]), float(args[1])))
            elif cmd == "serial":
                serial_cm = client.serial.stream()
                serial = serial_cm.__enter__()
                # The port is opened (and pyserial flushes it) only once the stream is being
                # served, after the client already holds it: bytes the board sent before then
                # would be lost. One byte up, read by the board, proves the path is open.
                serial.send(b"\0")
                if not select.select([board.fd], [], [], 30)[0] or not os.read(board.fd, 1):
                    raise RuntimeError("the serial port never opened")
                say(ev="serial")
            elif cmd == "up":
                say(ev="up", **up(serial, board, int(args[0])))
            elif cmd == "down":
                say(ev="down", **down(serial, board, int(args[0])))
            elif cmd == "echo":
                say(ev="echo", **echo(serial, board, int(args[0])))
            elif cmd == "release":
                if serial_cm is not None:
                    serial_cm.__exit__(None, None, None)
                    serial_cm = None
                connect_cm.__exit__(None, None, None)
                lease_cm.__exit__(None, None, None)
                say(ev="released", t=time.time())
            elif cmd == "pending":
                # queued behind the current lease: it becomes ready as soon as that ends
                lease = config.create_lease(duration=timedelta(minutes=30), selector=selector)
                say(ev="pending", name=lease.name)
            elif cmd == "delete":
                config.delete_lease(args[0])
                say(ev="deleted", t=time.time())
            elif cmd == "quit":
                say(ev="bye")
                return
            else:
                say(ev="error", error=f"unknown command {cmd}")
        except Exception as exc:  # noqa: BLE001 - reported to the orchestrator, which stops
            say(ev="error", error=f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
