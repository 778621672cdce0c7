"""The ceilings the serial path is compared with, measured in the same run.

- a bare socat pty pair: one thread writes into one end, another reads the other end, the way
  the client workload's board does;
- a bare grpcio bidi stream on loopback: a server process that echoes every message, and a
  client that streams 64 KiB messages and counts what comes back. No router, no TLS: the
  fastest a gRPC stream of this framing can go on this machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import tty
import zlib
from pathlib import Path

CHUNK = 1 << 16
SERVICE = "bench.Echo"


def pty_pair_mbps(device: Path, far: Path, total: int) -> dict:
    """Throughput of writing ``total`` bytes into ``device`` and reading them from ``far``."""
    block = os.urandom(1 << 20)
    a = os.open(device, os.O_RDWR | os.O_NOCTTY)
    b = os.open(far, os.O_RDWR | os.O_NOCTTY)
    for fd in (a, b):
        tty.setraw(fd)  # as the serial driver and the board do: no XON/XOFF, no echo
    done: dict = {}

    def sink() -> None:
        got, crc = 0, 0
        while got < total:
            data = os.read(b, CHUNK)
            got += len(data)
            crc = zlib.crc32(data, crc)
        done.update(t=time.perf_counter(), crc=crc)

    try:
        reader = threading.Thread(target=sink, daemon=True)
        reader.start()
        start, sent, crc = time.perf_counter(), 0, 0
        while sent < total:
            piece = block[: min(CHUNK, total - sent)]
            crc = zlib.crc32(piece, crc)
            view = memoryview(piece)
            while view:
                view = view[os.write(a, view) :]
            sent += len(piece)
        reader.join(120)
        if reader.is_alive():
            raise RuntimeError("bare pty pair: the reader did not get everything")
    finally:
        os.close(a)
        os.close(b)
    seconds = done["t"] - start
    return {"bytes": total, "seconds": seconds, "crc_ok": done["crc"] == crc}


def _serve() -> None:
    """Child process: a grpcio echo server on a loopback port, printed on stdout."""
    from concurrent import futures

    import grpc

    def echo(requests, context):
        yield from requests

    server = grpc.server(futures.ThreadPoolExecutor(4))
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Stream": grpc.stream_stream_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(1)


def grpc_bidi_mbps(total: int) -> dict:
    """Echo ``total`` bytes in 64 KiB messages through a bare grpcio bidi stream."""
    import grpc

    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.ceilings", "serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        port = int(server.stdout.readline())
        block = os.urandom(CHUNK)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(f"/{SERVICE}/Stream")

            def requests():
                sent = 0
                while sent < total:
                    yield block
                    sent += len(block)

            got = 0
            start = time.perf_counter()
            for reply in call(requests(), timeout=120):
                got += len(reply)
            seconds = time.perf_counter() - start
    finally:
        server.stdin.close()
        server.wait(10)
    return {"bytes": got, "seconds": seconds, "crc_ok": got >= total}


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        _serve()
