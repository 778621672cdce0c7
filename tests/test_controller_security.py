"""Our controller refuses what it must: bad tokens, wrong identities, dials without a lease,
expired leases, replayed router tokens; and a client that vanishes mid-stream leaks nothing.

The exporter side is played by a short script speaking the real protocol to the real
controller (Register, ReportStatus, Status, Listen): these are refusals the upstream exporter
never provokes on purpose. The full upstream exporter runs in test_controller_interop.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from jumpstarter_exporter._proto.jumpstarter.client.v1 import client_pb2, client_pb2_grpc
from jumpstarter_exporter._proto.jumpstarter.v1 import (
    common_pb2,
    jumpstarter_pb2,
    jumpstarter_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from jumpstarter_exporter.config.models import TLSConfig
from jumpstarter_exporter.wire.channel import identity_credentials, secure_channel
from tests.harness import Controller, wait_for


@dataclass
class Speaker:
    """One identity's channel to the controller."""

    endpoint: str
    tls: TLSConfig
    kind: str
    namespace: str
    name: str
    token: str

    @classmethod
    def from_config(cls, ctl: Controller, cfg: dict, kind: str, **override) -> Speaker:
        fields = dict(
            endpoint=ctl.endpoint,
            tls=TLSConfig(**cfg["tls"]),
            kind=kind,
            namespace=cfg["metadata"]["namespace"],
            name=cfg["metadata"]["name"],
            token=cfg["token"],
        )
        fields.update(override)
        return cls(**fields)

    def channel(self) -> grpc.aio.Channel:
        creds = identity_credentials(self.kind, self.namespace, self.name, self.token)
        return secure_channel(self.endpoint, self.tls, call_credentials=creds, environ={})


async def code_of(coro) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value.code(), info.value.details()


@pytest.fixture
def lab(controller: Controller, tmp_path: Path):
    exporter = controller.create_exporter("ex1", {"board": "b1"}, {}, tmp_path / "ex1.yaml")
    import yaml

    ecfg = yaml.safe_load(exporter.read_text())
    ccfg = controller.create_client("cl1", tmp_path / "cl1.yaml")
    other = controller.create_client("cl2", tmp_path / "cl2.yaml")
    return controller, ecfg, ccfg, other


REPORTS = [
    jumpstarter_pb2.DriverInstanceReport(
        uuid="r",
        labels={"jumpstarter.dev/client": "jumpstarter_driver_composite.client.CompositeClient"},
    )
]


class ScriptedExporter:
    """Registers, reports AVAILABLE, keeps a Status stream open and Listens when leased."""

    def __init__(self, speaker: Speaker) -> None:
        self.speaker = speaker
        self.statuses: list[jumpstarter_pb2.StatusResponse] = []
        self.tokens: asyncio.Queue[jumpstarter_pb2.ListenResponse] = asyncio.Queue()
        self.online = asyncio.Event()  # the first Status message arrived
        self.leased = asyncio.Event()
        self.unleased = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> ScriptedExporter:
        self.channel = self.speaker.channel()
        self.stub = jumpstarter_pb2_grpc.ControllerServiceStub(self.channel)
        await self.stub.Register(jumpstarter_pb2.RegisterRequest(reports=REPORTS), timeout=10)
        await self.report(common_pb2.EXPORTER_STATUS_AVAILABLE)
        self._tasks.append(asyncio.ensure_future(self._status()))
        return self

    async def report(self, status: int) -> None:
        await self.stub.ReportStatus(
            jumpstarter_pb2.ReportStatusRequest(status=status, message="test"), timeout=10
        )

    async def _status(self) -> None:
        listening = None
        async for msg in self.stub.Status(jumpstarter_pb2.StatusRequest()):
            self.statuses.append(msg)
            self.online.set()
            if msg.leased and listening is None:
                self.leased.set()
                listening = asyncio.ensure_future(self._listen(msg.lease_name))
                self._tasks.append(listening)
                await self.report(common_pb2.EXPORTER_STATUS_LEASE_READY)
            elif not msg.leased and listening is not None:
                self.unleased.set()

    async def _listen(self, lease: str) -> None:
        request = jumpstarter_pb2.ListenRequest(lease_name=lease)
        async for msg in self.stub.Listen(request):
            await self.tokens.put(msg)

    async def __aexit__(self, *exc) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task
        await self.channel.close()


