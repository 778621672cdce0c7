"""A small synchronous Jumpstarter client for test scripts, ``jmp shell`` and ``j``.

from jumpstarter_exporter.client import lease, connect, ClientError

with lease(selector={"board": "rpi4"}) as board:
    board.power.cycle()
    board.serial.expect(b"login:")
"""

from jumpstarter_exporter.client.board import AllowList, Board
from jumpstarter_exporter.client.connect import connect
from jumpstarter_exporter.client.drivers import ByteStream, DriverClient, PowerClient, SerialClient
from jumpstarter_exporter.client.errors import (
    ClientAuthError,
    ClientError,
    ClientUnavailable,
    DriverCallFailed,
    DriverNotAllowed,
    DriverNotFound,
    ExporterNotReady,
    LeaseEnded,
    LeaseNotFound,
    LeaseTimeout,
    NoMatchingExporter,
)
from jumpstarter_exporter.client.lease import Lease, lease

__all__ = [
    "AllowList",
    "Board",
    "ByteStream",
    "ClientAuthError",
    "ClientError",
    "ClientUnavailable",
    "DriverCallFailed",
    "DriverClient",
    "DriverNotAllowed",
    "DriverNotFound",
    "ExporterNotReady",
    "Lease",
    "LeaseEnded",
    "LeaseNotFound",
    "LeaseTimeout",
    "NoMatchingExporter",
    "PowerClient",
    "SerialClient",
    "connect",
    "lease",
]
