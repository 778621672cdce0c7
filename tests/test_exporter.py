"""Our ``jmp run`` as a real process: readiness, exit codes, signals and leases, against our
controller on loopback and upstream 0.9's client."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.harness import (
    Controller,
    NotifySocket,
    start_exporter,
    upstream_create_lease,
    upstream_delete_lease,
    upstream_env,
    wait_for,
)

EXPORT = {
    "power": {"type": "jumpstarter_driver_power.driver.MockPower"},
    "serial": {"type": "jumpstarter_driver_pyserial.driver.PySerial", "config": {"url": "loop://"}},
}


def exporter_row(ctl: Controller, name: str = "ex1") -> dict | None:
    out = ctl.jmp("controller", "get", "exporters", "-o", "json", "--state-dir", str(ctl.state_dir))
    return next((e for e in json.loads(out.stdout)["items"] if e["name"] == name), None)


@pytest.fixture
def notify(tmp_path: Path):
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()


@pytest.fixture
def setup(controller: Controller, tmp_path: Path, notify: NotifySocket):
    config = controller.create_exporter("ex1", {"board": "b1"}, EXPORT, tmp_path / "ex1.yaml")
    client = tmp_path / "cl1.yaml"
    controller.create_client("cl1", client, "--unsafe")
    env = {**controller.env, "NOTIFY_SOCKET": str(notify.path)}
    return controller, config, client, env


def test_ready_only_after_registration_and_exit_after_lease(
    setup, upstream_venv: Path, tmp_path: Path, notify: NotifySocket
) -> None:
    ctl, config, client, env = setup
    exp = start_exporter(config, env, tmp_path / "exporter.log")
    try:
        wait_for(lambda: notify.seen("READY=1"), 20, what="READY=1")
        assert "waiting for lease" in notify.statuses()
        row = exporter_row(ctl)
        assert row["registered"] and row["status"] == "Available"
        up = upstream_env(upstream_venv, ctl.env, tmp_path / "up-home")
        shell = subprocess.run(
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
                "j power on && j power read && echo hi | timeout 5 j serial pipe",
            ],
            env=up,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert shell.returncode == 0, shell.stderr[-3000:] + exp.log()[-3000:]
        assert "hi" in shell.stdout
        assert any(s.startswith("leased by cl1") for s in notify.statuses())
        # the lease was released: we exit 0 so the service manager starts us fresh
        assert exp.wait(30) == 0
        assert notify.seen("STOPPING=1")
        events = [e.get("event") for e in exp.events()]
        assert events.index("lease started") < events.index("lease ended")
        row = exporter_row(ctl)
        assert row["status"] == "Offline" and not row["registered"]
    finally:
        exp.stop()


def test_bad_token_exits_77_without_ready(setup, tmp_path: Path, notify: NotifySocket) -> None:
    _ctl, config, _client, env = setup
    data = yaml.safe_load(config.read_text())
    data["token"] = "not.a.token"
    config.write_text(yaml.safe_dump(data))
    exp = start_exporter(config, env, tmp_path / "exporter.log")
    assert exp.wait(30) == 77
    assert not notify.seen("READY=1")
    assert "not.a.token" not in exp.log()
    assert "the controller refused registration" in exp.log()


def test_unreachable_controller_exits_69_without_ready(
    setup, tmp_path: Path, notify: NotifySocket
) -> None:
    _ctl, config, _client, env = setup
    data = yaml.safe_load(config.read_text())
    data["endpoint"] = "127.0.0.1:1"
    config.write_text(yaml.safe_dump(data))
    started = time.monotonic()
    exp = start_exporter(config, env, tmp_path / "exporter.log", "--controller-budget", "2")
    assert exp.wait(30) == 69
    assert time.monotonic() - started < 15
    assert not notify.seen("READY=1")
    assert any(s.startswith("controller unreachable, retrying in") for s in notify.statuses())
    # the first failure is a warning, its repeats are debug (not shown at INFO)
    warnings = [e for e in exp.events() if e.get("event") == "controller unreachable"]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"
    assert "Error: controller 127.0.0.1:1 unreachable for" in exp.log()


def test_invalid_config_exits_78_without_ready(setup, tmp_path: Path, notify: NotifySocket) -> None:
    _ctl, config, _client, env = setup
    data = yaml.safe_load(config.read_text())
    data["export"]["serial"]["config"]["baudrate"] = "fast"
    config.write_text(yaml.safe_dump(data))
    exp = start_exporter(config, env, tmp_path / "exporter.log")
    assert exp.wait(30) == 78
    assert "export.serial.config.baudrate" in exp.log()
    assert not notify.seen("READY=1")


def test_sigterm_when_idle_unregisters_and_exits_0(
    setup, tmp_path: Path, notify: NotifySocket
) -> None:
    ctl, config, _client, env = setup
    exp = start_exporter(config, env, tmp_path / "exporter.log")
    try:
        wait_for(lambda: notify.seen("READY=1"), 20, what="READY=1")
        exp.proc.send_signal(signal.SIGTERM)
        assert exp.wait(15) == 0
        assert notify.seen("STOPPING=1")
        row = exporter_row(ctl)
        assert row["status"] == "Offline" and not row["registered"]
    finally:
        exp.stop()


def test_sighup_when_idle_exits_0(setup, tmp_path: Path, notify: NotifySocket) -> None:
    _ctl, config, _client, env = setup
    exp = start_exporter(config, env, tmp_path / "exporter.log")
    try:
        wait_for(lambda: notify.seen("READY=1"), 20, what="READY=1")
        exp.proc.send_signal(signal.SIGHUP)
        assert exp.wait(15) == 0
    finally:
        exp.stop()


def test_watchdog_pings_from_the_loop(setup, tmp_path: Path, notify: NotifySocket) -> None:
    _ctl, config, _client, env = setup
    exp = start_exporter(config, {**env, "WATCHDOG_USEC": "200000"}, tmp_path / "exporter.log")
    try:
        wait_for(lambda: notify.seen("READY=1"), 20, what="READY=1")
        time.sleep(1.0)
        pings = notify.poll().count("WATCHDOG=1")
        assert pings >= 5  # every 0.1 s: half of WATCHDOG_USEC
        exp.proc.send_signal(signal.SIGSTOP)  # a hung process stops pinging
        try:
            notify.poll()
            before = notify.messages.count("WATCHDOG=1")
            time.sleep(0.5)
            assert notify.poll().count("WATCHDOG=1") == before
        finally:
            exp.proc.send_signal(signal.SIGCONT)
    finally:
        exp.stop()


def test_a_lease_never_dialled_ends_the_same_way(
    setup, upstream_venv: Path, tmp_path: Path, notify: NotifySocket
) -> None:
    ctl, config, client, env = setup
    exp = start_exporter(config, env, tmp_path / "exporter.log")
    try:
        wait_for(lambda: notify.seen("READY=1"), 20, what="READY=1")
        up = upstream_env(upstream_venv, ctl.env, tmp_path / "up-home")
        name = upstream_create_lease(client, up, "board=b1")
        wait_for(lambda: exp.has_event("lease started"), 20, what="the lease to start")
        upstream_delete_lease(client, up, name)
        assert exp.wait(30) == 0
        assert exp.has_event("lease ended")
    finally:
        exp.stop()
