"""``jmp lab up`` end to end, and its parts: the board simulator and the restart loop.

Everything is real: the lab runs as ``jmp lab up`` in a subprocess (our controller, snmpsim,
socat, the board, ``jmp run``, the client API); the board tests use a socat pty pair and the
lab's snmpsim PDU, switching the outlet with their own SNMP SETs (``tests.snmpsim``); the
supervisor tests run real processes. "Nothing left running" is checked by scanning
``/proc`` for any process whose command line names the run's directory or PDU port, and by
binding the run's ports again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from jumpstarter_exporter.lab.board import Board, open_console, snmp_probe
from jumpstarter_exporter.lab.pdusim import APC_RPDU_CMD, LAB_FILES
from jumpstarter_exporter.lab.supervisor import Supervisor
from tests.harness import JMP, podman_base_image, socat_pty_pair, unmet, wait_for
from tests.snmpsim import SnmpSim, SnmpSimUnavailable, snmp_set, snmpsim_venv

pytestmark = pytest.mark.timeout(300)

# Each step's line as the lab prints it ("  3.4s  step         text").
STEPS = {
    "controller": r"jmp controller serve: listening on 127\.0\.0\.1:(?P<port>\d+)",
    "pdu": r"snmpsim as an APC rack PDU on udp/127\.0\.0\.1:(?P<pdu>\d+)",
    "configs": r"exporter 'board' \(lab=demo; power, serial\) in exporter\.yaml",
    "board": r"on PDU outlet 1, console on run/ttyDUT",
    "exporter": r"jmp run, pid (?P<first>\d+), in a restart loop; controller: Available",
    "lease": r"\S+ on exporter 'board' \(selector lab=demo\)",
    "power on": r"PDU outlet 1 switched on and confirmed",
    "console": r'boot #1: \d+ lines of boot log, "login:" after',
    "login": r"root; uname -a: Linux lab-board ",
    "power cycle": r'off 1 s, on: boot #2, "login:" again after',
    "power read": r"230\.0 V, 0\.4 A",
    "release": r"lease released",
    "exporter ": r"pid (?P<exited>\d+) exited 0 after the lease; controller: offline",
    "restart": r"restarted as pid (?P<second>\d+); controller: Available again",
    "lease again": r"\S+ on 'board' \(board still on\), released: leasable again",
    "stop": r"exporter, board, pdu and controller stopped",
}


@pytest.fixture(scope="module")
def lab_tools() -> Path:
    """socat and the snmpsim venv (built once by scripts/snmpsim-venv)."""
    if shutil.which("socat") is None:
        unmet("socat is not installed")
    try:
        return snmpsim_venv()
    except SnmpSimUnavailable as exc:
        unmet(f"snmpsim unavailable (scripts/snmpsim-venv): {exc}")
        raise


def lab_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("JMP_", "JUMPSTARTER_"))}


def leftovers(*needles: str) -> list[str]:
    """Command lines of running processes that contain any of ``needles``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            raw = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = raw.replace(b"\0", b" ").decode(errors="replace")
            if state != "Z" and any(n in cmd for n in needles):
                found.append(f"{entry.name}: {cmd}")
    return found


def port_free(kind: int, port: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        # TIME_WAIT from the run's connections is not "in use"; a listener still is.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def run_lab(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(JMP), "lab", "up", "--dir", str(directory)],
        env=lab_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )


def parse_steps(stdout: str) -> dict[str, re.Match[str]]:
    lines = stdout.splitlines()
    found: dict[str, re.Match[str]] = {}
    rest = iter(lines)
    for step, pattern in STEPS.items():
        line_re = re.compile(rf"^\s*\d+\.\ds  {re.escape(f'{step.strip():<12}')} {pattern}")
        for line in rest:  # in this order: each step's line comes after the previous one
            match = line_re.search(line)
            if match:
                found[step] = match
                break
        else:
            raise AssertionError(f"no line for step {step!r} in order:\n{stdout}")
    return found


def assert_nothing_left(directory: Path, steps: dict[str, re.Match[str]]) -> None:
    pdu = steps["pdu"]["pdu"]
    left = leftovers(str(directory), f"127.0.0.1:{pdu}")
    assert not left, f"still running after the lab: {left}"
    assert port_free(socket.SOCK_STREAM, int(steps["controller"]["port"]))
    assert port_free(socket.SOCK_DGRAM, int(pdu))


