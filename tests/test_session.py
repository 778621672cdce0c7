"""The lease session server on its Unix socket: what upstream clients call through tunnels."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import empty_pb2

from jumpstarter_exporter._proto.jumpstarter.v1 import (
    common_pb2,
    jumpstarter_pb2,
    jumpstarter_pb2_grpc,
)
from jumpstarter_exporter.config.models import ExporterConfig
from jumpstarter_exporter.drivers.registry import build_tree
from jumpstarter_exporter.exporter.session import Session
from jumpstarter_exporter.log import configure

CONFIG = ExporterConfig.model_validate(
    {
        "metadata": {"name": "ex"},
        "export": {"power": {"type": "jumpstarter_driver_power.driver.MockPower"}},
    }
)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _session() -> tuple[Session, grpc.aio.Channel, jumpstarter_pb2_grpc.ExporterServiceStub]:
    session = Session(build_tree(CONFIG), "exporter-uuid", {"jumpstarter.dev/name": "ex"})
    path = await session.start_unix()
    channel = grpc.aio.insecure_channel(f"unix://{path}")
    return session, channel, jumpstarter_pb2_grpc.ExporterServiceStub(channel)


def _power_uuid(session: Session) -> str:
    return next(r.uuid for r in session.reports if r.labels.get("jumpstarter.dev/name") == "power")


def test_driver_calls_are_gated_by_status() -> None:
    async def go():
        session, channel, stub = await _session()
        try:
            call = jumpstarter_pb2.DriverCallRequest(uuid=_power_uuid(session), method="on")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.DriverCall(call)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "EXPORTER_STATUS_AVAILABLE" in info.value.details()
            session.set_status(common_pb2.EXPORTER_STATUS_LEASE_READY, "Ready for commands")
            response = await stub.DriverCall(call)
            assert response.result.WhichOneof("kind") == "null_value"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.DriverCall(jumpstarter_pb2.DriverCallRequest(uuid="nope", method="on"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.DriverCall(
                    jumpstarter_pb2.DriverCallRequest(uuid=_power_uuid(session), method="rescue")
                )
            assert (info.value.code(), info.value.details()) == (
                grpc.StatusCode.NOT_FOUND,
                "method rescue not found on driver",
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Reset(jumpstarter_pb2.ResetRequest())
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await channel.close()
            await session.stop()

    run(go())


def test_status_versions_and_end_session() -> None:
    async def go():
        session, channel, stub = await _session()
        try:
            session.set_status(common_pb2.EXPORTER_STATUS_LEASE_READY, "Ready for commands")
            first = await stub.GetStatus(jumpstarter_pb2.GetStatusRequest())
            assert (first.status, first.status_version) == (
                common_pb2.EXPORTER_STATUS_LEASE_READY,
                1,
            )
            assert first.previous_status == common_pb2.EXPORTER_STATUS_AVAILABLE
            assert session.seen_version == 1
            ended = await stub.EndSession(jumpstarter_pb2.EndSessionRequest())
            assert ended.success and session.end_requested.is_set()
            report = await stub.GetReport(empty_pb2.Empty())
            assert report.uuid == "exporter-uuid"
            assert [r.labels["jumpstarter.dev/client"] for r in report.reports] == [
                "jumpstarter_driver_composite.client.CompositeClient",
                "jumpstarter_driver_power.client.PowerClient",
            ]
        finally:
            await channel.close()
            await session.stop()

    run(go())


def test_every_log_reader_sees_every_record() -> None:
    """Upstream hands each record to one reader only; two readers must both get it here."""
    configure("INFO", "json")

    async def go():
        session, channel, stub = await _session()
        try:
            session.set_status(common_pb2.EXPORTER_STATUS_LEASE_READY, "Ready for commands")
            readers = [stub.LogStream(empty_pb2.Empty()) for _ in range(2)]
            await asyncio.sleep(0.2)  # both streams registered
            await stub.DriverCall(
                jumpstarter_pb2.DriverCallRequest(uuid=_power_uuid(session), method="on")
            )
            session.publish("hook says hi", common_pb2.LOG_SOURCE_BEFORE_LEASE_HOOK)
            for reader in readers:
                seen = []
                while len(seen) < 2:
                    record = await asyncio.wait_for(reader.read(), 5)
                    if record.message in ("power on", "hook says hi"):
                        seen.append((record.message, record.source))
                assert ("power on", common_pb2.LOG_SOURCE_DRIVER) in seen
                assert ("hook says hi", common_pb2.LOG_SOURCE_BEFORE_LEASE_HOOK) in seen
                reader.cancel()
        finally:
            await channel.close()
            await session.stop()

    run(go())


def test_stop_ends_a_connection_that_outlived_the_lease_quietly() -> None:
    """A hook's connection still streaming logs when the lease ends is closed by stop()
    within the grace, and asyncio reports no error for the cancelled connection."""

    async def go():
        errors: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        session, channel, stub = await _session()
        try:
            logs = stub.LogStream(empty_pb2.Empty())
            async with asyncio.timeout(10):
                # The session has no event for "a reader joined": poll until one has.
                while not session.logs.readers:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            session.publish("hello", common_pb2.LOG_SOURCE_SYSTEM)
            first = await asyncio.wait_for(logs.read(), 10)
            assert first.message == "hello"
            await asyncio.wait_for(session.stop(grace=0.2), 5)
            with pytest.raises(grpc.aio.AioRpcError):
                while True:
                    await asyncio.wait_for(logs.read(), 10)
        finally:
            await channel.close()
        await asyncio.sleep(0.1)  # let the server's connection callbacks run
        assert errors == []
        assert session._connections == set()

    run(go())
