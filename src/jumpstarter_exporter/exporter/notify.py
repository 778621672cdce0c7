"""Telling systemd how we are: READY, STATUS, WATCHDOG and STOPPING (sd_notify(3)).

Without ``$NOTIFY_SOCKET`` (run by hand, or a unit without ``Type=notify``) every call is a
no-op. Sending never raises: a full or vanished notify socket must not take the daemon down.
The watchdog is pinged by a task on the event loop at half of ``$WATCHDOG_USEC``, so a loop
that is stuck stops pinging and systemd restarts us (see vector#25072 for why pinging from a
thread hides exactly that hang).
"""

from __future__ import annotations

import asyncio
import os
import socket

import structlog

log = structlog.get_logger("jumpstarter.exporter")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket (Linux): the leading "@" stands for a NUL byte.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.ready_sent = False
        self._last_status = ""
        self.watchdog_interval = self._watchdog_interval(env)

    @staticmethod
    def _watchdog_interval(env) -> float | None:
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 1_000_000 / 2
        except ValueError:
            return None

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *fields: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:  # systemd went away or the socket is full: keep running
            log.debug("sd_notify failed", error=str(exc))

    def ready(self, status: str) -> None:
        self.ready_sent = True
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    async def watchdog(self) -> None:
        """Ping forever (run as a task on the loop being watched)."""
        if self.watchdog_interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
