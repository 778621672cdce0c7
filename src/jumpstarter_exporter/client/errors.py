"""The client's errors: one ``ClientError`` family that also sits in the package's tree.

Each class inherits from :class:`ClientError` (so a test script can catch everything the
client raises on purpose with one ``except``) *and* from the matching class of
``jumpstarter_exporter.errors`` (so ``jmp shell`` and ``j`` derive their exit code from it the
same way every other command does)::

    ClientError                                   → 1
    ├── ClientAuthError      (AuthError)          → 77  the controller refused our token
    ├── ClientUnavailable    (ControllerUnavailable) → 69  controller/router/exporter unreachable
    ├── NoMatchingExporter   (NotFoundError)      → 1   no exporter matches the selector
    ├── LeaseTimeout                              → 75  exporters match but none became free
    ├── LeaseEnded                                → 1   the lease ended (or was released)
    ├── LeaseNotFound        (NotFoundError)      → 1   no lease of that name
    ├── ExporterNotReady                          → 1   beforeLease hook failed / not ready
    ├── DriverNotAllowed     (ConfigError)        → 78  the allow-list refuses a driver class
    ├── DriverNotFound       (NotFoundError)      → 1   no driver of that name on the exporter
    └── DriverCallFailed     (DriverCallError)    → 70  a driver method failed on the exporter
"""

from __future__ import annotations

from collections.abc import Sequence

from jumpstarter_exporter.errors import (
    AuthError,
    ConfigError,
    ControllerUnavailable,
    DriverCallError,
    ExitCode,
    JumpstarterError,
    NotFoundError,
)


class ClientError(JumpstarterError):
    """Root of every error the client raises on purpose."""

    exit_code = ExitCode.FAILURE


class ClientAuthError(ClientError, AuthError):
    """The controller refused the client's credentials (names the config, never the token)."""

    exit_code = ExitCode.NOPERM


class ClientUnavailable(ClientError, ControllerUnavailable):
    """The controller, the router or the exporter could not be reached in time."""

    exit_code = ExitCode.UNAVAILABLE


class NoMatchingExporter(ClientError, NotFoundError):
    """The controller has no exporter that could ever satisfy the selector."""

    exit_code = ExitCode.FAILURE


class LeaseTimeout(ClientError):
    """Matching exporters exist, but none was assigned within the timeout (all busy or
    offline). EX_TEMPFAIL: trying again later may work."""

    exit_code = ExitCode.HOOK_EXIT  # 75, EX_TEMPFAIL


class LeaseEnded(ClientError):
    """The lease ended (expired, or released elsewhere) while it was being used."""


class LeaseNotFound(ClientError, NotFoundError):
    """The controller has no lease of that name (for this client)."""

    exit_code = ExitCode.FAILURE


class ExporterNotReady(ClientError):
    """The exporter did not become ready for driver calls (e.g. its beforeLease hook failed)."""


class DriverNotAllowed(ClientError, ConfigError):
    """The driver client class the exporter reports is not in the client's allow-list."""

    exit_code = ExitCode.CONFIG

    def __init__(self, name: str, client_class: str, patterns: Sequence[str]) -> None:
        self.name = name
        self.client_class = client_class
        self.patterns = list(patterns)
        shown = ", ".join(self.patterns) if self.patterns else "(empty)"
        ConfigError.__init__(
            self,
            f"driver '{name}' ({client_class}) is not allowed by the client's driver "
            f"allow-list [{shown}]; add a matching pattern to drivers.allow in the client "
            "config, or set JMP_DRIVERS_ALLOW (UNSAFE allows every driver)",
        )


class DriverNotFound(ClientError, NotFoundError):
    """The exporter has no driver (or no method) of that name."""

    exit_code = ExitCode.FAILURE


class DriverCallFailed(ClientError, DriverCallError):
    """A driver call failed on the exporter; ``code`` is the gRPC status name."""

    exit_code = ExitCode.SOFTWARE

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


__all__ = [
    "ClientAuthError",
    "ClientError",
    "ClientUnavailable",
    "DriverCallFailed",
    "DriverNotAllowed",
    "DriverNotFound",
    "ExporterNotReady",
    "LeaseEnded",
    "LeaseNotFound",
    "LeaseTimeout",
    "NoMatchingExporter",
]
