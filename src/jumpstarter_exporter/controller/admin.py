"""Administration of a single-node controller: exporters and clients, and ready configs.

These functions work on the state directory directly (the admin runs on the controller's
machine; SQLite in WAL mode lets them run while the controller serves). Creating an exporter
or client mints its token, stores only the hash, and returns an ``ExporterConfig`` /
``ClientConfig`` with endpoint, ``tls.ca`` and token, saved through the config writer.
"""

from __future__ import annotations

import base64
import contextlib
import sqlite3
from collections.abc import Iterator

from jumpstarter_exporter.config.models import (
    ClientConfig,
    DriversConfig,
    ExporterConfig,
    ObjectMeta,
    TLSConfig,
)
from jumpstarter_exporter.controller.server import DEFAULT_PORT, StateDir
from jumpstarter_exporter.controller.store import Client, Exporter, Store
from jumpstarter_exporter.controller.tokens import new_token, token_hash
from jumpstarter_exporter.errors import AlreadyExistsError, ConfigError, NotFoundError

DEFAULT_NAMESPACE = "default"


def _endpoint(state: StateDir, endpoint: str | None) -> str:
    if endpoint:
        return endpoint
    with _store(state) as store:
        return store.get_meta("endpoint") or f"localhost:{DEFAULT_PORT}"


@contextlib.contextmanager
def _store(state: StateDir) -> Iterator[Store]:
    store = state.open_store()
    try:
        yield store
    finally:
        store.close()


def _tls(state: StateDir) -> TLSConfig:
    return TLSConfig(ca=base64.b64encode(state.ca().cert_pem).decode())


def _check_name(kind: str, name: str) -> None:
    # Names become resource-name segments and file names: keep them DNS-label-like.
    if not name or "/" in name or name in (".", "..") or len(name) > 253:
        raise ConfigError(f"invalid {kind} name {name!r}")


def create_exporter(
    state: StateDir,
    name: str,
    labels: dict[str, str],
    namespace: str = DEFAULT_NAMESPACE,
    endpoint: str | None = None,
) -> ExporterConfig:
    _check_name("exporter", name)
    token = new_token(f"exporter:{namespace}:{name}")
    with _store(state) as store:
        try:
            store.add_exporter(namespace, name, labels, token_hash(token))
        except sqlite3.IntegrityError:
            raise AlreadyExistsError(f"exporter {namespace}/{name} already exists") from None
    return ExporterConfig(
        metadata=ObjectMeta(namespace=namespace, name=name),
        endpoint=_endpoint(state, endpoint),
        tls=_tls(state),
        token=token,
    )


def create_client(
    state: StateDir,
    name: str,
    namespace: str = DEFAULT_NAMESPACE,
    endpoint: str | None = None,
    allow: list[str] | None = None,
    unsafe: bool = False,
) -> ClientConfig:
    _check_name("client", name)
    token = new_token(f"client:{namespace}:{name}")
    with _store(state) as store:
        try:
            store.add_client(namespace, name, token_hash(token))
        except sqlite3.IntegrityError:
            raise AlreadyExistsError(f"client {namespace}/{name} already exists") from None
    return ClientConfig(
        metadata=ObjectMeta(namespace=namespace, name=name),
        endpoint=_endpoint(state, endpoint),
        tls=_tls(state),
        token=token,
        drivers=DriversConfig(allow=allow or [], unsafe=unsafe),
    )


def list_exporters(state: StateDir) -> list[Exporter]:
    with _store(state) as store:
        return store.list_exporters()


def list_clients(state: StateDir) -> list[Client]:
    with _store(state) as store:
        return store.list_clients()


def list_leases(state: StateDir, active_only: bool = True):
    with _store(state) as store:
        return store.list_leases(active_only=active_only)


def delete_exporter(state: StateDir, name: str, namespace: str = DEFAULT_NAMESPACE) -> None:
    with _store(state) as store:
        if not store.delete_exporter(namespace, name):
            raise NotFoundError(f"exporter {namespace}/{name} does not exist")


def delete_client(state: StateDir, name: str, namespace: str = DEFAULT_NAMESPACE) -> None:
    with _store(state) as store:
        if not store.delete_client(namespace, name):
            raise NotFoundError(f"client {namespace}/{name} does not exist")
