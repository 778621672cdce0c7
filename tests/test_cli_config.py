"""``jmp config …`` through the real CLI process and the real filesystem."""

from __future__ import annotations

import json
import os
import pty
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import yaml

from jumpstarter_exporter.config import paths

CREATE_CLIENT = ["config", "client", "create"]
CLIENT_OPTS = ["--namespace", "lab", "--name", "me", "-e", "ctrl:443", "-t", "SECRET-TOKEN"]
EXPORTER_OPTS = [
    "--namespace",
    "lab",
    "--name",
    "ex",
    "--endpoint",
    "ctrl:443",
    "--token",
    "EXP-TOKEN",
]


def test_version_and_help(jmp) -> None:
    out = jmp("--version")
    assert out.returncode == 0
    assert out.stdout.startswith("jmp, version ")
    assert "config" in jmp("--help").stdout


def test_bad_log_level_is_a_usage_error(jmp) -> None:
    out = jmp("--log-level", "LOUD", "config", "client", "list")
    assert out.returncode == 2
    assert "--log-level" in out.stderr


def test_client_lifecycle(jmp, config_env) -> None:
    out = jmp(*CREATE_CLIENT, "one", *CLIENT_OPTS, "-a", "jumpstarter_driver_*,x.*", "-o", "path")
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path == paths.client_path("one")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = yaml.safe_load(path.read_text())
    assert data["drivers"]["allow"] == ["jumpstarter_driver_*", "x.*"]
    assert "leases" not in data  # defaults are not written (0.7.x clients reject the block)
    # the only client becomes the current one
    user = yaml.safe_load(paths.user_config_path().read_text())
    assert user["config"]["current-client"] == "one"

    assert jmp(*CREATE_CLIENT, "two", *CLIENT_OPTS).returncode == 0
    out = jmp("config", "client", "list")
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["CURRENT", "ALIAS", "ENDPOINT", "PATH"]
    assert lines[1].split()[:2] == ["*", "one"]
    assert lines[2].split()[0] == "two"
    assert "SECRET-TOKEN" not in out.stdout

    listing = json.loads(jmp("config", "client", "list", "-o", "json").stdout)
    assert listing["kind"] == "ClientConfigList"
    assert listing["currentConfig"] == "one"
    assert [i["alias"] for i in listing["items"]] == ["one", "two"]
    assert listing["items"][0]["token"] == "<redacted>"
    shown = json.loads(jmp("config", "client", "list", "-o", "json", "--show-secrets").stdout)
    assert shown["items"][0]["token"] == "SECRET-TOKEN"
    assert jmp("config", "client", "list", "-o", "name").stdout.split() == ["one", "two"]

    assert jmp("config", "client", "use", "two").returncode == 0
    assert yaml.safe_load(paths.user_config_path().read_text())["config"]["current-client"] == (
        "two"
    )
    # deleting the current client moves "current" to another existing one
    assert jmp("config", "client", "delete", "two").returncode == 0
    assert not paths.client_path("two").exists()
    assert yaml.safe_load(paths.user_config_path().read_text())["config"]["current-client"] == (
        "one"
    )
    assert jmp("config", "client", "delete", "one").returncode == 0
    assert jmp("config", "client", "list").stdout.strip() == "No resources found."


def test_client_errors(jmp) -> None:
    assert jmp(*CREATE_CLIENT, "dup", *CLIENT_OPTS).returncode == 0
    out = jmp(*CREATE_CLIENT, "dup", *CLIENT_OPTS)
    assert out.returncode == 1
    assert "A client with the name 'dup' already exists." in out.stderr
    out = jmp("config", "client", "use", "ghost")
    assert out.returncode == 1
    assert "File not found. Verify the path and retry." in out.stderr
    assert jmp("config", "client", "delete", "ghost").returncode == 1
    out = jmp(*CREATE_CLIENT, "../escape", *CLIENT_OPTS)
    assert out.returncode == 2
    assert "invalid client alias" in out.stderr


def test_missing_option_without_tty_is_an_error_not_a_hang(jmp) -> None:
    out = jmp(*CREATE_CLIENT, "x", "--namespace", "lab", "--name", "me", input="")
    assert out.returncode == 2
    assert "missing option --endpoint" in out.stderr
    out = jmp("config", "exporter", "create", "e", "--namespace", "lab", input="")
    assert out.returncode == 2
    assert "missing option --name" in out.stderr
    out = jmp(*CREATE_CLIENT, "x", *CLIENT_OPTS, "--insecure-tls", input="")
    assert out.returncode == 2
    assert "--nointeractive" in out.stderr


