"""``jumpstarter.v1.RouterService.Stream``: pair two callers by router token and forward.

The exporter (after a Listen token) and the client (after Dial) each open a Stream with the
same token. The first waits for the second, until the token expires; then frames are
forwarded verbatim in both directions (the router never interprets DATA/GOAWAY/PING/RST,
protocol-facts §4). Each direction is pumped by awaiting the write to the other side before
reading the next frame, so HTTP/2 flow control is the only buffer: a slow reader slows the
writer, and memory stays flat.

A side that half-closes ends only its direction; the pair ends when both directions ended
(both calls return OK) or when one side fails or vanishes (the other call ends with
UNAVAILABLE, so the exporter closes its end of the tunnel at once). A token pairs once: a
third caller, or a replay, is refused.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import structlog

from jumpstarter_exporter._proto.jumpstarter.v1 import router_pb2_grpc
from jumpstarter_exporter.controller.auth import Refused, bearer
from jumpstarter_exporter.controller.tokens import TokenError, verify_router_token

log = structlog.get_logger("jumpstarter.router")


@dataclass(eq=False)
class _Pair:
    stream_id: str
    first: grpc.aio.ServicerContext
    second: grpc.aio.ServicerContext
    open_directions: int = 2
    failed: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def other(self, context: grpc.aio.ServicerContext) -> grpc.aio.ServicerContext:
        return self.second if context is self.first else self.first

    def direction_ended(self) -> None:
        self.open_directions -= 1
        if self.open_directions <= 0:
            self.done.set()

    def fail(self) -> None:
        # The pumps are not cancelled here: a Python-level cancel leaves the call's core
        # receive operation pending, and the status we then send collides with it
        # (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS). Ending the surviving call is what stops
        # its pump; see RouterService._run.
        if not self.done.is_set():
            self.failed = True
            self.done.set()


def add_router_to_server(router: RouterService, server: grpc.aio.Server) -> None:
    """Register ``router`` for ``RouterService.Stream`` with frames kept as raw bytes.

    StreamRequest and StreamResponse have the same fields and numbers (payload = 1,
    frame_type = 2), so a received request message is, byte for byte, the response to
    forward: the router neither parses nor rebuilds frames (three copies of each payload
    fewer; it never looks inside them anyway)."""
    handler = grpc.stream_stream_rpc_method_handler(router.Stream)  # no (de)serializers
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("jumpstarter.v1.RouterService", {"Stream": handler}),)
    )


async def _pump(source: grpc.aio.ServicerContext, sink: grpc.aio.ServicerContext) -> None:
    while True:
        frame = await source.read()  # a serialized StreamRequest, passed on as it is
        if frame is grpc.aio.EOF:
            return
        await sink.write(frame)


class RouterService(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, key: bytes) -> None:
        self.key = key
        self.pending: dict[str, tuple[grpc.aio.ServicerContext, asyncio.Future[_Pair]]] = {}
        self.used: dict[str, float] = {}
        self.active = 0

    def _consume(self, stream_id: str, expires: float) -> None:
        now = time.time()
        for sid in [s for s, exp in self.used.items() if exp <= now]:
            del self.used[sid]
        self.used[stream_id] = expires

    async def Stream(self, request_iterator, context):
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        try:
            claims = verify_router_token(self.key, bearer(metadata))
        except (Refused, TokenError) as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"router token refused: {exc}")
        sid = claims.stream_id
        if sid in self.used:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "router token already used")
        # Headers go out now, not piggybacked on the first forwarded frame: otherwise a
        # status sent while the peer's first write is in flight would carry initial
        # metadata a second time (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS), and callers learn
        # at once that the router accepted them.
        await context.send_initial_metadata(())
        waiting = self.pending.pop(sid, None)
        if waiting is None:
            # First to arrive: wait (at most until the token expires) for the other side.
            future: asyncio.Future[_Pair] = asyncio.get_running_loop().create_future()
            self.pending[sid] = (context, future)
            try:
                pair = await asyncio.wait_for(future, max(claims.expires - time.time(), 0.1))
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no peer arrived")
            finally:
                if self.pending.get(sid, (None,))[0] is context:
                    del self.pending[sid]
        else:
            self._consume(sid, claims.expires)
            first, future = waiting
            pair = _Pair(sid, first, context)
            future.set_result(pair)
        await self._run(pair, context, pair.other(context))

    async def _run(self, pair: _Pair, mine, theirs) -> None:
        self.active += 1
        pump = asyncio.ensure_future(_pump(mine, theirs))
        pump.add_done_callback(lambda task: self._pump_done(pair, task))
        try:
            await pair.done.wait()
            if pair.failed and not pump.done():
                # We survived our peer: end our call, which also ends our pump's read.
                await mine.abort(
                    grpc.StatusCode.UNAVAILABLE, "the other side of the stream went away"
                )
        except asyncio.CancelledError:
            pair.fail()  # our own caller went away
            raise
        finally:
            self.active -= 1
            if not pump.done():
                pump.cancel()
            log.debug(
                "router stream closed",
                stream=pair.stream_id,
                failed=pair.failed,
                active=self.active,
                pending=len(self.pending),
            )

    @staticmethod
    def _pump_done(pair: _Pair, task: asyncio.Task) -> None:
        if task.cancelled():
            pair.fail()
        elif (exc := task.exception()) is not None:
            log.debug("router stream broke", stream=pair.stream_id, error=str(exc))
            pair.fail()
        else:
            pair.direction_ended()