def test_lab_up_runs_every_step_and_is_rerunnable(lab_tools: Path, tmp_path: Path) -> None:
    directory = tmp_path / "lab"
    for run in (1, 2):  # the second run reuses the state directory (CA, database)
        out = run_lab(directory)
        assert out.returncode == 0, f"run {run}: exit {out.returncode}\n{out.stdout}{out.stderr}"
        steps = parse_steps(out.stdout)
        assert "lab: all steps passed" in out.stdout
        # The exporter that served the lease exited and a new process took its place.
        assert steps["exporter "]["exited"] == steps["exporter"]["first"]
        assert steps["restart"]["second"] != steps["exporter"]["first"]
        assert_nothing_left(directory, steps)
        assert not out.stderr.strip(), out.stderr
    # What the controller saw, in its own log: two registrations per run, and the exporter
    # going offline in between (the restart is a new process, not a reconnect).
    events = [line for line in (directory / "logs" / "controller.log").read_text().splitlines()]
    registered = [e for e in events if '"exporter registered"' in e]
    assert len(registered) >= 2, events
    assert any('"exporter offline"' in e for e in events)
    # The configs were written through the config code, 0600, and load as jmp run loads them.
    for name in ("exporter.yaml", "client.yaml"):
        assert (directory / name).stat().st_mode & 0o777 == 0o600


