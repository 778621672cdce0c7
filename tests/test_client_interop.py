"""Our client (Python API, ``jmp shell`` + ``j``) against an upstream Jumpstarter 0.9
exporter (``jmp run`` from the upstream venv, upstream's MockPower and PySerial drivers)
registered with our controller."""

from __future__ import annotations

import os
import select
import subprocess

import pytest

from jumpstarter_exporter.client import lease
from tests.harness import JMP, wait_for
from tests.test_controller_interop import Rig, rig  # noqa: F401 - the shared fixture

pytestmark = pytest.mark.interop


def read_until(fd: int, wanted: bytes, timeout: float = 30.0) -> bytes:
    seen = b""

    def more() -> bool:
        nonlocal seen
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            seen += os.read(fd, 4096)
        return wanted in seen

    wait_for(more, timeout, interval=0, what=f"{wanted!r} (seen {seen!r})")
    return seen


def our_shell(rig: Rig, *command: str, options: tuple[str, ...] = ()) -> list[str]:  # noqa: F811
    """Our ``jmp shell`` on the rig's client config and selector, running ``command``."""
    return [
        str(JMP),
        "shell",
        "--client-config",
        str(rig.client_config),
        "--selector",
        rig.selector,
        *options,
        "--",
        *command,
    ]


@pytest.fixture
def far(rig: Rig):  # noqa: F811 - the imported fixture
    fd = os.open(rig.pty.far_end, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    yield fd
    os.close(fd)


def test_python_api_against_upstream_exporter(rig: Rig, far: int) -> None:  # noqa: F811
    with lease(config=rig.client_config, selector=rig.selector, timeout=30) as board:
        assert board.exporter_name == rig.exporter_name
        board.power.on()
        assert board.power.read()[-1] == {"voltage": 5.0, "current": 2.0}
        board.power.cycle(wait=0.1)
        board.serial.write(b"to-upstream\n")
        read_until(far, b"to-upstream\n")
        os.write(far, b"upstream board login: ")
        assert board.serial.expect(b"login:", timeout=20).endswith(b"board login:")
        name = board.lease_name
    # released on our controller, and the upstream exporter is available again
    leases = {r["name"]: r for r in rig.our_leases(include_ended=True)}
    assert leases[name]["end"], leases[name]
    rig.wait_status("Available", 30)
    assert "power on" in rig.exporter_output()


def test_shell_and_j_against_upstream_exporter(rig: Rig, far: int) -> None:  # noqa: F811
    env = {
        **rig.env,
        "PATH": f"{JMP.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    }
    script = "j power on && printf 'piped\\n' | j serial pipe --timeout 5; exit 3"
    proc = subprocess.Popen(
        our_shell(rig, "sh", "-c", script, options=("--acquisition-timeout", "30")),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        try:
            read_until(far, b"piped\n", 60)
        except AssertionError:
            proc.kill()
            raise AssertionError(proc.communicate()[1][-3000:]) from None
        os.write(far, b"answer-from-board\r\n")
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, stderr[-3000:]
    assert "answer-from-board" in stdout
    assert all(r["end"] for r in rig.our_leases(include_ended=True))
    rig.wait_status("Available", 30)


def test_upstream_j_inside_our_shell(rig: Rig) -> None:  # noqa: F811
    """Our shell's socket speaks the session protocol upstream's `j` expects."""
    out = subprocess.run(
        our_shell(rig, str(rig.venv / "bin" / "j"), "power", "on"),
        env=rig.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    wait_for(lambda: rig.exporter_output().count("power on") >= 1, 10, what="power on")
    assert all(r["end"] for r in rig.our_leases(include_ended=True))


def test_our_j_inside_upstream_shell(rig: Rig) -> None:  # noqa: F811
    """Upstream's jmp shell socket and environment work for our `j` too."""
    out = rig.shell(f"{JMP.parent / 'j'} power on && {JMP.parent / 'j'} power read")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "5.0 V  2.0 A" in out.stdout
