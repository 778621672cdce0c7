"""Our single-node controller + router against REAL upstream Jumpstarter 0.9 processes.

Every test starts our ``jmp controller serve`` on loopback (``controller`` fixture), an
upstream ``jmp run`` exporter with ``MockPower`` and ``PySerial`` (on one end of a socat pty
pair) and drives upstream's client CLI (``jmp get/create/delete``, ``jmp shell`` + ``j``)
against it. Assertions are on what the processes do and print, on our controller's JSON log
events and on ``jmp controller get ... -o json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import signal
import subprocess
import termios
import time
import tty
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    Controller,
    PtyPair,
    socat_pty_pair,
    stop_process,
    upstream_env,
    wait_for,
)

pytestmark = pytest.mark.interop

POWER = "jumpstarter_driver_power.driver.MockPower"
SERIAL = "jumpstarter_driver_pyserial.driver.PySerial"
# ExporterStatus enum values as upstream's `jmp get exporters --with status -o json` prints them.
AVAILABLE = 2


# --- processes --------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                for child in map(int, handle.read().split()):
                    out += [child, *_descendants(child)]
    return out


def _stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the process (upstream's ``jmp run`` forwards it to its setsid child), then
    SIGKILL whatever of its own descendants is still alive."""
    children = _descendants(proc.pid)
    stop_process(proc)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _run(
    cmd: list[str], env: dict[str, str], timeout: float = 60, what: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run to completion in its own process group; on timeout kill the whole group."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"{what or cmd} timed out after {timeout} s\nstdout:\n{stdout}\nstderr:\n{stderr}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, (
        f"{' '.join(out.args)} exited {out.returncode}\n"
        f"stdout:\n{out.stdout}\nstderr:\n{out.stderr[-4000:]}"
    )
    return out.stdout


def _ts(event: dict) -> float:
    return datetime.fromisoformat(event["ts"]).timestamp()


# --- one controller + one upstream exporter + one upstream client ----------------------------


@dataclass
class Rig:
    controller: Controller
    venv: Path
    env: dict[str, str]
    client_config: Path
    exporter_name: str
    client_name: str
    selector: str
    pty: PtyPair
    exporter_log: Path
    exporter: subprocess.Popen | None = None

    # upstream's CLI

    def upstream(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return _run([str(self.venv / "bin" / "jmp"), *args], self.env, timeout)

    def client(
        self, command: str, *args: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``jmp COMMAND --client-config F ARGS...`` (upstream; COMMAND like "get exporters")."""
        return self.upstream(
            *command.split(), "--client-config", str(self.client_config), *args, timeout=timeout
        )

    def shell_cmd(self, command: str) -> list[str]:
        """``jmp shell`` on this rig's selector, running ``sh -c COMMAND`` in the lease."""
        return [
            str(self.venv / "bin" / "jmp"),
            "shell",
            "--client-config",
            str(self.client_config),
            "--selector",
            self.selector,
            "--",
            "sh",
            "-c",
            command,
        ]

    def shell(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return _run(self.shell_cmd(command), self.env, timeout)

    # our controller's view

    def log_offset(self) -> int:
        path = self.controller.log_path
        return path.stat().st_size if path.exists() else 0

    def events(self, offset: int = 0, event: str | None = None, **match: Any) -> list[dict]:
        return [
            e
            for e in self.controller.events(offset)
            if (event is None or e.get("event") == event)
            and all(e.get(k) == v for k, v in match.items())
        ]

    def our_exporter(self) -> dict:
        out = self.controller.jmp(
            "controller",
            "get",
            "exporters",
            "-o",
            "json",
            "--state-dir",
            str(self.controller.state_dir),
        )
        items = [e for e in json.loads(out.stdout)["items"] if e["name"] == self.exporter_name]
        assert len(items) == 1, out.stdout
        return items[0]

    def our_leases(self, include_ended: bool = False) -> list[dict]:
        args = ["controller", "get", "leases", "-o", "json"]
        if include_ended:
            args.append("--all")
        out = self.controller.jmp(*args, "--state-dir", str(self.controller.state_dir))
        return json.loads(out.stdout)["items"]

    def wait_status(self, status: str, timeout: float = 20) -> dict:
        return wait_for(
            lambda: (e := self.our_exporter())["status"] == status and e,
            timeout,
            0.2,
            f"exporter {self.exporter_name} to be {status} (now {self.our_exporter()})",
        )

    def exporter_output(self) -> str:
        return self.exporter_log.read_text(errors="replace")


@pytest.fixture
def rig(controller: Controller, config_env: dict[str, str], upstream_venv: Path, tmp_path: Path):
    """Upstream ``jmp run`` registered with our controller and Available, plus a client."""
    tag = secrets.token_hex(4)
    home = tmp_path / "upstream-home"
    home.mkdir()
    pty = socat_pty_pair(tmp_path)
    exporter_name, client_name = f"exp-{tag}", f"cli-{tag}"
    selector = f"board=mock-{tag}"
    exporter_config = controller.create_exporter(
        exporter_name,
        {"board": f"mock-{tag}", "lab": "interop"},
        {
            "power": {"type": POWER},
            "serial": {"type": SERIAL, "config": {"url": str(pty.device)}},
        },
        tmp_path / "exporter.yaml",
    )
    client_config = tmp_path / "client.yaml"
    controller.create_client(client_name, client_config, "--unsafe")
    r = Rig(
        controller=controller,
        venv=upstream_venv,
        env=upstream_env(upstream_venv, config_env, home),
        client_config=client_config,
        exporter_name=exporter_name,
        client_name=client_name,
        selector=selector,
        pty=pty,
        exporter_log=tmp_path / "upstream-exporter.log",
    )
    try:
        with r.exporter_log.open("ab") as log:
            r.exporter = subprocess.Popen(
                [
                    str(upstream_venv / "bin" / "jmp"),
                    "run",
                    "--exporter-config",
                    str(exporter_config),
                ],
                env=r.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            r.wait_status("Available", 30)
            wait_for(
                lambda: r.events(event="exporter online", exporter=exporter_name),
                10,
                what="the exporter's Status stream",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nupstream exporter:\n{r.exporter_output()}") from None
        yield r
    finally:
        if r.exporter is not None:
            _stop_tree(r.exporter)
        pty.close()


# --- tests -------------------------------------------------------------------------------------


def test_upstream_exporter_registers_and_is_listed_online(rig: Rig) -> None:
    registered = rig.events(event="exporter registered", exporter=rig.exporter_name)
    # Composite root + power + serial, as upstream's exporter reports its driver tree.
    assert [e["devices"] for e in registered] == [3]

    ours = rig.our_exporter()
    assert ours["registered"] is True
    assert ours["status"] == "Available"
    assert ours["labels"]["board"] == rig.selector.split("=", 1)[1]

    listed = json.loads(_ok(rig.client("get exporters", "-o", "json", "--with", "online,status")))
    mine = [e for e in listed["exporters"] if e["name"] == rig.exporter_name]
    assert len(mine) == 1, listed
    assert mine[0]["namespace"] == "default"
    assert mine[0]["labels"] == {"board": rig.selector.split("=", 1)[1], "lab": "interop"}
    assert mine[0]["online"] is True
    assert mine[0]["status"] == AVAILABLE

    # The label selector is applied server-side: a non-matching one lists nothing.
    other = json.loads(_ok(rig.client("get exporters", "-o", "json", "-l", "board=nope")))
    assert other["exporters"] == []


def test_shell_power_on_creates_readies_and_releases_a_lease(rig: Rig) -> None:
    offset = rig.log_offset()
    _ok(rig.shell("j power on"))

    created = rig.events(offset, "lease created", client=rig.client_name)
    assert len(created) == 1, created
    name = created[0]["lease"]
    assert created[0]["selector"] == rig.selector
    ready = rig.events(offset, "lease ready", lease=name)
    assert [e["exporter"] for e in ready] == [rig.exporter_name]
    ended = wait_for(lambda: rig.events(offset, "lease ended", lease=name), 10, what="lease end")
    assert [e["reason"] for e in ended] == ["Released"]
    assert rig.events(offset, "dial", lease=name), "the client never dialled through our router"

    # The exporter went LeaseReady for this lease and came back Available.
    statuses = [
        e["status"] for e in rig.events(offset, "exporter status", exporter=rig.exporter_name)
    ]
    assert "LeaseReady" in statuses
    assert statuses[statuses.index("LeaseReady") :][-1] == "Available"
    rig.wait_status("Available", 10)
    assert rig.our_leases() == []
    # The driver call really reached upstream's MockPower through the tunnel.
    assert "MockPower:power on" in rig.exporter_output()


def _open_far_end(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd, termios.TCSANOW)
    return fd


def _read_exactly(fd: int, size: int, timeout: float, proc: subprocess.Popen) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < size:
        if time.monotonic() > deadline:
            break
        if proc.poll() is not None:
            break
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            with contextlib.suppress(BlockingIOError):
                data += os.read(fd, 65536)
    # Anything beyond the payload would be a bug too: give it a moment to show up.
    time.sleep(0.2)
    with contextlib.suppress(BlockingIOError):
        data += os.read(fd, 65536)
    return data


def _write_all(fd: int, data: bytes, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    view = memoryview(data)
    while view:
        assert time.monotonic() < deadline, "far end of the serial port does not drain"
        select.select([], [fd], [], 0.1)
        with contextlib.suppress(BlockingIOError):
            view = view[os.write(fd, view) :]


def test_serial_bytes_flow_both_ways_through_the_router(rig: Rig, tmp_path: Path) -> None:
    to_device = secrets.token_bytes(4096)  # client stdin -> serial far end
    to_client = secrets.token_bytes(4096)  # serial far end -> client stdout
    sent, received, errors = (
        tmp_path / "to-device.bin",
        tmp_path / "to-client.bin",
        tmp_path / "j.err",
    )
    sent.write_bytes(to_device)
    received.write_bytes(b"")  # exists before the loop below first measures it
    # Bidirectional `j serial pipe` (stdin is a file, so upstream auto-enables input): its
    # stdout goes to a file; the script stops it once the expected byte count has arrived.
    script = (
        f'j serial pipe < "{sent}" > "{received}" 2> "{errors}" & pid=$!; n=0; '
        f'while [ "$(wc -c < "{received}")" -lt {len(to_client)} ] && [ $n -lt 400 ]; '
        "do n=$((n+1)); sleep 0.05; done; kill $pid; wait $pid; exit 0"
    )
    far = _open_far_end(rig.pty.far_end)
    proc = subprocess.Popen(
        rig.shell_cmd(script),
        env=rig.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        # The client's bytes arriving also proves the stream is connected end to end, so
        # only now does the far end talk back (pyserial drops input received before open).
        got = _read_exactly(far, len(to_device), 30, proc)
        if len(got) != len(to_device):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            _, stderr = proc.communicate(timeout=10)
            j_err = errors.read_text(errors="replace") if errors.exists() else ""
            raise AssertionError(
                f"far end got {len(got)} of {len(to_device)} bytes (jmp shell exit "
                f"{proc.returncode})\njmp shell: {stderr.decode(errors='replace')[-3000:]}\n"
                f"j serial pipe: {j_err}\nexporter: {rig.exporter_output()[-3000:]}"
            )
        assert got == to_device
        _write_all(far, to_client)
        _, stderr = proc.communicate(timeout=40)
        assert proc.returncode == 0, stderr.decode(errors="replace")[-4000:]
        assert received.read_bytes() == to_client, (
            f"client stdout got {received.stat().st_size} of {len(to_client)} bytes; "
            f"j: {errors.read_text(errors='replace')}"
        )
        assert "Bidirectional mode" in errors.read_text()
    finally:
        os.close(far)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _create_lease(rig: Rig, duration: str) -> dict:
    out = rig.client(
        "create lease", "--selector", rig.selector, "--duration", duration, "-o", "json"
    )
    return json.loads(_ok(out))


def _conditions(lease: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c.get("reason", "")) for c in lease["conditions"]}


def test_create_get_delete_lease_then_lease_again(rig: Rig) -> None:
    offset = rig.log_offset()
    first = _create_lease(rig, "00:01:00")
    name = first["name"]
    assert first["exporter"] == rig.exporter_name
    assert first["client"] == rig.client_name
    assert first["duration"] == 60.0
    assert _conditions(first)["Ready"][0] == "True"
    rig.wait_status("LeaseReady")

    # The exporter is held: a second lease on the same selector waits.
    second = _create_lease(rig, "00:01:00")
    assert second["exporter"] == ""  # upstream's rendering of "no exporter yet"
    assert _conditions(second).get("Ready", ("False",))[0] == "False"
    assert _conditions(second)["Pending"] == ("True", "NotAvailable")

    listed = json.loads(_ok(rig.client("get leases", "-o", "json")))
    assert {x["name"]: x["exporter"] for x in listed["leases"]} == {
        name: rig.exporter_name,
        second["name"]: "",
    }
    ours = {x["name"]: x["exporter"] for x in rig.our_leases()}
    assert ours == {name: rig.exporter_name, second["name"]: None}

    assert name in _ok(rig.client("delete leases", name, "-o", "name"))

    ended = wait_for(lambda: rig.events(offset, "lease ended", lease=name), 10, what="lease end")
    assert [e["reason"] for e in ended] == ["Released"]
    record = [x for x in rig.our_leases(include_ended=True) if x["name"] == name]
    assert [x["reason"] for x in record] == ["Released"]
    assert record[0]["end"]
    # The waiting lease gets the exporter once upstream's exporter has cleaned up, and the
    # exporter really takes it (it needs a leased=false in between to switch leases).
    wait_for(lambda: rig.events(offset, "lease ready", lease=second["name"]), 15, what="hand-over")
    wait_for(
        lambda: any(
            e["status"] == "LeaseReady" and _ts(e) > _ts(ended[0])
            for e in rig.events(offset, "exporter status", exporter=rig.exporter_name)
        ),
        15,
        what="the exporter to take the second lease",
    )
    _ok(rig.client("delete leases", second["name"]))
    wait_for(lambda: rig.events(offset, "lease ended", lease=second["name"]), 10, what="lease end")
    assert rig.our_leases() == []
    rig.wait_status("Available")

    # Leasable again: a fresh shell gets it and powers on.
    again = rig.log_offset()
    _ok(rig.shell("j power on"))
    ready = rig.events(again, "lease ready", exporter=rig.exporter_name)
    assert len(ready) == 1 and ready[0]["lease"] not in (name, second["name"])
    assert [e["reason"] for e in rig.events(again, "lease ended")] == ["Released"]


def test_lease_expires_by_duration(rig: Rig) -> None:
    offset = rig.log_offset()
    name = _ok(
        rig.client("create lease", "--selector", rig.selector, "--duration", "3s", "-o", "name")
    ).strip()
    assert name, "upstream printed no lease name"
    name = name.rsplit("/", 1)[-1]
    ended = wait_for(
        lambda: rig.events(offset, "lease ended", lease=name), 15, what="the lease to expire"
    )
    assert [e["reason"] for e in ended] == ["Expired"]
    ready = rig.events(offset, "lease ready", lease=name)
    assert len(ready) == 1
    held = _ts(ended[0]) - _ts(ready[0])
    assert 2.5 <= held <= 6, f"lease held {held:.2f} s for a 3 s duration"

    # The upstream exporter took the lease, then reported Available again after it expired.
    statuses = [
        (e["status"], _ts(e))
        for e in rig.events(offset, "exporter status", exporter=rig.exporter_name)
    ]
    assert any(s == "LeaseReady" and t < _ts(ended[0]) for s, t in statuses), statuses
    wait_for(
        lambda: any(
            e["status"] == "Available" and _ts(e) >= _ts(ended[0])
            for e in rig.events(offset, "exporter status", exporter=rig.exporter_name)
        ),
        15,
        what="the exporter to report Available after expiry",
    )
    rig.wait_status("Available")
    record = [x for x in rig.our_leases(include_ended=True) if x["name"] == name]
    assert [x["reason"] for x in record] == ["Expired"]
    listed = json.loads(_ok(rig.client("get exporters", "-o", "json", "--with", "status")))
    assert [e["status"] for e in listed["exporters"] if e["name"] == rig.exporter_name] == [
        AVAILABLE
    ]
