"""The shipped units under a real, booted systemd: ../shared/tools/systemd-sandbox (Debian trixie,
systemd 257, podman 5.4 with Quadlet) in systemd-nspawn, sharing the host's network.

Two flavours run the same behaviour tests, each in its own sandbox:

- ``quadlet``: containers/*.container in /etc/containers/systemd, running the image built from
  ./Containerfile (the host's image store is visible inside the sandbox).
- ``plain``: systemd/*.service in /etc/systemd/system, running ``/opt/jumpstarter/bin/jmp``.
  The sandbox has python3 but not our package or its compiled dependencies, so it gets the
  repository's own venv: the repo and the venv's base interpreter are bind-mounted read-only
  at their host paths and /opt/jumpstarter links to ``REPO/.venv``. A drop-in adds
  ``BindReadOnlyPaths=`` for those two paths, because the unit's ``ProtectHome=tmpfs`` hides
  /root, where CI's interpreter lives; nothing else of the shipped unit is changed.

The exporters register with our controller on the host's 127.0.0.1, and leases are made and
released with upstream Jumpstarter 0.9's CLI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import SHARED_TOOLS
from tests.harness import (
    REPO,
    Controller,
    unmet,
    upstream_create_lease,
    upstream_delete_lease,
    upstream_env,
    wait_for,
)

pytestmark = [pytest.mark.system, pytest.mark.interop]

SANDBOX = SHARED_TOOLS / "systemd-sandbox"
EXPORT = {"power": {"type": "jumpstarter_driver_power.driver.MockPower"}}
EXPORTERS = "/etc/jumpstarter/exporters"
WAITING = "waiting for lease"
UNIT_DIRS = (REPO / "containers", REPO / "systemd")
# The drop-in the watchdog test adds: the shipped 30 s would make the test wait a minute.
TEST_WATCHDOG_SEC = 4


# --- sandbox plumbing ----------------------------------------------------------------------


class Box:
    """One booted sandbox and the commands run in it."""

    def __init__(self, name: str, flavour: str) -> None:
        self.name = name
        self.flavour = flavour

    def run(self, *cmd: str, input: str | None = None, timeout: float = 120):
        return subprocess.run(
            [str(SANDBOX), "exec", self.name, "--", *cmd],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def sx(self, *cmd: str, input: str | None = None, timeout: float = 120) -> str:
        out = self.run(*cmd, input=input, timeout=timeout)
        if out.returncode != 0:
            raise AssertionError(f"{cmd} -> {out.returncode}\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        """Write atomically (temp file + rename), as an admin or config tool should."""
        self.sx(
            "sh",
            "-c",
            f'mkdir -p "$(dirname {path})" && cat > {path}.tmp && chmod {mode} {path}.tmp '
            f"&& mv {path}.tmp {path}",
            input=text,
        )

    def props(self, unit: str) -> dict[str, str]:
        names = (
            "ActiveState",
            "SubState",
            "Result",
            "NRestarts",
            "StatusText",
            "MainPID",
            "ExecMainStatus",
        )
        out = self.sx("systemctl", "show", unit, *(f"-p{p}" for p in names))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-o", "short-precise").stdout

    def wait_props(self, unit: str, predicate, timeout: float, what: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            props = self.props(unit)
            if predicate(props):
                return props
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{unit}: {what} not reached in {timeout} s; last {props}\n"
                    + self.journal(unit)[-4000:]
                )
            time.sleep(0.3)


def start_box(name: str, flavour: str, binds: list[Path]) -> Box:
    if os.geteuid() != 0:
        unmet("needs root (systemd-sandbox)")
    if not SANDBOX.exists():
        unmet(f"{SANDBOX} is missing")
    prepared = subprocess.run(
        [str(SANDBOX), "prepare"], capture_output=True, text=True, timeout=900
    )
    if prepared.returncode != 0:
        unmet(f"systemd-sandbox prepare failed: {prepared.stderr[-2000:]}")
    subprocess.run([str(SANDBOX), "stop", name], capture_output=True, timeout=120)
    args = [f"--bind-ro={path}" for path in binds]
    started = subprocess.run(
        [str(SANDBOX), "start", name, "--", *args], capture_output=True, text=True, timeout=300
    )
    assert started.returncode == 0, started.stderr
    return Box(name, flavour)


def stop_box(box: Box) -> None:
    subprocess.run([str(SANDBOX), "stop", box.name], check=True, capture_output=True, timeout=120)


def interpreter_prefix() -> Path:
    """Where the venv's base interpreter lives (the plain flavour runs the repo's venv)."""
    prefix = Path(sys.base_prefix)
    if prefix == Path("/usr") or Path("/usr") in prefix.parents:
        unmet(f"the venv's interpreter is under {prefix}: it cannot be lent to the sandbox")
    return prefix


@pytest.fixture(scope="module")
def quadlet_box(exporter_image: str, udevd: None) -> Iterator[Box]:
    # udevd first: the sandbox binds the host's /run/udev only if it exists when it boots
    box = start_box("units-quadlet", "quadlet", [])
    try:
        for path in sorted((REPO / "containers").iterdir()):
            box.write(f"/etc/containers/systemd/{path.name}", path.read_text())
        box.sx("systemctl", "daemon-reload")
        yield box
    finally:
        stop_box(box)


@pytest.fixture(scope="module")
def plain_box() -> Iterator[Box]:
    prefix = interpreter_prefix()
    box = start_box("units-plain", "plain", [REPO, prefix])
    try:
        box.sx("ln", "-s", str(REPO / ".venv"), "/opt/jumpstarter")
        for unit in ("jumpstarter-exporter@.service", "jumpstarter-controller.service"):
            box.write(f"/etc/systemd/system/{unit}", (REPO / "systemd" / unit).read_text())
            box.write(
                f"/etc/systemd/system/{unit}.d/50-test-interpreter.conf",
                f"[Service]\nBindReadOnlyPaths={REPO} {prefix}\n",
            )
        box.sx("systemctl", "daemon-reload")
        yield box
    finally:
        stop_box(box)


@pytest.fixture(params=["quadlet", "plain"])
def box(request: pytest.FixtureRequest) -> Box:
    return request.getfixturevalue(f"{request.param}_box")


# --- controller, client and configs --------------------------------------------------------


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    base = tmp_path_factory.mktemp("units-controller")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JMP_", "JUMPSTARTER_"))}
    env["HOME"] = str(base / "home")
    env["JMP_CLIENT_CONFIG_HOME"] = str(base / "home" / "jumpstarter")
    controller = Controller(base / "state", env).start()
    try:
        yield controller
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def lessee(ctl: Controller, upstream_venv: Path, tmp_path_factory: pytest.TempPathFactory):
    """(client config, env) for upstream 0.9's ``jmp create/delete lease``."""
    base = tmp_path_factory.mktemp("units-client")
    client = base / "cl1.yaml"
    ctl.create_client("cl1", client, "--unsafe")
    return client, upstream_env(upstream_venv, ctl.env, base / "up-home")


