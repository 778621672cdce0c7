"""Controller scale (ours alone): many simulated exporters, concurrent leases with DriverCalls.

What is simulated, and why: 500 real ``jmp run`` processes do not fit a 2-core machine, so one
asyncio process (this one) plays them. Each simulated exporter has its own identity, its own
TLS channel to the controller, registers, reports AVAILABLE and holds a ``Status`` stream; when
leased it opens ``Listen``, reports LEASE_READY and answers every router token's connection
in-process, exactly as ``jmp run`` does (``Session.serve_tunnel``). They share one real
session (our ``Session`` with a ``MockPower``), which is what makes them cheap; the tunnels and
the router pairing are per lease, so the controller and router see the real traffic. Simulated
clients do what upstream's client does: CreateLease, wait until ready, then per connection
Dial and bridge a local Unix socket through the router, and DriverCall over that tunnel.

The controller is the real ``jmp controller serve`` process; its RSS and CPU are measured.
The simulator shares the 2 cores with it, so latencies here include that contention.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import grpc
import grpc.aio

from benchmarks import procstat
from benchmarks.report import pct
from jumpstarter_exporter import log as logsetup
from jumpstarter_exporter._proto.jumpstarter.client.v1 import client_pb2, client_pb2_grpc
from jumpstarter_exporter._proto.jumpstarter.v1 import (
    common_pb2,
    jumpstarter_pb2,
    jumpstarter_pb2_grpc,
)
from jumpstarter_exporter.config.models import ExporterConfig
from jumpstarter_exporter.controller import admin
from jumpstarter_exporter.controller.server import StateDir
from jumpstarter_exporter.drivers.registry import build_tree
from jumpstarter_exporter.exporter.session import Session
from jumpstarter_exporter.wire.channel import identity_credentials, secure_channel
from jumpstarter_exporter.wire.frames import bridge_to_router
from tests.harness import Controller

TIMEOUT = 60.0  # every controller/router wait in the simulation


class Stats:
    def __init__(self) -> None:
        self.registered = 0
        self.online: set[str] = set()
        self.create: list[float] = []
        self.ready: list[float] = []
        self.dial: list[float] = []
        self.calls: list[float] = []
        self.calls_ok = 0
        self.errors: list[str] = []
        # tunnels that ended with an error; at teardown (a client closing its channel while
        # the other side still writes) this is expected, so they are counted apart
        self.tunnel_breaks: list[str] = []
        self.expected = 0
        self.all_online = asyncio.Event()


async def sim_exporter(cfg, session: Session, router: grpc.aio.Channel, stats: Stats) -> None:
    creds = identity_credentials("Exporter", cfg.metadata.namespace, cfg.metadata.name, cfg.token)
    channel = secure_channel(cfg.endpoint, cfg.tls, None, creds)
    stub = jumpstarter_pb2_grpc.ControllerServiceStub(channel)
    try:
        await _serve_exporter(stub, cfg, session, router, stats)
    except grpc.aio.AioRpcError as exc:
        stats.errors.append(f"exporter {cfg.metadata.name}: {exc.code().name}: {exc.details()}")
    finally:
        await channel.close()


async def _serve_exporter(stub, cfg, session: Session, router, stats: Stats) -> None:
    await stub.Register(
        jumpstarter_pb2.RegisterRequest(labels={}, reports=session.reports), timeout=TIMEOUT
    )
    await _status(stub, common_pb2.EXPORTER_STATUS_AVAILABLE, "available")
    stats.registered += 1
    async with asyncio.TaskGroup() as tg:
        listening: asyncio.Task | None = None
        async for message in stub.Status(jumpstarter_pb2.StatusRequest()):
            stats.online.add(cfg.metadata.name)
            if len(stats.online) >= stats.expected:
                stats.all_online.set()
            if message.leased and listening is None:
                listening = tg.create_task(_listen(stub, message.lease_name, router, tg))
                await _status(stub, common_pb2.EXPORTER_STATUS_LEASE_READY, "ready")
            elif not message.leased and listening is not None:
                listening.cancel()
                listening = None
                await _status(stub, common_pb2.EXPORTER_STATUS_AVAILABLE, "available")


async def _status(stub, status: int, message: str) -> None:
    await stub.ReportStatus(
        jumpstarter_pb2.ReportStatusRequest(status=status, message=message), timeout=TIMEOUT
    )


async def _listen(stub, lease: str, router: grpc.aio.Channel, tg: asyncio.TaskGroup) -> None:
    async for response in stub.Listen(jumpstarter_pb2.ListenRequest(lease_name=lease)):
        tg.create_task(_serve_tunnel(response.router_token, router))


SESSION: Session | None = None
STATS = Stats()


async def _serve_tunnel(token: str, router: grpc.aio.Channel) -> None:
    assert SESSION is not None
    try:
        await SESSION.serve_tunnel(router, token)
    except ConnectionError as exc:  # counted: a tunnel that broke
        STATS.tunnel_breaks.append(f"exporter tunnel: {exc!r} from {exc.__cause__!r}")


async def sim_client(
    index: int, cfg, router: grpc.aio.Channel, power: str, calls: int, stats: Stats, tmp: Path
) -> None:
    creds = identity_credentials("Client", cfg.metadata.namespace, cfg.metadata.name, cfg.token)
    channel = secure_channel(cfg.endpoint, cfg.tls, None, creds)
    clients = client_pb2_grpc.ClientServiceStub(channel)
    controller = jumpstarter_pb2_grpc.ControllerServiceStub(channel)
    lease = None
    try:
        start = time.perf_counter()
        request = client_pb2.CreateLeaseRequest(
            parent=f"namespaces/{cfg.metadata.namespace}",
            lease=client_pb2.Lease(selector="sim=yes"),
        )
        request.lease.duration.FromSeconds(600)
        lease = await clients.CreateLease(request, timeout=TIMEOUT)
        stats.create.append(time.perf_counter() - start)
        short = lease.name.rsplit("/", 1)[-1]
        deadline = time.monotonic() + TIMEOUT
        while True:
            got = await controller.GetLease(
                jumpstarter_pb2.GetLeaseRequest(name=short), timeout=TIMEOUT
            )
            if got.exporter_uuid:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"lease {short} never became ready")
            await asyncio.sleep(0.02)
        stats.ready.append(time.perf_counter() - start)

        tunnels: set[asyncio.Task] = set()

        async def tunnel(reader, writer) -> None:
            tunnels.add(asyncio.current_task())
            began = time.perf_counter()
            try:
                dial = await controller.Dial(
                    jumpstarter_pb2.DialRequest(lease_name=short), timeout=TIMEOUT
                )
            except grpc.aio.AioRpcError as exc:
                stats.errors.append(f"client {index}: Dial: {exc.code().name}")
                writer.close()
                return
            stats.dial.append(time.perf_counter() - began)
            try:
                await bridge_to_router(reader, writer, router, dial.router_token)
            except ConnectionError as exc:
                stats.tunnel_breaks.append(f"client tunnel: {exc!r} from {exc.__cause__!r}")

        path = tmp / f"client-{index}.sock"
        server = await asyncio.start_unix_server(tunnel, str(path))
        try:
            async with grpc.aio.insecure_channel(f"unix://{path}") as local:
                exporter = jumpstarter_pb2_grpc.ExporterServiceStub(local)
                for _ in range(calls):
                    began = time.perf_counter()
                    await exporter.DriverCall(
                        jumpstarter_pb2.DriverCallRequest(uuid=power, method="on"),
                        timeout=TIMEOUT,
                    )
                    stats.calls.append(time.perf_counter() - began)
                    stats.calls_ok += 1
        finally:
            server.close()
            # the tunnels end once the local channel is closed; wait for them here so that
            # none is left for asyncio.run to cancel (it would log each as an error)
            if tunnels:
                _done, left = await asyncio.wait(tunnels, timeout=10)
                for task in left:
                    task.cancel()
                await asyncio.gather(*tunnels, return_exceptions=True)
    except (grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
        stats.errors.append(f"client {index}: {type(exc).__name__}: {exc}")
    finally:
        if lease is not None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await clients.DeleteLease(
                    client_pb2.DeleteLeaseRequest(name=lease.name), timeout=TIMEOUT
                )
        await channel.close()


async def simulate(ctl: Controller, state: StateDir, exporters: int, leases: int, calls: int):
    global SESSION, STATS  # one simulation per process: the tasks share them
    out: dict = {"exporters": exporters, "leases": leases, "calls_per_lease": calls}
    stats = STATS = Stats()
    stats.expected = exporters
    configs = [
        admin.create_exporter(state, f"sim-{i:04d}", {"sim": "yes"}, endpoint=ctl.endpoint)
        for i in range(exporters)
    ]
    client_cfg = admin.create_client(state, "sim-client", endpoint=ctl.endpoint, unsafe=True)
    template = ExporterConfig.model_validate(
        {
            "metadata": {"name": "sim", "namespace": "default"},
            "export": {"power": {"type": "jumpstarter_driver_power.driver.MockPower"}},
        }
    )
    root = build_tree(template)
    power = next(d.uuid for d, _parent, name in root.walk() if name == "power")
    session = Session(root, "sim", {})
    session.set_status(common_pb2.EXPORTER_STATUS_LEASE_READY, "Ready for commands")
    session.clients_allowed.set()
    await session.start_unix()  # the log sink, as in a lease; tunnels come by serve_tunnel
    SESSION = session
    router = secure_channel(ctl.endpoint, configs[0].tls)
    pid = ctl.proc.pid
    before = procstat.sample([pid])
    with tempfile.TemporaryDirectory(prefix="jmp-scale-") as tmp:
        try:
            async with asyncio.TaskGroup() as tg:
                start = time.perf_counter()
                sims = [tg.create_task(sim_exporter(c, session, router, stats)) for c in configs]
                with contextlib.suppress(TimeoutError):  # reported as online < exporters
                    await asyncio.wait_for(stats.all_online.wait(), 180)
                out["online_s"] = time.perf_counter() - start
                out["registered"] = stats.registered
                out["online"] = len(stats.online)
                await asyncio.sleep(2.0)  # settle: every Status stream open and idle
                idle = procstat.sample([pid])
                out["controller_idle_rss_kib"] = idle.rss_kib
                out["controller_register_cpu_s"] = idle.cpu_s - before.cpu_s
                start = time.perf_counter()
                async with asyncio.TaskGroup() as clients:
                    for i in range(leases):
                        clients.create_task(
                            sim_client(i, client_cfg, router, power, calls, stats, Path(tmp))
                        )
                out["lease_phase_s"] = time.perf_counter() - start
                busy = procstat.sample([pid])
                out["controller_lease_cpu_s"] = busy.cpu_s - idle.cpu_s
                out["controller_busy_rss_kib"] = busy.rss_kib
                for task in sims:
                    task.cancel()
        finally:
            await router.close()
            await session.stop(grace=0)
    out.update(
        create_s=stats.create,
        ready_s=stats.ready,
        dial_s=stats.dial,
        call_s=stats.calls,
        calls_ok=stats.calls_ok,
        errors=stats.errors[:20],
        error_count=len(stats.errors),
        tunnel_breaks=len(stats.tunnel_breaks),
    )
    return out


def run(base: Path, p) -> dict:
    """Start our controller in ``base`` and simulate ``p.scale_exporters`` exporters."""
    from benchmarks.rig import isolated_env

    base.mkdir(parents=True, exist_ok=True)
    env = isolated_env(base)
    ctl = Controller(base / "controller-state", env).start()
    try:
        # the simulated exporters' and clients' configs are created in-process (500 `jmp
        # controller create` runs would take minutes); same functions, same state dir.
        # The shared session's driver logs go to stderr, warnings only, never to the table.
        logsetup.configure("WARNING", "text", sys.stderr)
        result = asyncio.run(
            simulate(
                ctl,
                StateDir(base / "controller-state"),
                p.scale_exporters,
                p.scale_leases,
                p.scale_calls,
            )
        )
    finally:
        ctl.stop()
    result["rows"] = scale_rows(result)
    return result


def scale_rows(r: dict) -> list[dict]:
    n, leases = r["exporters"], r["leases"]
    ms = 1000

    def row(metric: str, unit: str, value) -> dict:
        return {"metric": f"scale: {metric}", "unit": unit, "ours": value}

    def p99(key: str):
        value = pct(r.get(key, []), 99)
        return None if value is None else value * ms

    return [
        row(f"{n} exporters registered + Status streams open", "s", r.get("online_s")),
        row(f"controller RSS, {n} exporters online", "MB", r["controller_idle_rss_kib"] / 976.5625),
        row(f"controller RSS after {leases} leases", "MB", r["controller_busy_rss_kib"] / 976.5625),
        row(f"controller CPU, {leases} leases phase", "s", r["controller_lease_cpu_s"]),
        row("CreateLease p99", "ms", p99("create_s")),
        row("create -> lease ready p99", "ms", p99("ready_s")),
        row("Dial p99", "ms", p99("dial_s")),
        row(f"DriverCall p99, {leases} leases at once", "ms", p99("call_s")),
        row("failed clients/exporters", "", r.get("error_count")),
        row("tunnels that broke (incl. at teardown)", "", r.get("tunnel_breaks")),
    ]
