"""Hotplug through the whole exporter: our ``jmp run`` (a real process) with a PySerial whose
device is a socat pty link that comes and goes, and ``match:`` resolved by the real udevd.

- controller mode: start-up without the device still registers and becomes READY, STATUS
  names the missing device and follows it both ways; upstream's ``j serial pipe`` in a lease
  fails while it is absent;
- standalone mode (``--tls-grpc-listener``, upstream 0.9's ``j``): a call during absence fails
  with UNAVAILABLE naming the driver and the path, GetReport says so; the device appears ->
  bytes both ways; socat goes away mid-stream -> the client sees the end of the stream and
  the exporter stays up; socat back on the same link -> works again, no restart;
- ``match: {SUBSYSTEM: tty, KERNEL: ttyS0}`` resolves to /dev/ttyS0 through udevd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2

from jumpstarter_exporter._proto.jumpstarter.v1 import jumpstarter_pb2, jumpstarter_pb2_grpc
from jumpstarter_exporter.drivers.serial import LABEL_AVAILABLE, PySerial
from jumpstarter_exporter.errors import DeviceUnavailable
from jumpstarter_exporter.hotplug import DeviceWatcher
from jumpstarter_exporter.wire import values
from tests.harness import (
    Controller,
    ExporterProcess,
    NotifySocket,
    start_exporter,
    stop_process,
    unmet,
    upstream_env,
    wait_for,
)

pytestmark = pytest.mark.interop

PYSERIAL = "jumpstarter_driver_pyserial.driver.PySerial"
WAITING = "waiting for lease"


class Link:
    """socat's pty pair: ``dut`` (the driver's configured path) and ``host`` (the far end).
    Absent until ``start``; ``stop`` (SIGTERM) closes the ptys and removes the links."""

    def __init__(self, directory: Path) -> None:
        self.dut, self.host = directory / "dut", directory / "host"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            ["socat", f"pty,link={self.dut},raw,echo=0", f"pty,link={self.host},raw,echo=0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self.dut.exists() and self.host.exists(), 10, what="socat's links")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, 5)
        wait_for(lambda: not self.dut.exists(), 10, what="socat's links to go")

    @contextlib.contextmanager
    def far_end(self) -> Iterator[int]:
        fd = os.open(self.host, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            yield fd
        finally:
            os.close(fd)


@pytest.fixture
def link(tmp_path: Path) -> Iterator[Link]:
    if shutil.which("socat") is None:
        unmet("socat is missing")
    pair = Link(tmp_path)
    try:
        yield pair
    finally:
        if pair.proc is not None:
            stop_process(pair.proc, 5)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()


def read_until(fd: int, want: bytes, seconds: float = 10.0) -> bytes:
    got = b""
    deadline = time.monotonic() + seconds
    while want not in got:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{want!r} not received; got {got!r}")
        if select.select([fd], [], [], min(left, 0.2))[0]:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if not chunk:
                raise AssertionError(f"end of file before {want!r}; got {got!r}")
            got += chunk
    return got


def ready(exp: ExporterProcess, notify: NotifySocket) -> None:
    def check() -> bool:
        if exp.proc.poll() is not None:
            raise AssertionError(f"exporter exited {exp.proc.returncode}: {exp.log()[-3000:]}")
        return notify.seen("READY=1")

    wait_for(check, 30, what="READY=1")


def status_becomes(notify: NotifySocket, exp: ExporterProcess, predicate, what: str) -> str:
    def check() -> str | None:
        assert exp.proc.poll() is None, exp.log()[-3000:]
        statuses = notify.statuses()
        return statuses[-1] if statuses and predicate(statuses[-1]) else None

    return wait_for(check, 10, what=f"STATUS {what} (log: {exp.log()[-1500:]})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_config(controller: Controller, export: dict, path: Path) -> Path:
    return controller.create_exporter("ex1", {"board": "b1"}, export, path)


# --- the driver and a watcher, in process ---------------------------------------------------


class NoPolling(PySerial):
    REOPEN_INTERVAL = 3600.0  # the console log must not need its polling to come back


async def until(predicate, what: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.02)


def test_watched_driver_ends_streams_and_recovers(link: Link, tmp_path: Path) -> None:
    """The watch alone (the pty itself stays alive: only its link goes) ends an open stream
    cleanly and closes the port; when the link is back, connect works again and a running
    console log reopens the port at once rather than at its next poll."""

    async def main() -> None:
        async with DeviceWatcher(poll_interval=0.05) as watcher:
            driver = NoPolling({"url": str(link.dut), "console_log": f"{tmp_path}/logs/"})
            driver.name = "serial"
            driver.attach_watcher(watcher)
            assert driver.available is False
            assert driver.report().labels[LABEL_AVAILABLE] == "false"
            with pytest.raises(DeviceUnavailable, match=r"serial driver 'serial'.*does not exist"):
                async with driver.lookup("connect", "stream")():
                    pass
            await driver.start()  # the console log waits for the device
            await asyncio.to_thread(link.start)
            await until(lambda: driver._hub.device is not None, "the log to open the port", 3)
            assert LABEL_AVAILABLE not in driver.report().labels
            async with driver.lookup("connect", "stream")() as stream:
                with link.far_end() as far:
                    os.write(far, b"hello")
                    assert await asyncio.wait_for(stream.read(), 5) == b"hello"
                target = link.dut.resolve()
                link.dut.unlink()  # socat and its pty live on
                assert await asyncio.wait_for(stream.read(), 5) == b""  # a clean end
                assert driver._hub.device is None
                with pytest.raises(BrokenPipeError):
                    await stream.write(b"x")
            link.dut.symlink_to(target)
            await until(lambda: driver._hub.device is not None, "the log to reopen", 3)
            async with driver.lookup("connect", "stream")() as stream:
                with link.far_end() as far:
                    await stream.write(b"ping")
                    await asyncio.to_thread(read_until, far, b"ping", 5)
            await driver.aclose()

    asyncio.run(main())


# --- controller mode -------------------------------------------------------------------------


def test_controller_mode_starts_without_the_device_and_follows_it(
    controller: Controller, link: Link, notify: NotifySocket, tmp_path: Path, upstream_venv: Path
) -> None:
    export = {"serial": {"type": PYSERIAL, "config": {"url": str(link.dut)}}}
    config = make_config(controller, export, tmp_path / "ex1.yaml")
    client = tmp_path / "cl1.yaml"
    controller.create_client("cl1", client, "--unsafe")
    env = {**controller.env, "NOTIFY_SOCKET": str(notify.path)}
    exp = start_exporter(config, env, tmp_path / "exporter.log")
    try:
        ready(exp, notify)  # registered and READY although the device is missing
        missing = f"device unavailable: serial ({link.dut} does not exist)"
        assert notify.statuses()[-1] == f"{WAITING}; {missing}"
        assert exp.has_event("starting without a device: its driver is unavailable")

        link.start()
        status_becomes(notify, exp, lambda s: s == WAITING, "back to steady")
        assert exp.has_event("device is back")
        link.stop()
        status_becomes(notify, exp, lambda s: s == f"{WAITING}; {missing}", "unavailable")
        assert exp.has_event("device went away")

        # A lease while it is absent: upstream's `j serial pipe` fails, the exporter lives on.
        up = upstream_env(upstream_venv, controller.env, tmp_path / "up-home")
        # (upstream's client shows a refused stream as a lost connection; the refusal and
        # its reason are in our log)
        pipe = ["j", "serial", "pipe", "--no-input"]
        out = subprocess.run(
            ["jmp", "shell", "--client-config", str(client), "--selector", "board=b1", "--", *pipe],
            env=up,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert "Serial connection lost" in out.stdout + out.stderr, out.stderr[-3000:]
        refused = next(e for e in exp.events() if e.get("event") == "driver stream failed")
        assert refused["code"] == "UNAVAILABLE"
        assert refused["error"] == (
            f"serial driver 'serial' ({link.dut}) is unavailable: {link.dut} does not exist"
        )
        assert exp.wait(30) == 0  # exits after the lease, as always (not a crash)
    finally:
        exp.stop()


# --- standalone mode: the whole unavailable -> available cycle --------------------------------


class Standalone:
    def __init__(self, port: int) -> None:
        self.port = port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = jumpstarter_pb2_grpc.ExporterServiceStub(self.channel)

    def serial_report(self) -> jumpstarter_pb2.DriverInstanceReport:
        reports = self.stub.GetReport(empty_pb2.Empty(), timeout=10).reports
        return next(r for r in reports if r.labels.get("jumpstarter.dev/name") == "serial")

    def call(self, method: str, *args: object) -> object:
        request = jumpstarter_pb2.DriverCallRequest(
            uuid=self.serial_report().uuid,
            method=method,
            args=[values.to_value(a) for a in args],
        )
        return self.stub.DriverCall(request, timeout=10)

    def close(self) -> None:
        self.channel.close()


def j(up: dict[str, str], port: int) -> tuple[list[str], dict[str, str]]:
    return ["j", "serial", "pipe"], {
        **up,
        "JUMPSTARTER_HOST": f"127.0.0.1:{port}",
        "JMP_GRPC_INSECURE": "1",
        "JMP_DRIVERS_ALLOW": "UNSAFE",
    }


def pipe_both_ways(link: Link, command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A running ``j serial pipe`` that was shown to carry bytes both ways."""
    proc = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    with link.far_end() as far:
        # upstream reads stdin in 1 KiB blocks: closing it sends what was written; the
        # stream stays open for the output (a serial line has no half-close)
        proc.stdin.write(b"to-device\n")
        proc.stdin.close()
        read_until(far, b"to-device\n", 30)  # also proves the stream is connected
        os.write(far, b"to-client\n")
        read_until(proc.stdout.fileno(), b"to-client\n", 10)
    return proc


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_standalone_serial_unavailable_available_cycle(
    controller: Controller, link: Link, notify: NotifySocket, tmp_path: Path, upstream_venv: Path
) -> None:
    export = {"serial": {"type": PYSERIAL, "config": {"url": str(link.dut)}}}
    config = make_config(controller, export, tmp_path / "ex1.yaml")
    env = {**controller.env, "NOTIFY_SOCKET": str(notify.path)}
    port = free_port()
    serving = f"serving standalone on 127.0.0.1:{port}"
    missing = f"{serving}; device unavailable: serial ({link.dut} does not exist)"
    up = upstream_env(upstream_venv, controller.env, tmp_path / "up-home")
    command, j_env = j(up, port)
    exp = start_exporter(
        config,
        env,
        tmp_path / "exporter.log",
        "--tls-grpc-listener",
        f"127.0.0.1:{port}",
        "--tls-grpc-insecure",
    )
    ours = Standalone(port)
    pipes: list[subprocess.Popen] = []
    try:
        ready(exp, notify)
        assert notify.statuses()[-1] == missing

        # absent: calls fail with a clear error, the report says so, upstream's pipe fails
        assert ours.serial_report().labels[LABEL_AVAILABLE] == "false"
        with pytest.raises(grpc.RpcError) as failed:
            ours.call("set_dtr", True)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert failed.value.details() == (
            f"serial driver 'serial' ({link.dut}) is unavailable: {link.dut} does not exist"
        )
        out = subprocess.run([*command, "--no-input"], env=j_env, capture_output=True, timeout=60)
        assert b"Serial connection lost" in out.stderr, out.stderr[-3000:]
        assert out.stdout == b""

        for _ in range(2):  # appear, stream, disappear mid-stream; then the same again
            link.start()
            status_becomes(notify, exp, lambda s: s == serving, "back to steady")
            assert LABEL_AVAILABLE not in ours.serial_report().labels
            ours.call("set_dtr", True)
            proc = pipe_both_ways(link, command, j_env)
            pipes.append(proc)
            link.stop()  # mid-stream: the client sees the end of the stream
            proc.wait(20)  # ended by the exporter, not by us
            assert proc.stderr is not None
            err = proc.stderr.read()
            assert b"end of stream" in err, err[-3000:]
            status_becomes(notify, exp, lambda s: s == missing, "unavailable")
            assert exp.proc.poll() is None
            assert ours.serial_report().labels[LABEL_AVAILABLE] == "false"

        exp.proc.send_signal(signal.SIGTERM)
        assert exp.wait(15) == 0
        assert exp.has_event("serial device went away")
    finally:
        ours.close()
        for proc in pipes:
            stop_group(proc)
        exp.stop()


