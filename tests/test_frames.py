"""Router stream framing with real parts: our TLS router on loopback, real sockets, real gRPC.

(a) ``bridge_to_router``: two bridges (the "exporter" and the "client" side of a tunnel)
    paired by our RouterService with a minted token; bytes, half-close, and failures.
(b) ``serve_byte_stream``: an exporter-style Stream handler serving an in-memory ByteStream,
    driven by a raw gRPC client.
(c) ``serve_tunnel``: gRPC calls answered in-process on the router stream (the exporter's
    side), reached by a real grpc.aio client through a client-side bridge, as in a lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest

from jumpstarter_exporter._proto.jumpstarter.v1 import router_pb2, router_pb2_grpc
from jumpstarter_exporter.controller.pki import create_ca, issue_server_cert
from jumpstarter_exporter.controller.router import RouterService, add_router_to_server
from jumpstarter_exporter.controller.tokens import mint_router_token
from jumpstarter_exporter.wire import frames, h2server

MiB = 1024 * 1024
GOAWAY = router_pb2.FRAME_TYPE_GOAWAY


@pytest.fixture(scope="module")
def pki():
    ca = create_ca("frames test CA")
    return ca, issue_server_cert(ca, ["127.0.0.1"])


# --- (a) tunnels through the real router -----------------------------------------------------


@dataclass
class Router:
    key: bytes
    service: RouterService
    endpoint: str
    ca_pem: bytes

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            self.endpoint, grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
        )


@contextlib.asynccontextmanager
async def router_server(pki) -> AsyncIterator[Router]:
    ca, leaf = pki
    key = secrets.token_bytes(32)
    service = RouterService(key)
    server = grpc.aio.server()
    add_router_to_server(service, server)  # as controller/server.py does: raw frames
    creds = grpc.ssl_server_credentials([(leaf.key_pem, leaf.cert_pem + ca.cert_pem)])
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield Router(key, service, f"127.0.0.1:{port}", ca.cert_pem)
    finally:
        await server.stop(grace=None)


@dataclass
class App:
    """The test's end of a local connection that a bridge serves (a socketpair)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    sock: socket.socket


@dataclass
class Tunnel:
    exporter: App  # what the exporter's session server would see
    client: App  # what the client's gRPC channel would see
    exporter_bridge: asyncio.Task
    client_bridge: asyncio.Task
    channels: list[grpc.aio.Channel]

    async def close(self) -> None:
        for task in (self.exporter_bridge, self.client_bridge):
            task.cancel()
        await asyncio.gather(self.exporter_bridge, self.client_bridge, return_exceptions=True)
        for app in (self.exporter, self.client):
            app.writer.close()
        for channel in self.channels:
            await channel.close()


async def local_pair() -> tuple[App, asyncio.StreamReader, asyncio.StreamWriter]:
    mine, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=mine)
    app_reader, app_writer = await asyncio.open_connection(sock=theirs)
    return App(app_reader, app_writer, theirs), reader, writer


async def open_tunnel(router: Router, token: str | None = None) -> Tunnel:
    token = token or mint_router_token(router.key)
    channels = [router.channel(), router.channel()]
    exporter, ex_reader, ex_writer = await local_pair()
    client, cl_reader, cl_writer = await local_pair()
    exporter_bridge = asyncio.ensure_future(
        frames.bridge_to_router(ex_reader, ex_writer, channels[0], token)
    )
    client_bridge = asyncio.ensure_future(
        frames.bridge_to_router(cl_reader, cl_writer, channels[1], token)
    )
    return Tunnel(exporter, client, exporter_bridge, client_bridge, channels)


async def finished(task: asyncio.Task, within: float = 5.0):
    """The task's result, which must arrive within ``within`` seconds."""
    done, _ = await asyncio.wait({task}, timeout=within)
    assert done, f"bridge still running after {within} s"
    return task.result()


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 30)