def install_config(box: Box, ctl: Controller, alias: str, tmp_path: Path) -> None:
    """Create exporter ALIAS (label board=ALIAS) and put its config where the units read it."""
    local = ctl.create_exporter(alias, {"board": alias}, EXPORT, tmp_path / f"{alias}.yaml")
    box.write(f"{EXPORTERS}/{alias}.yaml", local.read_text(), mode="0600")


def exporter_row(ctl: Controller, alias: str) -> dict | None:
    out = ctl.jmp("controller", "get", "exporters", "-o", "json", "--state-dir", str(ctl.state_dir))
    return next((e for e in json.loads(out.stdout)["items"] if e["name"] == alias), None)


def enable_now(box: Box, alias: str) -> None:
    """The documented way to enable and start one exporter in each flavour."""
    unit = f"jumpstarter-exporter@{alias}.service"
    if box.flavour == "plain":
        box.sx("systemctl", "enable", "--now", unit, timeout=300)
        return
    # Quadlet units are generated: `systemctl enable` refuses them. An instance is enabled by
    # a link named after it, whose [Install] the generator turns into a wants link.
    box.sx(
        "ln",
        "-sf",
        "jumpstarter-exporter@.container",
        f"/etc/containers/systemd/jumpstarter-exporter@{alias}.container",
    )
    box.sx("systemctl", "daemon-reload")
    box.sx("systemctl", "start", unit, timeout=300)


