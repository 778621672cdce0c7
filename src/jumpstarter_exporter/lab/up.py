"""``jmp lab up``: a controller, a PDU, a board, an exporter and a client on one machine.

In order, each step printing one line with the time since the start:

1. ``jmp controller serve`` on a free loopback port, state in ``DIR/controller`` (kept: a
   second run reuses the CA and the database);
2. exporter ``board`` (label ``lab=demo``) and client ``lab`` are (re)created through the
   controller's admin code, which writes their configs (``DIR/exporter.yaml``,
   ``DIR/client.yaml``); the exporter's ``export`` gets ``power`` (``PduPower`` on outlet 1 of
   the simulated PDU) and ``serial`` (``PySerial`` on the board's pty), and the file is loaded
   back through the same loader ``jmp run`` uses;
3. snmpsim as an APC rack PDU (``lab.pdusim``, the same simulator the PDU tests use);
4. a socat pty pair and the board simulator (``lab.board``) holding one end;
5. ``jmp run`` under a restart loop (``lab.supervisor``, as systemd's ``Restart=always``),
   until the controller logs the exporter ``Available``;
6. the scripted client session (``lab.session``, the client API): lease, power on, boot log
   and ``login:``, log in and run ``uname -a``, power cycle and the boot again, a power
   reading, release;
7. the exporter exits 0 after the lease, is restarted and registers again (both seen in the
   controller's log: ``exporter offline`` / ``exporter status Available``);
8. a second short lease: the restarted exporter is leasable;
9. everything stops, in reverse order, each process group with SIGTERM then SIGKILL.

Exit status: 0 all steps passed; 1 a step failed (``FAILED <step>: <why>``, and where the
logs are); 130 interrupted by SIGINT (Ctrl-C), 143 by SIGTERM, after the same clean stop.
Logs of every process are in ``DIR/logs/`` (rewritten by each run). Two runs cannot share a
directory at once (``DIR/lab.lock``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from jumpstarter_exporter import log as logsetup
from jumpstarter_exporter.lab import session
from jumpstarter_exporter.lab.pdusim import (
    LAB_FILES,
    METER_CURRENT,
    METER_VOLTAGE,
    REPO,
    SYS_DESCR,
    SnmpSim,
    SnmpSimUnavailable,
    snmp_get,
    snmpsim_venv,
)
from jumpstarter_exporter.lab.supervisor import Supervisor, spawn, terminate

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

EXPORTER = "board"
CLIENT = "lab"
LABELS = {"lab": "demo"}
OUTLET = 1
STEP_TIMEOUT = 30.0  # the longest any single wait may take before the step fails
# The children get our environment minus what would change how they behave: JMP_*/JUMPSTARTER_*
# overrides (the lab's configs are the whole truth), a systemd notify socket or socket
# activation meant for the lab itself.
_INHERITED_NOT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


def default_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "jumpstarter" / "lab"


StepFailed = session.StepFailed


class Report:
    """One line per step: ``  3.4s  step         what happened``."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.muted = False

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def line(self, step: str, text: str) -> None:
        if not self.muted:
            self.plain(f"{self.elapsed():5.1f}s  {step:<12} {text}")

    def plain(self, text: str) -> None:
        with self.lock:
            try:
                self.out.write(text + "\n")
                self.out.flush()
            except OSError:
                pass  # a closed pipe (| head): the lab still runs and stops cleanly


def jmp_argv() -> list[str]:
    here = Path(sys.executable).parent / "jmp"
    found = str(here) if here.exists() else shutil.which("jmp")
    if found is None:
        raise StepFailed("setup", "no jmp executable next to this Python or on PATH")
    return [found]


def child_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JMP_", "JUMPSTARTER_")) and k not in _INHERITED_NOT
    }


