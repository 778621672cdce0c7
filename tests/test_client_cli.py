"""``jmp shell``, ``j`` and ``jmp get/create/delete`` as real processes, against our controller
on loopback and our exporter (``jmp run``) with MockPower and PySerial on a socat pty pair.
The test plays the board on the pty's far end."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import termios
import time
from pathlib import Path

import pytest
import yaml

from tests.harness import (
    JMP,
    Controller,
    ExporterProcess,
    socat_pty_pair,
    start_exporter,
    wait_for,
)
from tests.test_client import POWER, SERIAL, FarEnd, lease_rows

J = JMP.parent / "j"


class Lab:
    """Controller + our exporter (restartable: it exits 0 after every lease) + client."""

    def __init__(self, controller: Controller, tmp_path: Path) -> None:
        self.ctl = controller
        self.tmp = tmp_path
        self.pty = socat_pty_pair(tmp_path)
        export = {
            "power": {"type": POWER},
            "serial": {"type": SERIAL, "config": {"url": str(self.pty.device)}},
        }
        self.exporter_config = controller.create_exporter(
            "ex1", {"board": "b1"}, export, tmp_path / "ex1.yaml"
        )
        self.client = tmp_path / "cl1.yaml"
        controller.create_client("cl1", self.client, "--allow", "jumpstarter_driver_*")
        self.far = FarEnd(self.pty.far_end)
        self.runs = 0
        self.exporter: ExporterProcess | None = None
        self.env = {k: v for k, v in controller.env.items() if not k.startswith("JMP_DRIVERS")}
        # `j` inside the shell is ours (the venv's), whatever else is on PATH.
        self.env["PATH"] = f"{JMP.parent}:{self.env.get('PATH', '/usr/bin:/bin')}"
        self.start_exporter()

    def start_exporter(self) -> ExporterProcess:
        self.runs += 1
        exp = start_exporter(
            self.exporter_config, self.ctl.env, self.tmp / f"exporter-{self.runs}.log"
        )
        wait_for(lambda: exp.has_event("ready") or exp.proc.poll() is not None, 30, what="exporter")
        assert exp.proc.poll() is None, exp.log()[-3000:]
        self.exporter = exp
        return exp

    def shell_argv(self, *command: str, selector: str = "board=b1") -> list[str]:
        return [
            str(JMP),
            "shell",
            "--client-config",
            str(self.client),
            "--selector",
            selector,
            "--acquisition-timeout",
            "20",
            "--",
            *command,
        ]

    def shell(self, *command: str, env: dict[str, str] | None = None, **kw):
        return subprocess.run(
            self.shell_argv(*command, **kw),
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=120,
        )

    def jmp(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(JMP), *args, "--client-config", str(self.client)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def close(self) -> None:
        self.far.close()
        if self.exporter is not None:
            self.exporter.stop()
        self.pty.close()


@pytest.fixture
def lab(controller: Controller, tmp_path: Path):
    rig = Lab(controller, tmp_path)
    try:
        yield rig
    finally:
        rig.close()


def test_shell_j_power_and_serial_pipe_move_real_bytes(lab: Lab) -> None:
    script = "j power on && j power read && printf 'hi-board\\n' | j serial pipe --timeout 6"
    proc = subprocess.Popen(
        lab.shell_argv("sh", "-c", script),
        env=lab.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # stdin of `j serial pipe` reached the device ...
        try:
            lab.far.read_until(b"hi-board\n", 60)
        except AssertionError:
            proc.kill()
            raise AssertionError(proc.communicate()[1][-3000:]) from None
        # ... and what the device prints reaches its stdout
        lab.far.write(b"from-the-board\r\n")
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "5.0 V  2.0 A" in stdout
    assert "from-the-board" in stdout
    assert lab.exporter is not None
    assert lab.exporter.wait(30) == 0
    assert "power on" in [e.get("event") for e in lab.exporter.events()]
    rows = lease_rows(lab.ctl)
    assert len(rows) == 1 and rows[0]["end"], rows


def test_shell_exit_status_and_environment(lab: Lab) -> None:
    out = lab.shell("sh", "-c", 'echo "host=$JUMPSTARTER_HOST allow=$JMP_DRIVERS_ALLOW"; exit 7')
    assert out.returncode == 7, out.stderr[-3000:]
    assert "allow=jumpstarter_driver_*" in out.stdout
    host = out.stdout.split("host=")[1].split()[0]
    assert host.endswith("/socket") and not Path(host).exists()  # removed on exit
    assert lab.exporter is not None and lab.exporter.wait(30) == 0
    assert all(r["end"] for r in lease_rows(lab.ctl))


def test_shell_no_matching_exporter(lab: Lab) -> None:
    out = lab.shell("true", selector="board=nope")
    assert out.returncode == 1
    assert "no exporter matches selector 'board=nope'" in out.stderr
    assert lease_rows(lab.ctl) == []


def test_j_help_lists_the_exporters_drivers(lab: Lab) -> None:
    out = lab.shell(str(J), "--help")
    assert out.returncode == 0, out.stderr[-3000:]
    commands = out.stdout.split("Commands:\n")[1]
    assert "power" in commands and "serial" in commands
    lab.start_exporter()
    out = lab.shell(str(J), "serial", "--help")
    assert "console" in out.stdout and "pipe" in out.stdout


def test_j_outside_a_shell_says_so(lab: Lab) -> None:
    out = subprocess.run([str(J), "power", "on"], env=lab.env, capture_output=True, text=True)
    assert out.returncode == 78
    assert "JUMPSTARTER_HOST is not set" in out.stderr


def test_allow_list_refuses_and_jmp_drivers_allow_overrides(lab: Lab) -> None:
    data = yaml.safe_load(lab.client.read_text())
    data["drivers"] = {"allow": ["jumpstarter_driver_power.*"], "unsafe": False}
    lab.client.write_text(yaml.safe_dump(data))
    script = "j power on; echo power=$?; j serial pipe --timeout 1 </dev/null; echo serial=$?"
    out = lab.shell("sh", "-c", script)
    assert "power=0" in out.stdout and "serial=78" in out.stdout, out.stderr[-3000:]
    assert "PySerialClient" in out.stderr and "jumpstarter_driver_power.*" in out.stderr
    lab.start_exporter()
    out = lab.shell(
        "sh",
        "-c",
        "j serial pipe --timeout 1 </dev/null; echo serial=$?",
        env={"JMP_DRIVERS_ALLOW": "UNSAFE"},
    )
    assert "serial=0" in out.stdout, out.stderr[-3000:]


def test_j_serial_console_raw_tty_escape_and_restore(lab: Lab) -> None:
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        lab.shell_argv(str(J), "serial", "console"),
        env=lab.env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    try:
        seen = b""

        def screen(wanted: bytes) -> bool:
            nonlocal seen
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                seen += os.read(master, 4096)
            return wanted in seen

        wait_for(lambda: screen(b"Ctrl-B"), 60, interval=0, what="the console banner")
        time.sleep(0.5)  # the stream opens right after the banner
        os.write(master, b"typed-keys")
        assert b"typed-keys" in lab.far.read_until(b"typed-keys", 30)
        lab.far.write(b"board-echo")
        wait_for(lambda: screen(b"board-echo"), 30, interval=0, what="device output on tty")
        os.write(master, b"\x02\x02\x02")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        after = termios.tcgetattr(slave)
        os.close(master)
        os.close(slave)
    assert after == before  # the terminal is given back as it was


def test_get_create_delete_with_each_output_format(lab: Lab) -> None:
    for fmt in ("json", "yaml", "name"):
        out = lab.jmp("get", "exporters", "-o", fmt)
        assert out.returncode == 0, out.stderr
        if fmt == "name":
            assert out.stdout.split() == ["ex1"]
        else:
            doc = json.loads(out.stdout) if fmt == "json" else yaml.safe_load(out.stdout)
            (row,) = doc["exporters"]
            assert row["name"] == "ex1" and row["labels"]["board"] == "b1"
            assert row["online"] is True and row["status"] == "Available"
    table = lab.jmp("get", "exporters")
    assert "ex1" in table.stdout and "board=b1" in table.stdout

    created = lab.jmp("create", "lease", "--selector", "board=b1", "--duration", "5m", "-o", "name")
    assert created.returncode == 0, created.stderr
    name = created.stdout.strip()
    out = lab.jmp(
        "create", "lease", "--selector", "board=b1", "--duration", "00:05:00", "-o", "json"
    )
    second = json.loads(out.stdout)
    assert second["state"] == "Pending" and second["duration"] == 300.0  # ex1 is taken
    docs = {fmt: lab.jmp("get", "leases", "-o", fmt).stdout for fmt in ("json", "yaml", "name")}
    assert {r["name"] for r in json.loads(docs["json"])["leases"]} == {name, second["name"]}
    mine = next(r for r in yaml.safe_load(docs["yaml"])["leases"] if r["name"] == name)
    assert mine["exporter"] == "ex1" and mine["state"] == "Ready" and mine["client"] == "cl1"
    assert set(docs["name"].split()) == {name, second["name"]}

    deleted = lab.jmp("delete", "lease", name, "-o", "name")
    assert deleted.returncode == 0 and deleted.stdout.split() == [name], deleted.stderr
    deleted = lab.jmp("delete", "leases", second["name"])  # upstream's plural spelling
    assert deleted.returncode == 0 and f"lease {second['name']} deleted" in deleted.stdout
    assert lab.jmp("get", "leases", "-o", "name").stdout.split() == []
    ended = lab.jmp("get", "leases", "--all", "-o", "json")
    assert {r["state"] for r in json.loads(ended.stdout)["leases"]} == {"Ended"}
    again = lab.jmp("delete", "lease", name)
    assert again.returncode == 1 and "already been released" in again.stderr


def test_signals_end_the_command_and_release_the_lease(lab: Lab) -> None:
    """SIGTERM to jmp shell is passed on to the command; Ctrl-C (SIGINT to the terminal's
    process group) ends the command; either way the lease is released afterwards."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen(
            lab.shell_argv("sh", "-c", "echo started; exec sleep 60"),
            env=lab.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"started\n", proc.stderr.read()[-3000:]
            if sig == signal.SIGTERM:
                proc.send_signal(sig)  # to jmp shell alone
            else:
                os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C does
            proc.wait(60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 128 + sig, proc.stderr.read()[-3000:]
        assert all(r["end"] for r in lease_rows(lab.ctl))
        assert lab.exporter is not None and lab.exporter.wait(30) == 0
        lab.start_exporter()


def test_offline_exporter_times_out_with_75(lab: Lab) -> None:
    assert lab.exporter is not None
    lab.exporter.stop()
    out = lab.shell("true", env={})
    assert out.returncode == 75, out.stderr[-3000:]
    assert "became free within" in out.stderr and "Offline" in out.stderr
    assert all(r["end"] for r in lease_rows(lab.ctl))  # the waiting lease was deleted


def test_shell_on_an_existing_lease_leaves_it_held(lab: Lab) -> None:
    created = lab.jmp("create", "lease", "--selector", "board=b1", "--duration", "5m", "-o", "name")
    name = created.stdout.strip()
    for _ in range(2):  # the same lease twice: the first shell did not end it
        argv = lab.shell_argv("sh", "-c", 'j power on && echo "lease=$JMP_LEASE"')
        argv[argv.index("--selector") : argv.index("--selector") + 2] = ["--lease", name]
        out = subprocess.run(argv, env=lab.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"lease={name}" in out.stdout
    (row,) = lease_rows(lab.ctl)
    assert row["name"] == name and not row["end"]
    assert lab.exporter is not None and lab.exporter.proc.poll() is None
    assert lab.jmp("delete", "lease", name).returncode == 0
    assert lab.exporter.wait(30) == 0


def test_sigterm_while_waiting_for_an_exporter_deletes_the_waiting_lease(lab: Lab) -> None:
    assert lab.exporter is not None
    lab.exporter.stop()  # offline: the lease stays pending
    proc = subprocess.Popen(
        lab.shell_argv("true"), env=lab.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: lease_rows(lab.ctl), 30, what="the lease to be created")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    rows = lease_rows(lab.ctl)
    assert len(rows) == 1 and rows[0]["end"], rows


def test_unreachable_controller_69_and_refused_token_77(lab: Lab) -> None:
    good = lab.client.read_text()
    data = yaml.safe_load(good)
    data["endpoint"] = "127.0.0.1:1"
    lab.client.write_text(yaml.safe_dump(data))
    out = lab.jmp("get", "exporters")
    assert out.returncode == 69 and "127.0.0.1:1" in out.stderr, out.stderr
    out = lab.shell("true")
    assert out.returncode == 69, out.stderr
    data = yaml.safe_load(good)
    data["token"] = "not-our-token"
    lab.client.write_text(yaml.safe_dump(data))
    for out in (lab.jmp("get", "leases"), lab.shell("true")):
        assert out.returncode == 77, out.stderr
        assert "refused" in out.stderr and "not-our-token" not in out.stderr


def test_shell_without_command_runs_shell_env(lab: Lab) -> None:
    argv = lab.shell_argv()
    argv.remove("--")
    out = subprocess.run(
        argv,
        env={**lab.env, "SHELL": "/bin/sh"},
        input="j power read\nexit 4\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 4, out.stderr[-3000:]
    assert "5.0 V  2.0 A" in out.stdout
    assert "exit the shell to release it" in out.stderr
    assert lab.exporter is not None and lab.exporter.wait(30) == 0