def main_process(box: Box, alias: str) -> str:
    """PID (in the sandbox) of the exporter process itself: for Quadlet the unit's MainPID is
    conmon, so ask podman for the container's init process."""
    if box.flavour == "plain":
        return box.props(f"jumpstarter-exporter@{alias}.service")["MainPID"]
    return box.sx(
        "podman", "inspect", "--format", "{{.State.Pid}}", f"jumpstarter-exporter-{alias}"
    ).strip()


# --- static checks -------------------------------------------------------------------------


def unit_files() -> list[Path]:
    return sorted(p for d in UNIT_DIRS for p in d.iterdir() if p.is_file())


def test_no_comment_after_a_value() -> None:
    """systemd reads "Key=value  # note" as a value containing the note (upstream's example
    passed its comment to jmp as arguments): comments must sit on lines of their own."""
    files = unit_files()
    assert {p.suffix for p in files} >= {".container", ".volume", ".service", ".path"}
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "=" in line and not line.lstrip().startswith(("#", ";")):
                assert not re.search(r"\s[#;]", line.split("=", 1)[1]), f"{path}:{number}"


def test_quadlet_generator_dryrun_is_clean(quadlet_box: Box) -> None:
    out = quadlet_box.run("/usr/lib/systemd/system-generators/podman-system-generator", "--dryrun")
    assert out.returncode == 0, out.stderr
    noise = [
        line
        for line in out.stderr.splitlines()
        if line.strip() and "Loading source unit file" not in line
    ]
    assert noise == [], out.stderr
    for unit in (
        "jumpstarter-exporter@.service",
        "my-exporter.service",
        "jumpstarter-controller.service",
        "jumpstarter-controller-volume.service",
    ):
        assert f"---{unit}---" in out.stdout
    exporter = out.stdout.split("---jumpstarter-exporter@.service---", 1)[1].split("\n---", 1)[0]
    for expected in (
        "Type=notify",
        "--sdnotify=container",
        "--network host",
        "-v /run/udev:/run/udev:ro",
        "-v /dev:/dev",
        "-v /etc/jumpstarter:/etc/jumpstarter:ro",
        "RestartPreventExitStatus=78",
        "Restart=always",
        "WatchdogSec=",
        "run --exporter %i",
    ):
        assert expected in exporter, expected


@pytest.mark.parametrize(
    "unit",
    [
        "jumpstarter-exporter@.service",
        "my-exporter.service",
        "jumpstarter-controller.service",
        "jumpstarter-controller-volume.service",
    ],
)
def test_generated_unit_passes_systemd_analyze_verify(quadlet_box: Box, unit: str) -> None:
    """``verify`` exits 0 even for unknown keys and bad values, so any stderr is a failure."""
    out = quadlet_box.run("systemd-analyze", "verify", f"/run/systemd/generator/{unit}")
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


@pytest.mark.parametrize("path", sorted((REPO / "systemd").iterdir()), ids=lambda p: p.name)
def test_plain_unit_passes_systemd_analyze_verify(plain_box: Box, path: Path) -> None:
    target = f"/run/verify/{path.name}"
    plain_box.write(target, path.read_text())
    out = plain_box.run("systemd-analyze", "verify", target)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


# --- behaviour under systemd ---------------------------------------------------------------


