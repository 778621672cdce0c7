"""wire/h2server.py against real grpc.aio clients: what a gRPC client observes of our server.

Every test serves plain bytes methods (grpc's own generic handlers) on a Unix socket in
tmp_path with ``h2server.serve_stream`` and calls them through a real ``grpc.aio`` channel,
so the HTTP/2 and gRPC framing is checked by C-core, the client upstream uses too. Server and
client share one event loop, so a handler can record what happened to it (cancelled, what it
saw) for the test to assert on.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import random
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest

from jumpstarter_exporter.wire import h2server

SERVICE = "test.Svc"
KIB = 1 << 10
MIB = 1 << 20


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _same(data: bytes) -> bytes:
    return data


def _with_bytes(make):
    """A handler factory of grpc's with explicit identity (de)serializers: bytes messages."""
    return lambda fn: make(fn, request_deserializer=_same, response_serializer=_same)


_unary = _with_bytes(grpc.unary_unary_rpc_method_handler)
_unary_stream = _with_bytes(grpc.unary_stream_rpc_method_handler)
_stream_unary = _with_bytes(grpc.stream_unary_rpc_method_handler)
_stream_stream = _with_bytes(grpc.stream_stream_rpc_method_handler)


class Server:
    """Counts the connections ``serve_stream`` accepted and how many of them have ended."""

    def __init__(self, methods: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = h2server.Handlers()
        self.handlers.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, methods)]
        )
        self.accepted = 0
        self.finished = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            await h2server.serve_stream(self.handlers, reader, writer)
        finally:
            self.finished += 1


async def eventually(predicate: Callable[[], bool], within: float) -> bool:
    """Whether ``predicate`` became true within ``within`` seconds (polled)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not predicate():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.02)
    return True


async def until_stalled(counter: Callable[[], int], within: float = 20) -> int:
    """The value ``counter`` settles at: unchanged for 0.5 s (or whatever it is at
    ``within`` seconds, which a counter that never stops reaches)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    last = counter()
    while loop.time() < end:
        await asyncio.sleep(0.5)
        if counter() == last:
            break
        last = counter()
    return counter()


async def serving(
    tmp_path: Path,
    methods: dict[str, grpc.RpcMethodHandler],
    body: Callable[[Server, grpc.aio.Channel], Awaitable[None]],
) -> Server:
    """Serve ``methods`` on a socket, run ``body`` with a channel to it, then close the
    channel and check that every ``serve_stream`` ended (no connection outlives its client).

    ``body`` is a function so that its call objects are gone before the channel closes:
    C-core keeps a connection open while any call object on it is alive.
    """
    server = Server(methods)
    path = tmp_path / "h2.sock"
    unix = await asyncio.start_unix_server(server.serve, path=str(path))
    channel = grpc.aio.insecure_channel(f"unix://{path}")
    try:
        await body(server, channel)
    finally:
        gc.collect()
        await channel.close()
        ended = await eventually(lambda: server.finished == server.accepted, 10)
        unix.close()
        await unix.wait_closed()
    assert ended, f"{server.accepted - server.finished} serve_stream call(s) still running"
    return server


def _method(name: str) -> str:
    return f"/{SERVICE}/{name}"


