"""The controller's durable state: SQLite in WAL mode, one file in the state directory.

Everything a restart must not lose lives here: exporters (labels, token hash, the device
report from Register, last reported status), clients (token hash) and leases (request,
assignment, times, how they ended). What only makes sense while a process runs (open Status
and Listen streams, pending router pairings) is kept in memory by the services instead.

All calls happen on the event loop's thread; each is a short transaction (SQLite with WAL and
``synchronous=NORMAL`` commits in well under a millisecond on local disk), so the loop never
waits on I/O worth a thread.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS exporters (
    namespace TEXT NOT NULL, name TEXT NOT NULL, uid TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}', token_hash TEXT NOT NULL UNIQUE,
    devices TEXT, status TEXT NOT NULL DEFAULT '', status_message TEXT NOT NULL DEFAULT '',
    last_seen REAL, enabled INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (namespace, name));
CREATE TABLE IF NOT EXISTS clients (
    namespace TEXT NOT NULL, name TEXT NOT NULL, uid TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE, PRIMARY KEY (namespace, name));
CREATE TABLE IF NOT EXISTS leases (
    namespace TEXT NOT NULL, name TEXT NOT NULL, client TEXT NOT NULL,
    selector TEXT NOT NULL DEFAULT '', exporter_name TEXT NOT NULL DEFAULT '',
    duration REAL NOT NULL, begin_time REAL, end_time REAL, tags TEXT NOT NULL DEFAULT '{}',
    exporter TEXT, effective_begin REAL, effective_end REAL,
    released INTEGER NOT NULL DEFAULT 0, ended INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT 'Pending', message TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (namespace, name));
CREATE INDEX IF NOT EXISTS leases_active ON leases (ended, seq);
"""


@dataclass
class Exporter:
    namespace: str
    name: str
    uid: str
    labels: dict[str, str]
    token_hash: str
    devices: list[dict[str, Any]] | None = None
    status: str = ""
    status_message: str = ""
    last_seen: float | None = None
    enabled: bool = True

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass
class Client:
    namespace: str
    name: str
    uid: str
    token_hash: str