def test_start_returns_after_ready_and_status_shows_state(
    box: Box, ctl: Controller, tmp_path: Path
) -> None:
    alias = f"{box.flavour}-ready"
    unit = f"jumpstarter-exporter@{alias}.service"
    install_config(box, ctl, alias, tmp_path)
    enable_now(box, alias)
    # Type=notify: the start job finished, so READY=1 has arrived, and READY is sent only after
    # registration: the controller must already know the exporter.
    props = box.props(unit)
    assert props["ActiveState"] == "active", props
    row = exporter_row(ctl, alias)
    assert row is not None and row["registered"], row
    assert props["StatusText"] == WAITING, props
    enabled = box.run("systemctl", "is-enabled", unit).stdout.strip()
    assert enabled == ("enabled" if box.flavour == "plain" else "generated"), enabled
    if box.flavour == "quadlet":
        wants = box.sx("ls", "/run/systemd/generator/multi-user.target.wants")
        assert unit in wants.split()
    box.sx("systemctl", "stop", unit)
    # a graceful stop unregisters
    wait_for(lambda: not exporter_row(ctl, alias)["registered"], 20, what="unregistered")


def test_lease_release_restarts_the_unit_ready_again(
    box: Box, ctl: Controller, lessee, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client, up = lessee
    alias = f"{box.flavour}-lease"
    unit = f"jumpstarter-exporter@{alias}.service"
    install_config(box, ctl, alias, tmp_path)
    box.sx("systemctl", "start", unit, timeout=300)
    first = box.props(unit)
    assert first["NRestarts"] == "0" and first["StatusText"] == WAITING, first
    lease = upstream_create_lease(client, up, f"board={alias}")
    box.wait_props(
        unit,
        lambda p: p["StatusText"] == f"leased by cl1 (lease {lease})",
        30,
        "StatusText naming the lease",
    )
    released = time.monotonic()
    upstream_delete_lease(client, up, lease)
    again = box.wait_props(
        unit,
        lambda p: (
            p["NRestarts"] == "1"
            and p["ActiveState"] == "active"
            and p["SubState"] == "running"
            and p["StatusText"] == WAITING
        ),
        60,
        "a restart that is READY again",
    )
    elapsed = time.monotonic() - released
    assert again["MainPID"] != first["MainPID"]
    journal = box.journal(unit)
    # exit 0 after the lease: systemd saw a clean exit, not a failure
    assert "Deactivated successfully" in journal, journal[-3000:]
    after_lease = journal.split("lease ended", 1)[1].split("Scheduled restart", 1)[0]
    assert not re.search(r"Main process exited, code=(killed|exited, status=[1-9])", after_lease)
    assert exporter_row(ctl, alias)["registered"]
    with capsys.disabled():
        print(f"\n{box.flavour}: lease released -> unit READY again in {elapsed:.1f} s")
    box.sx("systemctl", "stop", unit)


def test_config_error_leaves_the_unit_failed_without_restarts(box: Box, tmp_path: Path) -> None:
    alias = f"{box.flavour}-broken"
    unit = f"jumpstarter-exporter@{alias}.service"
    box.write(
        f"{EXPORTERS}/{alias}.yaml",
        yaml.safe_dump({"apiVersion": "jumpstarter.dev/v1alpha1", "endpoint": ["not", "a", "str"]}),
        mode="0600",
    )
    started = box.run("systemctl", "start", unit, timeout=300)
    assert started.returncode != 0
    props = box.props(unit)
    assert props["ActiveState"] == "failed" and props["ExecMainStatus"] == "78", props
    # Well past RestartSec=2: a crash loop would have restarted it by now.
    time.sleep(6)
    props = box.props(unit)
    assert props["ActiveState"] == "failed" and props["NRestarts"] == "0", props
    assert f"{EXPORTERS}/{alias}.yaml" in box.journal(unit)
    box.sx("systemctl", "reset-failed", unit)


def test_hung_exporter_is_killed_by_the_watchdog_and_restarted(
    box: Box, ctl: Controller, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alias = f"{box.flavour}-hung"
    unit = f"jumpstarter-exporter@{alias}.service"
    install_config(box, ctl, alias, tmp_path)
    box.write(
        f"/etc/systemd/system/{unit}.d/50-test-watchdog.conf",
        f"[Service]\nWatchdogSec={TEST_WATCHDOG_SEC}\n",
    )
    box.sx("systemctl", "daemon-reload")
    box.sx("systemctl", "start", unit, timeout=300)
    # Alive for longer than the watchdog period: the event loop's pings arrive.
    time.sleep(TEST_WATCHDOG_SEC + 2)
    props = box.props(unit)
    assert props["ActiveState"] == "active" and props["NRestarts"] == "0", props
    box.sx("kill", "-STOP", main_process(box, alias))
    hung = time.monotonic()
    box.wait_props(
        unit,
        lambda p: p["NRestarts"] == "1" and p["SubState"] == "running",
        90,
        "a watchdog restart",
    )
    elapsed = time.monotonic() - hung
    assert "Watchdog timeout" in box.journal(unit)
    assert box.props(unit)["StatusText"] == WAITING
    with capsys.disabled():
        print(f"\n{box.flavour}: SIGSTOP -> watchdog -> READY again in {elapsed:.1f} s")
    box.sx("systemctl", "stop", unit)


def test_controller_unit_keeps_its_state_and_serves_an_exporter_unit(box: Box) -> None:
    """The controller unit serves, and what admin commands create survives a restart (Quadlet:
    on the named volume; plain: in StateDirectory): an exporter config made before the
    restart (token, CA) registers with the restarted controller."""
    unit = "jumpstarter-controller.service"
    exporter = "jumpstarter-exporter@kept.service"
    if box.flavour == "quadlet":
        admin = ["podman", "exec", "jumpstarter-controller", "jmp", "controller"]
        state = []
    else:
        admin = ["/opt/jumpstarter/bin/jmp", "controller"]
        state = ["--state-dir", "/var/lib/jumpstarter-controller"]

    def listening() -> bool:
        return "8082" in box.run("ss", "-Hltn", "sport = :8082").stdout

    assert not listening(), "port 8082 is taken on this host"
    box.sx("systemctl", "start", unit, timeout=300)
    try:
        wait_for(listening, 60, interval=0.5, what="the controller on port 8082")
        made = box.sx(
            *admin, "create", "exporter", "kept", "--label", "board=kept",
            "--endpoint", "127.0.0.1:8082", *state,
        )  # fmt: skip
        config = yaml.safe_load(made)
        config["export"] = EXPORT
        box.write(f"{EXPORTERS}/kept.yaml", yaml.safe_dump(config), mode="0600")
        box.sx("systemctl", "restart", unit, timeout=300)
        wait_for(listening, 60, interval=0.5, what="the controller on port 8082 again")
        out = box.sx(*admin, "get", "exporters", "-o", "json", *state)
        assert [e["name"] for e in json.loads(out)["items"]] == ["kept"], out
        box.sx("systemctl", "start", exporter, timeout=300)
        props = box.props(exporter)
        assert props["ActiveState"] == "active" and props["StatusText"] == WAITING, props
        if box.flavour == "quadlet":
            box.sx("podman", "volume", "inspect", "jumpstarter-controller")
    finally:
        box.run("systemctl", "stop", exporter)
        box.sx("systemctl", "stop", unit)
        box.sx("rm", "-f", f"{EXPORTERS}/kept.yaml")


def test_documented_single_exporter_unit(quadlet_box: Box, ctl: Controller, tmp_path: Path):
    """containers/my-exporter.container, the documentation page's example, runs as shipped."""
    install_config(quadlet_box, ctl, "my-exporter", tmp_path)
    quadlet_box.sx("systemctl", "start", "my-exporter.service", timeout=300)
    try:
        props = quadlet_box.props("my-exporter.service")
        assert props["ActiveState"] == "active" and props["StatusText"] == WAITING, props
        assert exporter_row(ctl, "my-exporter")["registered"]
    finally:
        quadlet_box.sx("systemctl", "stop", "my-exporter.service")


def test_quadlet_exporter_resolves_a_device_through_the_host_udev(
    quadlet_box: Box, ctl: Controller, tmp_path: Path
) -> None:
    """The unit's /run/udev, /dev and host-network settings reach the container: a serial
    ``match:`` resolves to the host's /dev/ttyS0 through the host's udevd, and the monitor
    listens to udev (not raw kernel) events."""
    if not Path("/sys/class/tty/ttyS0").exists():
        unmet("no /dev/ttyS0 on this machine")
    alias = "quadlet-udev"
    unit = f"jumpstarter-exporter@{alias}.service"
    export = {
        "console": {
            "type": "jumpstarter_driver_pyserial.driver.PySerial",
            "config": {"match": {"SUBSYSTEM": "tty", "KERNEL": "ttyS0"}},
        }
    }
    local = ctl.create_exporter(alias, {"board": alias}, export, tmp_path / f"{alias}.yaml")
    quadlet_box.write(f"{EXPORTERS}/{alias}.yaml", local.read_text(), mode="0600")
    quadlet_box.sx("systemctl", "start", unit, timeout=300)
    try:
        props = quadlet_box.props(unit)
        assert props["ActiveState"] == "active" and props["StatusText"] == WAITING, props
        logged = {}
        for line in quadlet_box.sx("journalctl", "-u", unit, "-o", "cat").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            logged.setdefault(event.get("event"), event)
        assert "console: /dev/ttyS0" in logged["watching devices"]["devices"], logged
        assert logged["watching udev events"]["source"] == "udev", logged
    finally:
        quadlet_box.sx("systemctl", "stop", unit)


def test_every_config_gets_an_instance_and_new_files_are_picked_up(
    box: Box, ctl: Controller, tmp_path: Path
) -> None:
    """jumpstarter-exporters.service starts one instance per config (one command for the whole
    host) and jumpstarter-exporters.path reruns it when the directory changes."""
    for name in ("jumpstarter-exporters.service", "jumpstarter-exporters.path"):
        box.write(f"/etc/systemd/system/{name}", (REPO / "systemd" / name).read_text())
    box.sx("systemctl", "daemon-reload")
    # only this test's configs: earlier tests' files would start their instances too
    box.sx("sh", "-c", f"rm -f {EXPORTERS}/*.yaml")
    one, two, three = (f"{box.flavour}-many{i}" for i in (1, 2, 3))
    for alias in (one, two):
        install_config(box, ctl, alias, tmp_path)

    def running(alias: str) -> bool:
        p = box.props(f"jumpstarter-exporter@{alias}.service")
        return p["ActiveState"] == "active" and p["StatusText"] == WAITING

    def wait_or_show(predicate, timeout: float, interval: float, what: str) -> None:
        """wait_for, and on failure the units and the sync service's journal."""
        try:
            wait_for(predicate, timeout, interval, what)
        except AssertionError as exc:
            units = box.run("systemctl", "list-units", "--all", "jumpstarter-exporter*").stdout
            sync = box.journal("jumpstarter-exporters.*")
            raise AssertionError(f"{exc}\n{units}\n{sync}") from exc

    box.sx(
        "systemctl",
        "enable",
        "--now",
        "jumpstarter-exporters.service",
        "jumpstarter-exporters.path",
        timeout=300,
    )
    try:
        wait_or_show(lambda: running(one) and running(two), 60, 0.5, what="both instances")
        install_config(box, ctl, three, tmp_path)
        wait_or_show(lambda: running(three), 60, 0.5, what="an instance for the new file")
        box.sx("rm", f"{EXPORTERS}/{two}.yaml")
        wait_or_show(
            lambda: box.props(f"jumpstarter-exporter@{two}.service")["ActiveState"] == "inactive",
            60,
            0.5,
            what="the instance of the removed file to stop",
        )
        assert running(one) and running(three)
    finally:
        box.sx("systemctl", "disable", "--now", "jumpstarter-exporters.path")
        box.sx("sh", "-c", f"rm -f {EXPORTERS}/*.yaml")
        box.run("systemctl", "stop", "jumpstarter-exporter@*.service")