def interrupt_at(directory: Path, step: str, signum: int) -> tuple[int, str, dict[str, str]]:
    """Start the lab, send ``signum`` once ``step``'s line is printed; exit status, output,
    and the ports seen so far."""
    proc = subprocess.Popen(
        [str(JMP), "lab", "up", "--dir", str(directory)],
        env=lab_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    ports: dict[str, str] = {}
    try:
        for line in proc.stdout:
            seen.append(line)
            for name, pattern in (("port", STEPS["controller"]), ("pdu", STEPS["pdu"])):
                match = re.search(pattern, line)
                if match:
                    ports[name] = match[name]
            if re.match(rf"^\s*\d+\.\ds  {re.escape(step)}\s", line):
                proc.send_signal(signum)
                break
        else:
            raise AssertionError(f"the lab ended before {step!r}:\n{''.join(seen)}")
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(seen) + rest, ports


@pytest.mark.parametrize(
    ("step", "signum", "code"),
    [("power on", signal.SIGINT, 130), ("board", signal.SIGTERM, 143)],
)
def test_a_signal_stops_everything_with_a_documented_status(
    lab_tools: Path, tmp_path: Path, step: str, signum: int, code: int
) -> None:
    directory = tmp_path / "lab"
    status, output, ports = interrupt_at(directory, step, signum)
    assert status == code, output
    name = signal.Signals(signum).name
    assert f"lab: {name}, stopping everything" in output
    assert "lab: stopped, nothing left running" in output
    assert "all steps passed" not in output
    left = leftovers(str(directory), f"127.0.0.1:{ports['pdu']}")
    assert not left, f"still running after {name}: {left}"
    assert port_free(socket.SOCK_STREAM, int(ports["port"]))
    # And the directory is usable again at once.
    again = run_lab(directory)
    assert again.returncode == 0, again.stdout + again.stderr


def test_a_failed_step_is_named_and_nothing_is_left(lab_tools: Path, tmp_path: Path) -> None:
    """Without socat the board cannot be made: exit 1 naming the step, and the controller and
    PDU started before it are stopped."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sha256sum", "cut", "cat"):  # what scripts/snmpsim-venv runs
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    directory = tmp_path / "lab"
    out = subprocess.run(
        [str(JMP), "lab", "up", "--dir", str(directory)],
        env={**lab_env(), "PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAILED board: socat is not installed" in out.stdout
    assert f"(logs in {directory / 'logs'})" in out.stdout
    pdu = re.search(STEPS["pdu"], out.stdout)
    assert pdu is not None, out.stdout
    assert not leftovers(str(directory), f"127.0.0.1:{pdu['pdu']}")


def test_a_second_lab_on_the_same_directory_is_refused(lab_tools: Path, tmp_path: Path) -> None:
    import fcntl

    directory = tmp_path / "lab"
    directory.mkdir()
    with (directory / "lab.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        out = run_lab(directory)
    assert out.returncode == 1
    assert f"another `jmp lab up` is using {directory}" in out.stdout


# --- the board simulator ----------------------------------------------------------------------


@pytest.fixture
def lab_pdu(lab_tools: Path) -> Iterator[SnmpSim]:
    with SnmpSim(lab_tools, files=LAB_FILES) as sim:
        yield sim


class Console:
    """The exporter's end of the board's pty, raw, read with a deadline."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd, termios.TCSANOW)
        self.seen = b""

    def read_for(self, seconds: float) -> bytes:
        end, out = time.monotonic() + seconds, b""
        while time.monotonic() < end:
            with contextlib.suppress(BlockingIOError):
                out += os.read(self.fd, 4096)
                continue
            time.sleep(0.02)
        self.seen += out
        return out

    def expect(self, pattern: bytes, timeout: float = 15) -> bytes:
        out = b""
        deadline = time.monotonic() + timeout
        while pattern not in out:
            assert time.monotonic() < deadline, f"{pattern!r} not seen; got {out!r}"
            out += self.read_for(0.05)
        return out

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def board_rig(lab_pdu: SnmpSim, tmp_path: Path) -> Iterator[tuple[SnmpSim, Console]]:
    """The board as the lab runs it (a process on one end of a socat pair); the test holds
    the other end, as the exporter would."""
    pair = socat_pty_pair(tmp_path)
    board = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jumpstarter_exporter.lab.board",
            "--tty",
            str(pair.far_end),
            "--pdu",
            f"{lab_pdu.host}:{lab_pdu.port}",
            "--speed",
            "0.2",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    console = Console(pair.device)
    try:
        yield lab_pdu, console
    finally:
        console.close()
        board.send_signal(signal.SIGTERM)
        board.wait(10)
        pair.close()
    assert board.returncode == 0, board.stderr.read() if board.stderr else ""


def switch(sim: SnmpSim, on: bool) -> None:
    asyncio.run(snmp_set(sim, "lab", f"{APC_RPDU_CMD}.1", 1 if on else 2))


def test_board_boots_to_a_login_prompt_when_its_outlet_goes_on(
    board_rig: tuple[SnmpSim, Console],
) -> None:
    sim, console = board_rig
    assert console.read_for(0.5) == b""  # unpowered: silent
    switch(sim, True)
    boot = console.expect(b"lab-board login: ")
    assert b"U-Boot" in boot and b"boot #1" in boot
    console.write(b"root\r")
    assert console.expect(b"root@lab-board:~# ").startswith(b"root\r\n")  # echoed
    console.write(b"echo hello lab\r\n")
    assert b"\r\nhello lab\r\n" in console.expect(b"# ")
    console.write(b"uname -a\r")
    assert b"Linux lab-board 6.1.0-lab" in console.expect(b"# ")
    console.write(b"reboot\r")
    assert b"-sh: reboot: not found" in console.expect(b"# ")
    console.write(b"exit\r")
    console.expect(b"lab-board login: ")


def test_board_is_silent_when_off_and_a_power_cycle_reboots_it(
    board_rig: tuple[SnmpSim, Console],
) -> None:
    sim, console = board_rig
    switch(sim, True)
    console.expect(b"login: ")
    switch(sim, False)
    time.sleep(0.5)  # long enough for the board's polling to see the outlet off
    console.read_for(0.2)
    console.write(b"root\r")  # nobody listens: no echo, no prompt
    assert console.read_for(0.5) == b""
    switch(sim, True)
    again = console.expect(b"login: ")
    assert b"boot #2" in again
    assert b"root" not in again  # keystrokes typed while off were lost


def test_board_state_machine_over_a_real_pty(lab_pdu: SnmpSim, tmp_path: Path) -> None:
    """The Board class in-process (what the board process runs), with the real PDU probe."""
    pair = socat_pty_pair(tmp_path)
    probe, getter = snmp_probe(lab_pdu.host, lab_pdu.port, "lab", 1)
    console = Console(pair.device)

    async def scenario() -> bytes:
        fd = open_console(str(pair.far_end))
        board = Board(fd, probe, speed=0)
        task = asyncio.get_running_loop().create_task(board.run_forever())
        try:
            assert await probe() is False
            await asyncio.to_thread(switch, lab_pdu, True)
            out = await asyncio.to_thread(console.expect, b"login: ")
            assert board.boots == 1 and board.mode == "login"
            return out
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            getter.close()
            os.close(fd)

    try:
        out = asyncio.run(scenario())
    finally:
        console.close()
        pair.close()
    assert b"Starting kernel" in out


# --- the restart loop --------------------------------------------------------------------------


def test_supervisor_restarts_after_each_exit_and_stops_the_group(tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    # Each run appends a line and exits 0, like an exporter after a lease; the third stays up
    # with a child of its own (the group must go with it).
    script = f"echo run >> {marker}; [ $(wc -l < {marker}) -ge 3 ] && sleep 300 & wait"

    async def scenario() -> tuple[list[tuple[str, int | None]], int]:
        sup = Supervisor(["sh", "-c", script], tmp_path / "log", delay=0.05)
        sup.start()
        seen = []
        while len(seen) < 5:
            event = await sup.next_event(30)
            seen.append((event.kind, event.returncode))
        await asyncio.sleep(0.5)  # let the third one start its child
        await sup.stop()
        return seen, event.pid

    events, last = asyncio.run(scenario())
    assert events == [
        ("started", None),
        ("exited", 0),
        ("started", None),
        ("exited", 0),
        ("started", None),
    ]
    assert marker.read_text().count("run") == 3
    # The last run and its `sleep` were one process group (the supervisor made it): all gone.
    wait_for(lambda: not group_members(last), 10, what="the supervised group to stop")


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z" and int(fields[2]) == pgid:
                    members.append(int(entry.name))
    return members


def test_supervisor_gives_up_on_a_crash_loop(tmp_path: Path) -> None:
    async def scenario() -> Supervisor:
        sup = Supervisor(["sh", "-c", "exit 78"], tmp_path / "log", delay=0.01, burst=3)
        sup.start()
        while (await sup.next_event(30)).kind != "gave up":
            pass
        await sup.stop()
        return sup

    sup = asyncio.run(scenario())
    assert sup.gave_up is not None and sup.gave_up.returncode == 78


# --- the README's first command on a fresh machine ---------------------------------------------

FRESH_SCRIPT = r"""
set -u
# A fresh Debian has neither socat nor (often) python3-venv: take them away if the image has them.
gone=$(dpkg-query -W -f '${Package}\n' | grep -E '^(socat|python3(\.[0-9]+)?-venv)$')
[ -z "$gone" ] || apt-get remove -y -qq $gone >/dev/null 2>&1
python3 -c 'import ensurepip' 2>/dev/null && echo "python3-venv still installed"
mkdir /repo && tar -C /repo -xf /in/repo.tar && cd /repo
scripts/lab
echo "scripts/lab exit: $?"
# Nothing of the lab may outlive it: list every process but this shell and its children.
for p in /proc/[0-9]*; do
  [ "${p#/proc/}" = "$$" ] && continue
  cmd=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null) || continue
  case "$cmd" in ''|*'for p in'*|'bash -c'*|tr*) ;; *) echo "left running: $cmd" ;; esac
done
"""


@pytest.mark.system
@pytest.mark.timeout(1200)
def test_scripts_lab_on_a_fresh_debian_from_a_clone(tmp_path: Path) -> None:
    """scripts/lab in a fresh Debian 12 container holding only the repository's files: it
    installs socat and python3-venv (apt), .venv and snmpsim (PyPI), and the lab passes."""
    base = podman_base_image()
    repo = Path(__file__).resolve().parent.parent
    # What a clone holds: the tracked files (and new, not ignored ones), none of .venv.
    files = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    present = b"\0".join(f for f in files.split(b"\0") if f and (repo / f.decode()).exists())
    subprocess.run(
        ["tar", "-C", str(repo), "-cf", str(tmp_path / "repo.tar"), "--null", "-T", "-"],
        input=present,
        check=True,
        timeout=120,
    )
    name = f"jmp-lab-fresh-{os.getpid()}"
    try:
        out = subprocess.run(
            [
                *("podman", "run", "--rm", "--name", name, "-v", f"{tmp_path}:/in:ro", base),
                *("bash", "-c", FRESH_SCRIPT),
            ],
            capture_output=True,
            text=True,
            timeout=1100,
        )
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, timeout=60)
    log = out.stdout + out.stderr
    assert "python3-venv still installed" not in out.stdout, log
    assert "lab: installing socat python3-venv (apt-get)" in log, log
    assert "scripts/lab exit: 0" in out.stdout, log
    parse_steps(out.stdout)
    assert "lab: all steps passed" in out.stdout, log
    assert "left running" not in out.stdout, log