async def _status(call) -> tuple[grpc.StatusCode, str]:
    """The status a call ended with: (OK, "") or the error's code and details."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


# --- 1. unary, abort ------------------------------------------------------------------------


def test_unary_call_returns_the_handlers_response(tmp_path: Path) -> None:
    async def reverse(request: bytes, context) -> bytes:
        return request[::-1]

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary(_method("Reverse"))
        assert await call(b"hello") == b"olleh"
        assert await call(b"") == b""  # an empty message is still a message
        assert server.accepted == 1

    run(serving(tmp_path, {"Reverse": _unary(reverse)}, body))


@pytest.mark.parametrize(
    ("code", "details"),
    [
        (grpc.StatusCode.NOT_FOUND, "driver nope not found"),
        (grpc.StatusCode.FAILED_PRECONDITION, "100% busy, 50%2F50 is not an escape"),
        (grpc.StatusCode.PERMISSION_DENIED, "non-ASCII: é ü 日本語 ✓ and a\ttab\nnewline"),
        (grpc.StatusCode.INVALID_ARGUMENT, "%%% %zz %4 %"),
    ],
)
def test_abort_reaches_the_client_with_exact_code_and_details(
    tmp_path: Path, code: grpc.StatusCode, details: str
) -> None:
    """grpc-message is percent-encoded on the wire; C-core decodes it back to our text."""

    async def refuse(request: bytes, context) -> bytes:
        await context.abort(code, details)
        raise AssertionError("abort returned")

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        assert await _status(channel.unary_unary(_method("Refuse"))(b"x")) == (code, details)

    run(serving(tmp_path, {"Refuse": _unary(refuse)}, body))


def test_abort_after_streamed_messages_keeps_the_messages_and_the_status(
    tmp_path: Path,
) -> None:
    """The status then arrives in trailers after data, not as a trailers-only response."""

    async def some_then_abort(request: bytes, context):
        for i in range(3):
            yield b"m%d" % i
        await context.abort(grpc.StatusCode.ABORTED, "stopped at 3 ✗")

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        call = channel.unary_stream(_method("S"))(b"")
        got = [await call.read() for _ in range(3)]
        assert got == [b"m0", b"m1", b"m2"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert (info.value.code(), info.value.details()) == (
            grpc.StatusCode.ABORTED,
            "stopped at 3 ✗",
        )

    run(serving(tmp_path, {"S": _unary_stream(some_then_abort)}, body))


# --- 2. set_code, exceptions, unknown methods -----------------------------------------------


def test_set_code_then_raise_reports_that_code(tmp_path: Path) -> None:
    """What every generated ``*Servicer`` base class does for a method it does not have."""

    async def not_here(request: bytes, context) -> bytes:
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("Method not implemented!")
        raise NotImplementedError("Method not implemented!")

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        assert await _status(channel.unary_unary(_method("NotHere"))(b"")) == (
            grpc.StatusCode.UNIMPLEMENTED,
            "Method not implemented!",
        )

    run(serving(tmp_path, {"NotHere": _unary(not_here)}, body))


def test_handler_exception_is_unknown_and_the_connection_goes_on(tmp_path: Path) -> None:
    async def broken(request: bytes, context) -> bytes:
        raise ValueError("boom")

    async def echo(request: bytes, context) -> bytes:
        return request

    methods = {"Broken": _unary(broken), "Echo": _unary(echo)}

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        code, details = await _status(channel.unary_unary(_method("Broken"))(b""))
        assert code == grpc.StatusCode.UNKNOWN
        assert "boom" in details
        assert await channel.unary_unary(_method("Echo"))(b"still here") == b"still here"
        assert server.accepted == 1

    run(serving(tmp_path, methods, body))


def test_unknown_method_or_service_is_unimplemented(tmp_path: Path) -> None:
    async def echo(request: bytes, context) -> bytes:
        return request

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        for path in (_method("Missing"), "/other.Svc/Echo"):
            code, _details = await _status(channel.unary_unary(path)(b""))
            assert code == grpc.StatusCode.UNIMPLEMENTED, path
        # Also for a streaming call: the client is still sending when it is refused.
        call = channel.stream_stream(_method("MissingStream"))()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert await channel.unary_unary(_method("Echo"))(b"ok") == b"ok"

    run(serving(tmp_path, {"Echo": _unary(echo)}, body))


# --- 3. streaming, metadata -----------------------------------------------------------------


def test_server_streaming_many_messages_in_order(tmp_path: Path) -> None:
    async def count_gen(request: bytes, context):
        for i in range(int(request)):
            yield b"%d" % i

    async def count_write(request: bytes, context) -> None:
        # The other servicer style: context.write, then return None.
        for i in range(int(request)):
            await context.write(b"%d" % i)

    methods = {"Gen": _unary_stream(count_gen), "Write": _unary_stream(count_write)}

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        for name in ("Gen", "Write"):
            call = channel.unary_stream(_method(name))(b"5000")
            got = [message async for message in call]
            assert got == [b"%d" % i for i in range(5000)], name
            assert await call.code() == grpc.StatusCode.OK

    run(serving(tmp_path, methods, body))


def test_client_streaming_sees_every_message(tmp_path: Path) -> None:
    async def summary(requests, context) -> bytes:
        digest = hashlib.sha256()
        count = 0
        async for message in requests:
            digest.update(message)
            count += 1
        return b"%d:" % count + digest.digest()

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        messages = [b"message %d " % i * (i % 7) for i in range(2000)]

        async def requests():
            for message in messages:
                yield message

        response = await channel.stream_unary(_method("Sum"))(requests())
        assert response == b"2000:" + hashlib.sha256(b"".join(messages)).digest()

    run(serving(tmp_path, {"Sum": _stream_unary(summary)}, body))


def test_bidi_echo_with_context_read_write_and_eof(tmp_path: Path) -> None:
    seen_eof = []

    async def echo(requests, context) -> None:
        while (message := await context.read()) is not grpc.aio.EOF:
            await context.write(message.upper())
        seen_eof.append(True)
        await context.write(b"bye")

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        call = channel.stream_stream(_method("Echo"))()
        for i in range(200):
            # Strictly one at a time: each answer needs its request delivered now.
            await call.write(b"ping %d" % i)
            assert await asyncio.wait_for(call.read(), 10) == b"PING %d" % i
        await call.done_writing()
        assert await call.read() == b"bye"
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        assert seen_eof == [True]

    run(serving(tmp_path, {"Echo": _stream_stream(echo)}, body))


def test_abort_while_the_client_is_still_sending(tmp_path: Path) -> None:
    """The handler ends the call after one message; the client, still writing, gets the
    status and its later writes fail instead of hanging."""

    async def first_only(requests, context) -> None:
        first = await context.read()
        await context.abort(grpc.StatusCode.OUT_OF_RANGE, f"only {len(first)} bytes, please")

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        call = channel.stream_stream(_method("FirstOnly"))()
        await call.write(b"x" * 100)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(call.read(), 10)
        assert (info.value.code(), info.value.details()) == (
            grpc.StatusCode.OUT_OF_RANGE,
            "only 100 bytes, please",
        )
        # grpc.aio refuses writes on a finished call (InvalidStateError).
        with pytest.raises((grpc.aio.AioRpcError, asyncio.InvalidStateError)):
            for _ in range(100):  # more than the windows hold, were the call still open
                await asyncio.wait_for(call.write(b"y" * (64 * KIB)), 10)

    run(serving(tmp_path, {"FirstOnly": _stream_stream(first_only)}, body))


def test_handlers_without_serializers_get_and_give_raw_bytes(tmp_path: Path) -> None:
    """grpc treats a missing (de)serializer as the identity; so must we."""

    async def reverse(request: bytes, context) -> bytes:
        return request[::-1]

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        assert await channel.unary_unary(_method("Raw"))(b"\x00abc") == b"cba\x00"

    run(serving(tmp_path, {"Raw": grpc.unary_unary_rpc_method_handler(reverse)}, body))


def test_initial_metadata_reaches_the_client_before_any_message(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def announce(request: bytes, context):
        await context.send_initial_metadata((("x-first", "one"), ("x-second", "two words")))
        await release.wait()  # nothing else was sent: the headers went out on their own
        yield b"payload"

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        call = channel.unary_stream(_method("Announce"))(b"")
        metadata = await asyncio.wait_for(call.initial_metadata(), 10)
        assert metadata.get("x-first") == "one"
        assert metadata.get("x-second") == "two words"
        release.set()
        assert [message async for message in call] == [b"payload"]

    run(serving(tmp_path, {"Announce": _unary_stream(announce)}, body))


def test_abort_carries_trailing_metadata(tmp_path: Path) -> None:
    """Trailing metadata given to abort (text and -bin) reaches the client with the status."""

    async def refuse(request: bytes, context) -> bytes:
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            "no",
            trailing_metadata=(("x-why", "policy"), ("x-code-bin", b"\x00\x01")),
        )
        return b""

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(channel.unary_unary(_method("Refuse"))(b""), 10)
        trailing = info.value.trailing_metadata()
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (trailing.get("x-why"), trailing.get("x-code-bin")) == ("policy", b"\x00\x01")

    run(serving(tmp_path, {"Refuse": _unary(refuse)}, body))


def test_binary_initial_metadata_reaches_the_client_as_bytes(tmp_path: Path) -> None:
    """A ``-bin`` value goes out base64-encoded (as grpc's own server sends it), so the
    client decodes the very bytes the handler gave."""
    blob = b"\x00\xff\x10 binary"

    async def announce(request: bytes, context):
        await context.send_initial_metadata((("x-blob-bin", blob), ("x-text", "t")))
        yield b"payload"

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        call = channel.unary_stream(_method("Announce"))(b"")
        metadata = await asyncio.wait_for(call.initial_metadata(), 10)
        assert (metadata.get("x-blob-bin"), metadata.get("x-text")) == (blob, "t")
        assert [message async for message in call] == [b"payload"]

    run(serving(tmp_path, {"Announce": _unary_stream(announce)}, body))


def test_invocation_metadata_includes_text_and_binary_values(tmp_path: Path) -> None:
    """``-bin`` values travel base64 without padding; the handler gets the bytes back."""
    seen: list[tuple] = []

    async def look(request: bytes, context) -> bytes:
        seen.append(context.invocation_metadata())
        return b""

    blobs = [b"\x00\x01\xfe\xff", b"abc", b"\xff" * 5, bytes(range(256))]

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        metadata = [("x-plain", "value 1"), ("x-other", "two")]
        metadata += [(f"x-blob{i}-bin", blob) for i, blob in enumerate(blobs)]
        await channel.unary_unary(_method("Look"))(b"", metadata=metadata)

    run(serving(tmp_path, {"Look": _unary(look)}, body))
    assert len(seen) == 1
    for item in [("x-plain", "value 1"), ("x-other", "two")]:
        assert item in seen[0]
    for i, blob in enumerate(blobs):
        assert (f"x-blob{i}-bin", blob) in seen[0]
    keys = [key for key, _ in seen[0]]
    assert not [key for key in keys if key.startswith(":")], keys
    assert "content-type" not in keys and "te" not in keys


# --- 4. large messages, flow control ---------------------------------------------------------


def test_large_messages_arrive_intact_both_ways(tmp_path: Path) -> None:
    """3 MiB each way, three calls at once: well over the 1 MiB stream windows."""

    async def reverse(request: bytes, context) -> bytes:
        return request[::-1]

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        rng = random.Random(7)
        requests = [rng.randbytes(3 * MIB) for _ in range(3)]
        call = channel.unary_unary(_method("Reverse"))
        responses = await asyncio.gather(*(call(request) for request in requests))
        assert [r == q[::-1] for r, q in zip(responses, requests, strict=True)] == [True] * 3

    run(serving(tmp_path, {"Reverse": _unary(reverse)}, body))


def test_message_over_4mib_is_resource_exhausted(tmp_path: Path) -> None:
    handled = []

    async def take(request: bytes, context) -> bytes:
        handled.append(len(request))
        return b"%d" % len(request)

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary(_method("Take"))
        code, _ = await _status(call(b"\0" * (5 * MIB)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Exactly the limit is fine, and the connection still serves.
        assert await call(b"\0" * (4 * MIB)) == b"%d" % (4 * MIB)
        assert server.accepted == 1

    run(serving(tmp_path, {"Take": _unary(take)}, body))
    assert handled == [4 * MIB]


def test_64mib_bidi_transfer_with_checksums(tmp_path: Path) -> None:
    """Both directions at once through both flow-control windows, 1024 x 64 KiB."""
    count, size = 1024, 64 * KIB

    async def echo(requests, context) -> None:
        digest = hashlib.sha256()
        async for message in requests:
            digest.update(message)
            await context.write(message)
        await context.write(digest.digest())

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        block = random.Random(1).randbytes(size)
        sent, received = hashlib.sha256(), hashlib.sha256()
        call = channel.stream_stream(_method("Echo"))()

        async def writer() -> None:
            for i in range(count):
                message = i.to_bytes(4, "big") + block[4:]
                sent.update(message)
                await call.write(message)
            await call.done_writing()

        async def reader() -> bytes:
            for _ in range(count):
                message = await call.read()
                assert len(message) == size
                received.update(message)
            server_digest = await call.read()
            assert await call.read() is grpc.aio.EOF
            return server_digest

        async with asyncio.TaskGroup() as group:
            group.create_task(writer())
            server_digest = group.create_task(reader())
        assert await call.code() == grpc.StatusCode.OK
        assert server_digest.result() == sent.digest()
        assert received.digest() == sent.digest()

    run(serving(tmp_path, {"Echo": _stream_stream(echo)}, body), 180)


# --- 5. back-pressure ----------------------------------------------------------------------


def test_calls_that_end_with_data_unread_do_not_shrink_the_connection_window(
    tmp_path: Path,
) -> None:
    """A handler that returns while the client's data waits unread (the queue was full, so
    none of it went back to the client's windows) hands it back when the call ends: twenty
    such calls (~2 MiB each held back, more than the 16 MiB connection window in all) and a
    call after them still go through on the same connection."""

    async def ignore(requests, context) -> None:
        await context.read()  # the client is sending
        await asyncio.sleep(0.3)  # ... and fills the window and the queue meanwhile

    async def echo(request: bytes, context) -> bytes:
        return request

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        for _ in range(20):
            call = channel.stream_stream(_method("Ignore"))()

            async def writer(call=call) -> None:
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    for _ in range(64):
                        await call.write(b"\x5a" * (64 * KIB))

            task = asyncio.ensure_future(writer())
            try:
                # OK, or INTERNAL when the client's own write on the ended call loses the
                # race with our trailers (grpc.aio client behaviour); either way it ends.
                await asyncio.wait_for(call.code(), 10)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        big = b"\x01" * (3 * MIB)
        assert await asyncio.wait_for(channel.unary_unary(_method("Echo"))(big), 10) == big

    run(serving(tmp_path, {"Ignore": _stream_stream(ignore), "Echo": _unary(echo)}, body), 120)


def test_a_handler_that_does_not_read_stops_the_clients_writes(tmp_path: Path) -> None:
    """Nothing queues without bound: while the handler does not read, the client's writes
    stop completing after a few MiB (the windows plus the queue), then all 64 MiB go
    through once it reads."""
    count, size = 1024, 64 * KIB
    release = asyncio.Event()

    async def slow(requests, context) -> None:
        await release.wait()
        total = 0
        while (message := await context.read()) is not grpc.aio.EOF:
            total += len(message)
        await context.write(b"%d" % total)

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        call = channel.stream_stream(_method("Slow"))()
        written = 0

        async def writer() -> None:
            nonlocal written
            for _ in range(count):
                await call.write(b"\x5a" * size)
                written += 1
            await call.done_writing()

        task = asyncio.ensure_future(writer())
        try:
            stalled_at = await until_stalled(lambda: written)
            assert not task.done(), "all 64 MiB were accepted by a handler that reads none"
            # Generous: the windows hold 2 MiB; C-core may buffer some messages too.
            assert stalled_at * size < 16 * MIB, f"{stalled_at} x 64 KiB written"
            release.set()
            await asyncio.wait_for(asyncio.shield(task), 60)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert await call.read() == b"%d" % (count * size)
        assert await call.code() == grpc.StatusCode.OK

    run(serving(tmp_path, {"Slow": _stream_stream(slow)}, body), 120)


def test_a_client_that_does_not_read_stops_the_handlers_writes(tmp_path: Path) -> None:
    """The other direction: the handler's writes wait for the client's windows."""
    count, size = 1024, 64 * KIB
    written = 0

    async def flood(request: bytes, context):
        nonlocal written
        for _ in range(count):
            yield b"\xa5" * size
            written += 1

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        call = channel.unary_stream(_method("Flood"))(b"")
        await asyncio.wait_for(call.initial_metadata(), 10)
        stalled_at = await until_stalled(lambda: written)
        assert stalled_at < count, "the handler wrote 64 MiB nobody read"
        assert stalled_at * size < 32 * MIB, f"{stalled_at} x 64 KiB written"
        total = 0
        async for message in call:
            total += len(message)
        assert total == count * size
        assert written == count

    run(serving(tmp_path, {"Flood": _unary_stream(flood)}, body), 120)


# --- 6-7. cancellation, deadline -------------------------------------------------------------


def test_client_cancel_cancels_the_handler_and_the_connection_goes_on(tmp_path: Path) -> None:
    started = asyncio.Event()
    outcome: list[str] = []

    async def wait_forever(request: bytes, context) -> bytes:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            outcome.append(f"cancelled, context.cancelled()={context.cancelled()}")
            raise
        return b"never"

    async def echo(request: bytes, context) -> bytes:
        return request

    methods = {"Wait": _unary(wait_forever), "Echo": _unary(echo)}

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary(_method("Wait"))(b"")
        await asyncio.wait_for(started.wait(), 10)
        assert call.cancel()
        assert await eventually(lambda: bool(outcome), 10), "the handler was not cancelled"
        assert outcome == ["cancelled, context.cancelled()=True"]
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await channel.unary_unary(_method("Echo"))(b"next") == b"next"
        assert server.accepted == 1

    run(serving(tmp_path, methods, body))


def test_deadline_exceeded_cancels_the_handler(tmp_path: Path) -> None:
    outcome: list[str] = []

    async def sleepy(request: bytes, context) -> bytes:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        return b"too late"

    async def echo(request: bytes, context) -> bytes:
        return request

    methods = {"Sleepy": _unary(sleepy), "Echo": _unary(echo)}

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        code, _ = await _status(channel.unary_unary(_method("Sleepy"))(b"", timeout=0.2))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await eventually(lambda: bool(outcome), 10), "the handler was not cancelled"
        assert outcome == ["cancelled"]
        assert await channel.unary_unary(_method("Echo"))(b"after") == b"after"

    run(serving(tmp_path, methods, body))


# --- 8. concurrency ----------------------------------------------------------------------


def test_200_concurrent_calls_on_one_channel(tmp_path: Path) -> None:
    """More calls than MAX_CONCURRENT_STREAMS (100): the client queues the rest."""
    active = 0
    peak = 0

    async def slow_echo(request: bytes, context) -> bytes:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await asyncio.sleep(0.05)
        finally:
            active -= 1
        return request

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary(_method("Echo"))
        responses = await asyncio.gather(*(call(b"%d" % i) for i in range(200)))
        assert responses == [b"%d" % i for i in range(200)]
        assert server.accepted == 1

    run(serving(tmp_path, {"Echo": _unary(slow_echo)}, body))
    assert 1 < peak <= h2server.MAX_CONCURRENT_STREAMS


# --- 9. connection end ---------------------------------------------------------------------


def _first_then_wait(outcome: list[str]):
    """A streaming handler that sends one message, then waits until it is cancelled (and
    records that in ``outcome``)."""

    async def one_then_wait(request: bytes, context):
        yield b"first"
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    return one_then_wait


def test_closing_the_channel_cancels_a_running_handler_and_ends_serve_stream(
    tmp_path: Path,
) -> None:
    outcome: list[str] = []
    one_then_wait = _first_then_wait(outcome)

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        call = channel.unary_stream(_method("Stream"))(b"")
        assert await asyncio.wait_for(call.read(), 10) == b"first"
        assert (server.accepted, server.finished) == (1, 0)
        await channel.close()
        assert await eventually(lambda: bool(outcome), 10), "the handler was not cancelled"
        assert outcome == ["cancelled"]
        # serving() then checks that serve_stream returned once the call object is gone.

    run(serving(tmp_path, {"Stream": _unary_stream(one_then_wait)}, body))


_KILLED_CLIENT = """
import asyncio, sys
import grpc.aio

async def main():
    channel = grpc.aio.insecure_channel(sys.argv[1])
    call = channel.unary_stream(sys.argv[2])(b"")
    print((await call.read()).decode(), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_a_killed_client_cancels_its_handler_and_ends_serve_stream(tmp_path: Path) -> None:
    """The connection just ends (no RST_STREAM, no GOAWAY): a real grpc client process is
    killed with SIGKILL in the middle of a call."""
    outcome: list[str] = []
    one_then_wait = _first_then_wait(outcome)

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        target = f"unix://{tmp_path / 'h2.sock'}"
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _KILLED_CLIENT,
            target,
            _method("Stream"),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert await asyncio.wait_for(client.stdout.readline(), 30) == b"first\n"
            assert (server.accepted, server.finished) == (1, 0)
        finally:
            client.kill()
            await asyncio.wait_for(client.wait(), 10)
        assert await eventually(lambda: server.finished == 1, 10), "serve_stream still running"
        assert outcome == ["cancelled"]

    run(serving(tmp_path, {"Stream": _unary_stream(one_then_wait)}, body))


# --- 10. compression -----------------------------------------------------------------------


def test_a_compressed_request_is_unimplemented_and_the_connection_goes_on(
    tmp_path: Path,
) -> None:
    handled = []

    async def echo(request: bytes, context) -> bytes:
        handled.append(request)
        return request

    async def body(server: Server, channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary(_method("Echo"))
        # Compressible, so C-core does not fall back to sending it uncompressed.
        text = b"compress me " * 1000
        code, _ = await _status(call(text, compression=grpc.Compression.Gzip))
        assert code == grpc.StatusCode.UNIMPLEMENTED
        assert await call(b"plain") == b"plain"
        assert server.accepted == 1

    run(serving(tmp_path, {"Echo": _unary(echo)}, body))
    assert handled == [b"plain"]


def test_bad_binary_metadata_refuses_the_call_not_the_connection() -> None:
    """Invalid base64 in a ``-bin`` header ends that call with INVALID_ARGUMENT and the
    connection serves the next call. The peer is h2's own client state machine, because a
    real gRPC client always encodes ``-bin`` values correctly and cannot send this."""
    import h2.config
    import h2.connection
    import h2.events

    async def echo(request: bytes, context) -> bytes:
        return request

    async def go() -> None:
        handlers = h2server.Handlers()
        handlers.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, {"Echo": _unary(echo)})]
        )
        sent: list[bytes] = []

        async def write(data: bytes) -> None:
            sent.append(data)

        server = h2server.H2GrpcConnection(handlers, write)
        served = asyncio.ensure_future(server.serve())
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()

        def request(stream_id: int, extra: list[tuple[str, str]]) -> None:
            headers = [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", _method("Echo")),
                (":authority", "x"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                *extra,
            ]
            client.send_headers(stream_id, headers)
            client.send_data(stream_id, b"\0\0\0\0\x02hi", end_stream=True)
            server.feed(client.data_to_send())

        with_headers = (h2.events.TrailersReceived, h2.events.ResponseReceived)

        statuses: dict[int, dict[str, str]] = {}

        async def status(stream_id: int) -> dict[str, str]:
            async with asyncio.timeout(10):
                while stream_id not in statuses:
                    await asyncio.sleep(0.01)
                    while sent:
                        for event in client.receive_data(sent.pop(0)):
                            if isinstance(event, with_headers):
                                headers = {k.decode(): v.decode() for k, v in event.headers}
                                if "grpc-status" in headers:
                                    statuses[event.stream_id] = headers
                    server.feed(client.data_to_send())
            return statuses[stream_id]

        request(1, [("x-blob-bin", "@@not base64@@")])
        refused = await status(1)
        assert refused["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
        assert "x-blob-bin" in refused["grpc-message"]
        request(3, [("x-blob-bin", "AAE")])
        assert (await status(3))["grpc-status"] == "0"
        server.feed_eof()
        await asyncio.wait_for(served, 10)

    run(go())
