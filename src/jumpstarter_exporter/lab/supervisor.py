"""Child processes for the lab: each in its own process group, and a tiny restart loop.

``spawn`` starts a command in a new session (its own process group, so Ctrl-C at the terminal
reaches only the lab, which then stops everything in order) with stdout and stderr appended to
a log file, and asks the kernel to SIGTERM it if the lab itself dies (``PR_SET_PDEATHSIG``), so
even a ``kill -9`` of the lab leaves nothing running for long. ``terminate`` stops a whole
group: SIGTERM, then SIGKILL after a grace period.

``Supervisor`` is what systemd's ``Restart=always`` does for ``jmp run`` on a real exporter
host: whenever the exporter exits (exit 0 after each lease is the normal case) it is started
again after ``delay`` seconds, unless it keeps failing (``burst`` non-zero exits within
``window`` seconds: systemd's start limit), or the supervisor is being stopped. Every start
and exit is put on ``events`` for whoever wants to show them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1


try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded here: not after fork()
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    # Fires when the forking thread dies: the lab spawns from its event loop's (main) thread.
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def spawn(
    argv: list[str], log_path: Path, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    with log_path.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


async def terminate(proc: asyncio.subprocess.Process, grace: float = 5.0) -> int | None:
    """SIGTERM the process's group, SIGKILL it after ``grace`` s; its exit status."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 5)
    # Whatever the leader left behind in its group goes too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


@dataclass
class Event:
    kind: str  # "started" | "exited" | "gave up"
    pid: int
    returncode: int | None = None
    at: float = field(default_factory=time.monotonic)


@dataclass
class Supervisor:
    """Restart ``argv`` whenever it exits (see the module docstring)."""

    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    delay: float = 0.2
    burst: int = 5
    window: float = 10.0
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    proc: asyncio.subprocess.Process | None = None
    gave_up: Event | None = None
    _stopping: bool = False
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        failures: list[float] = []
        while not self._stopping:
            proc = self.proc = await spawn(self.argv, self.log_path, self.env)
            if self._stopping:  # stop() came while this one was being started
                await terminate(proc)
                return
            self.events.put_nowait(Event("started", proc.pid))
            code = await proc.wait()
            self.events.put_nowait(Event("exited", proc.pid, code))
            if self._stopping:
                return
            if code != 0:
                now = time.monotonic()
                failures = [t for t in failures if now - t < self.window] + [now]
                if len(failures) >= self.burst:
                    self.gave_up = Event("gave up", proc.pid, code)
                    self.events.put_nowait(self.gave_up)
                    return
            await asyncio.sleep(self.delay)

    async def stop(self) -> None:
        """No more restarts; the current process is stopped and the loop has ended."""
        self._stopping = True
        if self.proc is not None:
            await terminate(self.proc)
        if self._task is not None:
            # The loop notices _stopping after its current await (wait, sleep or spawn).
            await asyncio.wait_for(self._task, 15)

    async def next_event(self, timeout: float) -> Event:  # noqa: ASYNC109
        return await asyncio.wait_for(self.events.get(), timeout)
