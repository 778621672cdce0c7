"""Standalone mode (``jmp run --tls-grpc-listener``): one session served directly over TCP,
no controller. Clients connect with ``JUMPSTARTER_HOST=host:port`` (upstream's §3.16)."""

from __future__ import annotations

import asyncio
import hmac
import signal
import uuid as uuidlib
from collections.abc import Callable

import grpc
import grpc.aio
import structlog

from jumpstarter_exporter._proto.jumpstarter.v1 import common_pb2
from jumpstarter_exporter.config.models import ExporterConfig
from jumpstarter_exporter.drivers.base import Driver
from jumpstarter_exporter.drivers.registry import build_tree
from jumpstarter_exporter.errors import ConfigError, ExitCode
from jumpstarter_exporter.exporter import hooks
from jumpstarter_exporter.exporter.daemon import resume_gc, start_device_watcher
from jumpstarter_exporter.exporter.notify import Notifier
from jumpstarter_exporter.exporter.session import Session

log = structlog.get_logger("jumpstarter.exporter")

PASSPHRASE_HEADER = "x-jumpstarter-passphrase"


class PassphraseInterceptor(grpc.aio.ServerInterceptor):
    """Every call must carry ``x-jumpstarter-passphrase`` (compared in constant time)."""

    def __init__(self, passphrase: str) -> None:
        self._expected = passphrase.encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        given = dict(details.invocation_metadata or ()).get(PASSPHRASE_HEADER, "")
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self._expected):
            return handler
        if handler is None:
            return None

        async def deny(_request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or missing passphrase")

        async def deny_stream(_request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or missing passphrase")
            yield  # pragma: no cover - makes this an async generator

        kind = (handler.request_streaming, handler.response_streaming)
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[kind]
        return factory(deny_stream if kind[1] else deny)


def parse_listener(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "0.0.0.0", value
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"--tls-grpc-listener {value!r}: port must be a number") from None
    if not 1 <= number <= 65535:
        raise ConfigError(f"--tls-grpc-listener {value!r}: port must be 1-65535")
    return host.strip("[]") or "0.0.0.0", number


async def serve_standalone(
    config: ExporterConfig,
    listener: str,
    notifier: Notifier,
    *,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
    passphrase: str | None = None,
) -> ExitCode:
    host, port = parse_listener(listener)
    credentials = None
    if cert_pem is not None and key_pem is not None:
        credentials = grpc.ssl_server_credentials([(key_pem, cert_pem)])
    elif passphrase:
        log.warning("--passphrase travels in clear text without TLS")
    root = build_tree(config)
    state = {"status": "starting"}

    def show(status: str | None = None) -> str:
        if status is not None:
            state["status"] = status
        devices = watcher.status_text() if watcher is not None else ""
        return f"{state['status']}; {devices}" if devices else state["status"]

    def on_device_change(_watch: object) -> None:
        if notifier.ready_sent:
            notifier.status(show())

    watcher = start_device_watcher(root, on_device_change)
    try:
        return await _serve(config, root, show, host, port, notifier, credentials, passphrase)
    finally:
        if watcher is not None:
            await watcher.aclose()


async def _serve(
    config: ExporterConfig,
    root: Driver,
    show: Callable[[str], str],
    host: str,
    port: int,
    notifier: Notifier,
    credentials: grpc.ServerCredentials | None,
    passphrase: str | None,
) -> ExitCode:
    session = Session(root, str(uuidlib.uuid4()), {}, config.motd or "")
    interceptors = [PassphraseInterceptor(passphrase)] if passphrase else []
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with_hooks = bool(config.hooks.before_lease or config.hooks.after_lease)
    try:
        # Hooks reach the session over a private Unix socket, as in controller mode.
        bound = await session.start_tcp(address, credentials, interceptors, unix=with_hooks)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc}") from None
    session.clients_allowed.set()
    await root.start()
    env: dict[str, str] = {}
    if with_hooks:
        env = hooks.environment(str(session.socket_path), "standalone", "")
        if passphrase:
            env["JMP_GRPC_PASSPHRASE"] = passphrase
    if config.hooks.before_lease is not None:
        session.set_status(common_pb2.EXPORTER_STATUS_BEFORE_LEASE_HOOK, "Running beforeLease hook")
        result = await hooks.run_hook(
            config.hooks.before_lease, "beforeLease", env, lambda line: None
        )
        if not result.ok and config.hooks.before_lease.on_failure != "warn":
            await session.stop()
            await root.aclose()
            return ExitCode.HOOK_EXIT
    session.set_status(common_pb2.EXPORTER_STATUS_LEASE_READY, "Ready for commands")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, stop.set)
    notifier.ready(show(f"serving standalone on {host}:{bound}"))
    log.info("serving standalone", host=host, port=bound, tls=credentials is not None)
    resume_gc()
    watchdog = asyncio.ensure_future(notifier.watchdog())
    try:
        await stop.wait()
    finally:
        notifier.stopping()
        watchdog.cancel()
        if config.hooks.after_lease is not None:
            session.set_status(
                common_pb2.EXPORTER_STATUS_AFTER_LEASE_HOOK, "Running afterLease hooks"
            )
            await hooks.run_hook(config.hooks.after_lease, "afterLease", env, lambda line: None)
        await session.stop(grace=1.0)
        await root.aclose()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    return ExitCode.OK
