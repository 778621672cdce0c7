"""``benchmarks/run --smoke`` end to end, so the benchmark never rots.

It starts the real controller, our exporter under its restart loop and upstream 0.9's
``jmp run``, drives both with upstream's Python client, and must produce the table, the JSON
and the chart. Only their shape is checked: no timing is asserted (the numbers of a smoke run
on a busy CI machine mean nothing; benchmarks/README.md has the method and the real run).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import REPO, unmet

pytestmark = pytest.mark.interop

SIDES = ("ours", "upstream")
PER_SIDE = [
    "start_registered_s",
    "start_leasable_s",
    "turnaround_s",
    "release_leasable_s",
    "on_lat_s",
    "read_lat_s",
    "concurrent_cps",
    "up_mbps",
    "down_mbps",
    "echo_lat_s",
    "idle_rss_kib",
    "idle_pss_kib",
    "cpu_ms_per_mib_up",
    "cpu_ms_per_mib_down",
]


def test_smoke_run_writes_table_json_and_chart(upstream_venv: Path, tmp_path: Path) -> None:
    if shutil.which("socat") is None:
        unmet("socat is not installed")
    out = tmp_path / "results"
    run = subprocess.run(
        [str(REPO / "benchmarks" / "run"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-6000:]

    result = json.loads((out / "latest.json").read_text())
    assert result["mode"] == "smoke"
    assert result["versions"]["upstream"] == "0.9.0"
    params = result["params"]
    for side in SIDES:
        samples = result["sides"][side]
        for key in PER_SIDE:
            assert samples.get(key), f"{side}: no {key}"
        # every latency sample was taken, and every transfer arrived intact
        assert len(samples["on_lat_s"]) == params["calls"] * params["rounds"]
        assert len(samples["echo_lat_s"]) == params["echo"] * params["rounds"]
        assert all(samples["up_crc_ok"]) and all(samples["down_crc_ok"])
        assert all(samples["echo_ok"])
        assert all(v > 0 for v in samples["start_leasable_s"] + samples["turnaround_s"])
    # upstream's jmp run is a supervisor plus its exporter; ours is one process
    assert result["sides"]["upstream"]["idle_procs"][0] == 2
    assert result["sides"]["ours"]["idle_procs"][0] == 1
    assert result["sides"]["ours"].get("start_ready_s"), "READY=1 never seen from ours"
    assert result["ceilings"]["pty_mbps"] and result["ceilings"]["grpc_mbps"]

    scale = result["scale"]
    assert scale["exporters"] == params["scale_exporters"]
    assert scale["registered"] == params["scale_exporters"]
    assert scale["calls_ok"] == params["scale_leases"] * params["scale_calls"]

    metrics = {row["metric"] for row in result["rows"]}
    assert {"start -> leasable", "DriverCall on() p99", "serial device->client"} <= metrics
    for row in result["rows"]:
        # a smoke run's CPU can be 0 ticks: no ratio then, rather than a division by zero
        if row["target"] and row["upstream"]:
            assert row["ratio"] == pytest.approx(row["ours"] / row["upstream"])

    table = (out / "latest.txt").read_text()
    assert table == run.stdout
    assert "| start -> leasable" in table and "upstream 0.9" in table
    assert (out / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