class JsonLog:
    """Reads a child's JSON log file as it grows (our processes log JSON lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.seen: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        new: list[dict[str, Any]] = []
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as handle:
            handle.seek(self.offset)
            for line in handle:
                if not line.endswith(b"\n"):
                    break  # half-written: read it next time
                self.offset += len(line)
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict):
                        new.append(event)
        self.seen += new
        return new

    def mark(self) -> int:
        self.poll()
        return len(self.seen)

    async def wait(
        self,
        match: Callable[[dict[str, Any]], bool],
        timeout: float,  # noqa: ASYNC109 - a deadline on a log, not on one awaitable
        since: int = 0,
        alive: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        checked = since
        while True:
            self.poll()
            for event in self.seen[checked:]:
                if match(event):
                    return event
            checked = len(self.seen)
            if alive is not None:
                alive()
            if time.monotonic() > deadline:
                raise TimeoutError
            await asyncio.sleep(0.05)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(f"    {line}" for line in text[-lines:]) or "(empty log)"


@dataclass
class Lab:
    dir: Path
    report: Report
    speed: float = 1.0
    env: dict[str, str] = field(default_factory=child_env)
    procs: list[tuple[str, asyncio.subprocess.Process]] = field(default_factory=list)
    supervisor: Supervisor | None = None
    sim: SnmpSim | None = None
    port: int = 0
    pdu_port: int = 0
    closing: bool = False

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def run(self) -> Path:
        return self.dir / "run"

    def say(self, step: str, text: str) -> None:
        self.report.line(step, text)

    # -- steps -------------------------------------------------------------------------------

    async def start_controller(self) -> JsonLog:
        log_path = self.logs / "controller.log"
        argv = [*jmp_argv(), "--log-format", "json", "controller", "serve"]
        argv += ["--listen", "127.0.0.1:0", "--state-dir", str(self.dir / "controller")]
        proc = await self._spawn("controller", argv, log_path)
        log = JsonLog(log_path)
        try:
            event = await log.wait(
                lambda e: e.get("event") == "controller listening",
                STEP_TIMEOUT,
                alive=lambda: self._alive("controller", proc, log_path),
            )
        except TimeoutError:
            raise StepFailed(
                "controller", f"not listening after {STEP_TIMEOUT:g} s:\n{_tail(log_path)}"
            ) from None
        self.port = int(event["port"])
        self.say("controller", f"jmp controller serve: listening on 127.0.0.1:{self.port}")
        return log

    def write_configs(self) -> tuple[Path, Path]:
        from jumpstarter_exporter.config.load import load_client, load_exporter
        from jumpstarter_exporter.config.yamlio import atomic_write, dump_yaml
        from jumpstarter_exporter.controller import admin
        from jumpstarter_exporter.controller.server import StateDir
        from jumpstarter_exporter.errors import JumpstarterError, NotFoundError

        state = StateDir(self.dir / "controller")
        endpoint = f"127.0.0.1:{self.port}"
        exporter_path, client_path = self.dir / "exporter.yaml", self.dir / "client.yaml"
        try:
            # A reused directory: the old tokens go, fresh ones are minted, and deleting
            # them ends any lease a killed run left behind (controller/store.py).
            for delete, name in ((admin.delete_exporter, EXPORTER), (admin.delete_client, CLIENT)):
                with contextlib.suppress(NotFoundError):
                    delete(state, name)
            exporter = admin.create_exporter(state, EXPORTER, LABELS, endpoint=endpoint)
            data = exporter.to_file()
            data["description"] = "jmp lab: a simulated board behind a simulated APC PDU"
            data["export"] = self.export()
            atomic_write(exporter_path, dump_yaml(data))
            client = admin.create_client(
                state,
                CLIENT,
                endpoint=endpoint,
                allow=["jumpstarter_driver_power.*", "jumpstarter_driver_pyserial.*"],
            )
            atomic_write(client_path, dump_yaml(client.to_file()))
            # What `jmp run` and the client will read, checked the way they read it.
            load_exporter(path=exporter_path, environ=self.env)
            load_client(path=client_path, environ=self.env)
        except JumpstarterError as exc:
            raise StepFailed("configs", str(exc)) from exc
        labels = ",".join(f"{k}={v}" for k, v in LABELS.items())
        self.say(
            "configs",
            f"exporter {EXPORTER!r} ({labels}; power, serial) in {exporter_path.name}, "
            f"client {CLIENT!r} in {client_path.name}",
        )
        return exporter_path, client_path

    def export(self) -> dict[str, Any]:
        return {
            "power": {
                "type": "jumpstarter_driver_power.driver.PduPower",
                "config": {
                    "host": "127.0.0.1",
                    "port": self.pdu_port,
                    "outlet": OUTLET,
                    "profile": "apc-rpdu",
                    "community": "lab",
                    "voltage_oid": f"{METER_VOLTAGE}.{{outlet}}",
                    "voltage_scale": 0.1,
                    "current_oid": f"{METER_CURRENT}.{{outlet}}",
                    "current_scale": 0.1,
                },
            },
            "serial": {
                "type": "jumpstarter_driver_pyserial.driver.PySerial",
                "config": {"url": str(self.run / "ttyDUT"), "baudrate": 115200},
            },
        }

    async def start_pdu(self) -> None:
        venv = await self._snmpsim_venv()
        self.sim = SnmpSim(venv, files=LAB_FILES)
        argv = self.sim.prepare()
        self.pdu_port = self.sim.port
        log_path = self.logs / "snmpsim.log"
        proc = await self._spawn("pdu", argv, log_path)
        deadline = time.monotonic() + STEP_TIMEOUT
        while await snmp_get("127.0.0.1", self.pdu_port, "lab", SYS_DESCR, wait=0.3) is None:
            self._alive("pdu", proc, log_path)
            if time.monotonic() > deadline:
                raise StepFailed("pdu", f"snmpsim did not answer in {STEP_TIMEOUT:g} s")
        self.say(
            "pdu",
            f"snmpsim as an APC rack PDU on udp/127.0.0.1:{self.pdu_port}, outlets off",
        )

    async def _snmpsim_venv(self) -> Path:
        """From a checkout, ``scripts/snmpsim-venv`` builds it (once: minutes) or finds it
        (at once); as a process of ours, so Ctrl-C during a build stops it too."""
        script = REPO / "scripts" / "snmpsim-venv"
        if script.exists():
            log_path = self.logs / "snmpsim-venv.log"
            env = dict(self.env)
            env.update({k: v for k, v in os.environ.items() if k.startswith("JMP_SNMPSIM_")})
            proc = await self._spawn("snmpsim-venv", [str(script)], log_path, env)
            if await proc.wait() != 0:
                raise StepFailed("pdu", f"scripts/snmpsim-venv failed:\n{_tail(log_path)}")
            lines = log_path.read_text().strip().splitlines()
            return Path(lines[-1]) if lines else Path()
        try:
            return snmpsim_venv(build=False)
        except SnmpSimUnavailable as exc:
            raise StepFailed("pdu", str(exc)) from exc

    async def start_board(self) -> None:
        self.run.mkdir(parents=True, exist_ok=True)
        dut, far = self.run / "ttyDUT", self.run / "ttyBOARD"
        for link in (dut, far):
            link.unlink(missing_ok=True)
        socat = shutil.which("socat")
        if socat is None:
            raise StepFailed("board", "socat is not installed (apt-get install socat)")
        pair = [socat, f"pty,raw,echo=0,link={dut}", f"pty,raw,echo=0,link={far}"]
        proc = await self._spawn("pty pair", pair, self.logs / "socat.log")
        deadline = time.monotonic() + 10
        while not (dut.exists() and far.exists()):
            self._alive("board", proc, self.logs / "socat.log")
            if time.monotonic() > deadline:
                raise StepFailed("board", "socat made no pty pair in 10 s")
            await asyncio.sleep(0.02)
        argv = [sys.executable, "-m", "jumpstarter_exporter.lab.board", "--tty", str(far)]
        argv += ["--pdu", f"127.0.0.1:{self.pdu_port}", "--community", "lab"]
        argv += ["--outlet", str(OUTLET), "--speed", str(self.speed)]
        await self._spawn("board", argv, self.logs / "board.log")
        self.say("board", f"on PDU outlet {OUTLET}, console on run/{dut.name} (socat pty pair)")

    async def start_exporter(self, config: Path, clog: JsonLog) -> None:
        argv = [*jmp_argv(), "--log-format", "json", "run", "--exporter-config", str(config)]
        mark = clog.mark()
        if self.closing:
            raise asyncio.CancelledError
        self.supervisor = Supervisor(argv, self.logs / "exporter.log", self.env)
        self.supervisor.start()
        started = await self._next_event("exporter", "started")
        await self._available(clog, mark, "exporter")
        self.say(
            "exporter", f"jmp run, pid {started.pid}, in a restart loop; controller: Available"
        )

    async def exporter_restarts(self, clog: JsonLog, mark: int) -> None:
        exited = await self._next_event("exporter", "exited")
        if exited.returncode != 0:
            raise StepFailed(
                "exporter",
                f"exited {exited.returncode} after the lease, expected 0:\n"
                f"{_tail(self.logs / 'exporter.log')}",
            )
        await self._controller_event(
            clog, mark, "exporter", lambda e: e.get("event") in ("exporter offline",)
        )
        self.say("exporter", f"pid {exited.pid} exited 0 after the lease; controller: offline")
        mark = len(clog.seen)
        started = await self._next_event("restart", "started")
        await self._available(clog, mark, "restart")
        self.say("restart", f"restarted as pid {started.pid}; controller: Available again")

    # -- helpers -----------------------------------------------------------------------------

    async def _spawn(
        self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        if self.closing:
            raise asyncio.CancelledError  # the lab is stopping: start nothing new
        proc = await spawn(argv, log_path, self.env if env is None else env)
        self.procs.append((name, proc))  # before any other await: stop_all will see it
        return proc

    def _alive(self, step: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        if proc.returncode is not None:
            raise StepFailed(step, f"exited {proc.returncode}:\n{_tail(log_path)}")

    async def _next_event(self, step: str, kind: str):
        assert self.supervisor is not None
        try:
            event = await self.supervisor.next_event(STEP_TIMEOUT)
        except TimeoutError:
            raise StepFailed(
                step, f"the exporter did not get {kind} in {STEP_TIMEOUT:g} s"
            ) from None
        if event.kind != kind:
            raise StepFailed(
                step,
                f"expected the exporter {kind}, it {event.kind} (status {event.returncode}):\n"
                f"{_tail(self.logs / 'exporter.log')}",
            )
        return event

    async def _controller_event(
        self, clog: JsonLog, mark: int, step: str, match: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        def exporter_alive() -> None:
            gave_up = self.supervisor.gave_up if self.supervisor else None
            if gave_up is not None:
                raise StepFailed(
                    step,
                    f"the exporter keeps failing (status {gave_up.returncode}):\n"
                    f"{_tail(self.logs / 'exporter.log')}",
                )

        try:
            return await clog.wait(
                lambda e: e.get("exporter") == EXPORTER and match(e),
                STEP_TIMEOUT,
                since=mark,
                alive=exporter_alive,
            )
        except TimeoutError:
            raise StepFailed(
                step,
                f"the controller did not see it in {STEP_TIMEOUT:g} s; exporter log:\n"
                f"{_tail(self.logs / 'exporter.log')}",
            ) from None

    async def _available(self, clog: JsonLog, mark: int, step: str) -> None:
        await self._controller_event(
            clog,
            mark,
            step,
            lambda e: e.get("event") == "exporter status" and e.get("status") == "Available",
        )

    async def run_session(self, fn: Callable[..., None], *args: Any) -> None:
        if self.closing:
            raise asyncio.CancelledError  # stopping: no new lease
        await _in_thread(fn, *args)

    async def stop_all(self) -> list[str]:
        """Stop everything in reverse order of start; what did not stop cleanly."""
        problems = []
        if self.supervisor is not None:
            try:
                await self.supervisor.stop()
            except (TimeoutError, OSError) as exc:
                problems.append(f"exporter supervisor: {exc!r}")
        while self.procs:  # newest first; popped, so a second call stops only newcomers
            name, proc = self.procs.pop()
            try:
                await terminate(proc)
            except (TimeoutError, OSError) as exc:
                problems.append(f"{name} (pid {proc.pid}): {exc}")
        if self.sim is not None:
            self.sim.stop()  # its data directory (the process is already gone)
        return problems


async def _in_thread(fn: Callable[..., None], *args: Any) -> None:
    """Run a synchronous client step in a daemon thread: an interrupted lab does not wait for
    a blocked gRPC call (the processes it talks to are being stopped anyway)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def target() -> None:
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            error = exc
            loop.call_soon_threadsafe(lambda: done.done() or done.set_exception(error))
        else:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    threading.Thread(target=target, name=f"lab-{fn.__name__}", daemon=True).start()
    await done


