"""Shared fixtures: the upstream 0.9 interop venv, an isolated config home per test, and the
host's real systemd-udevd (one per test session, shared by every module that needs it)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import build_upstream_venv, podman_base_image, unmet

REPO = Path(__file__).resolve().parent.parent
HOST_UDEVD = REPO.parent / "shared" / "tools" / "host-udevd"


@pytest.fixture(scope="session")
def udevd() -> Iterator[None]:
    """A real systemd-udevd via host-udevd, for the whole test session.

    Session-scoped so that no module stops it while another still uses it; stopped at the
    end of the session only if it was not running before.
    """
    if os.geteuid() != 0:
        unmet("needs root (udevd)")
    if not HOST_UDEVD.exists():
        unmet(f"{HOST_UDEVD} is missing")
    status = subprocess.run([str(HOST_UDEVD), "status"], capture_output=True, timeout=30)
    was_running = status.returncode == 0
    subprocess.run([str(HOST_UDEVD), "start"], check=True, capture_output=True, timeout=300)
    try:
        yield
    finally:
        if not was_running:
            subprocess.run([str(HOST_UDEVD), "stop"], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def upstream_venv() -> Path:
    """The venv with upstream Jumpstarter 0.9.0 (built once by scripts/upstream-venv).

    Never skipped: if it cannot be built the interop tests fail, which is what CI wants.
    """
    venv = build_upstream_venv()
    assert (venv / "bin" / "jmp").exists(), f"no upstream jmp in {venv}"
    return venv


@pytest.fixture
def config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment whose config home and system exporter dir are private to the test.

    Every JMP_*/JUMPSTARTER_* variable of the caller is dropped so the developer's own
    configuration can never leak into a test.
    """
    for key in list(os.environ):
        if key.startswith(("JMP_", "JUMPSTARTER_")):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    system = tmp_path / "etc-exporters"
    system.mkdir()
    env = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "JMP_CLIENT_CONFIG_HOME": str(home / ".config" / "jumpstarter"),
        "JMP_SYSTEM_EXPORTER_DIR": str(system),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **env}


JMP = REPO / ".venv" / "bin" / "jmp"


@pytest.fixture
def jmp(config_env: dict[str, str]):
    """Run our real ``jmp`` as a subprocess in the private config environment."""

    def run(
        *args: str, env: dict[str, str] | None = None, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(JMP), *args],
            env={**config_env, **(env or {})},
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


@pytest.fixture
def controller(tmp_path: Path, config_env: dict[str, str]):
    """Our real controller on 127.0.0.1 (random port), stopped when the test ends."""
    from tests.harness import Controller

    ctl = Controller(tmp_path / "controller-state", config_env).start()
    try:
        yield ctl
    finally:
        ctl.stop()


# --- container image (issue 7: tests/test_image.py, tests/test_units.py) -------------------

SHARED_TOOLS = REPO.parent / "shared" / "tools"
EXPORTER_IMAGE = "localhost/jumpstarter-exporter:latest"


@pytest.fixture(scope="session")
def exporter_image() -> str:
    """The project image built from ./Containerfile on the registry-free local base image.

    Tagged ``:latest`` because that is the tag the shipped Quadlet units run. Rebuilt once per
    session; podman's layer cache makes an unchanged tree take about a second.
    """
    base = podman_base_image()
    build = subprocess.run(
        [
            "podman",
            "build",
            "--build-arg",
            f"BASE_IMAGE={base}",
            "-t",
            EXPORTER_IMAGE,
            "-f",
            str(REPO / "Containerfile"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    # Each changed tree leaves the previous image and build stage untagged (~250 MB each);
    # remove only those (dangling and carrying our labels), so repeated runs do not fill a disk.
    for label in (
        "org.opencontainers.image.title=jumpstarter-exporter",
        "jumpstarter-exporter.stage",
    ):
        subprocess.run(
            ["podman", "image", "prune", "-f", "--filter", f"label={label}"],
            capture_output=True,
            timeout=120,
        )
    return EXPORTER_IMAGE
