"""``hooks.beforeLease`` / ``hooks.afterLease``: lab scripts run around every lease.

A hook is a script (a file, or inline shell) run with the lease's session reachable at
``$JUMPSTARTER_HOST`` so it can drive the board (``j power on`` …). Its output goes to our
log and to the clients' LogStream, line by line. It has a timeout; a failure is handled as
``onFailure`` says: ``warn`` (report and go on), ``endLease`` (release the lease),
``exit`` (stop the exporter). Semantics and status messages follow upstream (§3.8).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from jumpstarter_exporter.config.models import HookInstance

log = structlog.get_logger("jumpstarter.exporter")

KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL for a hook that timed out


@dataclass(frozen=True)
class HookResult:
    ok: bool
    message: str = ""


def command(hook: HookInstance) -> list[str]:
    """A one-line script naming an existing file runs that file; anything else is shell."""
    script = hook.script.strip()
    if "\n" not in script and Path(script).is_file():
        if hook.exec_:
            return [hook.exec_, script]
        if script.endswith(".py"):
            return [sys.executable, script]
        return ["/bin/sh", script]
    return [hook.exec_ or "/bin/sh", "-c", hook.script]


def environment(host: str, lease: str, client: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PS1", None)
    env.update(
        JUMPSTARTER_HOST=host,
        JMP_DRIVERS_ALLOW="UNSAFE",
        LEASE_NAME=lease,
        CLIENT_NAME=client,
        TERM="dumb",
        DEBIAN_FRONTEND="noninteractive",
        GIT_TERMINAL_PROMPT="0",
    )
    return env


async def run_hook(
    hook: HookInstance,
    phase: str,
    env: dict[str, str],
    on_line: Callable[[str], None],
) -> HookResult:
    """Run one hook to completion or timeout; never raises for the hook's own failures."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *command(hook),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: a timeout kills its children too
        )
    except OSError as exc:
        return HookResult(False, f"Error executing hook: {exc}")
    log.info("hook started", hook=phase, pid=proc.pid)

    async def pump() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            log.info("hook output", hook=phase, line=line)
            on_line(line)

    reader = asyncio.ensure_future(pump())
    try:
        async with asyncio.timeout(hook.timeout):
            code = await proc.wait()
            await reader
    except asyncio.CancelledError:
        # The lease or the exporter ended under the hook: take its process group along.
        _signal_group(proc.pid, signal.SIGKILL)
        reader.cancel()
        raise
    except TimeoutError:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), KILL_GRACE)
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        return HookResult(False, f"Hook timed out after {hook.timeout} seconds")
    if code != 0:
        return HookResult(False, f"Hook failed with exit code {code}")
    return HookResult(True)


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)
