"""Start-up and exit of the ``jmp`` process: the collector pause and the fast exit.

The exporter restarts after every lease, so ``cli.entry`` pauses the cyclic collector for
start-up and ``jmp run`` ends without the interpreter's finalization. These tests pin that the
pause never outlives start-up and that the fast exit loses neither the exit code nor the last
log lines.
"""

from __future__ import annotations

import gc
import json
import signal
import subprocess
from pathlib import Path

from click.testing import CliRunner

from jumpstarter_exporter.cli.main import jmp
from jumpstarter_exporter.exporter.daemon import resume_gc
from tests.harness import JMP, stop_process, wait_for


def test_resume_gc_turns_the_collector_back_on_and_freezes_start_up() -> None:
    gc.disable()
    try:
        resume_gc()
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.enable()


def test_resume_gc_leaves_a_running_collector_alone() -> None:
    assert gc.isenabled()
    resume_gc()
    assert gc.get_freeze_count() == 0


def test_every_command_but_run_turns_the_collector_back_on(tmp_path: Path) -> None:
    env = {"JMP_CLIENT_CONFIG_HOME": str(tmp_path), "JMP_SYSTEM_EXPORTER_DIR": str(tmp_path)}
    gc.disable()  # as cli.entry leaves it
    try:
        result = CliRunner().invoke(jmp, ["config", "exporter", "list"], env=env)
        assert result.exit_code == 0, result.output
        assert gc.isenabled()
    finally:
        gc.enable()


def test_jmp_run_exits_fast_with_its_code_and_last_log_lines(tmp_path: Path) -> None:
    """SIGTERM while the controller is unreachable: ``Exporter.run`` returns 0, so the
    process ends through the fast exit; the code and every log line up to the last must
    still arrive (nothing left in a buffer)."""
    config = tmp_path / "e.yaml"
    config.write_text(
        "apiVersion: jumpstarter.dev/v1alpha1\nkind: ExporterConfig\n"
        "metadata: {namespace: lab, name: e}\nendpoint: 127.0.0.1:1\ntoken: t\n"
        "export:\n  power: {type: jumpstarter_driver_power.driver.MockPower}\n"
    )
    log_path = tmp_path / "exporter.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(JMP), "--log-format", "json", "run", "--exporter-config", str(config)],
            stdout=log,
            stderr=log,
            env={"PATH": "/usr/bin:/bin", "JMP_CLIENT_CONFIG_HOME": str(tmp_path)},
        )
    try:
        wait_for(lambda: "controller unreachable" in log_path.read_text(), 30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop_process(proc)
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert events[-1]["event"] == "stopping" and events[-1]["reason"] == "SIGTERM", events[-1]
