"""``benchmarks/run``: our exporter beside upstream Jumpstarter 0.9's, in one run (issue #9).

Rounds interleave the two implementations (ours first in odd rounds, upstream first in even
ones) against one controller (ours), with one client program (upstream's Python client API).
Every figure in the table is a median or percentile over all rounds of this run; ratios are
ours / upstream from the same run. See benchmarks/README.md for the method.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import ceilings, procstat, report
from benchmarks.rig import Client, Rig, Side, build, first, leasable_at

MIB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Params:
    rounds: int
    calls: int
    concurrent_callers: int
    concurrent_seconds: float
    serial_bytes: int
    echo: int
    cycles: int
    growth_calls: int
    growth_bytes: int
    scale_exporters: int
    scale_leases: int
    scale_calls: int


FULL = Params(
    rounds=5,
    calls=2000,
    concurrent_callers=8,
    concurrent_seconds=3.0,
    serial_bytes=16 * MIB,
    echo=1000,
    cycles=2,
    growth_calls=10_000,
    growth_bytes=256 * MIB,
    scale_exporters=500,
    scale_leases=50,
    scale_calls=20,
)
SMOKE = Params(
    rounds=1,
    calls=30,
    concurrent_callers=8,
    concurrent_seconds=0.5,
    serial_bytes=256 * 1024,
    echo=20,
    cycles=1,
    growth_calls=0,
    growth_bytes=0,
    scale_exporters=10,
    scale_leases=3,
    scale_calls=3,
)


def say(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


class PeakSampler:
    """Peak RSS/PSS of a process tree while a step runs (sampled every 0.2 s)."""

    def __init__(self, side: Side) -> None:
        self.side = side
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = procstat.sample(self.side.pids())
            self.peak_rss, self.peak_pss = (
                max(self.peak_rss, s.rss_kib),
                max(self.peak_pss, s.pss_kib),
            )
            self._stop.wait(0.2)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(2)


def step(side: Side, client: Client, command: str, event: str) -> tuple[dict, float]:
    """Run one client command; return its reply and the exporter tree's CPU seconds for it."""
    before = procstat.sample(side.pids()).cpu_s
    reply = client.do(command, event)
    if reply.get("ev") == "error":
        raise RuntimeError(f"{side.name}: {command}: {reply['error']}")
    return reply, procstat.sample(side.pids()).cpu_s - before


def add(out: dict, key: str, value) -> None:
    if isinstance(value, list):
        out.setdefault(key, []).extend(value)
    else:
        out.setdefault(key, []).append(value)


def wait_leasable(rig: Rig, side: Side, since: float, *, online: bool, need_register: bool):
    return rig.events.wait(
        lambda items: leasable_at(
            items, side.exporter, since, online=online, need_register=need_register
        ),
        60,
        f"{side.name} exporter to be leasable",
    )