def _prepare(directory: Path) -> TextIO:
    directory.mkdir(parents=True, exist_ok=True)
    return (directory / "lab.lock").open("w")


async def up(directory: Path, out: TextIO, speed: float = 1.0) -> int:
    report = Report(out)
    lock = _prepare(directory)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        report.plain(f"lab: another `jmp lab up` is using {directory}; give another --dir")
        lock.close()
        return EXIT_FAILED
    lab = Lab(directory, report, speed)
    shutil.rmtree(lab.logs, ignore_errors=True)
    lab.logs.mkdir(parents=True)
    report.plain(f"Jumpstarter lab in {directory}  (logs: {lab.logs})")

    loop = asyncio.get_running_loop()
    signalled: asyncio.Future[int] = loop.create_future()

    def on_signal(signum: int) -> None:
        # A second signal changes nothing: the stop below is already bounded.
        if not signalled.done():
            signalled.set_result(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    # The steps run as their own task, raced against a signal, rather than cancelling the
    # main task from the handler: on Python 3.11 a cancellation that meets a finishing
    # wait_for() is lost, and a lab that ignores Ctrl-C is worse than one that is slow to stop.
    steps = loop.create_task(_steps(lab))
    code = EXIT_OK
    try:
        await asyncio.wait({steps, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if signalled.done():
            lab.closing = True  # no process is started from here on
            report.muted = True  # a session thread may still be talking...
            logsetup.configure("CRITICAL")  # ...or logging what fails as everything stops
            name = signal.Signals(signalled.result()).name
            report.plain(f"\nlab: {name}, stopping everything")
            code = EXIT_SIGINT if signalled.result() == signal.SIGINT else EXIT_SIGTERM
            steps.cancel()
            await asyncio.wait({steps}, timeout=2)
        else:
            try:
                steps.result()
            except session.StepFailed as exc:
                report.muted = True
                report.plain(f"FAILED {exc.step}: {exc.message}\n(logs in {lab.logs})")
                code = EXIT_FAILED
    finally:
        lab.closing = True
        problems = await lab.stop_all()
        if not steps.done():
            steps.cancel()
            await asyncio.wait({steps}, timeout=5)
            problems += await lab.stop_all()  # anything it started meanwhile
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        lock.close()
    if problems:
        report.plain("lab: could not stop: " + "; ".join(problems))
        code = code or EXIT_FAILED
    if code == EXIT_OK:
        report.line("stop", "exporter, board, pdu and controller stopped")
        report.plain(f"lab: all steps passed in {report.elapsed():.1f} s")
    elif code in (EXIT_SIGINT, EXIT_SIGTERM):
        report.plain("lab: stopped, nothing left running")
    return code


async def _steps(lab: Lab) -> None:
    from jumpstarter_exporter.config.load import load_client

    clog = await lab.start_controller()
    await lab.start_pdu()
    exporter_path, client_path = lab.write_configs()
    client = load_client(path=client_path, environ=lab.env).config
    await lab.start_board()
    await lab.start_exporter(exporter_path, clog)
    plan = session.Plan(config=client, selector=LABELS, outlet=OUTLET)
    mark = clog.mark()
    await lab.run_session(session.first_lease, plan, lab.say)
    await lab.exporter_restarts(clog, mark)
    await lab.run_session(session.second_lease, plan, lab.say)
