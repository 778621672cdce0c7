"""kill -9 the controller during a lease: the lease and registrations survive in SQLite,
the upstream 0.9 exporter reconnects on its own, and the lease can still be used."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.harness import Controller, stop_process, upstream_env, wait_for
from tests.test_controller_security import Speaker, create_lease

pytestmark = pytest.mark.interop

MOCK_POWER = {"power": {"type": "jumpstarter_driver_power.driver.MockPower"}}


def _exporter_status(ctl: Controller, name: str) -> str | None:
    out = ctl.jmp("controller", "get", "exporters", "-o", "json", "--state-dir", str(ctl.state_dir))
    for item in json.loads(out.stdout)["items"]:
        if item["name"] == name:
            return item["status"]
    return None


def test_kill_9_during_lease(controller: Controller, upstream_venv: Path, tmp_path: Path) -> None:
    ctl = controller
    exporter_file = ctl.create_exporter("ex1", {"board": "b1"}, MOCK_POWER, tmp_path / "ex1.yaml")
    client_file = tmp_path / "cl1.yaml"
    ccfg = ctl.create_client("cl1", client_file, "--unsafe")
    env = upstream_env(upstream_venv, ctl.env, tmp_path / "upstream-home")
    exporter = subprocess.Popen(
        ["jmp", "run", "--exporter-config", str(exporter_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "exporter.log").open("wb"),
    )
    try:
        wait_for(lambda: _exporter_status(ctl, "ex1") == "Available", 30, what="registration")
        client = Speaker.from_config(ctl, ccfg, "Client")
        lease = asyncio.run(create_lease(client, seconds=300))
        wait_for(lambda: _exporter_status(ctl, "ex1") == "LeaseReady", 30, what="LeaseReady")

        offset = ctl.log_path.stat().st_size
        ctl.kill()
        ctl.start()  # same port, same state directory

        leases = json.loads(
            ctl.jmp(
                "controller", "get", "leases", "-o", "json", "--state-dir", str(ctl.state_dir)
            ).stdout
        )["items"]
        assert [(x["name"], x["exporter"], x["reason"]) for x in leases] == [
            (lease, "ex1", "Ready")
        ]
        wait_for(
            lambda: any(e.get("event") == "exporter online" for e in ctl.events(offset)),
            30,
            what="the exporter to reconnect",
        )
        assert exporter.poll() is None, "the upstream exporter died with the controller"
        shell = subprocess.run(
            [
                "jmp",
                "shell",
                "--client-config",
                str(client_file),
                "--lease",
                lease,
                "--",
                "j",
                "power",
                "on",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert shell.returncode == 0, shell.stderr[-3000:]
        dials = [e for e in ctl.events(offset) if e.get("event") == "dial"]
        assert dials and dials[-1]["lease"] == lease
    finally:
        stop_process(exporter)
    assert yaml.safe_load(client_file.read_text())["token"] not in ctl.log()
