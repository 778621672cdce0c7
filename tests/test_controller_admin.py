"""``jmp controller create|get|delete`` and ``serve`` errors, through the real CLI."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml

from jumpstarter_exporter.config import paths
from tests.harness import JMP, Controller, wait_for
from tests.test_controller_security import ScriptedExporter, Speaker, code_of


def admin(ctl: Controller, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return ctl.jmp("controller", *args, "--state-dir", str(ctl.state_dir), check=check)


def test_create_exporter_and_client_with_save(controller: Controller) -> None:
    out = admin(controller, "create", "exporter", "ex1", "--label", "board=rpi4", "--save")
    assert "saved exporter config" in out.stderr
    path = paths.user_exporter_path("ex1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cfg = yaml.safe_load(path.read_text())
    assert cfg["endpoint"] == controller.endpoint  # what the running controller advertises
    assert cfg["metadata"] == {"namespace": "default", "name": "ex1"}
    ca = (controller.state_dir / "ca.pem").read_bytes()
    assert base64.b64decode(cfg["tls"]["ca"]) == ca
    assert cfg["token"].count(".") == 2  # JWT-shaped: upstream's jmp shell decodes it
    # only a hash is stored
    assert cfg["token"].encode() not in (controller.state_dir / "state.db").read_bytes()
    check = controller.jmp("config", "exporter", "check", "ex1", "-o", "json")
    assert json.loads(check.stdout)["valid"] is True

    admin(controller, "create", "client", "cl1", "--allow", "jumpstarter_driver_*", "--save")
    client = yaml.safe_load(paths.client_path("cl1").read_text())
    assert client["drivers"] == {"allow": ["jumpstarter_driver_*"], "unsafe": False}
    user = yaml.safe_load(paths.user_config_path().read_text())
    assert user["config"]["current-client"] == "cl1"

    again = admin(controller, "create", "exporter", "ex1", check=False)
    assert again.returncode == 1
    assert "exporter default/ex1 already exists" in again.stderr

    printed = admin(controller, "create", "client", "cl2", "--unsafe")
    assert yaml.safe_load(printed.stdout)["drivers"]["unsafe"] is True

    listing = json.loads(admin(controller, "get", "exporters", "-o", "json").stdout)["items"]
    assert [(e["name"], e["labels"], e["registered"]) for e in listing] == [
        ("ex1", {"board": "rpi4"}, False)
    ]
    assert admin(controller, "get", "clients", "-o", "name").stdout.split() == ["cl1", "cl2"]
    assert admin(controller, "get", "leases").stdout.strip() == "No resources found."


def test_deleted_exporter_token_stops_working_and_offline_is_shown(
    controller: Controller, tmp_path: Path
) -> None:
    path = controller.create_exporter("ex1", {"board": "b1"}, {}, tmp_path / "ex1.yaml")
    ecfg = yaml.safe_load(path.read_text())
    speaker = Speaker.from_config(controller, ecfg, "Exporter")

    def status() -> str:
        items = json.loads(admin(controller, "get", "exporters", "-o", "json").stdout)["items"]
        return items[0]["status"] if items else "gone"

    async def online_then_offline() -> None:
        async with ScriptedExporter(speaker) as exporter:
            await asyncio.wait_for(exporter.online.wait(), 10)
            assert await asyncio.to_thread(status) == "Available"
        # the Status stream is gone: offline at once, not a minute later
        await asyncio.to_thread(wait_for, lambda: status() == "Offline", 10, 0.1, "Offline")

    asyncio.run(online_then_offline())
    admin(controller, "delete", "exporter", "ex1")
    assert status() == "gone"

    async def refused() -> grpc.StatusCode:
        code, _ = await code_of(ScriptedExporter(speaker).__aenter__())
        return code

    assert asyncio.run(refused()) == grpc.StatusCode.UNAUTHENTICATED
    missing = admin(controller, "delete", "exporter", "ex1", check=False)
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr


@pytest.mark.parametrize(
    ("listen", "message"),
    [("127.0.0.1:notaport", "is not a number"), ("127.0.0.1:99999", "out of range")],
)
def test_serve_rejects_bad_listen(tmp_path: Path, config_env, listen: str, message: str) -> None:
    out = subprocess.run(
        [str(JMP), "controller", "serve", "--listen", listen, "--state-dir", str(tmp_path)],
        env=config_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 78
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_reports_a_busy_port(controller: Controller, tmp_path: Path, config_env) -> None:
    out = subprocess.run(
        [
            str(JMP),
            "controller",
            "serve",
            "--listen",
            controller.endpoint,
            "--state-dir",
            str(tmp_path / "other"),
        ],
        env=config_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 78
    assert f"cannot listen on {controller.endpoint}" in out.stderr