def test_bytes_both_ways_and_clean_close(pki) -> None:
    async def go() -> None:
        async with router_server(pki) as router:
            tunnel = await open_tunnel(router)
            try:
                hello, reply = os.urandom(1024), os.urandom(1024)
                tunnel.client.writer.write(hello)
                await tunnel.client.writer.drain()
                got = await asyncio.wait_for(tunnel.exporter.reader.readexactly(1024), 10)
                assert got == hello
                tunnel.exporter.writer.write(reply)
                await tunnel.exporter.writer.drain()
                got = await asyncio.wait_for(tunnel.client.reader.readexactly(1024), 10)
                assert got == reply
                # Both sides close their writing side: both see EOF, both bridges return.
                tunnel.client.writer.write_eof()
                tunnel.exporter.writer.write_eof()
                assert await read_all(tunnel.exporter.reader) == b""
                assert await read_all(tunnel.client.reader) == b""
                assert await finished(tunnel.exporter_bridge) is None
                assert await finished(tunnel.client_bridge) is None
                # The router has nothing left over.
                assert router.service.active == 0
                assert router.service.pending == {}
            finally:
                await tunnel.close()

    asyncio.run(asyncio.wait_for(go(), 60))


async def transfer(src: App, dst: App, payload: bytes) -> float:
    """Send ``payload`` from ``src`` to ``dst`` (exact size, sha256 checked); seconds taken."""
    want = hashlib.sha256(payload).hexdigest()

    async def send() -> None:
        view = memoryview(payload)
        for offset in range(0, len(view), MiB):
            src.writer.write(view[offset : offset + MiB])
            await src.writer.drain()

    async def receive() -> str:
        digest, left = hashlib.sha256(), len(payload)
        while left:
            chunk = await dst.reader.read(min(left, 256 * 1024))
            assert chunk, f"EOF with {left} bytes missing"
            digest.update(chunk)
            left -= len(chunk)
        return digest.hexdigest()

    start = time.perf_counter()
    _, got = await asyncio.wait_for(asyncio.gather(send(), receive()), 60)
    seconds = time.perf_counter() - start
    assert got == want
    return seconds


def test_16_mib_each_way_with_sha256(pki) -> None:
    async def go() -> None:
        async with router_server(pki) as router:
            tunnel = await open_tunnel(router)
            try:
                size = 16 * MiB
                down = await transfer(tunnel.exporter, tunnel.client, os.urandom(size))
                up = await transfer(tunnel.client, tunnel.exporter, os.urandom(size))
                print(
                    f"\n16 MiB through bridge+TLS router+bridge: exporter->client "
                    f"{size / MiB / down:.1f} MiB/s ({down:.2f} s), client->exporter "
                    f"{size / MiB / up:.1f} MiB/s ({up:.2f} s)"
                )
                # And both at once (full duplex).
                both = await asyncio.wait_for(
                    asyncio.gather(
                        transfer(tunnel.exporter, tunnel.client, os.urandom(size)),
                        transfer(tunnel.client, tunnel.exporter, os.urandom(size)),
                    ),
                    60,
                )
                print(f"16 MiB each way at once: {max(both):.2f} s")
                tunnel.client.writer.write_eof()
                tunnel.exporter.writer.write_eof()
                assert await finished(tunnel.exporter_bridge) is None
                assert await finished(tunnel.client_bridge) is None
            finally:
                await tunnel.close()

    asyncio.run(asyncio.wait_for(go(), 120))


def test_half_close_propagates_and_the_other_way_stays_open(pki) -> None:
    async def go() -> None:
        async with router_server(pki) as router:
            tunnel = await open_tunnel(router)
            try:
                tunnel.client.writer.write(b"request")
                tunnel.client.writer.write_eof()  # the client is done sending
                assert await read_all(tunnel.exporter.reader) == b"request"  # data, then EOF
                await asyncio.sleep(0.2)
                assert not tunnel.exporter_bridge.done()
                assert not tunnel.client_bridge.done()
                # The exporter still answers, at length, after the client's EOF.
                answer = os.urandom(3 * MiB)
                tunnel.exporter.writer.write(answer)
                await tunnel.exporter.writer.drain()
                got = await asyncio.wait_for(tunnel.client.reader.readexactly(len(answer)), 30)
                assert got == answer
                tunnel.exporter.writer.write_eof()
                assert await read_all(tunnel.client.reader) == b""
                assert await finished(tunnel.exporter_bridge) is None
                assert await finished(tunnel.client_bridge) is None
            finally:
                await tunnel.close()

    asyncio.run(asyncio.wait_for(go(), 60))