# --- match: through the real udevd -----------------------------------------------------------


def test_match_resolves_through_udevd(
    controller: Controller, udevd: None, notify: NotifySocket, tmp_path: Path
) -> None:
    if not Path("/dev/ttyS0").exists() or not Path("/sys/class/tty/ttyS0").exists():
        unmet("no /dev/ttyS0 on this machine")
    match = {"SUBSYSTEM": "tty", "KERNEL": "ttyS0"}
    ghost = {"SUBSYSTEM": "tty", "KERNEL": "ttyJMPNOPE9"}
    # without an exporter, a driver resolves its match on the spot
    assert PySerial({"match": match})._device_path() == "/dev/ttyS0"

    export = {
        "console": {"type": PYSERIAL, "config": {"match": match}},
        "ghost": {"type": PYSERIAL, "config": {"match": ghost}},
    }
    config = make_config(controller, export, tmp_path / "ex1.yaml")
    env = {**controller.env, "NOTIFY_SOCKET": str(notify.path)}
    port = free_port()
    exp = start_exporter(
        config,
        env,
        tmp_path / "exporter.log",
        "--tls-grpc-listener",
        f"127.0.0.1:{port}",
        "--tls-grpc-insecure",
    )
    try:
        ready(exp, notify)
        assert notify.statuses()[-1] == (
            f"serving standalone on 127.0.0.1:{port}; device unavailable: "
            "ghost (no device matches SUBSYSTEM=tty, KERNEL=ttyJMPNOPE9)"
        )
        watching = next(e for e in exp.events() if e.get("event") == "watching devices")
        assert "console: /dev/ttyS0" in watching["devices"]
        assert next(e for e in exp.events() if e.get("event") == "watching udev events")[
            "source"
        ] == ("udev")
        exp.proc.send_signal(signal.SIGTERM)
        assert exp.wait(15) == 0
    finally:
        exp.stop()
