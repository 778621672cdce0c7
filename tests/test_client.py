"""Our client's Python API (``jumpstarter_exporter.client``) against real parts: our
controller on loopback, our exporter (``jmp run``) with MockPower and PySerial on a socat pty
pair. The test plays the board on the pty's far end."""

from __future__ import annotations

import json
import os
import re
import select
from pathlib import Path

import pytest
import yaml

from jumpstarter_exporter.client import (
    ClientAuthError,
    ClientError,
    DriverNotAllowed,
    NoMatchingExporter,
    lease,
)
from jumpstarter_exporter.errors import ExitCode
from tests.harness import JMP, Controller, socat_pty_pair, start_exporter, wait_for

SERIAL = "jumpstarter_driver_pyserial.driver.PySerial"
POWER = "jumpstarter_driver_power.driver.MockPower"


class FarEnd:
    """The test's end of the pty pair: what the board would print and read."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def read_until(self, wanted: bytes, timeout: float = 20.0) -> bytes:
        seen = b""

        def more() -> bool:
            nonlocal seen
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                seen += os.read(self.fd, 4096)
            return wanted in seen

        wait_for(more, timeout, interval=0, what=f"{wanted!r} on the pty (seen {seen!r})")
        return seen

    def close(self) -> None:
        os.close(self.fd)


def lease_rows(ctl: Controller) -> list[dict]:
    out = ctl.jmp(
        "controller", "get", "leases", "--all", "-o", "json", "--state-dir", str(ctl.state_dir)
    )
    return json.loads(out.stdout)["items"]


@pytest.fixture
def lab(controller: Controller, tmp_path: Path):
    """(controller, exporter process, client config path, far end of the serial line)."""
    pty = socat_pty_pair(tmp_path)
    export = {
        "power": {"type": POWER},
        "serial": {"type": SERIAL, "config": {"url": str(pty.device)}},
    }
    config = controller.create_exporter("ex1", {"board": "b1"}, export, tmp_path / "ex1.yaml")
    client = tmp_path / "cl1.yaml"
    controller.create_client("cl1", client, "--allow", "jumpstarter_driver_*")
    exporter = start_exporter(config, controller.env, tmp_path / "exporter.log")
    far = FarEnd(pty.far_end)
    try:
        wait_for(
            lambda: exporter.has_event("ready") or exporter.proc.poll() is not None,
            30,
            what="exporter to register",
        )
        assert exporter.proc.poll() is None, exporter.log()[-3000:]
        yield controller, exporter, client, far
    finally:
        far.close()
        exporter.stop()
        pty.close()


def test_lease_power_serial_and_release(lab) -> None:
    ctl, exporter, client, far = lab
    with lease(config=client, selector={"board": "b1"}, duration=120, timeout=30) as board:
        assert board.exporter_name == "ex1"
        assert board.lease_name
        assert set(board.drivers) == {"power", "serial"}
        board.power.on()
        board.power.off()
        board.power.cycle(wait=0.1)
        assert board.power.read() == [
            {"voltage": 0.0, "current": 0.0},
            {"voltage": 5.0, "current": 2.0},
        ]
        board.serial.write(b"root\n")
        assert b"root\n" in far.read_until(b"root\n")
        far.write(b"boot log...\r\nmyboard login: ")
        seen = board.serial.expect(b"login:", timeout=20)
        assert seen.endswith(b"login:") and b"boot log" in seen
        far.write(b"Password: ")
        assert board.serial.expect(re.compile(rb"Pass\w+:"), timeout=20) == b" Password:"
        with pytest.raises(TimeoutError, match="never-printed"):
            board.serial.expect(b"never-printed", timeout=0.5)
        assert board["power"] is board.power
        board.call("power", "on")
        name = board.lease_name
    # released: the exporter logged the power calls, ended the lease and exits 0 to restart
    assert exporter.wait(30) == 0, exporter.log()[-3000:]
    driver_lines = [e.get("event") for e in exporter.events()]
    assert driver_lines.count("power on") >= 3 and driver_lines.count("power off") >= 2
    row = next(r for r in lease_rows(ctl) if r["name"] == name)
    assert row["end"] and row["reason"], row


def test_release_on_exception_and_on_keyboard_interrupt(lab) -> None:
    ctl, exporter, client, _far = lab
    names = []
    with pytest.raises(KeyboardInterrupt), lease(config=client, selector="board=b1") as board:
        names.append(board.lease_name)
        board.power.on()
        raise KeyboardInterrupt
    assert exporter.wait(30) == 0, exporter.log()[-3000:]
    row = next(r for r in lease_rows(ctl) if r["name"] == names[0])
    assert row["end"] and row["reason"], row


def test_no_matching_exporter(lab) -> None:
    ctl, exporter, client, _far = lab
    with (
        pytest.raises(NoMatchingExporter, match="board=nope") as info,
        lease(config=client, selector="board=nope", timeout=10),
    ):
        pass
    assert info.value.exit_code == ExitCode.FAILURE
    assert exporter.proc.poll() is None  # our exporter was never leased
    assert lease_rows(ctl) == []  # refused before a lease was created: nothing left waiting


def test_allow_list_refusal_and_env_override(lab, monkeypatch: pytest.MonkeyPatch) -> None:
    ctl, exporter, client, _far = lab
    data = yaml.safe_load(client.read_text())
    data["drivers"] = {"allow": ["jumpstarter_driver_power.*"], "unsafe": False}
    client.write_text(yaml.safe_dump(data))
    with lease(config=client, selector="board=b1") as board:
        board.power.on()  # allowed
        with pytest.raises(DriverNotAllowed) as info:
            board.serial.write(b"x")
        message = str(info.value)
        assert "serial" in message and "PySerialClient" in message
        assert "jumpstarter_driver_power.*" in message
        assert info.value.exit_code == ExitCode.CONFIG
    exporter.wait(30)
    # JMP_DRIVERS_ALLOW replaces the config's list; UNSAFE allows every driver.
    exporter2 = start_exporter(
        Path(str(client).replace("cl1.yaml", "ex1.yaml")),
        ctl.env,
        client.parent / "exporter2.log",
    )
    try:
        wait_for(lambda: exporter2.has_event("ready"), 30, what="exporter again")
        monkeypatch.setenv("JMP_DRIVERS_ALLOW", "UNSAFE")
        with lease(config=client, selector="board=b1") as board:
            board.serial.write(b"ok\n")
        assert exporter2.wait(30) == 0
    finally:
        exporter2.stop()


def test_refused_token_is_an_auth_error(lab) -> None:
    _ctl, _exporter, client, _far = lab
    data = yaml.safe_load(client.read_text())
    data["token"] = "forged-token"
    client.write_text(yaml.safe_dump(data))
    with pytest.raises(ClientAuthError) as info, lease(config=client, selector="board=b1"):
        pass
    assert info.value.exit_code == ExitCode.NOPERM
    assert isinstance(info.value, ClientError)
    assert "forged-token" not in str(info.value)


def test_end_session_first_lets_the_after_lease_hook_run_and_release(
    controller: Controller, tmp_path: Path
) -> None:
    """With hooks: the lease waits for beforeLease, and on exit EndSession runs afterLease
    while the client waits; the exporter then releases the lease itself (so the client's
    EndSession really came first). Our `j` runs inside both hooks (JUMPSTARTER_HOST is the
    exporter's hook socket)."""
    trace = tmp_path / "trace.txt"
    export = {"power": {"type": POWER}}
    config = controller.create_exporter("ex1", {"board": "b1"}, export, tmp_path / "ex1.yaml")
    data = yaml.safe_load(config.read_text())
    data["hooks"] = {
        "beforeLease": {"script": f"sleep 2; j power on && echo before >> {trace}"},
        "afterLease": {"script": f"j power off && echo after >> {trace}"},
    }
    config.write_text(yaml.safe_dump(data))
    client = tmp_path / "cl1.yaml"
    controller.create_client("cl1", client, "--allow", "jumpstarter_driver_*")
    env = {**controller.env, "PATH": f"{JMP.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    exporter = start_exporter(config, env, tmp_path / "exporter.log")
    try:
        wait_for(lambda: exporter.has_event("ready"), 30, what="exporter ready")
        with lease(config=client, selector="board=b1") as board:
            assert trace.read_text() == "before\n"  # ready only after the hook
            board.power.on()
            name = board.lease_name
        assert trace.read_text() == "before\nafter\n"  # afterLease ran before we returned
        assert exporter.wait(30) == 0, exporter.log()[-3000:]
    finally:
        exporter.stop()
    releases = [e for e in controller.events() if e.get("event") == "lease release requested"]
    assert [(e["lease"], e["by"]) for e in releases] == [(name, "exporter default/ex1")]