def test_a_tunnel_that_closes_at_once_is_normal(pki) -> None:
    """The 0.9 client's readiness probe: connect and close, no data (§3.6)."""

    async def go() -> None:
        async with router_server(pki) as router:
            tunnel = await open_tunnel(router)
            try:
                tunnel.client.writer.close()
                assert await read_all(tunnel.exporter.reader) == b""
                tunnel.exporter.writer.close()
                assert await finished(tunnel.exporter_bridge) is None
                assert await finished(tunnel.client_bridge) is None
            finally:
                await tunnel.close()

    asyncio.run(asyncio.wait_for(go(), 60))


def test_cancelling_one_bridge_ends_the_other(pki) -> None:
    async def go() -> None:
        async with router_server(pki) as router:
            tunnel = await open_tunnel(router)
            try:
                tunnel.client.writer.write(b"x" * 1024)
                await asyncio.wait_for(tunnel.exporter.reader.readexactly(1024), 10)
                tunnel.exporter_bridge.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await tunnel.exporter_bridge
                # The cancelled bridge closed its local connection ...
                assert await read_all(tunnel.exporter.reader) == b""
                # ... and the other bridge ends (an error: the peer vanished) and closes its own.
                with pytest.raises(frames.TunnelError, match="UNAVAILABLE"):
                    await finished(tunnel.client_bridge)
                assert await read_all(tunnel.client.reader) == b""
            finally:
                await tunnel.close()

    asyncio.run(asyncio.wait_for(go(), 60))


def test_a_local_connection_that_dies_ends_both_bridges(pki) -> None:
    async def go() -> None:
        async with router_server(pki) as router:
            tunnel = await open_tunnel(router)
            try:
                # The client streams; the exporter's local peer dies without reading it.
                async def flood() -> None:
                    with contextlib.suppress(ConnectionError):
                        while True:
                            tunnel.client.writer.write(b"y" * 65536)
                            await tunnel.client.writer.drain()

                flooding = asyncio.ensure_future(flood())
                await asyncio.wait_for(tunnel.exporter.reader.readexactly(65536), 10)
                tunnel.exporter.writer.transport.abort()  # abrupt: unread data is dropped
                with pytest.raises(frames.TunnelError, match="local connection failed"):
                    await finished(tunnel.exporter_bridge)
                # The other bridge ends too. Cleanly or not depends on a race: the aborted
                # socket reads as EOF, so the exporter's bridge may say GOAWAY before its write
                # fails; after the peer's GOAWAY a failing RPC is a normal end.
                with contextlib.suppress(frames.TunnelError):
                    await finished(tunnel.client_bridge)
                # The client's local connection was closed under the flood.
                await asyncio.wait_for(flooding, 5)
            finally:
                await tunnel.close()

    asyncio.run(asyncio.wait_for(go(), 60))


def test_refused_token_and_unreachable_router(pki) -> None:
    async def go() -> None:
        async with router_server(pki) as router:
            app, reader, writer = await local_pair()
            async with router.channel() as channel:
                forged = mint_router_token(b"not the router key")
                with pytest.raises(frames.TunnelError, match="UNAUTHENTICATED"):
                    await asyncio.wait_for(
                        frames.bridge_to_router(reader, writer, channel, forged), 10
                    )
            assert await read_all(app.reader) == b""  # the local connection was closed
            app.writer.close()
        # Nothing listens there any more: the RPC fails fast.
        app, reader, writer = await local_pair()
        async with router.channel() as channel:
            start = time.monotonic()
            with pytest.raises(frames.TunnelError, match="UNAVAILABLE"):
                await frames.bridge_to_router(reader, writer, channel, "t", timeout=2)
            assert time.monotonic() - start < 5
        assert await read_all(app.reader) == b""
        app.writer.close()
        # Something listens but never completes the TLS handshake: the timeout applies.
        with socket.create_server(("127.0.0.1", 0)) as silent:
            app, reader, writer = await local_pair()
            endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
            async with grpc.aio.secure_channel(endpoint, grpc.ssl_channel_credentials()) as ch:
                start = time.monotonic()
                with pytest.raises(frames.TunnelError, match="not reachable within 1 s"):
                    await frames.bridge_to_router(reader, writer, ch, "t", timeout=1)
                assert time.monotonic() - start < 3
            assert await read_all(app.reader) == b""
            app.writer.close()

    asyncio.run(asyncio.wait_for(go(), 60))


