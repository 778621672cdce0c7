"""Outgoing gRPC channels: which roots to trust, and the options every channel gets.

Trust decision, in order (protocol-facts §2.4):

1. ``tls.insecure`` (or ``JUMPSTARTER_GRPC_INSECURE=1``/``JMP_GRPC_INSECURE=1``, folded into
   ``tls.insecure`` by config loading): still TLS, trusting the certificate the server shows
   on first contact (trust on first use).
2. ``tls.ca``: the base64 PEM bundle from the config.
3. ``JUMPSTARTER_FORCE_SYSTEM_CERTS=1``: the operating system's trust store, i.e. the file
   OpenSSL uses by default (``/etc/ssl/certs/ca-certificates.crt`` on Debian; ``SSL_CERT_FILE``
   moves it). gRPC otherwise uses its own bundled roots and ignores the OS store, so a lab CA
   installed with ``update-ca-certificates`` would not be trusted. Upstream's variable only
   affects Python's ``ssl`` users, never gRPC channels; ours applies to the channels too.
4. Otherwise gRPC's default roots.
"""

from __future__ import annotations

import _ssl
import asyncio
import os
import socket
import ssl
from collections.abc import Mapping
from pathlib import Path

import grpc
import grpc.aio

from jumpstarter_exporter.config.models import GrpcOptions, TLSConfig
from jumpstarter_exporter.errors import ConfigError

# Upstream's defaults for every controller/router channel (protocol-facts §2.5); the
# keepalive settings keep NAT and load-balancer idle timeouts from killing quiet streams.
DEFAULT_GRPC_OPTIONS: dict[str, str | int] = {
    "grpc.lb_policy_name": "round_robin",
    "grpc.keepalive_time_ms": 20000,
    "grpc.keepalive_timeout_ms": 180000,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.keepalive_permit_without_calls": 1,
}


def channel_options(grpc_options: GrpcOptions | None) -> list[tuple[str, str | int]]:
    """Upstream's defaults, overridden key by key by the config's ``grpcOptions``."""
    return list({**DEFAULT_GRPC_OPTIONS, **(grpc_options or {})}.items())


def _enabled(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def system_roots() -> bytes:
    """The PEM bundle of the operating system's trust store."""
    defaults = ssl.get_default_verify_paths()
    candidates = [
        os.environ.get(defaults.openssl_cafile_env),
        defaults.cafile,
        defaults.openssl_cafile,
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_bytes()
    capath = defaults.capath or defaults.openssl_capath
    if capath and Path(capath).is_dir():
        bundle = b"".join(p.read_bytes() for p in sorted(Path(capath).glob("*.pem")) if p.is_file())
        if bundle:
            return bundle
    raise ConfigError(
        "JUMPSTARTER_FORCE_SYSTEM_CERTS=1, but no system CA bundle was found "
        f"(looked at {', '.join(c for c in candidates if c)} and {capath})"
    )


def root_certificates(tls: TLSConfig, environ: Mapping[str, str] | None = None) -> bytes | None:
    """Roots for a verified TLS channel (None: gRPC's bundled roots). Not for insecure mode."""
    env = os.environ if environ is None else environ
    if tls.ca:
        return tls.ca_pem()
    if _enabled(env, "JUMPSTARTER_FORCE_SYSTEM_CERTS"):
        return system_roots()
    return None


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``); the port defaults to 443 as upstream's does."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or "]" in port:
        host, port = endpoint, "443"
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"endpoint {endpoint!r}: port {port!r} is not a number") from None
    if not host or not 0 < number < 65536:
        raise ConfigError(f"endpoint {endpoint!r}: expected host:port")
    return host, number


def fetch_server_chain(endpoint: str, timeout: float = 5.0) -> bytes:
    """The certificate chain a TLS server presents, unverified (for trust on first use).

    The whole chain, not only the leaf: a server certificate signed by a private CA can be
    trusted through that CA, which gRPC (BoringSSL, no partial-chain flag) needs.
    """
    host, port = split_endpoint(endpoint)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            # Public as SSLSocket.get_unverified_chain() from Python 3.13; the private
            # object has had it since 3.10.
            chain = tls._sslobj.get_unverified_chain() or []  # type: ignore[union-attr]
            pem = b"".join(c.public_bytes(_ssl.ENCODING_PEM).encode() for c in chain)
    except TimeoutError:
        raise ConnectionError(f"timeout connecting to {host}:{port}") from None
    except OSError as exc:
        raise ConnectionError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    if not pem:
        raise ConnectionError(f"{host}:{port} presented no certificate")
    return pem


def credentials(
    endpoint: str, tls: TLSConfig, environ: Mapping[str, str] | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials for ``endpoint`` following the trust order in the module docstring."""
    roots = fetch_server_chain(endpoint) if tls.insecure else root_certificates(tls, environ)
    return grpc.ssl_channel_credentials(root_certificates=roots)


def secure_channel(
    endpoint: str,
    tls: TLSConfig,
    grpc_options: GrpcOptions | None = None,
    call_credentials: grpc.CallCredentials | None = None,
    environ: Mapping[str, str] | None = None,
) -> grpc.aio.Channel:
    """One long-lived asyncio channel to a controller or router (always TLS).

    Call it on the event loop's thread. In insecure mode it probes the server (blocking, 5 s
    at most); from async code prefer ``open_secure_channel``, which probes in a thread.
    """
    creds = credentials(endpoint, tls, environ)
    return _channel(endpoint, creds, grpc_options, call_credentials)


async def open_secure_channel(
    endpoint: str,
    tls: TLSConfig,
    grpc_options: GrpcOptions | None = None,
    call_credentials: grpc.CallCredentials | None = None,
    environ: Mapping[str, str] | None = None,
) -> grpc.aio.Channel:
    """``secure_channel`` without blocking the loop: the trust decision (which may probe the
    server) runs in a thread, the channel is made on the loop (grpc.aio requires it)."""
    creds = await asyncio.to_thread(credentials, endpoint, tls, environ)
    return _channel(endpoint, creds, grpc_options, call_credentials)


def _channel(endpoint, creds, grpc_options, call_credentials) -> grpc.aio.Channel:
    if call_credentials is not None:
        creds = grpc.composite_channel_credentials(creds, call_credentials)
    return grpc.aio.secure_channel(endpoint, creds, options=channel_options(grpc_options))


class _IdentityPlugin(grpc.AuthMetadataPlugin):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def __call__(self, context, callback) -> None:  # gRPC's plugin signature
        callback(self._metadata, None)


def identity_credentials(kind: str, namespace: str, name: str, token: str) -> grpc.CallCredentials:
    """The metadata every controller call carries (protocol-facts §2.1), in upstream's order.

    Call credentials, so gRPC sends them only over TLS and never logs them.
    """
    return grpc.metadata_call_credentials(
        _IdentityPlugin(
            (
                ("jumpstarter-kind", kind),
                ("jumpstarter-namespace", namespace),
                ("jumpstarter-name", name),
                ("authorization", f"Bearer {token}"),
            )
        ),
        name="jumpstarter-identity",
    )
