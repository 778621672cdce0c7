"""The container image (./Containerfile) run by testcontainers through podman's Docker API.

The container is our real exporter on the host network, talking to our real controller on
127.0.0.1, leased and released by upstream Jumpstarter 0.9's CLI. DOCKER_HOST comes from
``../shared/tools/podman-api start`` (.ci/run sets it; the fixture starts it if unset).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import SHARED_TOOLS
from tests.harness import (
    Controller,
    unmet,
    upstream_create_lease,
    upstream_delete_lease,
    upstream_env,
    wait_for,
)

pytestmark = pytest.mark.system

EXPORT = {"power": {"type": "jumpstarter_driver_power.driver.MockPower"}}
IMAGE_UID = 10001  # the image's unprivileged user (Containerfile)


@pytest.fixture(scope="module")
def docker_host(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[str]:
    """Point testcontainers at podman's API socket; Ryuk is off (its image needs a registry).

    .ci/run starts the API and sets DOCKER_HOST; otherwise this starts it and stops it again
    (if it was not already running)."""
    monkeypatch_module.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
    if os.environ.get("DOCKER_HOST"):
        yield os.environ["DOCKER_HOST"]
        return
    tool = SHARED_TOOLS / "podman-api"
    if not tool.exists():
        unmet(f"{tool} is missing and DOCKER_HOST is not set")
    running = subprocess.run([str(tool), "status"], capture_output=True, timeout=60)
    out = subprocess.run([str(tool), "start"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        unmet(f"podman-api start failed: {out.stderr}")
    monkeypatch_module.setenv("DOCKER_HOST", out.stdout.strip().splitlines()[-1])
    try:
        yield os.environ["DOCKER_HOST"]
    finally:
        if running.returncode != 0:
            subprocess.run([str(tool), "stop"], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def inspect(image: str) -> dict:
    out = subprocess.run(
        ["podman", "image", "inspect", image], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)[0]


def exporter_dir(ctl: Controller, tmp_path: Path, name: str) -> Path:
    """A directory to mount as /etc/jumpstarter/exporters holding NAME.yaml, readable by the
    image's unprivileged user (the config holds a token, so only that uid may read it)."""
    directory = tmp_path / "exporters"
    directory.mkdir(exist_ok=True)
    config = ctl.create_exporter(name, {"board": name}, EXPORT, directory / f"{name}.yaml")
    os.chown(config, IMAGE_UID, IMAGE_UID)
    return directory


def container(image: str, directory: Path, alias: str):
    from testcontainers.core.container import DockerContainer

    return (
        DockerContainer(image)
        .with_command(f"--log-format json run --exporter {alias}")
        .with_kwargs(network_mode="host")
        .with_volume_mapping(str(directory), "/etc/jumpstarter/exporters", "ro")
    )


def logs(c) -> str:
    out, err = c.get_logs()
    return (out or b"").decode() + (err or b"").decode()


def events(c) -> list[str]:
    found = []
    for line in logs(c).splitlines():
        try:
            found.append(json.loads(line).get("event"))
        except ValueError:
            continue
    return found


def test_image_metadata(exporter_image: str, capsys: pytest.CaptureFixture[str]) -> None:
    info = inspect(exporter_image)
    config = info["Config"]
    assert config["Entrypoint"] == ["/jumpstarter/bin/jmp"]
    assert config["User"] == "jumpstarter"
    labels = config.get("Labels") or {}
    for key in ("title", "description", "version", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    ran = subprocess.run(
        ["podman", "run", "--rm", "--entrypoint", "id", exporter_image, "-u"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.stdout.strip() == str(IMAGE_UID), ran.stderr
    with capsys.disabled():
        print(f"\nimage {exporter_image}: {info['Size'] / 1e6:.0f} MB")


def test_container_registers_serves_a_lease_and_exits_0(
    exporter_image: str,
    docker_host: str,
    controller: Controller,
    upstream_venv: Path,
    tmp_path: Path,
) -> None:
    directory = exporter_dir(controller, tmp_path, "img1")
    c = container(exporter_image, directory, "img1")
    with c:
        wait_for(lambda: "ready" in events(c), 60, what="the exporter in the container: ready")
        assert "registered" in events(c)
        up = upstream_env(upstream_venv, controller.env, tmp_path / "up-home")
        client = tmp_path / "cl1.yaml"
        controller.create_client("cl1", client, "--unsafe")
        lease = upstream_create_lease(client, up, "board=img1")
        wait_for(lambda: "lease started" in events(c), 30, what="the lease to reach the container")
        upstream_delete_lease(client, up, lease)
        result = c.get_wrapped_container().wait(timeout=60)
        assert result["StatusCode"] == 0, logs(c)[-3000:]
        assert "lease ended" in events(c)


def test_container_with_a_broken_config_exits_78(
    exporter_image: str, docker_host: str, tmp_path: Path
) -> None:
    directory = tmp_path / "exporters"
    directory.mkdir()
    bad = directory / "bad.yaml"
    bad.write_text(yaml.safe_dump({"apiVersion": "jumpstarter.dev/v1alpha1", "endpoint": 5}))
    os.chown(bad, IMAGE_UID, IMAGE_UID)
    c = container(exporter_image, directory, "bad")
    with c:
        result = c.get_wrapped_container().wait(timeout=60)
        assert result["StatusCode"] == 78, logs(c)[-3000:]
        assert "/etc/jumpstarter/exporters/bad.yaml" in logs(c)