def run_round(rig: Rig, side: Side, p: Params, out: dict, growth: bool) -> None:
    ev = rig.events
    # 1. cold start: process start -> Register seen -> leasable (online + Available)
    started = side.start()
    leasable = wait_leasable(rig, side, started, online=False, need_register=True)
    registered = first(ev.items, started, event="exporter registered", exporter=side.exporter)
    add(out, "start_registered_s", registered["t"] - started)
    add(out, "start_leasable_s", leasable - started)
    if side.restart:
        ready = [t for t in rig.notify.ready if t >= started]
        if ready:
            add(out, "start_ready_s", ready[0] - started)
    time.sleep(1.0)  # idle after registration
    idle = procstat.sample(side.pids())
    add(out, "idle_rss_kib", idle.rss_kib)
    add(out, "idle_pss_kib", idle.pss_kib)
    add(out, "idle_procs", idle.pids)

    client = Client(
        rig.venv / "bin" / "python",
        rig.client_config,
        side,
        rig.env,
        rig.base / f"client-{side.name}.log",
    )
    try:
        asked = time.time()
        step(side, client, "lease", "lease")
        lease = first(ev.poll(), asked - 1, event="lease created", selector=side.selector)
        current = lease["lease"]

        # 3. DriverCall round trips
        reply, cpu = step(side, client, f"on {p.calls}", "on")
        add(out, "on_lat_s", reply["lat"])
        add(out, "cpu_ms_per_call", cpu * 1000 / p.calls)
        reply, _ = step(side, client, f"read {p.calls}", "read")
        add(out, "read_lat_s", reply["lat"])
        reply, _ = step(
            side, client, f"concurrent {p.concurrent_callers} {p.concurrent_seconds}", "concurrent"
        )
        add(out, "concurrent_cps", reply["calls"] / reply["seconds"])

        # 4. serial through the router, and 5. memory/CPU while it flows; one console
        # stream for all of it (see client_workload.py for why not one per step)
        step(side, client, "serial", "serial")
        for direction in ("up", "down"):
            with PeakSampler(side) as peak:
                reply, cpu = step(side, client, f"{direction} {p.serial_bytes}", direction)
            add(out, f"{direction}_mbps", reply["bytes"] / reply["seconds"] / 1e6)
            add(out, f"{direction}_crc_ok", reply["crc_ok"])
            if "frames" in reply:
                add(out, f"{direction}_frames_per_mib", reply["frames"] / (reply["bytes"] / MIB))
            add(out, f"cpu_ms_per_mib_{direction}", cpu * 1000 / (reply["bytes"] / MIB))
            add(out, "serial_peak_rss_kib", peak.peak_rss)
            add(out, "serial_peak_pss_kib", peak.peak_pss)
        reply, _ = step(side, client, f"echo {p.echo}", "echo")
        add(out, "echo_lat_s", reply["lat"])
        add(out, "echo_ok", reply["ok"])

        if growth:
            run_growth(side, client, p, out)

        # 2. turnaround: a lease is queued behind the current one; time from the current
        # lease's end (controller) to the exporter reporting LeaseReady for the next one.
        for k in range(p.cycles):
            pending = step(side, client, "pending", "pending")[0]["name"]
            asked = time.time()
            if k == 0:
                step(side, client, "release", "released")
            else:
                step(side, client, f"delete {current}", "deleted")
            ended = ev.wait(
                lambda items, name=current, t=asked - 1: first(
                    items, t, event="lease ended", lease=name
                ),
                30,
                "the lease to end",
            )
            ready = ev.wait(
                lambda items, t=ended["t"]: first(
                    items, t, event="exporter status", exporter=side.exporter, status="LeaseReady"
                ),
                60,
                "the next lease to be ready",
            )
            add(out, "turnaround_s", ready["t"] - ended["t"])
            current = pending
        asked = time.time()
        step(side, client, f"delete {current}", "deleted")
        ended = ev.wait(
            lambda items: first(items, asked - 1, event="lease ended", lease=current),
            30,
            "the last lease to end",
        )
        back = wait_leasable(rig, side, ended["t"], online=True, need_register=side.restart)
        add(out, "release_leasable_s", back - ended["t"])
    finally:
        client.close()
        side.stop()


def run_growth(side: Side, client: Client, p: Params, out: dict) -> None:
    """Memory before and after many calls and a long transfer (ours only: the target is ours)."""
    before = procstat.sample(side.pids())
    step(side, client, f"on {p.growth_calls}", "on")
    after_calls = procstat.sample(side.pids())
    step(side, client, f"up {p.growth_bytes // 2}", "up")
    step(side, client, f"down {p.growth_bytes // 2}", "down")
    after_serial = procstat.sample(side.pids())
    out["growth"] = {
        "calls": p.growth_calls,
        "bytes": p.growth_bytes,
        "rss_kib_before": before.rss_kib,
        "rss_kib_after_calls": after_calls.rss_kib,
        "rss_kib_after_serial": after_serial.rss_kib,
    }


def machine() -> dict:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": model,
        "cores": os.cpu_count(),
        "mem_gib": round(int(mem) / MIB, 1),
        "python": platform.python_version(),
        "load_before": os.getloadavg(),
    }


