"""Running the single-node controller: state directory, TLS, one gRPC port for all three
services, and a clean stop on SIGTERM/SIGINT (a second signal stops at once).

State directory layout (created 0700)::

    state.db        SQLite (WAL): exporters, clients, leases, settings
    ca.pem          the lab CA (its base64 goes into issued configs as tls.ca)
    ca-key.pem      its key, 0600
    server.pem      server certificate for the advertised host names, 0644
    server-key.pem  its key, 0600

Upstream serves the router on a second port (8083); ours serves it on the controller's port
and advertises that address as the router endpoint, which upstream clients accept as-is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from cryptography import x509

from jumpstarter_exporter._proto.jumpstarter.client.v1 import client_pb2_grpc
from jumpstarter_exporter._proto.jumpstarter.v1 import jumpstarter_pb2_grpc
from jumpstarter_exporter.config.yamlio import atomic_write
from jumpstarter_exporter.controller.client_service import ClientService
from jumpstarter_exporter.controller.controller_service import ControllerService
from jumpstarter_exporter.controller.core import Core
from jumpstarter_exporter.controller.pki import KeyPair, create_ca, issue_server_cert
from jumpstarter_exporter.controller.router import RouterService, add_router_to_server
from jumpstarter_exporter.controller.store import Store
from jumpstarter_exporter.errors import ConfigError

log = structlog.get_logger("jumpstarter.controller")

DEFAULT_PORT = 8082
GRACE = 5.0  # seconds in-flight calls get on shutdown

# Clients ping every 20 s even with no call in flight (protocol-facts §2.5); a stricter
# server would answer GOAWAY too_many_pings and break idle Status streams.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 20000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10000),
    ("grpc.http2.max_ping_strikes", 0),
    # gRPC sets SO_REUSEPORT by default: a second controller on the same port would start
    # "successfully" and steal half the connections. Fail the bind instead.
    ("grpc.so_reuseport", 0),
]


def default_state_dir() -> Path:
    if os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/jumpstarter-controller")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "jumpstarter" / "controller"


@dataclass(frozen=True)
class StateDir:
    path: Path

    @property
    def db(self) -> Path:
        return self.path / "state.db"

    def open_store(self) -> Store:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return Store(self.db)

    def ca(self) -> KeyPair:
        """The lab CA, created on first use."""
        cert, key = self.path / "ca.pem", self.path / "ca-key.pem"
        if not cert.exists() or not key.exists():
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            pair = create_ca()
            atomic_write(key, pair.key_pem.decode(), mode=0o600)
            atomic_write(cert, pair.cert_pem.decode(), mode=0o644)
            log.info("created CA", path=str(cert))
        return KeyPair(cert.read_bytes(), key.read_bytes())

    def server_cert(self, hosts: list[str]) -> KeyPair:
        """A server certificate covering ``hosts``; reissued when the host list changes."""
        cert, key = self.path / "server.pem", self.path / "server-key.pem"
        if cert.exists() and key.exists() and _covers(cert.read_bytes(), hosts):
            return KeyPair(cert.read_bytes(), key.read_bytes())
        pair = issue_server_cert(self.ca(), hosts)
        atomic_write(key, pair.key_pem.decode(), mode=0o600)
        atomic_write(cert, pair.cert_pem.decode(), mode=0o644)
        log.info("issued server certificate", hosts=hosts)
        return pair


def _covers(cert_pem: bytes, hosts: list[str]) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    names = {str(n) for n in san.get_values_for_type(x509.DNSName)}
    names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return set(hosts) <= names


def server_hosts(advertise: str, extra: list[str]) -> list[str]:
    host = advertise.rsplit(":", 1)[0].strip("[]")
    hosts = [host, "localhost", "127.0.0.1", "::1", socket.gethostname(), *extra]
    return list(dict.fromkeys(h for h in hosts if h))


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep:
        host, port = listen, str(DEFAULT_PORT)
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"--listen {listen!r}: port {port!r} is not a number") from None
    if not 0 <= number < 65536:
        raise ConfigError(f"--listen {listen!r}: port out of range")
    return host.strip("[]") or "0.0.0.0", number


async def serve(
    state: StateDir,
    listen: str,
    advertise: str | None = None,
    extra_hosts: list[str] | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT. Prints nothing but logs; ``ready`` is set once listening."""
    host, port = parse_listen(listen)
    store = state.open_store()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # Bind first to learn the real port (for --listen HOST:0), then issue the certificate.
    placeholder_advertise = advertise or f"{_advertised_host(host)}:{port}"
    pair = state.server_cert(server_hosts(placeholder_advertise, extra_hosts or []))
    creds = grpc.ssl_server_credentials([(pair.key_pem, pair.cert_pem)])
    try:
        bound = server.add_secure_port(bind, creds)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {bind}: {exc}") from None
    endpoint = advertise or f"{_advertised_host(host)}:{bound}"
    store.set_meta("endpoint", endpoint)
    core = Core(store, endpoint)
    router = RouterService(core.router_key)
    jumpstarter_pb2_grpc.add_ControllerServiceServicer_to_server(ControllerService(core), server)
    client_pb2_grpc.add_ClientServiceServicer_to_server(ClientService(core), server)
    add_router_to_server(router, server)
    await server.start()
    log.info(
        "controller listening",
        listen=bind,
        port=bound,
        endpoint=endpoint,
        state_dir=str(state.path),
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: stopping now", signal=signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    scheduler = asyncio.ensure_future(core.run_scheduler())
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        scheduler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scheduler
        await server.stop(GRACE)
        store.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        log.info("controller stopped")


def _advertised_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return host
