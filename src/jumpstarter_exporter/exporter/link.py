"""The exporter's side of the controller: one long-lived TLS channel, typed calls, and the
classification of failures into "retry", "bad credentials" and "bad config"."""

from __future__ import annotations

import grpc
import grpc.aio

from jumpstarter_exporter._proto.jumpstarter.v1 import jumpstarter_pb2, jumpstarter_pb2_grpc
from jumpstarter_exporter.config.models import ExporterConfig
from jumpstarter_exporter.errors import AuthError, ConfigError
from jumpstarter_exporter.wire.channel import identity_credentials, open_secure_channel

CALL_TIMEOUT = 10.0  # every unary call to the controller; streams are cancelled instead

# Codes after which retrying the same credentials cannot help.
AUTH_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


def classify(exc: grpc.aio.AioRpcError, what: str, config: ExporterConfig) -> Exception | None:
    """The fatal error an RPC failure means, or None when it is worth retrying."""
    code = exc.code()
    if code in AUTH_CODES:
        return AuthError(
            f"the controller refused {what} for exporter "
            f"{config.metadata.namespace}/{config.metadata.name}: {exc.details()} "
            "(check token, metadata.name and metadata.namespace)"
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT and "metadata" in (exc.details() or ""):
        return ConfigError(f"the controller rejected {what}: {exc.details()}")
    return None


class ControllerLink:
    def __init__(self, config: ExporterConfig) -> None:
        self.config = config
        self.channel: grpc.aio.Channel | None = None
        self.stub: jumpstarter_pb2_grpc.ControllerServiceStub | None = None

    async def connect(self) -> None:
        """(Re)create the channel. In insecure (trust-on-first-use) mode this probes the
        server's certificate, a blocking network call: done in a thread, with a timeout."""
        await self.close()
        cfg = self.config
        creds = identity_credentials(
            "Exporter", cfg.metadata.namespace or "", cfg.metadata.name, cfg.token or ""
        )
        self.channel = await open_secure_channel(cfg.endpoint, cfg.tls, cfg.grpcOptions, creds)
        self.stub = jumpstarter_pb2_grpc.ControllerServiceStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    def _stub(self) -> jumpstarter_pb2_grpc.ControllerServiceStub:
        if self.stub is None:
            raise ConnectionError("not connected to the controller")
        return self.stub

    async def register(self, labels: dict[str, str], reports) -> str:
        request = jumpstarter_pb2.RegisterRequest(labels=labels, reports=reports)
        response = await self._stub().Register(request, timeout=CALL_TIMEOUT)
        return response.uuid

    async def report_status(self, status: int, message: str, release_lease: bool = False) -> None:
        request = jumpstarter_pb2.ReportStatusRequest(status=status, message=message)
        if release_lease:
            request.release_lease = True
        await self._stub().ReportStatus(request, timeout=CALL_TIMEOUT)

    def status_stream(self):
        return self._stub().Status(jumpstarter_pb2.StatusRequest())

    def listen(self, lease: str):
        return self._stub().Listen(jumpstarter_pb2.ListenRequest(lease_name=lease))

    async def release_lease(self, lease: str) -> None:
        request = jumpstarter_pb2.ReleaseLeaseRequest(name=lease)
        await self._stub().ReleaseLease(request, timeout=CALL_TIMEOUT)

    async def unregister(self, reason: str) -> None:
        request = jumpstarter_pb2.UnregisterRequest(reason=reason)
        await self._stub().Unregister(request, timeout=CALL_TIMEOUT)