def versions(rig: Rig) -> dict:
    up = subprocess.run(
        [str(rig.venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    pkgs = {d["name"]: d["version"] for d in json.loads(up.stdout or "[]")}
    from importlib.metadata import version

    return {
        "ours": version("jumpstarter-exporter"),
        "upstream": pkgs.get("jumpstarter", "?"),
        "grpcio_ours": version("grpcio"),
        "grpcio_upstream": pkgs.get("grpcio", "?"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI: shape, not speed)")
    parser.add_argument("--rounds", type=int, help="rounds per implementation")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where latest.{json,png,txt} go")
    parser.add_argument("--no-scale", action="store_true", help="skip the controller scale test")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument(
        "--quadlet",
        action="store_true",
        help="add the Quadlet/plain unit restart rows (runs tests/test_units.py's restart test "
        "under the systemd sandbox; needs it prepared, as .ci/run does)",
    )
    args = parser.parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so every finally below stops the
    # exporters, clients, socat and the controller it started (they run in their own sessions)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    p = SMOKE if args.smoke else FULL
    if args.rounds:
        p.rounds = args.rounds
    base = Path(tempfile.mkdtemp(prefix="jmp-bench-"))
    began = time.time()
    result: dict = {"mode": "smoke" if args.smoke else "full", "params": asdict(p)}
    result["machine"] = machine()
    say(f"work dir {base}")
    rig = build(base)
    try:
        result["versions"] = versions(rig)
        sides: dict[str, dict] = {"ours": {}, "upstream": {}}
        ceil: dict[str, list] = {}
        for r in range(p.rounds):
            order = ["ours", "upstream"] if r % 2 == 0 else ["upstream", "ours"]
            for name in order:
                say(f"round {r + 1}/{p.rounds}: {name}")
                growth = name == "ours" and r == p.rounds - 1 and p.growth_calls > 0
                run_round(rig, rig.sides[name], p, sides[name], growth)
            say(f"round {r + 1}/{p.rounds}: ceilings")
            pty = rig.sides["ours"].pty
            bare = ceilings.pty_pair_mbps(pty.device, pty.far_end, p.serial_bytes)
            add(ceil, "pty_mbps", _mbps(bare))
            add(ceil, "grpc_mbps", _mbps(ceilings.grpc_bidi_mbps(p.serial_bytes)))
        result["sides"], result["ceilings"] = sides, ceil
    finally:
        rig.close()
    if not args.no_scale:
        from benchmarks import scale

        say("controller scale")
        result["scale"] = scale.run(base / "scale", p)
    if args.quadlet:
        say("unit restart under the systemd sandbox (tests/test_units.py)")
        result["units"] = unit_restarts()
    result["machine"]["load_after"] = os.getloadavg()
    result["seconds"] = time.time() - began
    args.out.mkdir(parents=True, exist_ok=True)
    table = report.table(result)
    result["rows"] = report.rows(result)
    (args.out / "latest.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "latest.txt").write_text(table + "\n")
    report.chart(result, args.out / "latest.png")
    sys.stdout.write(table + "\n")
    say(f"wrote {args.out}/latest.json, latest.png, latest.txt in {result['seconds']:.0f} s")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


UNIT_TEST = "tests/test_units.py::test_lease_release_restarts_the_unit_ready_again"
UNIT_LINE = re.compile(r"^(quadlet|plain): lease released -> unit READY again in ([0-9.]+) s$")


def unit_restarts() -> dict:
    """Lease released -> unit READY again under a booted systemd, for the Quadlet and plain
    units, as measured (and printed) by the units test. Coarse: it polls ``systemctl show``
    and prints 0.1 s resolution; one sample each."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", UNIT_TEST],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=Path(__file__).resolve().parent.parent,
    )
    found = {}
    for line in run.stdout.splitlines():
        if m := UNIT_LINE.match(line.strip()):
            found[f"{m.group(1)}_s"] = float(m.group(2))
    if run.returncode != 0 or not found:
        tail = (run.stdout + run.stderr)[-2000:]
        raise RuntimeError(f"{UNIT_TEST} failed (exit {run.returncode}):\n{tail}")
    return found


def _mbps(r: dict) -> float:
    if not r["crc_ok"]:
        raise RuntimeError(f"ceiling transfer corrupted: {r}")
    return r["bytes"] / r["seconds"] / 1e6


if __name__ == "__main__":
    sys.exit(main())