def test_wire_framing_seen_by_a_raw_peer(pki) -> None:
    """A raw Stream call stands in for the far side: what a bridge sends, and how it takes
    DATA, PING and RST_STREAM."""

    async def go() -> None:
        async with router_server(pki) as router:
            token = mint_router_token(router.key)
            app, reader, writer = await local_pair()
            async with router.channel() as bridge_channel, router.channel() as peer_channel:
                bridge = asyncio.ensure_future(
                    frames.bridge_to_router(reader, writer, bridge_channel, token)
                )
                peer = router_pb2_grpc.RouterServiceStub(peer_channel).Stream(
                    metadata=(("authorization", f"Bearer {token}"),)
                )
                payload = os.urandom(200 * 1024)
                app.writer.write(payload)
                app.writer.write_eof()
                got, frame = bytearray(), await asyncio.wait_for(peer.read(), 10)
                while frame.frame_type == router_pb2.FRAME_TYPE_DATA:
                    assert 0 < len(frame.payload) <= frames.CHUNK
                    got += frame.payload
                    frame = await asyncio.wait_for(peer.read(), 10)
                assert bytes(got) == payload
                assert frame.frame_type == GOAWAY and frame.payload == b""
                # PING and unknown frame types are ignored; DATA still flows.
                await peer.write(router_pb2.StreamRequest(frame_type=router_pb2.FRAME_TYPE_PING))
                await peer.write(router_pb2.StreamRequest(payload=b"junk", frame_type=5))
                await peer.write(router_pb2.StreamRequest(payload=b"after ping"))
                assert await asyncio.wait_for(app.reader.readexactly(10), 10) == b"after ping"
                # RST_STREAM aborts the tunnel.
                await peer.write(
                    router_pb2.StreamRequest(frame_type=router_pb2.FRAME_TYPE_RST_STREAM)
                )
                with pytest.raises(frames.TunnelError, match="reset"):
                    await finished(bridge)
                assert await read_all(app.reader) == b""
                app.writer.close()
                peer.cancel()

    asyncio.run(asyncio.wait_for(go(), 60))


class LingeringRouter(router_pb2_grpc.RouterServiceServicer):
    """Answers GOAWAY to a GOAWAY but never ends the RPC; records the call's metadata."""

    def __init__(self) -> None:
        self.metadata: list[tuple[str, str]] = []
        self.ended = asyncio.Event()

    async def Stream(self, request_iterator, context):
        self.metadata = list(context.invocation_metadata())
        context.add_done_callback(lambda _: self.ended.set())
        async for frame in request_iterator:
            if frame.frame_type == GOAWAY:
                await context.write(router_pb2.StreamResponse(frame_type=GOAWAY))
        await asyncio.Event().wait()


def test_a_router_that_never_ends_the_call_is_left_after_timeout() -> None:
    async def go() -> None:
        servicer = LingeringRouter()
        server = grpc.aio.server()
        router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            app, reader, writer = await local_pair()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                bridge = asyncio.ensure_future(
                    frames.bridge_to_router(reader, writer, channel, "tok", timeout=0.5)
                )
                app.writer.write_eof()
                assert await read_all(app.reader) == b""  # the GOAWAY came back
                start = time.monotonic()
                assert await finished(bridge) is None  # a normal end, after the linger
                assert 0.2 < time.monotonic() - start < 3
                app.writer.close()
                await asyncio.wait_for(servicer.ended.wait(), 5)  # the call was cancelled
            # Only the bearer token (gRPC adds its user-agent).
            keys = {k for k, _ in servicer.metadata} - {"user-agent"}
            assert keys == {"authorization"}
            assert dict(servicer.metadata)["authorization"] == "Bearer tok"
        finally:
            await server.stop(grace=None)

    asyncio.run(asyncio.wait_for(go(), 60))


