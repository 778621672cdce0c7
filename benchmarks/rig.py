"""The processes a benchmark round needs: our controller, the two exporters, the client.

Both exporters register with the same controller (ours) and are driven by the same client
program (upstream's Python client API, run by the upstream venv's python). Ours runs under a
tiny restart loop, as systemd would run it (``Restart=always``); upstream's ``jmp run`` is its
own supervisor (a parent that forks the exporter) and stays in-process between leases.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from benchmarks import procstat
from tests.harness import JMP, REPO, Controller, PtyPair, build_upstream_venv, socat_pty_pair

EXPORT_TYPES = {
    "power": "jumpstarter_driver_power.driver.MockPower",
    "serial": "jumpstarter_driver_pyserial.driver.PySerial",
}


def isolated_env(base: Path) -> dict[str, str]:
    """An environment whose config homes are private to this run (no developer config leaks)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JMP_", "JUMPSTARTER_"))}
    home = base / "home"
    (home / ".config").mkdir(parents=True, exist_ok=True)
    system = base / "etc-exporters"
    system.mkdir(exist_ok=True)
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        JMP_CLIENT_CONFIG_HOME=str(home / ".config" / "jumpstarter"),
        JMP_SYSTEM_EXPORTER_DIR=str(system),
    )
    env.pop("VIRTUAL_ENV", None)
    return env


def bytecode_env(env: dict[str, str]) -> dict[str, str]:
    """Our exporter with compiled bytecode, as every real install has it.

    The project venv holds our package as an editable install, whose sources are never
    compiled ahead, and CI machines set PYTHONDONTWRITEBYTECODE=1: each ``jmp run`` would then
    compile every module of ours from source (measured: +3.5 MB RSS and part of the start-up),
    while upstream's venv, a plain pip install, has its bytecode. The image and a pip install
    of ours compile at install time too, so compile ours once (into ``__pycache__`` beside the
    sources, which git ignores; a prefix cache would miss the venv's own bytecode).
    """
    ours = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(
        [str(JMP.parent / "python"), "-m", "compileall", "-q", str(REPO / "src")],
        env=ours,
        check=True,
        timeout=300,
    )
    return ours