def _run_on_pty(args: list[str], env: dict[str, str], answers: list[tuple[str, str]]) -> str:
    """Drive the real CLI on a pseudo-terminal, answering each prompt as it appears."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 30
    try:
        for prompt, answer in answers:
            while prompt.encode() not in seen:
                assert time.monotonic() < deadline, f"no prompt {prompt!r}; got {seen!r}"
                ready, _, _ = select.select([leader], [], [], 1)
                if ready:
                    seen += os.read(leader, 4096)
            seen = seen.split(prompt.encode(), 1)[1]
            os.write(leader, answer.encode() + b"\r")
        assert proc.wait(timeout=30) == 0
        try:
            while select.select([leader], [], [], 0.2)[0]:
                seen += os.read(leader, 4096)
        except OSError:
            pass
        return seen.decode(errors="replace")
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()


def test_prompts_on_a_terminal(config_env) -> None:
    jmp_bin = str(Path(sys.executable).with_name("jmp"))
    out = _run_on_pty(
        [jmp_bin, "config", "exporter", "create", "tty"],
        config_env,
        [("Namespace:", "lab"), ("Name:", "ex"), ("Endpoint:", "c:1"), ("Token:", "hidden-tok")],
    )
    assert "hidden-tok" not in out  # the token prompt does not echo
    data = yaml.safe_load(paths.user_exporter_path("tty").read_text())
    assert data["metadata"] == {"namespace": "lab", "name": "ex"}
    assert data["token"] == "hidden-tok"


def test_insecure_confirm_declined_aborts(config_env) -> None:
    jmp_bin = str(Path(sys.executable).with_name("jmp"))
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [jmp_bin, *CREATE_CLIENT, "insec", *CLIENT_OPTS, "-a", "", "--insecure-tls"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=config_env,
    )
    os.close(follower)
    seen = b""
    try:
        while b"Continue?" not in seen:
            assert select.select([leader], [], [], 10)[0], seen
            seen += os.read(leader, 4096)
        os.write(leader, b"n\r")
        assert proc.wait(timeout=30) == 1
    finally:
        os.close(leader)
    assert not paths.client_path("insec").exists()


def test_exporter_lifecycle(jmp, config_env) -> None:
    out = jmp("config", "exporter", "create", "board", *EXPORTER_OPTS, "-o", "path")
    assert out.returncode == 0, out.stderr
    path = paths.user_exporter_path("board")
    assert Path(out.stdout.strip()) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = yaml.safe_load(path.read_text())
    assert list(data) == [
        "apiVersion",
        "kind",
        "metadata",
        "endpoint",
        "tls",
        "token",
        "grpcOptions",
        "description",
        "export",
        "hooks",
        "failureDetection",
    ]
    assert data["hooks"] == {"beforeLease": None, "afterLease": None}

    out = jmp("config", "exporter", "create", "board", *EXPORTER_OPTS)
    assert out.returncode == 1
    assert 'exporter "board" exists' in out.stderr

    system = paths.system_exporter_path("sysonly")
    system.write_text(path.read_text())
    out = jmp("config", "exporter", "list")
    rows = [line.split() for line in out.stdout.splitlines()]
    assert rows == [["ALIAS", "PATH"], ["board", str(path)], ["sysonly", str(system)]]
    listing = json.loads(jmp("config", "exporter", "list", "-o", "json").stdout)
    assert listing["kind"] == "ExporterConfigList"
    assert [i["alias"] for i in listing["items"]] == ["board", "sysonly"]
    assert listing["items"][0]["token"] == "<redacted>"
    assert "EXP-TOKEN" not in json.dumps(listing)

    out = jmp("config", "exporter", "delete", "sysonly")
    assert out.returncode == 1
    assert "exists only in the system location" in out.stderr
    assert system.exists()

    paths.system_exporter_path("board").write_text(path.read_text())
    out = jmp("config", "exporter", "delete", "board", "-o", "path")
    assert out.returncode == 0
    assert out.stdout.strip() == str(path)
    assert "still exists and will now be used" in out.stderr
    out = jmp("config", "exporter", "delete", "ghost")
    assert out.returncode == 1
    assert 'exporter "ghost" does not exist' in out.stderr
    assert jmp("config", "exporter", "create", "a/b", *EXPORTER_OPTS).returncode == 2


def test_exporter_list_empty(jmp) -> None:
    # Hidden files are in-flight temps and edit drafts, never configs.
    hidden = paths.user_exporter_path("x").with_name(".draft.yaml")
    hidden.parent.mkdir(parents=True)
    hidden.write_text("kind: ExporterConfig\n")
    out = jmp("config", "exporter", "list")
    assert (out.returncode, out.stdout.strip()) == (0, "No resources found.")


def test_check_reports_values_sources_and_exit_codes(jmp, config_env) -> None:
    assert jmp("config", "exporter", "create", "chk", *EXPORTER_OPTS).returncode == 0
    out = jmp("config", "exporter", "check", "chk", "-o", "json", env={"JMP_TOKEN": "ENV-TOK"})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    values = {v["key"]: v for v in report["values"]}
    assert values["token"]["value"] == "<redacted>"
    assert values["token"]["source"] == "environment JMP_TOKEN"
    assert values["endpoint"]["source"] == "line 6"
    assert "ENV-TOK" not in out.stdout and "EXP-TOKEN" not in out.stdout

    bad = paths.user_exporter_path("bad")
    bad.write_text(paths.user_exporter_path("chk").read_text() + "grpcConfig: {}\n")
    out = jmp("config", "exporter", "check", "bad")
    assert out.returncode == 78
    assert "grpcConfig: unknown key (did you mean 'grpcOptions'?)" in out.stderr
    assert "Traceback" not in out.stderr

    out = jmp("config", "exporter", "check", "--exporter-config", str(bad))
    assert out.returncode == 78
    assert jmp("config", "exporter", "check").returncode == 2
    assert jmp("config", "exporter", "check", "ghost").returncode == 1


def test_client_check_uses_environment_selection(jmp, config_env) -> None:
    assert jmp(*CREATE_CLIENT, "a", *CLIENT_OPTS).returncode == 0
    assert jmp(*CREATE_CLIENT, "b", *CLIENT_OPTS[:-4], "-e", "b:1", "-t", "x").returncode == 0
    out = jmp("config", "client", "check", "-o", "json", env={"JMP_CLIENT": "b"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["path"] == str(paths.client_path("b"))
    out = jmp("config", "client", "check", "-o", "json")
    assert json.loads(out.stdout)["path"] == str(paths.client_path("a"))


def _editor(tmp_path: Path, body: str) -> str:
    script = tmp_path / "editor.sh"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_edit_applies_valid_changes(jmp, config_env, tmp_path: Path) -> None:
    assert jmp("config", "exporter", "create", "ed", *EXPORTER_OPTS).returncode == 0
    editor = _editor(tmp_path, "sed -i 's/description: null/description: my board/' \"$1\"")
    out = jmp("config", "exporter", "edit", "ed", env={"EDITOR": editor, "VISUAL": editor})
    assert out.returncode == 0, out.stderr
    path = paths.user_exporter_path("ed")
    assert yaml.safe_load(path.read_text())["description"] == "my board"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["ed.yaml"]


def test_edit_never_installs_an_invalid_file(jmp, config_env, tmp_path: Path) -> None:
    assert jmp("config", "exporter", "create", "ed", *EXPORTER_OPTS).returncode == 0
    path = paths.user_exporter_path("ed")
    before = path.read_text()
    editor = _editor(tmp_path, "echo 'grpcConfig: {}' >> \"$1\"")
    out = jmp("config", "exporter", "edit", "ed", env={"EDITOR": editor, "VISUAL": editor})
    assert out.returncode == 78
    assert "edit not applied" in out.stderr
    assert path.read_text() == before
    rejected = path.with_name("ed.yaml.rejected")
    assert rejected.read_text() == before + "grpcConfig: {}\n"
    out = jmp("config", "exporter", "edit", "ghost", env={"EDITOR": editor})
    assert out.returncode == 1


def test_check_validates_driver_config(jmp, config_env) -> None:
    assert jmp("config", "exporter", "create", "drv", *EXPORTER_OPTS).returncode == 0
    path = paths.user_exporter_path("drv")
    text = path.read_text().replace(
        "export: {}",
        "export:\n  serial:\n    type: jumpstarter_driver_pyserial.driver.PySerial\n"
        "    config: {url: 'loop://', baudrate: fast}\n"
        "  power:\n    type: nowhere.Nothing",
    )
    path.write_text(text)
    out = jmp("config", "exporter", "check", "drv")
    assert out.returncode == 78
    assert "export.serial.config.baudrate" in out.stderr
    assert "export.power.type: unknown driver type 'nowhere.Nothing'" in out.stderr