# --- (c) serve_tunnel: calls answered on the router stream itself ----------------------------


class Answers:
    """A small gRPC service for the tunnel tests (bytes in, bytes out)."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.waiting = asyncio.Event()

    async def upper(self, request: bytes, context) -> bytes:
        return request.upper()

    async def count(self, request: bytes, context):
        for i in range(int(request)):
            yield str(i).encode()

    async def hang(self, request: bytes, context) -> bytes:
        self.waiting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b""

    def handlers(self) -> h2server.Handlers:
        methods = {
            "Upper": grpc.unary_unary_rpc_method_handler(self.upper),
            "Count": grpc.unary_stream_rpc_method_handler(self.count),
            "Hang": grpc.unary_unary_rpc_method_handler(self.hang),
        }
        handlers = h2server.Handlers()
        handlers.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Answers", methods),)
        )
        return handlers


@contextlib.asynccontextmanager
async def served_tunnel(router: Router, tmp_path, answers: Answers):
    """serve_tunnel on one side; on the other, a Unix socket whose connection a client
    bridge carries through the router (what our client and upstream's do)."""
    token = mint_router_token(router.key)
    exporter_channel, client_channel = router.channel(), router.channel()
    served = asyncio.ensure_future(frames.serve_tunnel(exporter_channel, token, answers.handlers()))
    bridges: list[asyncio.Task] = []
    local: list[asyncio.StreamWriter] = []

    async def accept(reader, writer) -> None:
        bridges.append(asyncio.current_task())
        local.append(writer)
        await frames.bridge_to_router(reader, writer, client_channel, token)

    def leave() -> None:
        """The client process ends: its end of the local connection closes."""
        for writer in local:
            writer.transport.close()

    path = tmp_path / "client.sock"
    server = await asyncio.start_unix_server(accept, path=str(path))
    grpc_channel = grpc.aio.insecure_channel(f"unix://{path}")
    try:
        yield served, grpc_channel, leave
    finally:
        await grpc_channel.close()
        server.close()
        served.cancel()
        for task in bridges:
            task.cancel()
        await asyncio.gather(served, *bridges, return_exceptions=True)
        await exporter_channel.close()
        await client_channel.close()


def test_serve_tunnel_answers_calls_and_ends_cleanly(pki, tmp_path) -> None:
    async def go() -> None:
        async with router_server(pki) as router:
            answers = Answers()
            async with served_tunnel(router, tmp_path, answers) as (served, channel, leave):
                upper = channel.unary_unary("/test.Answers/Upper")
                assert await asyncio.wait_for(upper(b"hello"), 10) == b"HELLO"
                big = os.urandom(3 * MiB)  # larger than any flow-control window
                assert await asyncio.wait_for(upper(big), 30) == big.upper()
                count = channel.unary_stream("/test.Answers/Count")
                got = [item async for item in count(b"500")]
                assert got == [str(i).encode() for i in range(500)]
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary("/test.Answers/Nope")(b"")
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
                # The client goes away: the tunnel ends without an error.
                leave()
                assert await finished(served, 10) is None
            assert router.service.active == 0

    asyncio.run(asyncio.wait_for(go(), 60))


def test_serve_tunnel_cancelled_ends_the_calls_and_the_client_learns(pki, tmp_path) -> None:
    async def go() -> None:
        async with router_server(pki) as router:
            answers = Answers()
            async with served_tunnel(router, tmp_path, answers) as (served, channel, _leave):
                call = channel.unary_unary("/test.Answers/Hang")(b"")
                await asyncio.wait_for(answers.waiting.wait(), 10)
                served.cancel()  # the lease is over
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await asyncio.wait_for(call, 10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert answers.cancelled.is_set()

    asyncio.run(asyncio.wait_for(go(), 60))


def test_serve_tunnel_failures_are_tunnel_errors(pki) -> None:
    async def go() -> None:
        async with router_server(pki) as router:
            token = mint_router_token(router.key)
            async with router.channel() as channel, router.channel() as peer_channel:
                served = asyncio.ensure_future(
                    frames.serve_tunnel(channel, token, Answers().handlers())
                )
                peer = router_pb2_grpc.RouterServiceStub(peer_channel).Stream(
                    metadata=(("authorization", f"Bearer {token}"),)
                )
                # The server side speaks first in HTTP/2: its SETTINGS arrive unasked.
                first = await asyncio.wait_for(peer.read(), 10)
                assert first.frame_type == router_pb2.FRAME_TYPE_DATA
                assert first.payload[3] == 0x4  # an HTTP/2 SETTINGS frame
                await peer.write(
                    router_pb2.StreamRequest(frame_type=router_pb2.FRAME_TYPE_RST_STREAM)
                )
                with pytest.raises(frames.TunnelError, match="reset"):
                    await finished(served)
                peer.cancel()
            async with router.channel() as channel:
                forged = mint_router_token(b"not the router key")
                with pytest.raises(frames.TunnelError, match="UNAUTHENTICATED"):
                    await asyncio.wait_for(
                        frames.serve_tunnel(channel, forged, Answers().handlers()), 10
                    )
        with socket.create_server(("127.0.0.1", 0)) as silent:
            endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
            async with grpc.aio.secure_channel(endpoint, grpc.ssl_channel_credentials()) as ch:
                with pytest.raises(frames.TunnelError, match="not reachable within 1 s"):
                    await frames.serve_tunnel(ch, "t", Answers().handlers(), timeout=1)

    asyncio.run(asyncio.wait_for(go(), 60))


def test_write_frames_keeps_each_frame_under_the_cap() -> None:
    """Whatever the HTTP/2 side hands over at once goes out in frames of at most
    TUNNEL_FRAME bytes, in order. A recording call stands in for the RPC: a real client
    cannot be made to produce several MiB between two writes on demand (its windows
    decide), and the property is about what we write, not what the router does."""

    class Recorder:
        def __init__(self) -> None:
            self.frames: list[router_pb2.StreamRequest] = []

        async def write(self, frame: router_pb2.StreamRequest) -> None:
            self.frames.append(frame)

    async def go() -> None:
        for size in (1, frames.TUNNEL_FRAME, frames.TUNNEL_FRAME + 1, 5 * MiB + 3):
            data = os.urandom(size)
            call = Recorder()
            await frames.write_frames(call, data)
            assert all(0 < len(f.payload) <= frames.TUNNEL_FRAME for f in call.frames)
            assert all(f.frame_type == router_pb2.FRAME_TYPE_DATA for f in call.frames)
            assert b"".join(f.payload for f in call.frames) == data
            assert len(call.frames) == -(-size // frames.TUNNEL_FRAME)

    asyncio.run(go())


# --- (b) serve_byte_stream on an exporter-style Stream handler --------------------------------


class EchoStream:
    """An in-memory ByteStream: what is written is read back; bounded (back-pressure)."""

    def __init__(self, *, fail_read: BaseException | None = None) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
        self.fail_read = fail_read
        self.closed = asyncio.Event()
        self.eof_received = False

    async def read(self, n: int) -> bytes:
        if self.fail_read is not None:
            await asyncio.sleep(0.2)
            raise self.fail_read
        return await self.queue.get()

    async def write(self, data: bytes) -> None:
        await self.queue.put(bytes(data))

    async def send_eof(self) -> None:
        self.eof_received = True
        await self.queue.put(b"")

    async def aclose(self) -> None:
        self.closed.set()


class SinkStream(EchoStream):
    """Has nothing to say (EOF at once) but takes everything written."""

    def __init__(self) -> None:
        super().__init__()
        self.received = bytearray()

    async def read(self, n: int) -> bytes:
        return b""

    async def write(self, data: bytes) -> None:
        self.received += data


class Handler(router_pb2_grpc.RouterServiceServicer):
    def __init__(self) -> None:
        self.streams: list[EchoStream] = []
        self.factory = EchoStream

    async def Stream(self, request_iterator, context):
        request = frames.parse_stream_request(dict(context.invocation_metadata()))
        assert request["kind"] == "driver"
        stream = self.factory()
        self.streams.append(stream)
        await frames.serve_byte_stream(stream, context)


@contextlib.asynccontextmanager
async def session_server() -> AsyncIterator[tuple[Handler, grpc.aio.Channel]]:
    handler = Handler()
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(handler, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield handler, channel
    finally:
        await server.stop(grace=None)


REQUEST = json.dumps(
    {"kind": "driver", "uuid": "6f1c2a94-2b39-4a53-9c1f-2f0d7a4c1b11", "method": "connect"},
    separators=(",", ":"),
)


def open_stream(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    return router_pb2_grpc.RouterServiceStub(channel).Stream(metadata=(("request", REQUEST),))


def data(payload: bytes) -> router_pb2.StreamRequest:
    return router_pb2.StreamRequest(payload=payload)


def test_echo_stream_ends_the_call_ok() -> None:
    async def go() -> None:
        async with session_server() as (handler, channel):
            call = open_stream(channel)
            # Headers come first, without any data (the echo has nothing to say yet).
            assert list(await asyncio.wait_for(call.initial_metadata(), 5)) == []
            sent, got = os.urandom(300 * 1024), bytearray()
            for offset in range(0, len(sent), 100 * 1024):
                await call.write(data(sent[offset : offset + 100 * 1024]))
                while len(got) < offset + 100 * 1024:
                    frame = await asyncio.wait_for(call.read(), 5)
                    assert frame.frame_type == router_pb2.FRAME_TYPE_DATA
                    got += frame.payload
            assert bytes(got) == sent
            await call.write(router_pb2.StreamRequest(frame_type=router_pb2.FRAME_TYPE_PING))
            await call.write(router_pb2.StreamRequest(frame_type=GOAWAY))
            await call.done_writing()
            frame = await asyncio.wait_for(call.read(), 5)
            assert frame.frame_type == GOAWAY and frame.payload == b""
            assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            (stream,) = handler.streams
            assert stream.eof_received
            await asyncio.wait_for(stream.closed.wait(), 5)

    asyncio.run(asyncio.wait_for(go(), 60))


def test_half_close_without_goaway_frame_and_device_eof_first() -> None:
    async def go() -> None:
        async with session_server() as (handler, channel):
            handler.factory = SinkStream
            call = open_stream(channel)
            # The device has nothing to say: GOAWAY at once, while we may still send.
            frame = await asyncio.wait_for(call.read(), 5)
            assert frame.frame_type == GOAWAY
            payload = os.urandom(2 * MiB)
            for offset in range(0, len(payload), 64 * 1024):
                await call.write(data(payload[offset : offset + 64 * 1024]))
            await call.done_writing()  # plain half-close, no GOAWAY frame
            assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            (stream,) = handler.streams
            assert bytes(stream.received) == payload
            assert stream.eof_received
            await asyncio.wait_for(stream.closed.wait(), 5)

    asyncio.run(asyncio.wait_for(go(), 60))


def test_client_cancel_closes_the_stream() -> None:
    async def go() -> None:
        async with session_server() as (handler, channel):
            for _ in range(3):  # the server stays healthy after each cancel
                call = open_stream(channel)
                await call.write(data(b"hello"))
                frame = await asyncio.wait_for(call.read(), 5)
                assert frame.payload == b"hello"
                call.cancel()
                await asyncio.wait_for(handler.streams[-1].closed.wait(), 5)
                assert not handler.streams[-1].eof_received
            # A cancel while the server is blocked writing to a full stream (back-pressure).
            call = open_stream(channel)
            for _ in range(20):
                await call.write(data(b"z" * 65536))  # nobody reads the echo
            call.cancel()
            await asyncio.wait_for(handler.streams[-1].closed.wait(), 5)

    asyncio.run(asyncio.wait_for(go(), 60))


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConnectionError("serial port unplugged"), grpc.StatusCode.UNAVAILABLE),
        (OSError(5, "Input/output error"), grpc.StatusCode.INTERNAL),
        (RuntimeError("driver bug"), grpc.StatusCode.UNKNOWN),
    ],
)
def test_stream_failure_ends_the_call_with_a_status(error, code) -> None:
    async def go() -> None:
        async with session_server() as (handler, channel):
            handler.factory = lambda: EchoStream(fail_read=error)
            call = open_stream(channel)
            await asyncio.wait_for(call.initial_metadata(), 5)
            # The server is waiting for our frames when the device fails.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(call.read(), 5)
            assert info.value.code() == code
            assert str(error) in info.value.details()
            await asyncio.wait_for(handler.streams[-1].closed.wait(), 5)
            # And the server still serves.
            handler.factory = EchoStream
            call = open_stream(channel)
            await call.write(data(b"again"))
            assert (await asyncio.wait_for(call.read(), 5)).payload == b"again"
            call.cancel()

    asyncio.run(asyncio.wait_for(go(), 60))


def test_rst_from_the_client_aborts() -> None:
    async def go() -> None:
        async with session_server() as (handler, channel):
            call = open_stream(channel)
            await call.write(router_pb2.StreamRequest(frame_type=router_pb2.FRAME_TYPE_RST_STREAM))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(call.read(), 5)
            assert info.value.code() == grpc.StatusCode.ABORTED
            await asyncio.wait_for(handler.streams[-1].closed.wait(), 5)

    asyncio.run(asyncio.wait_for(go(), 60))


# --- the ``request`` metadata ------------------------------------------------------------------


def test_parse_stream_request() -> None:
    uid = "6f1c2a94-2b39-4a53-9c1f-2f0d7a4c1b11"
    assert frames.parse_stream_request({"request": REQUEST, "user-agent": "x"}) == {
        "kind": "driver",
        "uuid": uid,
        "method": "connect",
    }
    resource = json.dumps(
        {"kind": "resource", "uuid": uid.upper(), "x_jmp_content_encoding": "gzip"}
    )
    assert frames.parse_stream_request([("authorization", "Bearer t"), ("request", resource)]) == {
        "kind": "resource",
        "uuid": uid,
        "x_jmp_content_encoding": "gzip",
    }
    assert (
        frames.parse_stream_request({"request": json.dumps({"kind": "resource", "uuid": uid})})[
            "x_jmp_content_encoding"
        ]
        is None
    )


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({}, "missing 'request'"),
        ([("request", REQUEST), ("request", REQUEST)], "more than one"),
        ({"request": "{not json"}, "not valid JSON"),
        ({"request": "[1]"}, "JSON object"),
        ({"request": '{"uuid": "6f1c2a94-2b39-4a53-9c1f-2f0d7a4c1b11"}'}, "unknown kind None"),
        ({"request": '{"kind": "other"}'}, "unknown kind 'other'"),
        ({"request": '{"kind": "driver", "uuid": "nope", "method": "m"}'}, "not a UUID"),
        ({"request": '{"kind": "driver", "uuid": 7, "method": "m"}'}, "not a UUID"),
        (
            {"request": '{"kind": "driver", "uuid": "6f1c2a94-2b39-4a53-9c1f-2f0d7a4c1b11"}'},
            "method None",
        ),
        (
            {
                "request": '{"kind": "resource", "uuid": "6f1c2a94-2b39-4a53-9c1f-2f0d7a4c1b11",'
                ' "x_jmp_content_encoding": 3}'
            },
            "x_jmp_content_encoding 3",
        ),
    ],
)
def test_parse_stream_request_errors(metadata, message) -> None:
    with pytest.raises(ValueError, match=message):
        frames.parse_stream_request(metadata)
