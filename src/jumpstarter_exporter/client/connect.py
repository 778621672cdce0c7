"""``connect()``: a Board over an existing session (``jmp shell``'s ``JUMPSTARTER_HOST``).

``JUMPSTARTER_HOST`` is a Unix socket path (what ``jmp shell`` and exporter hooks export) or
``host:port`` of a standalone exporter (``jmp run --tls-grpc-listener``): plaintext when
``JMP_GRPC_INSECURE=1``/``JUMPSTARTER_GRPC_INSECURE=1``, otherwise TLS with the system roots;
``JMP_GRPC_PASSPHRASE`` is sent as upstream's ``x-jumpstarter-passphrase`` metadata.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import grpc

from jumpstarter_exporter.client.board import AllowList, Board
from jumpstarter_exporter.errors import ConfigError


def connect(
    host: str | None = None,
    *,
    allow: AllowList | None = None,
    timeout: float = 30.0,
    environ: Mapping[str, str] | None = None,
) -> Board:
    """The Board behind ``host`` (default ``$JUMPSTARTER_HOST``). The allow-list defaults to
    ``JMP_DRIVERS_ALLOW`` (set by ``jmp shell``); with neither, no driver is allowed, as
    upstream's ``j``."""
    env = os.environ if environ is None else environ
    host = host or env.get("JUMPSTARTER_HOST")
    if not host:
        raise ConfigError("JUMPSTARTER_HOST is not set: run this inside `jmp shell`, or pass host=")
    allow = allow or AllowList.from_env(env) or AllowList()
    metadata: list[tuple[str, str]] = []
    if env.get("JMP_GRPC_PASSPHRASE"):
        metadata.append(("x-jumpstarter-passphrase", env["JMP_GRPC_PASSPHRASE"]))
    credentials = None
    if host.startswith(("unix:", "/")) or os.path.exists(host):
        target = host if host.startswith("unix:") else f"unix://{os.path.abspath(host)}"
    else:
        target = host
        insecure = {env.get("JMP_GRPC_INSECURE"), env.get("JUMPSTARTER_GRPC_INSECURE")}
        if "1" not in insecure:
            credentials = grpc.ssl_channel_credentials()
    return Board(
        target,
        allow=allow,
        lease_name=env.get("JMP_LEASE", ""),
        exporter_name=env.get("JMP_EXPORTER", ""),
        credentials=credentials,
        metadata=metadata,
        timeout=timeout,
    )


__all__ = ["connect"]
