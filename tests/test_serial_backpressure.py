"""A client that stops reading the serial console must not make the exporter grow.

Upstream 0.9's Python client opens the console through our controller's router and then
does not read. The test floods the board side of a socat pty pair and watches two things:
the writer is stalled by back-pressure (far less than the flood is accepted), and the
exporter's resident memory stays flat. Then the client reads again and data flows.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.harness import Controller, socat_pty_pair, start_exporter, upstream_env, wait_for

pytestmark = pytest.mark.interop

FLOOD = 64 << 20
CLIENT = textwrap.dedent(
    """
    import sys, time
    from jumpstarter.config.client import ClientConfigV1Alpha1

    config = ClientConfigV1Alpha1.from_file(sys.argv[1])
    with config.lease(selector="board=b1") as lease:
        with lease.connect() as client:
            with client.tty.stream() as s:
                print("open", flush=True)
                sys.stdin.readline()          # stall until the test says "read"
                got, deadline = 0, time.monotonic() + 10
                while got < (1 << 20) and time.monotonic() < deadline:
                    got += len(s.receive())
                print("read", got, flush=True)
    """
)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_stalled_client_does_not_grow_the_exporter(
    controller: Controller, upstream_venv: Path, tmp_path: Path
) -> None:
    pty = socat_pty_pair(tmp_path)
    export = {
        "tty": {
            "type": "jumpstarter_driver_pyserial.driver.PySerial",
            "config": {"url": str(pty.device)},
        }
    }
    config = controller.create_exporter("ex1", {"board": "b1"}, export, tmp_path / "ex1.yaml")
    client = tmp_path / "cl1.yaml"
    controller.create_client("cl1", client, "--unsafe")
    up = upstream_env(upstream_venv, controller.env, tmp_path / "up-home")
    (tmp_path / "client.py").write_text(CLIENT)
    exp = start_exporter(config, controller.env, tmp_path / "exporter.log")
    proc = None
    try:
        wait_for(lambda: exp.has_event("ready"), 30, what="exporter ready")
        proc = subprocess.Popen(
            ["python", str(tmp_path / "client.py"), str(client)],
            env=up,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "open"
        time.sleep(0.5)
        before = _rss_kib(exp.proc.pid)

        accepted = 0
        stop = threading.Event()
        far = os.open(pty.far_end, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)

        def flood() -> None:
            nonlocal accepted
            chunk = os.urandom(1 << 16)
            deadline = time.monotonic() + 8
            while accepted < FLOOD and time.monotonic() < deadline and not stop.is_set():
                try:
                    accepted += os.write(far, chunk)
                except BlockingIOError:
                    time.sleep(0.01)

        writer = threading.Thread(target=flood)
        writer.start()
        peak = before
        while writer.is_alive():
            peak = max(peak, _rss_kib(exp.proc.pid))
            time.sleep(0.1)
        growth_mib = (peak - before) / 1024
        print(f"accepted {accepted >> 20} MiB of {FLOOD >> 20}; exporter RSS +{growth_mib:.1f} MiB")
        assert accepted < FLOOD // 2, "the board side was never stalled: no back-pressure"
        assert growth_mib < 48, f"exporter grew by {growth_mib:.1f} MiB for a stalled reader"

        proc.stdin.write("read\n")
        proc.stdin.flush()
        line = proc.stdout.readline().split()
        assert line[0] == "read" and int(line[1]) > 0  # the stream still works
        stop.set()
        os.close(far)
        assert proc.wait(60) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        exp.stop()
        pty.close()
