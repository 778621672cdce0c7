"""beforeLease/afterLease hooks with our exporter, our controller and upstream's jmp shell."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.harness import (
    Controller,
    ExporterProcess,
    start_exporter,
    stop_process,
    upstream_env,
    wait_for,
)
from tests.test_exporter import EXPORT

pytestmark = pytest.mark.interop


def statuses(ctl: Controller) -> list[tuple[str, str]]:
    return [
        (e["status"], e.get("message", ""))
        for e in ctl.events()
        if e.get("event") == "exporter status"
    ]


@pytest.fixture
def lab(controller: Controller, tmp_path: Path, upstream_venv: Path):
    def make(hooks: dict) -> tuple[Path, Path, dict[str, str]]:
        config = controller.create_exporter("ex1", {"board": "b1"}, EXPORT, tmp_path / "ex1.yaml")
        data = yaml.safe_load(config.read_text())
        data["hooks"] = hooks
        config.write_text(yaml.safe_dump(data))
        client = tmp_path / "cl1.yaml"
        controller.create_client("cl1", client, "--unsafe")
        # upstream's `j` on PATH, for the hooks and the shell alike
        env = upstream_env(upstream_venv, controller.env, tmp_path / "up-home")
        return config, client, env

    return make


def background_shell(client: Path, env: dict[str, str]) -> subprocess.Popen:
    """An upstream shell whose fate we do not judge: after a failed beforeLease hook the
    upstream client keeps retrying (it cannot Dial, and leases again), so we stop it."""
    return subprocess.Popen(
        ["jmp", "shell", "--client-config", str(client), "--selector", "board=b1", "--", "true"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def shell(client: Path, env: dict[str, str], *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["jmp", "shell", "--client-config", str(client), "--selector", "board=b1", "--", *cmd],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def serve_one_lease(config: Path, client: Path, env: dict[str, str], log: Path) -> ExporterProcess:
    """Start the exporter, lease it through upstream's shell for one `j power on`, and see
    it exit 0 after the release (hooks run on the way)."""
    exp = start_exporter(config, env, log)
    try:
        wait_for(lambda: exp.has_event("ready"), 30, what="exporter ready")
        out = shell(client, env, "j", "power", "on")
        assert out.returncode == 0, out.stderr[-3000:] + exp.log()[-3000:]
        assert exp.wait(60) == 0
    finally:
        exp.stop()
    return exp


def test_hooks_run_around_the_lease_and_can_use_the_board(
    lab, controller: Controller, tmp_path: Path
) -> None:
    trace = tmp_path / "trace.txt"
    config, client, env = lab(
        {
            "beforeLease": {
                "script": f'echo "before $LEASE_NAME $CLIENT_NAME" >> {trace}\n'
                "j power on\necho powered on"
            },
            "afterLease": {"script": f"j power off && echo after >> {trace}"},
        }
    )
    exp = serve_one_lease(config, client, env, tmp_path / "exporter.log")
    lines = trace.read_text().splitlines()
    assert lines[0].startswith("before ") and lines[0].endswith(" cl1")
    assert lines[1] == "after"
    seen = [s for s, _ in statuses(controller)]
    rest = iter(seen[seen.index("BeforeLeaseHook") :])
    # each state follows the previous one (a subsequence of what the controller saw)
    assert all(state in rest for state in ["LeaseReady", "AfterLeaseHook", "Available"]), seen
    outputs = [e["line"] for e in exp.events() if e.get("event") == "hook output"]
    assert "powered on" in outputs


def test_before_lease_warning_still_serves(lab, controller: Controller, tmp_path: Path) -> None:
    config, client, env = lab({"beforeLease": {"script": "exit 3", "onFailure": "warn"}})
    serve_one_lease(config, client, env, tmp_path / "exporter.log")
    assert (
        "LeaseReady",
        "[HOOK_WARNING] beforeLease hook warning: Hook failed with exit code 3",
    ) in statuses(controller)


def test_before_lease_end_lease_releases_it(lab, controller: Controller, tmp_path: Path) -> None:
    config, client, env = lab({"beforeLease": {"script": "exit 1", "onFailure": "endLease"}})
    exp = start_exporter(config, env, tmp_path / "exporter.log")
    try:
        wait_for(lambda: exp.has_event("ready"), 30, what="exporter ready")
        client_proc = background_shell(client, env)
        try:
            assert exp.wait(60) == 0  # the lease ended: start fresh
        finally:
            stop_process(client_proc)
    finally:
        exp.stop()
    assert (
        "BeforeLeaseHookFailed",
        "beforeLease hook failed (on_failure=endLease): Hook failed with exit code 1",
    ) in statuses(controller)
    ended = [e for e in controller.events() if e.get("event") == "lease ended"]
    assert ended and ended[0]["reason"] == "Released"


def test_before_lease_exit_stops_with_75(lab, controller: Controller, tmp_path: Path) -> None:
    config, client, env = lab({"beforeLease": {"script": "exit 1", "onFailure": "exit"}})
    exp = start_exporter(config, env, tmp_path / "exporter.log")
    try:
        wait_for(lambda: exp.has_event("ready"), 30, what="exporter ready")
        client_proc = background_shell(client, env)
        try:
            assert exp.wait(60) == 75
        finally:
            stop_process(client_proc)
    finally:
        exp.stop()
    assert any(s == "BeforeLeaseHookFailed" for s, _ in statuses(controller))


def test_hook_timeout_kills_the_script(lab, controller: Controller, tmp_path: Path) -> None:
    pidfile = tmp_path / "hook.pid"
    config, client, env = lab(
        {"beforeLease": {"script": f"sleep 60 & echo $! > {pidfile}; wait", "timeout": 1}}
    )
    serve_one_lease(config, client, env, tmp_path / "exporter.log")
    assert (
        "LeaseReady",
        "[HOOK_WARNING] beforeLease hook warning: Hook timed out after 1 seconds",
    ) in statuses(controller)
    sleeper = int(pidfile.read_text())
    wait_for(lambda: not _alive(sleeper), 10, what="the hook's child to be killed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"