class Events:
    """The controller's JSON log, read incrementally; each event gets ``t`` (epoch seconds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.items: list[dict] = []

    def poll(self) -> list[dict]:
        if not self.path.exists():
            return self.items
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1  # keep a partly written last line for the next poll
        self.offset += end
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError, KeyError):
                event = json.loads(line)
                event["t"] = datetime.fromisoformat(event["ts"]).timestamp()
                self.items.append(event)
        return self.items

    def wait(self, find, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            found = find(self.poll())
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.01)


def leasable_at(
    events: list[dict], exporter: str, since: float, *, online: bool, need_register: bool
) -> float | None:
    """When ``exporter`` became leasable after ``since``: online (Status stream open) and
    reporting Available; with ``need_register``, only a registration after ``since`` counts
    (our exporter exits after a lease, so its old process may say Available on the way out)."""
    registered = not need_register
    status = None
    for event in events:
        if event["t"] < since or event.get("exporter") != exporter:
            continue
        name = event.get("event")
        if name == "exporter registered":
            registered, status = True, None
        elif name == "exporter online":
            online = True
        elif name == "exporter offline":
            online = False
        elif name == "exporter status":
            status = event.get("status")
        if registered and online and status == "Available":
            return event["t"]
    return None


def first(events: list[dict], since: float, **match) -> dict | None:
    for event in events:
        if event["t"] >= since and all(event.get(k) == v for k, v in match.items()):
            return event
    return None


class NotifyListener:
    """A real sd_notify socket; records when READY=1 arrives (epoch seconds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.ready: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in data.split(b"\n"):
                self.ready.append(time.time())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@dataclass
class Side:
    """One exporter implementation under test."""

    name: str  # "ours" | "upstream"
    config: Path
    pty: PtyPair
    env: dict[str, str]
    command: list[str]
    log_path: Path
    restart: bool  # run under a restart loop (ours) or as its own supervisor (upstream)
    proc: subprocess.Popen | None = None
    starts: list[float] = field(default_factory=list)
    _loop: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def exporter(self) -> str:
        return f"bench-{self.name}"

    @property
    def selector(self) -> str:
        return f"impl={self.name}"

    def _spawn(self) -> subprocess.Popen:
        with self.log_path.open("ab") as log:
            self.starts.append(time.time())
            return subprocess.Popen(
                self.command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def start(self) -> float:
        self._stopping.clear()
        self.proc = self._spawn()
        if self.restart:
            self._loop = threading.Thread(target=self._restart_loop, daemon=True)
            self._loop.start()
        return self.starts[-1]

    def _restart_loop(self) -> None:
        """The tiny supervisor: start the exporter again as soon as it exits (as systemd's
        Restart=always with RestartSec=0 would)."""
        while not self._stopping.is_set():
            assert self.proc is not None
            code = self.proc.wait()
            if self._stopping.is_set():
                return
            if code != 0:
                raise RuntimeError(f"{self.name} exporter exited {code}: see {self.log_path}")
            self.proc = self._spawn()

    def pids(self) -> list[int]:
        return procstat.tree_pids(self.proc.pid) if self.proc is not None else []

    def stop(self) -> None:
        self._stopping.set()
        if self.proc is None:
            return
        pids = self.pids()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        # upstream's jmp run forks its exporter into a new session: end what is left of it
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._loop is not None:
            self._loop.join(5)


class Client:
    """benchmarks/client_workload.py in the upstream venv, one command per line."""

    def __init__(self, python: Path, config: Path, side: Side, env: dict, log: Path) -> None:
        with log.open("ab") as err:
            self.proc = subprocess.Popen(
                [
                    str(python),
                    str(REPO / "benchmarks" / "client_workload.py"),
                    str(config),
                    side.selector,
                    str(side.pty.far_end),
                ],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        self.log = log
        self._expect("hello", 60)

    def _expect(self, event: str, timeout: float) -> dict:
        # a watchdog kills a client that hangs so the run ends with an error, not forever
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            timer.cancel()
        if not line:
            raise RuntimeError(f"client ended while waiting for {event!r}; see {self.log}")
        reply = json.loads(line)
        if reply.get("ev") != event:
            raise RuntimeError(f"client: expected {event!r}, got {reply}; see {self.log}")
        return reply

    def do(self, command: str, event: str, timeout: float = 180) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._expect(event, timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.do("quit", "bye", 10)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@dataclass
class Rig:
    base: Path
    env: dict[str, str]
    controller: Controller
    events: Events
    venv: Path
    client_config: Path
    sides: dict[str, Side]
    notify: NotifyListener

    def close(self) -> None:
        for side in self.sides.values():
            side.stop()
            side.pty.close()
        self.notify.close()
        self.controller.stop()


def build(base: Path) -> Rig:
    venv = build_upstream_venv()
    env = isolated_env(base)
    controller = Controller(base / "controller-state", env)
    controller.start()
    events = Events(controller.log_path)
    client_config = base / "client.yaml"
    controller.create_client("bench-client", client_config, "--unsafe")
    up_env = {**env, "PATH": f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"}
    notify = NotifyListener(base / "notify.sock")
    sides = {}
    for name in ("ours", "upstream"):
        pty_dir = base / f"pty-{name}"
        pty_dir.mkdir()
        pty = socat_pty_pair(pty_dir)
        export = {
            "power": {"type": EXPORT_TYPES["power"]},
            "serial": {"type": EXPORT_TYPES["serial"], "config": {"url": str(pty.device)}},
        }
        config = controller.create_exporter(
            f"bench-{name}", {"impl": name}, export, base / f"exporter-{name}.yaml"
        )
        if name == "ours":
            command = [str(JMP), "--log-format", "json", "run", "--exporter-config", str(config)]
            side_env = {**bytecode_env(env), "NOTIFY_SOCKET": str(notify.path)}
        else:
            command = [str(venv / "bin" / "jmp"), "run", "--exporter-config", str(config)]
            side_env = up_env
        sides[name] = Side(
            name=name,
            config=config,
            pty=pty,
            env=side_env,
            command=command,
            log_path=base / f"exporter-{name}.log",
            restart=name == "ours",
        )
    return Rig(base, up_env, controller, events, venv, client_config, sides, notify)
