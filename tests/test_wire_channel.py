"""Outgoing channels against a real TLS gRPC server on loopback: which roots are trusted."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from jumpstarter_exporter.config.models import TLSConfig
from jumpstarter_exporter.controller.pki import create_ca, issue_server_cert
from jumpstarter_exporter.errors import ConfigError
from jumpstarter_exporter.wire import channel


@pytest.fixture(scope="module")
def ca():
    return create_ca("test lab CA")


@pytest.fixture(scope="module")
def tls_server(ca) -> Iterator[str]:
    leaf = issue_server_cert(ca, ["localhost", "127.0.0.1"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    echo = grpc.unary_unary_rpc_method_handler(lambda req, _ctx: req)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {"Echo": echo})])
    creds = grpc.ssl_server_credentials([(leaf.key_pem, leaf.cert_pem + ca.cert_pem)])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def call(endpoint: str, tls: TLSConfig, environ: dict[str, str]) -> bytes:
    async def go() -> bytes:
        async with channel.secure_channel(endpoint, tls, environ=environ) as ch:
            echo = ch.unary_unary("/t.T/Echo")
            return await echo(b"ping", timeout=5)

    return asyncio.run(go())


def test_config_ca_is_trusted(tls_server: str, ca) -> None:
    tls = TLSConfig(ca=base64.b64encode(ca.cert_pem).decode())
    assert call(tls_server, tls, {}) == b"ping"


def test_unknown_ca_is_refused(tls_server: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        call(tls_server, TLSConfig(), {})
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_force_system_certs_uses_the_os_store(
    tls_server: str, ca, tmp_path: Path, monkeypatch
) -> None:
    """The OS store is OpenSSL's default CA file; SSL_CERT_FILE stands in for
    /etc/ssl/certs/ca-certificates.crt so the test does not modify the machine."""
    bundle = tmp_path / "os-bundle.pem"
    bundle.write_bytes(ca.cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    assert call(tls_server, TLSConfig(), {"JUMPSTARTER_FORCE_SYSTEM_CERTS": "1"}) == b"ping"
    # Without the variable gRPC uses its bundled roots, which do not know the lab CA.
    with pytest.raises(grpc.aio.AioRpcError):
        call(tls_server, TLSConfig(), {})
    # With the variable but an OS store that lacks the CA, the server is refused.
    bundle.write_bytes(create_ca("another CA").cert_pem)
    with pytest.raises(grpc.aio.AioRpcError):
        call(tls_server, TLSConfig(), {"JUMPSTARTER_FORCE_SYSTEM_CERTS": "1"})


def test_force_system_certs_without_a_store_is_a_config_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    monkeypatch.setattr(
        channel.ssl,
        "get_default_verify_paths",
        lambda: channel.ssl.DefaultVerifyPaths(
            None, None, "SSL_CERT_FILE", str(tmp_path / "x"), "SSL_CERT_DIR", str(tmp_path / "y")
        ),
    )
    with pytest.raises(ConfigError, match="no system CA bundle"):
        channel.root_certificates(TLSConfig(), {"JUMPSTARTER_FORCE_SYSTEM_CERTS": "1"})


def test_insecure_trusts_on_first_use(tls_server: str) -> None:
    assert call(tls_server, TLSConfig(insecure=True), {}) == b"ping"


def test_insecure_against_nothing_listening_names_the_target() -> None:
    with pytest.raises(ConnectionError, match=r"cannot connect to 127\.0\.0\.1:1"):
        channel.fetch_server_chain("127.0.0.1:1", timeout=2)


def test_channel_options_defaults_and_overrides() -> None:
    opts = dict(channel.channel_options({"grpc.keepalive_time_ms": 5000, "grpc.x": "y"}))
    assert opts["grpc.keepalive_time_ms"] == 5000
    assert opts["grpc.keepalive_permit_without_calls"] == 1
    assert opts["grpc.lb_policy_name"] == "round_robin"
    assert opts["grpc.x"] == "y"


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [("h:1", ("h", 1)), ("h", ("h", 443)), ("[::1]:8082", ("::1", 8082))],
)
def test_split_endpoint(endpoint: str, expected: tuple[str, int]) -> None:
    assert channel.split_endpoint(endpoint) == expected


def test_split_endpoint_rejects_garbage() -> None:
    with pytest.raises(ConfigError, match="not a number"):
        channel.split_endpoint("h:port")