@dataclass
class Lease:
    namespace: str
    name: str
    client: str
    duration: float
    selector: str = ""
    exporter_name: str = ""
    begin_time: float | None = None
    end_time: float | None = None
    tags: dict[str, str] = field(default_factory=dict)
    exporter: str | None = None
    effective_begin: float | None = None
    effective_end: float | None = None
    released: bool = False
    ended: bool = False
    reason: str = "Pending"
    message: str = ""
    created: float = 0.0
    seq: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def active(self) -> bool:
        return self.exporter is not None and not self.ended

    def expires_at(self) -> float | None:
        if self.end_time is not None:
            return self.end_time
        if self.effective_begin is not None:
            return self.effective_begin + self.duration
        return None


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Create the file 0600 before SQLite opens it: the -wal and -shm files SQLite makes
        # next to it copy its mode, and they hold recent commits (token hashes, leases).
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a power cut may lose the last commit, never corrupt the file.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        path.chmod(0o600)

    def close(self) -> None:
        self.db.close()

    # --- meta ---------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # --- exporters ----------------------------------------------------------------------

    @staticmethod
    def _exporter(row: sqlite3.Row) -> Exporter:
        return Exporter(
            namespace=row["namespace"],
            name=row["name"],
            uid=row["uid"],
            labels=json.loads(row["labels"]),
            token_hash=row["token_hash"],
            devices=json.loads(row["devices"]) if row["devices"] is not None else None,
            status=row["status"],
            status_message=row["status_message"],
            last_seen=row["last_seen"],
            enabled=bool(row["enabled"]),
        )

    def add_exporter(self, namespace: str, name: str, labels: dict[str, str], th: str) -> Exporter:
        exporter = Exporter(namespace, name, str(uuid.uuid4()), dict(labels), th)
        self.db.execute(
            "INSERT INTO exporters (namespace, name, uid, labels, token_hash) VALUES (?,?,?,?,?)",
            (namespace, name, exporter.uid, json.dumps(labels), th),
        )
        return exporter

    def get_exporter(self, namespace: str, name: str) -> Exporter | None:
        row = self.db.execute(
            "SELECT * FROM exporters WHERE namespace = ? AND name = ?", (namespace, name)
        ).fetchone()
        return self._exporter(row) if row else None

    def exporter_by_token(self, th: str) -> Exporter | None:
        row = self.db.execute("SELECT * FROM exporters WHERE token_hash = ?", (th,)).fetchone()
        return self._exporter(row) if row else None

    def list_exporters(self, namespace: str | None = None) -> list[Exporter]:
        if namespace is None:
            rows = self.db.execute("SELECT * FROM exporters ORDER BY namespace, name")
        else:
            rows = self.db.execute(
                "SELECT * FROM exporters WHERE namespace = ? ORDER BY name", (namespace,)
            )
        return [self._exporter(r) for r in rows]

    def update_exporter(self, exporter: Exporter) -> None:
        self.db.execute(
            "UPDATE exporters SET labels = ?, devices = ?, status = ?, status_message = ?, "
            "last_seen = ?, enabled = ? WHERE namespace = ? AND name = ?",
            (
                json.dumps(exporter.labels),
                json.dumps(exporter.devices) if exporter.devices is not None else None,
                exporter.status,
                exporter.status_message,
                exporter.last_seen,
                int(exporter.enabled),
                exporter.namespace,
                exporter.name,
            ),
        )

    def delete_exporter(self, namespace: str, name: str) -> bool:
        """Delete the exporter and end the leases it holds: a new exporter created later
        under the same name must not inherit a lease nobody can serve any more."""
        cur = self.db.execute(
            "DELETE FROM exporters WHERE namespace = ? AND name = ?", (namespace, name)
        )
        if cur.rowcount:
            self.db.execute(
                "UPDATE leases SET ended = 1, effective_end = ?, reason = 'ExporterDeleted', "
                "message = ? WHERE namespace = ? AND exporter = ? AND ended = 0",
                (time.time(), f"exporter {name} was deleted", namespace, name),
            )
        return cur.rowcount > 0

    # --- clients ------------------------------------------------------------------------

    def add_client(self, namespace: str, name: str, th: str) -> Client:
        client = Client(namespace, name, str(uuid.uuid4()), th)
        self.db.execute(
            "INSERT INTO clients (namespace, name, uid, token_hash) VALUES (?,?,?,?)",
            (namespace, name, client.uid, th),
        )
        return client

    def client_by_token(self, th: str) -> Client | None:
        row = self.db.execute("SELECT * FROM clients WHERE token_hash = ?", (th,)).fetchone()
        return Client(**dict(row)) if row else None

    def get_client(self, namespace: str, name: str) -> Client | None:
        row = self.db.execute(
            "SELECT * FROM clients WHERE namespace = ? AND name = ?", (namespace, name)
        ).fetchone()
        return Client(**dict(row)) if row else None

    def list_clients(self) -> list[Client]:
        rows = self.db.execute("SELECT * FROM clients ORDER BY namespace, name")
        return [Client(**dict(r)) for r in rows]

    def set_client_token(self, namespace: str, name: str, th: str) -> None:
        self.db.execute(
            "UPDATE clients SET token_hash = ? WHERE namespace = ? AND name = ?",
            (th, namespace, name),
        )

    def delete_client(self, namespace: str, name: str) -> bool:
        """Delete the client and end its leases: nobody can release them any more, and an
        exporter must not stay leased to a credential that no longer exists."""
        cur = self.db.execute(
            "DELETE FROM clients WHERE namespace = ? AND name = ?", (namespace, name)
        )
        if cur.rowcount:
            self.db.execute(
                "UPDATE leases SET ended = 1, effective_end = ?, reason = 'ClientDeleted', "
                "message = ? WHERE namespace = ? AND client = ? AND ended = 0",
                (time.time(), f"client {name} was deleted", namespace, name),
            )
        return cur.rowcount > 0

    # --- leases -------------------------------------------------------------------------

    @staticmethod
    def _lease(row: sqlite3.Row) -> Lease:
        data = dict(row)
        data["tags"] = json.loads(data["tags"])
        data["released"] = bool(data["released"])
        data["ended"] = bool(data["ended"])
        return Lease(**data)

    def add_lease(self, lease: Lease) -> Lease:
        lease.created = lease.created or time.time()
        row = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 AS next FROM leases").fetchone()
        lease.seq = row["next"]
        self.db.execute(
            "INSERT INTO leases (namespace, name, client, selector, exporter_name, duration, "
            "begin_time, end_time, tags, reason, message, created, seq) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                lease.namespace,
                lease.name,
                lease.client,
                lease.selector,
                lease.exporter_name,
                lease.duration,
                lease.begin_time,
                lease.end_time,
                json.dumps(lease.tags),
                lease.reason,
                lease.message,
                lease.created,
                lease.seq,
            ),
        )
        return lease

    def get_lease(self, namespace: str, name: str) -> Lease | None:
        row = self.db.execute(
            "SELECT * FROM leases WHERE namespace = ? AND name = ?", (namespace, name)
        ).fetchone()
        return self._lease(row) if row else None

    def list_leases(self, namespace: str | None = None, active_only: bool = False) -> list[Lease]:
        query, args = "SELECT * FROM leases WHERE 1=1", []
        if namespace is not None:
            query += " AND namespace = ?"
            args.append(namespace)
        if active_only:
            query += " AND ended = 0"
        rows = self.db.execute(query + " ORDER BY seq", args)
        return [self._lease(r) for r in rows]

    def update_lease(self, lease: Lease) -> None:
        self.db.execute(
            "UPDATE leases SET client = ?, duration = ?, begin_time = ?, end_time = ?, "
            "exporter = ?, effective_begin = ?, effective_end = ?, released = ?, ended = ?, "
            "reason = ?, message = ? WHERE namespace = ? AND name = ?",
            (
                lease.client,
                lease.duration,
                lease.begin_time,
                lease.end_time,
                lease.exporter,
                lease.effective_begin,
                lease.effective_end,
                int(lease.released),
                int(lease.ended),
                lease.reason,
                lease.message,
                lease.namespace,
                lease.name,
            ),
        )
