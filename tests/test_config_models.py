"""Config models and loading: precedence, provenance, and clear errors for bad input."""

from __future__ import annotations

import base64
import os
import stat
import textwrap
from pathlib import Path

import pytest

from jumpstarter_exporter.config import paths
from jumpstarter_exporter.config.load import load_client, load_exporter
from jumpstarter_exporter.config.models import (
    ClientConfig,
    CompositeEntry,
    DriverEntry,
    ExporterConfig,
    RefEntry,
)
from jumpstarter_exporter.config.yamlio import atomic_write
from jumpstarter_exporter.errors import ConfigError, ExitCode, NotFoundError

EXPORTER = """\
apiVersion: jumpstarter.dev/v1alpha1
kind: ExporterConfig
metadata:
  namespace: lab
  name: board-1
endpoint: file.example:443
token: file-token
export:
  power:
    type: jumpstarter_driver_power.driver.MockPower
    methods_description:
      on: switch the board on
      off: switch it off
  serial:
    type: jumpstarter_driver_pyserial.driver.PySerial
    config:
      url: loop://
  group:
    children:
      inner:
        type: jumpstarter_driver_power.driver.MockPower
  alias:
    ref: group.inner
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_documented_example_loads_with_all_forms(tmp_path: Path) -> None:
    cfg = load_exporter(path=write(tmp_path / "e.yaml", EXPORTER), environ={}).config
    assert isinstance(cfg.export["power"], DriverEntry)
    # YAML 1.1 would make `on:` the boolean True and upstream would drop the driver.
    assert cfg.export["power"].methods_description == {
        "on": "switch the board on",
        "off": "switch it off",
    }
    assert cfg.export["serial"].config == {"url": "loop://"}
    assert isinstance(cfg.export["group"], CompositeEntry)
    assert isinstance(cfg.export["alias"], RefEntry)
    assert cfg.exits_after_lease is True


def test_exit_on_lease_end_false_is_kept(tmp_path: Path) -> None:
    text = EXPORTER + "exitOnLeaseEnd: false\n"
    cfg = load_exporter(path=write(tmp_path / "e.yaml", text), environ={}).config
    assert cfg.exits_after_lease is False
    assert cfg.to_file()["exitOnLeaseEnd"] is False


@pytest.mark.parametrize(
    ("var", "key", "value"),
    [
        ("JMP_ENDPOINT", "endpoint", "env.example:8082"),
        ("JMP_TOKEN", "token", "env-token"),
        ("JMP_NAMESPACE", "namespace", "env-ns"),
        ("JMP_NAME", "name", "env-name"),
    ],
)
def test_environment_overrides_exporter_file(tmp_path: Path, var: str, key: str, value: str):
    path = write(tmp_path / "e.yaml", EXPORTER)
    loaded = load_exporter(path=path, environ={var: value})
    cfg = loaded.config
    actual = getattr(cfg.metadata, key) if key in ("namespace", "name") else getattr(cfg, key)
    assert actual == value
    origins = {k: src for k, _v, src in loaded.explain()}
    dotted = f"metadata.{key}" if key in ("namespace", "name") else key
    assert origins[dotted] == f"environment {var}"


@pytest.mark.parametrize("var", ["JUMPSTARTER_GRPC_INSECURE", "JMP_GRPC_INSECURE"])
def test_insecure_env_turns_on_insecure_tls(tmp_path: Path, var: str) -> None:
    path = write(tmp_path / "e.yaml", EXPORTER)
    assert load_exporter(path=path, environ={}).config.tls.insecure is False
    assert load_exporter(path=path, environ={var: "1"}).config.tls.insecure is True
    # 0 leaves the file's value alone rather than forcing verification on.
    assert load_exporter(path=path, environ={var: "0"}).config.tls.insecure is False


def test_bad_insecure_env_value_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path / "e.yaml", EXPORTER)
    with pytest.raises(ConfigError, match="JUMPSTARTER_GRPC_INSECURE='maybe'"):
        load_exporter(path=path, environ={"JUMPSTARTER_GRPC_INSECURE": "maybe"})


def test_flags_override_environment_and_file(tmp_path: Path) -> None:
    path = write(tmp_path / "e.yaml", EXPORTER + "exitOnLeaseEnd: false\n")
    loaded = load_exporter(
        path=path,
        overrides={"exitOnLeaseEnd": True, "endpoint": "flag:1"},
        environ={"JMP_ENDPOINT": "env:1"},
    )
    assert loaded.config.endpoint == "flag:1"
    assert loaded.config.exit_on_lease_end is True
    origins = {k: src for k, _v, src in loaded.explain()}
    assert origins["endpoint"] == "command line"
    assert origins["metadata.name"] == "line 5"
    assert origins["motd"] == "default"


def test_user_dir_shadows_system_dir(config_env: dict[str, str]) -> None:
    system = write(paths.system_exporter_path("b"), EXPORTER)
    assert load_exporter(alias="b").path == system
    user = write(paths.user_exporter_path("b"), EXPORTER.replace("board-1", "board-user"))
    loaded = load_exporter(alias="b")
    assert loaded.path == user
    assert loaded.config.metadata.name == "board-user"


def test_missing_alias_names_the_user_path(config_env: dict[str, str]) -> None:
    with pytest.raises(NotFoundError, match='exporter "nope" does not exist'):
        load_exporter(alias="nope")


def test_client_drivers_allow_env(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        """\
        apiVersion: jumpstarter.dev/v1alpha1
        kind: ClientConfig
        metadata: {namespace: lab, name: me}
        endpoint: h:1
        token: t
        drivers: {allow: ["a.*"], unsafe: false}
        """,
    )
    cfg = load_client(path=path, environ={"JMP_DRIVERS_ALLOW": "x.*, y.*"}).config
    assert cfg.drivers.allow == ["x.*", "y.*"]
    assert cfg.drivers.unsafe is False
    cfg = load_client(path=path, environ={"JMP_DRIVERS_ALLOW": "UNSAFE"}).config
    assert cfg.drivers.unsafe is True


def _client_file(alias: str, endpoint: str) -> Path:
    return write(
        paths.client_path(alias),
        f"""\
        apiVersion: jumpstarter.dev/v1alpha1
        kind: ClientConfig
        metadata: {{namespace: lab, name: {alias}}}
        endpoint: {endpoint}
        token: t
        """,
    )


def test_client_selection_order(config_env: dict[str, str]) -> None:
    a = _client_file("a", "a:1")
    b = _client_file("b", "b:1")
    write(paths.user_config_path(), "config: {current-client: a}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JMP_NAME")}
    assert load_client(environ=env).path == a
    assert load_client(environ={**env, "JMP_CLIENT": "b"}).path == b
    assert load_client(environ={**env, "JMP_CLIENT": "a", "JMP_CLIENT_CONFIG": str(b)}).path == b
    assert load_client(alias="a", environ={**env, "JMP_CLIENT": "b"}).path == a
    only_env = {**env, "JMP_NAME": "e", "JMP_NAMESPACE": "lab", "JMP_ENDPOINT": "env:1"}
    loaded = load_client(environ=only_env)
    assert loaded.path is None
    assert loaded.config.endpoint == "env:1"


def test_no_client_selected_is_a_clear_error(config_env: dict[str, str]) -> None:
    with pytest.raises(NotFoundError, match="no client config selected"):
        load_client()


def problems_of(tmp_path: Path, text: str, name: str = "bad.yaml") -> ConfigError:
    path = write(tmp_path / name, text)
    with pytest.raises(ConfigError) as info:
        load_exporter(path=path, environ={})
    assert info.value.exit_code == ExitCode.CONFIG
    assert str(path) in str(info.value)
    return info.value


def test_unknown_key_gets_a_hint_and_line(tmp_path: Path) -> None:
    err = problems_of(tmp_path, EXPORTER + "grpcConfig: {}\n")
    assert "grpcConfig: unknown key (did you mean 'grpcOptions'?)" in str(err)
    assert "[line 24]" in str(err)


def test_unknown_key_inside_a_driver_entry(tmp_path: Path) -> None:
    text = EXPORTER.replace("    config:\n      url: loop://", "    confg:\n      url: loop://")
    err = problems_of(tmp_path, text)
    assert "export.serial.confg: unknown key (did you mean 'config'?)" in str(err)


def test_driver_entry_fitting_no_form(tmp_path: Path) -> None:
    text = EXPORTER.replace("type: jumpstarter_driver_pyserial", "typ: jumpstarter_driver_pyserial")
    err = problems_of(tmp_path, text)
    assert "export.serial: a driver entry needs `type:`" in str(err)
    assert "[line 14]" in str(err)


def test_wrong_type_names_key_path(tmp_path: Path) -> None:
    err = problems_of(tmp_path, EXPORTER + "failureDetection: {maxRapidFailures: many}\n")
    assert "failureDetection.maxRapidFailures: Input should be a valid integer" in str(err)


def test_dangling_ref(tmp_path: Path) -> None:
    err = problems_of(tmp_path, EXPORTER.replace("ref: group.inner", "ref: group.nothing"))
    assert "ref 'group.nothing' names no entry" in str(err)


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    err = problems_of(tmp_path, "apiVersion: x\nmetadata: [unclosed\n")
    assert "invalid YAML: line" in str(err)


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    err = problems_of(tmp_path, EXPORTER + "token: second\n")
    assert "duplicate key 'token' at line 24" in str(err)


def test_bad_base64_ca(tmp_path: Path) -> None:
    err = problems_of(tmp_path, EXPORTER + "tls: {ca: 'not base64!'}\n")
    assert "tls.ca: must be base64 of a PEM CA bundle" in str(err)
    not_pem = base64.b64encode(b"hello").decode()
    err = problems_of(tmp_path, EXPORTER + f"tls: {{ca: '{not_pem}'}}\n", "b.yaml")
    assert "holds no PEM certificate" in str(err)


def test_missing_required_and_wrong_kind(tmp_path: Path) -> None:
    err = problems_of(tmp_path, "apiVersion: jumpstarter.dev/v1alpha1\nkind: ClientConfig\n")
    assert "kind: Input should be 'ExporterConfig'" in str(err)
    assert "metadata: required key is missing" in str(err)


def test_empty_and_non_mapping_files(tmp_path: Path) -> None:
    assert "file is empty" in str(problems_of(tmp_path, ""))
    assert "expected a mapping" in str(problems_of(tmp_path, "- a\n- b\n", "l.yaml"))


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "dir.yaml"
    path.mkdir()
    with pytest.raises(ConfigError, match="cannot read file"):
        load_exporter(path=path, environ={})


def test_secrets_never_in_errors(tmp_path: Path) -> None:
    text = EXPORTER.replace("token: file-token", "token: [s3cr3t-value]")
    err = problems_of(tmp_path, text)
    assert "token" in str(err)
    assert "s3cr3t-value" not in str(err)


def test_secrets_redacted_in_explain(tmp_path: Path) -> None:
    loaded = load_exporter(path=write(tmp_path / "e.yaml", EXPORTER), environ={})
    values = {k: v for k, v, _ in loaded.explain()}
    assert values["token"] == "<redacted>"
    assert {k: v for k, v, _ in loaded.explain(show_secrets=True)}["token"] == "file-token"


@pytest.mark.parametrize("alias", ["", ".", "..", "a/b", "a\\b"])
def test_aliases_that_escape_the_directory_are_refused(alias: str) -> None:
    with pytest.raises(ConfigError, match="invalid exporter alias"):
        paths.user_exporter_path(alias)
    with pytest.raises(ConfigError, match="invalid client alias"):
        paths.client_path(alias)


def test_atomic_write_is_0600_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "c.yaml"
    atomic_write(target, "a: 1\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_text() == "a: 1\n"
    assert [p.name for p in target.parent.iterdir()] == ["c.yaml"]


def test_interrupted_atomic_write_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "c.yaml"
    atomic_write(target, "old: 1\n")

    def boom(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, "new: 2\n")
    assert target.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]


def test_written_exporter_round_trips(tmp_path: Path) -> None:
    cfg = load_exporter(path=write(tmp_path / "e.yaml", EXPORTER), environ={}).config
    from jumpstarter_exporter.config.store import save_exporter

    out = save_exporter(cfg, tmp_path / "out.yaml")
    again = load_exporter(path=out, environ={}).config
    assert again == cfg
    text = out.read_text()
    assert "motd" not in text and "exitOnLeaseEnd" not in text
    assert list(cfg.to_file())[:4] == ["apiVersion", "kind", "metadata", "endpoint"]


def test_models_built_directly_ignore_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("JMP_TOKEN", "from-env")
    cfg = ClientConfig(metadata={"namespace": "n", "name": "c"})
    assert cfg.token is None
    assert ExporterConfig(metadata={"name": "e"}).token is None


@pytest.mark.parametrize(
    ("var", "attr"),
    [("JMP_ENDPOINT", "endpoint"), ("JMP_TOKEN", "token"), ("JMP_NAME", "name")],
)
def test_environment_overrides_client_file(config_env, var: str, attr: str) -> None:
    path = _client_file("c", "file:1")
    loaded = load_client(alias="c", environ={**os.environ, var: "from-env"})
    cfg = loaded.config
    assert (cfg.metadata.name if attr == "name" else getattr(cfg, attr)) == "from-env"
    assert loaded.path == path


def test_pdu_secrets_are_redacted(tmp_path: Path) -> None:
    text = EXPORTER + textwrap.dedent(
        """\
        description: pdu
        """
    )
    text = text.replace(
        "  serial:\n",
        "  pdu:\n    type: jumpstarter_driver_power.driver.PduPower\n"
        "    config: {host: h, community: c0mm, write_community: wr1te, username: u,\n"
        "             password: pa55word, priv_password: pr1vpass}\n"
        "  up:\n    type: jumpstarter_driver_snmp.driver.SNMPServer\n"
        "    config: {host: h, user: u, plug: 1, auth_key: aut4key, priv_key: pr1vkey}\n"
        "  serial:\n",
    )
    loaded = load_exporter(path=write(tmp_path / "e.yaml", text), environ={})
    shown = " ".join(str(v) for _k, v, _s in loaded.explain())
    for secret in ("c0mm", "wr1te", "pa55word", "pr1vpass", "aut4key", "pr1vkey"):
        assert secret not in shown
