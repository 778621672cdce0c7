"""Our ``jmp run`` through whole lifecycles, as real processes: several leases in one process,
signals during a lease, a controller that dies and comes back, upstream 0.9's Python client
API, and standalone mode (``--tls-grpc-listener``) with upstream's ``j``.

Everything runs against our controller on loopback and upstream Jumpstarter 0.9 clients.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.harness import (
    JMP,
    Controller,
    ExporterProcess,
    NotifySocket,
    socat_pty_pair,
    start_exporter,
    upstream_create_lease,
    upstream_delete_lease,
    upstream_env,
    wait_for,
)

pytestmark = pytest.mark.interop

EXPORT = {
    "power": {"type": "jumpstarter_driver_power.driver.MockPower"},
    "serial": {"type": "jumpstarter_driver_pyserial.driver.PySerial", "config": {"url": "loop://"}},
}
WAITING = "waiting for lease"


def exporter_row(ctl: Controller, name: str = "ex1") -> dict | None:
    out = ctl.jmp("controller", "get", "exporters", "-o", "json", "--state-dir", str(ctl.state_dir))
    return next((e for e in json.loads(out.stdout)["items"] if e["name"] == name), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_key(config: Path, key: str, value) -> None:
    data = yaml.safe_load(config.read_text())
    data[key] = value
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def leased_statuses(notify: NotifySocket) -> list[str]:
    return [s for s in notify.statuses() if s.startswith("leased by")]


@pytest.fixture
def notify(tmp_path: Path):
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()


@pytest.fixture
def setup(controller: Controller, tmp_path: Path, notify: NotifySocket, upstream_venv: Path):
    """(controller, exporter config, client config, env for our jmp, env for upstream)."""
    config = controller.create_exporter("ex1", {"board": "b1"}, EXPORT, tmp_path / "ex1.yaml")
    client = tmp_path / "cl1.yaml"
    controller.create_client("cl1", client, "--unsafe")
    env = {**controller.env, "NOTIFY_SOCKET": str(notify.path)}
    up = upstream_env(upstream_venv, controller.env, tmp_path / "up-home")
    return controller, config, client, env, up


def shell(client: Path, up: dict[str, str], *command: str, lease: str | None = None):
    """Upstream 0.9 ``jmp shell`` (a fresh lease on board=b1, or ``lease``) running command."""
    target = ["--lease", lease] if lease else ["--selector", "board=b1"]
    return subprocess.run(
        ["jmp", "shell", "--client-config", str(client), *target, "--", *command],
        env=up,
        capture_output=True,
        text=True,
        timeout=90,
    )


def start_shell(client: Path, up: dict[str, str], script: str, log: Path) -> subprocess.Popen:
    """Upstream ``jmp shell`` running ``sh -c script`` in the background, in its own process
    group so that ``stop_group`` also reaches the command it runs."""
    handle = log.open("wb")
    try:
        return subprocess.Popen(
            [
                "jmp",
                "shell",
                "--client-config",
                str(client),
                "--selector",
                "board=b1",
                "--",
                "sh",
                "-c",
                script,
            ],
            env=up,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        handle.close()


def stop_group(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(5)
            return
        except subprocess.TimeoutExpired:
            continue


def ready(exp: ExporterProcess, notify: NotifySocket) -> None:
    def check() -> bool:
        if exp.proc.poll() is not None:
            raise AssertionError(f"exporter exited {exp.proc.returncode}: {exp.log()[-3000:]}")
        return notify.seen("READY=1")

    wait_for(check, 20, what="READY=1")


# --- several leases in one process ---------------------------------------------------------


def test_exit_on_lease_end_false_serves_two_leases(
    setup, tmp_path: Path, notify: NotifySocket
) -> None:
    ctl, config, client, env, up = setup
    set_key(config, "exitOnLeaseEnd", False)
    exp = start_exporter(config, env, tmp_path / "exporter.log")
    try:
        ready(exp, notify)
        for round_ in (1, 2):
            out = shell(client, up, "sh", "-c", "j power on && j power read")
            assert out.returncode == 0, out.stderr[-3000:] + exp.log()[-3000:]
            # back to idle, same process, still registered, STATUS back to waiting
            wait_for(
                lambda r=round_: (
                    len(leased_statuses(notify)) == r and notify.statuses()[-1] == WAITING
                ),
                20,
                what=f"STATUS back to {WAITING!r} after lease {round_}",
            )
            assert exp.proc.poll() is None, exp.log()[-3000:]
            wait_for(
                lambda: (exporter_row(ctl) or {}).get("status") == "Available",
                20,
                what="the controller to show the exporter Available",
            )
            assert exporter_row(ctl)["registered"]
        assert notify.poll().count("READY=1") == 1
        events = [e.get("event") for e in exp.events()]
        assert events.count("lease started") == events.count("lease ended") == 2
        first, second = leased_statuses(notify)
        assert first != second  # two different leases (each names its lease)
        exp.proc.send_signal(signal.SIGTERM)
        assert exp.wait(15) == 0
        assert notify.seen("STOPPING=1")
        row = exporter_row(ctl)
        assert row["status"] == "Offline" and not row["registered"]
    finally:
        exp.stop()


def test_exit_on_lease_end_flag_overrides_config(
    setup, tmp_path: Path, notify: NotifySocket
) -> None:
    _ctl, config, client, env, up = setup
    set_key(config, "exitOnLeaseEnd", False)
    exp = start_exporter(config, env, tmp_path / "exporter.log", "--exit-on-lease-end")
    try:
        ready(exp, notify)
        out = shell(client, up, "j", "power", "on")
        assert out.returncode == 0, out.stderr[-3000:] + exp.log()[-3000:]
        assert exp.wait(30) == 0
        assert notify.seen("STOPPING=1")
        assert [e.get("event") for e in exp.events()].count("lease started") == 1
    finally:
        exp.stop()


# --- signals during a lease ----------------------------------------------------------------


def test_sighup_during_lease_serves_until_release(
    setup, tmp_path: Path, notify: NotifySocket
) -> None:
    _ctl, config, client, env, up = setup
    exp = start_exporter(config, env, tmp_path / "exporter.log")
    marker = tmp_path / "first-call-done"
    proceed = tmp_path / "proceed"
    sh = None
    try:
        ready(exp, notify)
        script = (
            f"j power on && touch {marker} && "
            f"while [ ! -e {proceed} ]; do sleep 0.1; done && j power on && j power read"
        )
        sh = start_shell(client, up, script, tmp_path / "shell.log")
        wait_for(marker.exists, 60, what="the first driver call in the shell")
        exp.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: any(s.endswith("exiting after this lease") for s in notify.statuses()),
            10,
            what="STATUS to announce the exit after this lease",
        )
        time.sleep(0.5)
        assert exp.proc.poll() is None, "SIGHUP during a lease must not stop the exporter"
        assert not notify.seen("STOPPING=1")
        proceed.touch()  # the second call, after the SIGHUP
        assert sh.wait(60) == 0, (tmp_path / "shell.log").read_text()[-3000:] + exp.log()[-3000:]
        assert exp.wait(30) == 0
        assert notify.seen("STOPPING=1")
    finally:
        stop_group(sh)
        exp.stop()


def test_sigterm_during_lease_exits_0_and_unregisters(
    setup, tmp_path: Path, notify: NotifySocket
) -> None:
    ctl, config, client, env, up = setup
    exp = start_exporter(config, env, tmp_path / "exporter.log")
    marker, proceed = tmp_path / "leased", tmp_path / "proceed"
    sh = None
    try:
        ready(exp, notify)
        script = (
            f"j power on && touch {marker} && "
            f"while [ ! -e {proceed} ]; do sleep 0.1; done; j power on"
        )
        sh = start_shell(client, up, script, tmp_path / "shell.log")
        wait_for(marker.exists, 60, what="the driver call in the shell")
        started = time.monotonic()
        exp.proc.send_signal(signal.SIGTERM)
        assert exp.wait(10) == 0, exp.log()[-3000:]
        assert time.monotonic() - started < 10
        assert notify.seen("STOPPING=1")
        row = exporter_row(ctl)
        assert row["status"] == "Offline" and not row["registered"]
        # a driver call after the exporter left fails, and the client's shell ends
        proceed.touch()
        assert sh.wait(30) != 0, (tmp_path / "shell.log").read_text()[-3000:]
    finally:
        stop_group(sh)
        exp.stop()


def test_goodbye_to_a_hung_controller_is_bounded(
    setup, tmp_path: Path, notify: NotifySocket
) -> None:
    ctl, config, _client, env, _up = setup
    exp = start_exporter(config, env, tmp_path / "exporter.log")
    assert ctl.proc is not None
    try:
        ready(exp, notify)
        ctl.proc.send_signal(signal.SIGSTOP)  # accepts connections, never answers
        try:
            started = time.monotonic()
            exp.proc.send_signal(signal.SIGTERM)
            assert exp.wait(15) == 0
            assert 4 < time.monotonic() - started < 10  # the 5 s goodbye bound, not a hang
        finally:
            ctl.proc.send_signal(signal.SIGCONT)
    finally:
        exp.stop()


def test_second_sigterm_forces_exit(setup, tmp_path: Path, notify: NotifySocket) -> None:
    ctl, config, _client, env, _up = setup
    exp = start_exporter(config, env, tmp_path / "exporter.log")
    assert ctl.proc is not None
    try:
        ready(exp, notify)
        ctl.proc.send_signal(signal.SIGSTOP)  # the goodbye calls now hang (bounded at 5 s)
        try:
            exp.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: notify.seen("STOPPING=1"), 5, what="STOPPING=1")
            time.sleep(1.0)
            assert exp.proc.poll() is None, "the graceful stop should still be saying goodbye"
            started = time.monotonic()
            exp.proc.send_signal(signal.SIGTERM)
            assert exp.wait(5) == 128 + signal.SIGTERM
            assert time.monotonic() - started < 2
            assert exp.has_event("second signal: exiting now")
        finally:
            ctl.proc.send_signal(signal.SIGCONT)
    finally:
        exp.stop()


# --- the controller goes away during a lease -----------------------------------------------


def test_controller_restart_mid_lease(setup, tmp_path: Path, notify: NotifySocket) -> None:
    ctl, config, client, env, up = setup
    exp = start_exporter(config, env, tmp_path / "exporter.log")
    try:
        ready(exp, notify)
        lease = upstream_create_lease(client, up, "board=b1")
        wait_for(
            lambda: f"leased by cl1 (lease {lease})" in notify.statuses(),
            30,
            what="the exporter to take the lease",
        )

        ctl.kill()
        wait_for(
            lambda: any(
                s.startswith("controller unreachable") and lease in s for s in notify.statuses()
            ),
            20,
            what="STATUS to say the controller is unreachable",
        )
        time.sleep(1.0)
        assert exp.proc.poll() is None, "the exporter must keep serving its lease"
        ctl.start()  # same port, same state directory
        wait_for(
            lambda: exp.has_event("controller reachable again"),
            45,
            what="the exporter to reconnect",
        )
        out = shell(client, up, "j", "power", "on", lease=lease)
        assert out.returncode == 0, out.stderr[-3000:] + exp.log()[-3000:]
        assert exp.proc.poll() is None  # a shell on a lease it did not create keeps it
        # once reconnected, STATUS no longer claims the controller is down
        assert notify.statuses()[-1].startswith("leased by cl1"), notify.statuses()[-3:]

        upstream_delete_lease(client, up, lease)
        assert exp.wait(30) == 0
        assert notify.seen("STOPPING=1")
    finally:
        exp.stop()


# --- upstream 0.9's Python client API ------------------------------------------------------

CLIENT_SCRIPT = textwrap.dedent(
    """
    import os, select, sys, time
    from jumpstarter.config.client import ClientConfigV1Alpha1

    def receive(stream, n):
        got = b""
        while len(got) < n:
            got += stream.receive()
        return got

    def far_read(fd, n, timeout=10.0):
        got, deadline = b"", time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                got += os.read(fd, 4096)
        return got

    config = ClientConfigV1Alpha1.from_file(sys.argv[1])
    far = os.open(sys.argv[2], os.O_RDWR | os.O_NOCTTY)
    with config.lease(selector="board=b1") as lease:
        with lease.connect() as client:
            client.power.on()
            client.power.off()
            print("readings", [(r.voltage, r.current) for r in client.power.read()])
            with client.serial.stream() as s:
                s.send(b"echo-me")
                print("loop", receive(s, 7))
            with client.tty.stream() as s:
                s.send(b"to-the-board")
                print("far got", far_read(far, 12))
                os.write(far, b"from-the-board")
                print("tty got", receive(s, 14))
    print("released")
    """
)


def test_upstream_python_client_api(setup, tmp_path: Path, notify: NotifySocket) -> None:
    _ctl, config, client, env, up = setup
    pty = socat_pty_pair(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["export"]["tty"] = {
        "type": "jumpstarter_driver_pyserial.driver.PySerial",
        "config": {"url": str(pty.device)},
    }
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    exp = start_exporter(config, env, tmp_path / "exporter.log")
    try:
        ready(exp, notify)
        out = subprocess.run(
            ["python", str(script), str(client), str(pty.far_end)],
            env=up,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert out.returncode == 0, out.stderr[-3000:] + exp.log()[-3000:]
        lines = out.stdout.splitlines()
        assert "readings [(0.0, 0.0), (5.0, 2.0)]" in lines
        assert "loop b'echo-me'" in lines
        assert "far got b'to-the-board'" in lines
        assert "tty got b'from-the-board'" in lines
        assert lines[-1] == "released"
        assert exp.wait(30) == 0  # the lease was released: exit to start fresh
    finally:
        exp.stop()
        pty.close()


# --- standalone mode -----------------------------------------------------------------------


def j(up: dict[str, str], port: int, *args: str, **extra: str):
    """Upstream ``j`` straight at a standalone exporter (no client config: without
    ``JMP_DRIVERS_ALLOW`` upstream's client would refuse to load any driver client)."""
    env = {
        **up,
        "JUMPSTARTER_HOST": f"127.0.0.1:{port}",
        "JMP_GRPC_INSECURE": "1",
        "JMP_DRIVERS_ALLOW": "UNSAFE",
        **extra,
    }
    return subprocess.run(["j", *args], env=env, capture_output=True, text=True, timeout=60)


def test_standalone_insecure_listener(setup, tmp_path: Path, notify: NotifySocket) -> None:
    _ctl, config, _client, env, up = setup
    port = free_port()
    listener = f"127.0.0.1:{port}"
    exp = start_exporter(
        config,
        env,
        tmp_path / "exporter.log",
        "--tls-grpc-listener",
        listener,
        "--tls-grpc-insecure",
    )
    try:
        ready(exp, notify)
        assert notify.statuses()[-1] == f"serving standalone on {listener}"
        on = j(up, port, "power", "on")
        assert on.returncode == 0, on.stderr[-3000:] + exp.log()[-3000:]
        read = j(up, port, "power", "read")
        assert read.returncode == 0, read.stderr[-3000:]
        assert "5.0" in read.stdout
        # a standalone exporter serves any number of clients, one after the other
        assert j(up, port, "power", "off").returncode == 0
        exp.proc.send_signal(signal.SIGTERM)
        assert exp.wait(15) == 0
        assert notify.seen("STOPPING=1")
    finally:
        exp.stop()


def test_standalone_passphrase(setup, tmp_path: Path, notify: NotifySocket) -> None:
    _ctl, config, _client, env, up = setup
    port = free_port()
    exp = start_exporter(
        config,
        env,
        tmp_path / "exporter.log",
        "--tls-grpc-listener",
        f"127.0.0.1:{port}",
        "--tls-grpc-insecure",
        "--passphrase",
        "s3cret",
    )
    try:
        ready(exp, notify)
        # UNAUTHENTICATED "invalid or missing passphrase", as upstream's interceptor answers
        missing = j(up, port, "power", "on")
        assert missing.returncode != 0
        assert "invalid or missing passphrase" in missing.stderr, missing.stderr[-3000:]
        wrong = j(up, port, "power", "on", JMP_GRPC_PASSPHRASE="guess")
        assert wrong.returncode != 0
        assert "invalid or missing passphrase" in wrong.stderr, wrong.stderr[-3000:]
        good = j(up, port, "power", "on", JMP_GRPC_PASSPHRASE="s3cret")
        assert good.returncode == 0, good.stderr[-3000:] + exp.log()[-3000:]
        assert "s3cret" not in exp.log()
    finally:
        exp.stop()


USAGE_CASES = {
    "listener without insecure or cert": (
        ["--exporter-config", "{config}", "--tls-grpc-listener", "127.0.0.1:1"],
        "--tls-grpc-listener requires either --tls-grpc-insecure or --tls-cert and --tls-key",
    ),
    "insecure with cert": (
        [
            "--exporter-config",
            "{config}",
            "--tls-grpc-listener",
            "127.0.0.1:1",
            "--tls-grpc-insecure",
            "--tls-cert",
            "{cert}",
            "--tls-key",
            "{key}",
        ],
        "--tls-grpc-insecure cannot be combined with --tls-cert / --tls-key",
    ),
    "passphrase without listener": (
        ["--exporter-config", "{config}", "--passphrase", "s3cret"],
        "--tls-grpc-insecure, --tls-cert, --tls-key, and --passphrase require --tls-grpc-listener",
    ),
    "insecure without listener": (
        ["--exporter-config", "{config}", "--tls-grpc-insecure"],
        "--tls-grpc-insecure, --tls-cert, --tls-key, and --passphrase require --tls-grpc-listener",
    ),
    "neither config option": (
        [],
        "Invalid value: one of --exporter, --exporter-config should be specified",
    ),
    "both config options": (
        ["--exporter", "ex1", "--exporter-config", "{config}"],
        "Invalid value: only one of --exporter, --exporter-config should be specified",
    ),
}


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_run_usage_errors_match_upstream(
    case: str, tmp_path: Path, config_env: dict[str, str], upstream_venv: Path
) -> None:
    args, message = USAGE_CASES[case]
    config = tmp_path / "ex1.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "jumpstarter.dev/v1alpha1",
                "kind": "ExporterConfig",
                "metadata": {"namespace": "default", "name": "ex1"},
                "endpoint": "127.0.0.1:1",
                "token": "t",
                "export": EXPORT,
            }
        )
    )
    (tmp_path / "cert.pem").write_text("not a cert\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    paths = {"config": config, "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    argv = [a.format(**paths) for a in args]
    ours = subprocess.run(
        [str(JMP), "run", *argv], env=config_env, capture_output=True, text=True, timeout=30
    )
    theirs = subprocess.run(
        [str(upstream_venv / "bin" / "jmp"), "run", *argv],
        env=config_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert theirs.returncode == 2 and f"Error: {message}" in theirs.stderr, theirs.stderr
    assert ours.returncode == 2, ours.stderr
    assert ours.stderr.strip().splitlines()[-1] == f"Error: {message}", ours.stderr
