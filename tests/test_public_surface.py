"""The public surface that scripts and units depend on, pinned (httpx-style)."""

from __future__ import annotations

import click

import jumpstarter_exporter.config as config
import jumpstarter_exporter.errors as errors
from jumpstarter_exporter.cli.main import jmp


def test_exit_codes_are_an_api() -> None:
    assert {c.name: int(c) for c in errors.ExitCode} == {
        "OK": 0,
        "FAILURE": 1,
        "USAGE": 2,
        "UNAVAILABLE": 69,
        "SOFTWARE": 70,
        "HOOK_EXIT": 75,
        "NOPERM": 77,
        "CONFIG": 78,
    }
    assert errors.exit_code_for(errors.ConfigError("x")) == 78
    assert errors.exit_code_for(errors.AuthError("x")) == 77
    assert errors.exit_code_for(errors.ControllerUnavailable("x")) == 69
    assert errors.exit_code_for(errors.DeviceBusy("x")) == 70
    assert errors.exit_code_for(RuntimeError("bug")) == 70


def test_exception_tree() -> None:
    assert issubclass(errors.DeviceUnavailable, errors.DeviceError)
    assert issubclass(errors.DeviceBusy, errors.DeviceError)
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, errors.JumpstarterError)


def test_config_exports() -> None:
    assert sorted(config.__all__) == [
        "ClientConfig",
        "ExporterConfig",
        "Loaded",
        "UserConfig",
        "load_client",
        "load_exporter",
        "load_user",
    ]


def _commands(group: click.Group, prefix: str = "") -> set[str]:
    found = set()
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        found.add(f"{prefix}{name}")
        if isinstance(cmd, click.Group):
            found |= _commands(cmd, f"{prefix}{name} ")
    return found


def test_cli_commands() -> None:
    assert {
        "config",
        "config client",
        "config client create",
        "config client use",
        "config client list",
        "config client delete",
        "config client check",
        "config exporter",
        "config exporter create",
        "config exporter list",
        "config exporter delete",
        "config exporter edit",
        "config exporter check",
        "shell",
        "get",
        "create",
        "create lease",
        "delete",
        "delete lease",
        "delete leases",
    } <= _commands(jmp)


def test_client_api_surface() -> None:
    """What test scripts and the lab import (the README documents it)."""
    import inspect

    from jumpstarter_exporter import client

    assert {"lease", "connect", "ClientError", "Board"} <= set(client.__all__)
    assert list(inspect.signature(client.lease).parameters) == [
        "config",
        "selector",
        "duration",
        "timeout",
    ]
    for name in client.__all__:
        obj = getattr(client, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, client.ClientError)
            assert issubclass(obj, errors.JumpstarterError)


def test_upstream_flags_exist() -> None:
    ctx = click.Context(jmp)
    create = jmp.get_command(ctx, "config").commands["client"].commands["create"]
    flags = {opt for p in create.params for opt in p.opts}
    assert {
        "--out",
        "--namespace",
        "--name",
        "-e",
        "--endpoint",
        "-t",
        "--token",
        "-a",
        "--allow",
        "--unsafe",
        "-k",
        "--insecure-tls",
        "--nointeractive",
        "-o",
    } <= flags
    top = {opt for p in jmp.params for opt in p.opts}
    assert {"--log-level", "--log-format", "--version"} <= top
