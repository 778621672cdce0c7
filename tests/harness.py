"""Real processes for tests: our controller, upstream's exporter, socat pty pairs.

Each helper starts a real process on loopback and stops it (SIGTERM, then SIGKILL) when the
test ends, so no test leaves anything running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
JMP = REPO / ".venv" / "bin" / "jmp"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unmet(reason: str) -> None:
    """A missing prerequisite: fail in CI (it must be provided there), skip elsewhere."""
    import pytest

    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def podman_base_image() -> str:
    """The registry-free base image (``$BASE_IMAGE``, else the one ../shared/tools/base-image
    builds), after checking podman can use it; ``unmet()`` otherwise."""
    import shutil

    if os.geteuid() != 0:
        unmet("needs root (podman)")
    if shutil.which("podman") is None:
        unmet("podman is missing: run ../shared/tools/provision-podman")
    base = os.environ.get("BASE_IMAGE", "localhost/bookworm-python:latest")
    if subprocess.run(["podman", "image", "exists", base], timeout=60).returncode != 0:
        unmet(f"base image {base} is missing: run ../shared/tools/base-image")
    return base


def build_upstream_venv() -> Path:
    """The venv with upstream Jumpstarter 0.9.0, built once by scripts/upstream-venv (which
    prints its path last)."""
    out = subprocess.run(
        [str(REPO / "scripts" / "upstream-venv")],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        try:
            # A process started in its own session is stopped with all its children.
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Controller:
    """``jmp controller serve`` on 127.0.0.1, state in a temp dir, JSON logs in a file."""

    state_dir: Path
    env: dict[str, str]
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Controller:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        listen = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                str(JMP),
                "--log-format",
                "json",
                "--log-level",
                "DEBUG",
                "controller",
                "serve",
                "--listen",
                listen,
                "--state-dir",
                str(self.state_dir),
            ],
            env=self.env,
            stdout=log,
            stderr=log,
        )
        log.close()
        event = wait_for(
            lambda: self._find("controller listening", offset), what="controller to listen"
        )
        self.port = event["port"]
        return self

    def events(self, offset: int = 0) -> list[dict]:
        if not self.log_path.exists():
            return []
        out = []
        with self.log_path.open("rb") as handle:
            handle.seek(offset)
            for line in handle:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def _find(self, event: str, offset: int = 0) -> dict | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"controller exited {self.proc.returncode}: {self.log()}")
        return next((e for e in self.events(offset) if e.get("event") == event), None)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)

    def jmp(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [str(JMP), *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        if check and out.returncode != 0:
            raise AssertionError(f"jmp {' '.join(args)} failed: {out.stderr}")
        return out

    def create_exporter(self, name: str, labels: dict[str, str], export: dict, path: Path) -> Path:
        args = [
            "controller",
            "create",
            "exporter",
            name,
            "--state-dir",
            str(self.state_dir),
            "--endpoint",
            self.endpoint,
            "--out",
            str(path),
        ]
        for key, value in labels.items():
            args += ["--label", f"{key}={value}"]
        self.jmp(*args)
        data = yaml.safe_load(path.read_text())
        data["export"] = export
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def create_client(self, name: str, path: Path, *extra: str) -> dict:
        self.jmp(
            "controller",
            "create",
            "client",
            name,
            "--state-dir",
            str(self.state_dir),
            "--endpoint",
            self.endpoint,
            "--out",
            str(path),
            *extra,
        )
        return yaml.safe_load(path.read_text())


@dataclass
class PtyPair:
    """Two linked pseudo-terminals made by socat: one end for the driver, one for the test."""

    device: Path
    far_end: Path
    proc: subprocess.Popen

    def close(self) -> None:
        stop_process(self.proc, 5)


def socat_pty_pair(directory: Path) -> PtyPair:
    device, far = directory / "ttyDUT", directory / "ttyTEST"
    proc = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={device}", f"pty,raw,echo=0,link={far}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: device.exists() and far.exists(), 10, what="socat ptys")
    return PtyPair(device, far, proc)


def upstream_env(venv: Path, base: dict[str, str], home: Path) -> dict[str, str]:
    env = dict(base)
    env["PATH"] = f"{venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    env["JMP_CLIENT_CONFIG_HOME"] = str(home)
    env.pop("VIRTUAL_ENV", None)
    return env


class NotifySocket:
    """A real sd_notify datagram socket, as systemd provides in ``$NOTIFY_SOCKET``."""

    def __init__(self, directory: Path) -> None:
        import socket

        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.05)
        self.messages: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return self.messages
            self.messages.extend(data.decode().split("\n"))

    def seen(self, field: str) -> bool:
        return field in self.poll()

    def statuses(self) -> list[str]:
        return [m.removeprefix("STATUS=") for m in self.poll() if m.startswith("STATUS=")]

    def close(self) -> None:
        self.sock.close()


@dataclass
class ExporterProcess:
    """Our ``jmp run`` as a real process with JSON logs in a file."""

    proc: subprocess.Popen
    log_path: Path

    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def has_event(self, name: str) -> bool:
        return any(e.get("event") == name for e in self.events())

    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        stop_process(self.proc)


def start_exporter(
    config: Path, env: dict[str, str], log_path: Path, *args: str
) -> ExporterProcess:
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [str(JMP), "--log-format", "json", "run", "--exporter-config", str(config), *args],
        env=env,
        stdout=log,
        stderr=log,
    )
    log.close()
    return ExporterProcess(proc, log_path)


def upstream_create_lease(
    client: Path, env: dict[str, str], selector: str, duration: str = "00:05:00"
) -> str:
    """``jmp create lease`` with upstream 0.9's CLI; returns the lease's short name."""
    created = subprocess.run(
        [
            "jmp",
            "create",
            "lease",
            "--client-config",
            str(client),
            "--selector",
            selector,
            "--duration",
            duration,
            "-o",
            "name",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    name = created.stdout.strip().splitlines()[-1].rsplit("/", 1)[-1]
    assert name, created.stdout
    return name


def upstream_delete_lease(client: Path, env: dict[str, str], name: str) -> None:
    """``jmp delete leases NAME`` with upstream 0.9's CLI (plural, as 0.9 spells it)."""
    deleted = subprocess.run(
        ["jmp", "delete", "leases", "--client-config", str(client), name],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert deleted.returncode == 0, deleted.stderr
