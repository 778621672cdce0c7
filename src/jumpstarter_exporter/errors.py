"""The one exception tree and the one exit-code table of jumpstarter-exporter.

Every error a user can cause or meet is one of these classes; policy code branches on the
class, never on message text. The process exit code is derived from the class alone, so the
shipped systemd units (``RestartPreventExitStatus=78``) can rely on it::

    JumpstarterError
    ├── ConfigError            file, key path, line            → 78 (EX_CONFIG)
    ├── AuthError              which credential, never its value → 77 (EX_NOPERM)
    ├── ControllerUnavailable  endpoint, attempts, last error     → 69 (EX_UNAVAILABLE)
    ├── NotFoundError          a named config/alias is missing     → 1
    ├── AlreadyExistsError     refusing to overwrite               → 1
    ├── DeviceError            driver, device                      → 70
    │   ├── DeviceUnavailable
    │   │   └── AmbiguousMatch  (hotplug.match: several devices match a ``match:``)
    │   └── DeviceBusy
    └── DriverCallError        driver, method                      → 70
    anything else (a bug)                                          → 70 (EX_SOFTWARE)
    a lease hook with ``onFailure: exit`` failed                  → 75 (EX_TEMPFAIL)

The numbers follow BSD ``sysexits.h``; 1 keeps upstream's status for "the alias you named
does not exist / already exists", so scripts written for upstream ``jmp config`` keep working.
Usage errors (bad or missing flags) exit 2, as click does.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """Process exit statuses: an API, documented in the README and relied on by the units."""

    OK = 0  # lease done / graceful stop: "start me fresh"
    FAILURE = 1  # a named alias is missing or already exists (upstream-compatible)
    USAGE = 2  # bad command-line usage (click)
    UNAVAILABLE = 69  # controller unreachable past the configured budget
    SOFTWARE = 70  # internal error: a bug, reported with a traceback
    HOOK_EXIT = 75  # a lease hook with onFailure: exit failed (EX_TEMPFAIL: restart me)
    NOPERM = 77  # the controller refused our credentials
    CONFIG = 78  # invalid configuration: restarting will not help


class JumpstarterError(Exception):
    """Root of every error this package raises on purpose."""

    exit_code: ExitCode = ExitCode.SOFTWARE


class ConfigError(JumpstarterError):
    """A configuration file or value is invalid.

    ``problems`` holds one line per problem, each already naming the key path (and line where
    known), so one message can report every mistake in a file at once.
    """

    exit_code = ExitCode.CONFIG

    def __init__(
        self,
        message: str,
        *,
        path: Path | str | None = None,
        problems: Sequence[str] = (),
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.problems = list(problems)
        super().__init__(message)

    def __str__(self) -> str:
        head = super().__str__()
        if self.path is not None:
            head = f"{self.path}: {head}"
        if not self.problems:
            return head
        return head + "\n" + "\n".join(f"  - {p}" for p in self.problems)


class NotFoundError(JumpstarterError):
    """A config named by alias or path does not exist."""

    exit_code = ExitCode.FAILURE


class AlreadyExistsError(JumpstarterError):
    """Creating something that already exists (we never overwrite silently)."""

    exit_code = ExitCode.FAILURE


class AuthError(JumpstarterError):
    """The controller refused our credentials. Names the credential's source, never its value."""

    exit_code = ExitCode.NOPERM


class ControllerUnavailable(JumpstarterError):
    """The controller could not be reached within the configured budget."""

    exit_code = ExitCode.UNAVAILABLE


class DeviceError(JumpstarterError):
    """A device behind a driver failed."""


class DeviceUnavailable(DeviceError):
    """The device is absent (unplugged, not yet enumerated)."""


class DeviceBusy(DeviceError):
    """The device is held by another user (exclusive open failed)."""


class DriverCallError(JumpstarterError):
    """A driver method failed in a way that maps onto a gRPC status for the client."""


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit status for an exception that ended the process."""
    if isinstance(exc, JumpstarterError):
        return exc.exit_code
    return ExitCode.SOFTWARE


__all__ = [
    "AlreadyExistsError",
    "AuthError",
    "ConfigError",
    "ControllerUnavailable",
    "DeviceBusy",
    "DeviceError",
    "DeviceUnavailable",
    "DriverCallError",
    "ExitCode",
    "JumpstarterError",
    "NotFoundError",
    "exit_code_for",
]