async def create_lease(client: Speaker, seconds: int = 60, selector: str = "board=b1"):
    async with client.channel() as ch:
        stub = client_pb2_grpc.ClientServiceStub(ch)
        lease = await stub.CreateLease(
            client_pb2.CreateLeaseRequest(
                parent=f"namespaces/{client.namespace}",
                lease=client_pb2.Lease(
                    selector=selector, duration=duration_pb2.Duration(seconds=seconds)
                ),
            ),
            timeout=10,
        )
    return lease.name.split("/")[-1]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_missing_bad_and_foreign_tokens(lab) -> None:
    ctl, ecfg, ccfg, _ = lab

    async def go():
        good = Speaker.from_config(ctl, ecfg, "Exporter")
        register = jumpstarter_pb2.RegisterRequest(reports=REPORTS)
        # no authorization at all: a channel without call credentials
        async with secure_channel(ctl.endpoint, good.tls, environ={}) as ch:
            stub = jumpstarter_pb2_grpc.ControllerServiceStub(ch)
            code, msg = await code_of(stub.Register(register, timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert "missing authorization" in msg
        bad = Speaker.from_config(ctl, ecfg, "Exporter", token="x.y.z")
        async with bad.channel() as ch:
            stub = jumpstarter_pb2_grpc.ControllerServiceStub(ch)
            code, msg = await code_of(stub.Register(register, timeout=10))
            assert (code, msg) == (grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        # the exporter's real token, claiming to be another exporter
        other = Speaker.from_config(ctl, ecfg, "Exporter", name="someone-else")
        async with other.channel() as ch:
            stub = jumpstarter_pb2_grpc.ControllerServiceStub(ch)
            code, msg = await code_of(stub.Register(register, timeout=10))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert ecfg["token"] not in msg
        # a client token may not register, an exporter token may not lease
        as_exporter = Speaker.from_config(ctl, ccfg, "Exporter")
        async with as_exporter.channel() as ch:
            stub = jumpstarter_pb2_grpc.ControllerServiceStub(ch)
            code, _ = await code_of(stub.Register(register, timeout=10))
            assert code == grpc.StatusCode.PERMISSION_DENIED
        client_view = Speaker.from_config(ctl, ccfg, "Client")
        async with client_view.channel() as ch:
            stub = jumpstarter_pb2_grpc.ControllerServiceStub(ch)
            listen = stub.Listen(jumpstarter_pb2.ListenRequest(lease_name="x"))
            code, _ = await code_of(listen.read())
            assert code == grpc.StatusCode.PERMISSION_DENIED
        exporter_as_client = Speaker.from_config(ctl, ecfg, "Client")
        code, _ = await code_of(create_lease(exporter_as_client))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        exporter_kind = Speaker.from_config(ctl, ecfg, "Exporter")
        async with exporter_kind.channel() as ch:
            stub = client_pb2_grpc.ClientServiceStub(ch)
            code, _ = await code_of(
                stub.ListLeases(client_pb2.ListLeasesRequest(parent="namespaces/default"))
            )
            assert code == grpc.StatusCode.PERMISSION_DENIED

    run(go())
    assert ecfg["token"] not in ctl.log() and ccfg["token"] not in ctl.log()
    refusals = [e for e in ctl.events() if e.get("event") == "refused"]
    assert len(refusals) >= 6


def test_dial_requires_own_active_lease(lab) -> None:
    ctl, ecfg, ccfg, other_cfg = lab

    async def go():
        client = Speaker.from_config(ctl, ccfg, "Client")
        other = Speaker.from_config(ctl, other_cfg, "Client")
        async with ScriptedExporter(Speaker.from_config(ctl, ecfg, "Exporter")) as exporter:
            async with client.channel() as ch:
                stub = jumpstarter_pb2_grpc.ControllerServiceStub(ch)
                code, _ = await code_of(
                    stub.Dial(jumpstarter_pb2.DialRequest(lease_name="no-such-lease"), timeout=10)
                )
                assert code == grpc.StatusCode.NOT_FOUND
            lease = await create_lease(client)
            await asyncio.wait_for(exporter.leased.wait(), 10)
            async with other.channel() as ch:
                stub = jumpstarter_pb2_grpc.ControllerServiceStub(ch)
                code, msg = await code_of(
                    stub.Dial(jumpstarter_pb2.DialRequest(lease_name=lease), timeout=10)
                )
                # upstream clients look for this phrase to detect a transferred lease
                assert code == grpc.StatusCode.PERMISSION_DENIED
                assert "permission denied" in msg
            async with client.channel() as ch:
                stub = jumpstarter_pb2_grpc.ControllerServiceStub(ch)
                dial = await stub.Dial(jumpstarter_pb2.DialRequest(lease_name=lease), timeout=30)
                pushed = await asyncio.wait_for(exporter.tokens.get(), 10)
                assert pushed.router_token == dial.router_token
                assert dial.router_endpoint == ctl.endpoint

    run(go())


def test_expired_lease_ends_and_cannot_be_dialled(lab) -> None:
    ctl, ecfg, ccfg, _ = lab

    async def go():
        client = Speaker.from_config(ctl, ccfg, "Client")
        async with ScriptedExporter(Speaker.from_config(ctl, ecfg, "Exporter")) as exporter:
            lease = await create_lease(client, seconds=1)
            await asyncio.wait_for(exporter.leased.wait(), 10)
            await asyncio.wait_for(exporter.unleased.wait(), 10)  # Status said leased=false
            async with client.channel() as ch:
                stub = client_pb2_grpc.ClientServiceStub(ch)
                got = await stub.GetLease(
                    client_pb2.GetLeaseRequest(name=f"namespaces/default/leases/{lease}")
                )
                ready = [c for c in got.conditions if c.type == "Ready"]
                assert (ready[0].status, ready[0].reason) == ("False", "Expired")
                assert got.HasField("effective_end_time")
                dial = jumpstarter_pb2_grpc.ControllerServiceStub(ch).Dial(
                    jumpstarter_pb2.DialRequest(lease_name=lease), timeout=10
                )
                code, msg = await code_of(dial)
                assert code == grpc.StatusCode.FAILED_PRECONDITION
                assert "not active" in msg

    run(go())
    ended = [e for e in ctl.events() if e.get("event") == "lease ended"]
    assert ended and ended[-1]["reason"] == "Expired"


async def _router_call(ctl: Controller, tls: TLSConfig, token: str):
    channel = secure_channel(
        ctl.endpoint, tls, call_credentials=grpc.access_token_call_credentials(token), environ={}
    )
    call = router_pb2_grpc.RouterServiceStub(channel).Stream()
    return channel, call


def test_router_pairs_once_and_refuses_replay_and_forgery(lab) -> None:
    ctl, ecfg, ccfg, _ = lab

    async def go():
        tls = TLSConfig(**ccfg["tls"])
        client = Speaker.from_config(ctl, ccfg, "Client")
        async with ScriptedExporter(Speaker.from_config(ctl, ecfg, "Exporter")) as exporter:
            lease = await create_lease(client)
            await asyncio.wait_for(exporter.leased.wait(), 10)
            async with client.channel() as ch:
                dial = await jumpstarter_pb2_grpc.ControllerServiceStub(ch).Dial(
                    jumpstarter_pb2.DialRequest(lease_name=lease), timeout=30
                )
            token = dial.router_token
            ch_a, side_a = await _router_call(ctl, tls, token)
            ch_b, side_b = await _router_call(ctl, tls, token)
            await side_a.write(router_pb2.StreamRequest(payload=b"ping"))
            got = await asyncio.wait_for(side_b.read(), 10)
            assert got.payload == b"ping"
            await side_b.write(
                router_pb2.StreamRequest(payload=b"", frame_type=router_pb2.FRAME_TYPE_GOAWAY)
            )
            got = await asyncio.wait_for(side_a.read(), 10)
            assert got.frame_type == router_pb2.FRAME_TYPE_GOAWAY  # frames pass verbatim
            ch_c, replay = await _router_call(ctl, tls, token)
            code, msg = await code_of(replay.read())
            assert (code, msg) == (grpc.StatusCode.PERMISSION_DENIED, "router token already used")
            ch_d, forged = await _router_call(ctl, tls, token[:-4] + "AAAA")
            code, _ = await code_of(forged.read())
            assert code == grpc.StatusCode.UNAUTHENTICATED
            # half-close both directions: both calls end with OK
            await side_a.done_writing()
            await side_b.done_writing()
            assert await asyncio.wait_for(side_a.read(), 10) == grpc.aio.EOF
            assert await asyncio.wait_for(side_b.read(), 10) == grpc.aio.EOF
            assert await side_a.code() == grpc.StatusCode.OK
            for ch in (ch_a, ch_b, ch_c, ch_d):
                await ch.close()

    run(go())


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_client_vanishing_mid_stream_closes_the_exporter_side(lab) -> None:
    ctl, ecfg, ccfg, _ = lab

    async def one_cycle(client: Speaker, exporter: ScriptedExporter, lease: str, tls) -> None:
        async with client.channel() as ch:
            dial = await jumpstarter_pb2_grpc.ControllerServiceStub(ch).Dial(
                jumpstarter_pb2.DialRequest(lease_name=lease), timeout=30
            )
        await asyncio.wait_for(exporter.tokens.get(), 10)
        ch_e, exporter_side = await _router_call(ctl, tls, dial.router_token)
        ch_c, client_side = await _router_call(ctl, tls, dial.router_token)
        await client_side.write(router_pb2.StreamRequest(payload=b"x" * 1000))
        assert (await asyncio.wait_for(exporter_side.read(), 10)).payload == b"x" * 1000
        await ch_c.close()  # the client process dies: its connection is gone
        code, _ = await code_of(asyncio.wait_for(_drain(exporter_side), 10))
        assert code == grpc.StatusCode.UNAVAILABLE
        await ch_e.close()

    async def go():
        tls = TLSConfig(**ccfg["tls"])
        client = Speaker.from_config(ctl, ccfg, "Client")
        async with ScriptedExporter(Speaker.from_config(ctl, ecfg, "Exporter")) as exporter:
            lease = await create_lease(client)
            await asyncio.wait_for(exporter.leased.wait(), 10)
            await one_cycle(client, exporter, lease, tls)
            before = _fds(ctl.proc.pid)
            for _ in range(40):
                await one_cycle(client, exporter, lease, tls)
            # gRPC reaps closed connections lazily (the count saw-tooths by ~10), so bound
            # it: a leak of the 3 connections per cycle would add over a hundred.
            after = _fds(ctl.proc.pid)
            assert after <= before + 20, f"controller fds grew from {before} to {after}"

            def closed() -> list[dict]:
                return [e for e in ctl.events() if e.get("event") == "router stream closed"]

            # both sides of every pairing ended (the client side's handler may log last)
            await asyncio.to_thread(wait_for, lambda: len(closed()) == 2 * 41, 10)
            assert (closed()[-1]["active"], closed()[-1]["pending"]) == (0, 0)

    run(go())
    assert "Traceback" not in ctl.log()


async def _drain(call) -> None:
    while True:
        msg = await call.read()
        if msg == grpc.aio.EOF:
            raise AssertionError("stream ended cleanly; expected UNAVAILABLE")
