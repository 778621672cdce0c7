"""`jmp config ...` files are interchangeable with upstream Jumpstarter 0.9.0, both ways.

Every test runs the real CLIs (ours from this venv, upstream's from the ``upstream_venv``
fixture) as subprocesses on a private config home (``config_env``) and compares the values
each side sees. Upstream's ``jmp`` takes about a second to start, so each test creates its
configs first and then asserts everything about them with as few listings as possible.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.interop

OUR_JMP = Path(sys.executable).with_name("jmp")


# --- running the two CLIs -------------------------------------------------------------------


def _run(cmd: list[str], env: dict[str, str], what: str) -> str:
    proc = subprocess.run(
        cmd, env=env, input="", capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, (
        f"{what} {' '.join(cmd[1:])} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc.stdout


def _run_parallel(cmds: list[list[str]], env: dict[str, str], what: str) -> list[str]:
    """Independent commands at once (upstream's jmp takes ~1 s to start)."""
    procs = [
        subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cmd in cmds
    ]
    outs = []
    for cmd, proc in zip(cmds, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, (
            f"{what} {' '.join(cmd[1:])} exited {proc.returncode}\n"
            f"stdout:\n{stdout}\nstderr:\n{stderr}"
        )
        outs.append(stdout)
    return outs


def ours(env: dict[str, str], *args: str) -> str:
    return _run([str(OUR_JMP), *args], env, "our jmp")


def ours_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(ours(env, *args, "-o", "json"))


def upstream(venv: Path, env: dict[str, str], *args: str) -> str:
    return _run([str(venv / "bin" / "jmp"), *args], env, "upstream jmp")


def upstream_parallel(venv: Path, env: dict[str, str], *arglists: list[str]) -> list[str]:
    jmp = str(venv / "bin" / "jmp")
    return _run_parallel([[jmp, *args] for args in arglists], env, "upstream jmp")


def upstream_json(venv: Path, env: dict[str, str], *args: str) -> Any:
    return json.loads(upstream(venv, env, *args, "-o", "json"))


def upstream_python(venv: Path, env: dict[str, str], script: str) -> Any:
    """Run ``script`` with upstream's python; it must print one JSON document."""
    return json.loads(_run([str(venv / "bin" / "python"), "-c", script], env, "upstream python"))


def check_rows(env: dict[str, str], kind: str, alias: str) -> dict[str, tuple[Any, str]]:
    """Our ``jmp config KIND check ALIAS`` as {dotted key: (shown value, source)}."""
    out = ours_json(env, "config", kind, "check", alias, "--show-secrets")
    assert out["valid"] is True
    return {row["key"]: (row["value"], row["source"]) for row in out["values"]}


def check_values(env: dict[str, str], kind: str, alias: str) -> dict[str, Any]:
    return {key: value for key, (value, _) in check_rows(env, kind, alias).items()}


def file_line(source: str) -> int | None:
    """The line number in a ``check`` source that names the file ("PATH:N" or "line N")."""
    match = re.fullmatch(r"(?:.+:|line )(\d+)", source)
    return int(match.group(1)) if match else None


def by_alias(listing: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["alias"]: item for item in listing["items"]}


def home(env: dict[str, str]) -> Path:
    return Path(env["JMP_CLIENT_CONFIG_HOME"])


def current_in_file(env: dict[str, str]) -> str | None:
    data = yaml.safe_load((home(env) / "config.yaml").read_text())
    assert data["apiVersion"] == "jumpstarter.dev/v1alpha1"
    assert data["kind"] == "UserConfig"
    return data["config"]["current-client"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def client_summary(item: dict[str, Any]) -> dict[str, Any]:
    """The values a client config is about, from any listing/dump of it."""
    return {
        "namespace": item["metadata"]["namespace"],
        "name": item["metadata"]["name"],
        "endpoint": item["endpoint"],
        "token": item["token"],
        "insecure": item["tls"]["insecure"],
        "ca": item["tls"]["ca"],
        "allow": item["drivers"]["allow"],
        "unsafe": item["drivers"]["unsafe"],
        "use_profiles": item["shell"]["use_profiles"],
        "leases": {
            "acquisition_timeout": item["leases"]["acquisition_timeout"],
            "retry_timeout": item["leases"]["retry_timeout"],
        },
    }


def client_summary_from_check(values: dict[str, Any]) -> dict[str, Any]:
    return {
        "namespace": values["metadata.namespace"],
        "name": values["metadata.name"],
        "endpoint": values["endpoint"],
        "token": values["token"],
        "insecure": values["tls.insecure"],
        "allow": values["drivers.allow"],
        "unsafe": values["drivers.unsafe"],
    }


DEFAULT_LEASES = {"acquisition_timeout": 7200, "retry_timeout": 300.0}

_UPSTREAM_DUMP = textwrap.dedent(
    """
    import json
    from jumpstarter.config.client import ClientConfigV1Alpha1
    from jumpstarter.config.exporter import ExporterConfigV1Alpha1
    from jumpstarter.config.user import UserConfigV1Alpha1

    def client(c):
        d = c.model_dump(mode="json", by_alias=True, exclude={"path"})
        d["path"] = str(c.path)
        return d

    user = UserConfigV1Alpha1.load() if UserConfigV1Alpha1.exists() else None
    current = user.config.current_client if user else None
    print(json.dumps({
        "current": current.alias if current else None,
        "clients": {c.alias: client(c) for c in ClientConfigV1Alpha1.list().items},
        "exporters": {
            e.alias: e.model_dump(mode="json", by_alias=True, exclude={"path"})
            for e in ExporterConfigV1Alpha1.list().items
        },
    }))
    """
)


# --- 1. upstream client create -> ours ------------------------------------------------------

UPSTREAM_CLIENTS = {
    # alias: (extra create args, expected allow, expected unsafe, expected insecure)
    "full": (["-a", "jumpstarter_driver_*,foo.*"], ["jumpstarter_driver_*", "foo.*"], False, False),
    "insecure": (["-a", "", "--insecure-tls", "--nointeractive"], [""], False, True),
    "unsafe": (["-a", "x.*", "--unsafe"], ["x.*"], True, False),
    "allowunsafe": (["-a", "x.*,UNSAFE"], ["x.*", "UNSAFE"], True, False),
}


def test_upstream_client_create_loads_in_ours(upstream_venv: Path, config_env: dict) -> None:
    creates = [
        [
            *("config", "client", "create", alias, "--namespace", f"ns-{alias}"),
            *("--name", f"name-{alias}", "-e", f"{alias}.example.com:443", "-t", f"tok-{alias}"),
            *extra,
        ]
        for alias, (extra, *_) in UPSTREAM_CLIENTS.items()
    ]
    # The first one alone: it becomes current-client. The others cannot race for that.
    upstream(upstream_venv, config_env, *creates[0])
    upstream_parallel(upstream_venv, config_env, *creates[1:])

    listing = ours_json(config_env, "config", "client", "list", "--show-secrets")
    assert listing["kind"] == "ClientConfigList"
    items = by_alias(listing)
    assert sorted(items) == sorted(UPSTREAM_CLIENTS)
    # Upstream made the first client created the current one; we read the same config.yaml.
    assert current_in_file(config_env) == "full"
    assert listing["currentConfig"] == "full"

    for alias, (_, allow, unsafe, insecure) in UPSTREAM_CLIENTS.items():
        expected = {
            "namespace": f"ns-{alias}",
            "name": f"name-{alias}",
            "endpoint": f"{alias}.example.com:443",
            "token": f"tok-{alias}",
            "insecure": insecure,
            "ca": "",
            "allow": allow,
            "unsafe": unsafe,
            "use_profiles": False,
            "leases": DEFAULT_LEASES,
        }
        item = items[alias]
        assert client_summary(item) == expected, alias
        assert item["path"] == str(home(config_env) / "clients" / f"{alias}.yaml")
        rows = check_rows(config_env, "client", alias)
        values = {key: value for key, (value, _) in rows.items()}
        assert client_summary_from_check(values) == {
            "namespace": f"ns-{alias}",
            "name": f"name-{alias}",
            "endpoint": f"{alias}.example.com:443",
            "token": f"tok-{alias}",
            "insecure": insecure,
            "allow": allow,
            "unsafe": unsafe,
        }, alias
        # Those values came from the file upstream wrote, not from defaults or environment.
        for key in ("metadata.name", "endpoint", "token", "tls.insecure", "drivers.allow"):
            assert file_line(rows[key][1]) is not None, (alias, key, rows[key])

    # Upstream's own listing of the same files agrees with ours, value for value.
    theirs = upstream_json(upstream_venv, config_env, "config", "client", "list")
    assert theirs["currentConfig"] == listing["currentConfig"]
    for alias, item in by_alias(theirs).items():
        assert client_summary(item) == client_summary(items[alias]), alias


# --- 2. upstream exporter create -> ours ----------------------------------------------------


def test_upstream_exporter_create_loads_in_ours(upstream_venv: Path, config_env: dict) -> None:
    upstream_parallel(
        upstream_venv,
        config_env,
        [
            *("config", "exporter", "create", "plain", "--namespace", "lab"),
            *("--name", "ex-plain", "--endpoint", "ctrl.example.com:443"),
            *("--token", "ETOK-plain"),
        ],
        [
            *("config", "exporter", "create", "insecure", "--namespace", "lab2"),
            *("--name", "ex-ins", "--endpoint", "ctrl2.example.com:8082"),
            *("--token", "ETOK-ins", "-k", "--nointeractive"),
        ],
    )
    exporters = home(config_env) / "exporters"
    listing = ours_json(config_env, "config", "exporter", "list", "--show-secrets")
    assert listing["kind"] == "ExporterConfigList"
    items = by_alias(listing)
    assert sorted(items) == ["insecure", "plain"]

    for alias, (ns, name, endpoint, insecure) in {
        "plain": ("lab", "ex-plain", "ctrl.example.com:443", False),
        "insecure": ("lab2", "ex-ins", "ctrl2.example.com:8082", True),
    }.items():
        path = exporters / f"{alias}.yaml"
        on_disk = yaml.safe_load(path.read_text())
        item = dict(items[alias])
        assert item.pop("alias") == alias
        assert item.pop("path") == str(path)
        # Loaded unchanged: our listing is exactly what upstream wrote, nulls included.
        assert item == on_disk
        assert item["metadata"] == {"namespace": ns, "name": name}
        assert item["endpoint"] == endpoint
        assert item["token"] == f"ETOK-{alias.replace('insecure', 'ins')}"
        assert item["tls"] == {"ca": "", "insecure": insecure}
        assert item["hooks"] == {"beforeLease": None, "afterLease": None}
        assert item["failureDetection"] == {"maxRapidFailures": 5, "rapidFailureWindow": 60}

        values = check_values(config_env, "exporter", alias)
        assert values["metadata.namespace"] == ns
        assert values["metadata.name"] == name
        assert values["endpoint"] == endpoint
        assert values["token"] == item["token"]
        assert values["tls.insecure"] == insecure
        assert values["export"] == {}
        assert values["hooks.beforeLease"] is None


# --- 3. ours -> upstream --------------------------------------------------------------------


OUR_CLIENTS = {
    # alias: (extra create args, expected allow, expected unsafe, expected insecure)
    "o1": (["-a", "a.*,b.*"], ["a.*", "b.*"], False, False),
    "o2": (["--unsafe", "-k", "--nointeractive"], [], True, True),
    "o3": (["-a", ""], [], False, False),
}


def _our_client(env: dict[str, str], alias: str, *extra: str) -> None:
    ours(
        env,
        *("config", "client", "create", alias, "--namespace", f"ns-{alias}"),
        *("--name", f"name-{alias}", "-e", f"{alias}.example.com:443", "-t", f"tok-{alias}"),
        *extra,
    )


def _expected_client(alias: str) -> dict[str, Any]:
    _, allow, unsafe, insecure = OUR_CLIENTS[alias]
    return {
        "namespace": f"ns-{alias}",
        "name": f"name-{alias}",
        "endpoint": f"{alias}.example.com:443",
        "token": f"tok-{alias}",
        "insecure": insecure,
        "ca": "",
        "allow": allow,
        "unsafe": unsafe,
        "use_profiles": False,
        "leases": DEFAULT_LEASES,
    }


def test_our_configs_read_by_upstream(upstream_venv: Path, config_env: dict) -> None:
    for alias, (extra, *_) in OUR_CLIENTS.items():
        _our_client(config_env, alias, *extra)
    assert current_in_file(config_env) == "o1"  # the first client created becomes current
    _our_client(config_env, "gone")
    ours(config_env, "config", "client", "use", "gone")
    assert current_in_file(config_env) == "gone"
    ours(config_env, "config", "client", "delete", "gone")  # current: moves to another one
    assert not (home(config_env) / "clients" / "gone.yaml").exists()
    assert current_in_file(config_env) in OUR_CLIENTS
    ours(config_env, "config", "client", "use", "o2")
    assert current_in_file(config_env) == "o2"
    exporter = ("config", "exporter", "create")
    ours(
        config_env,
        *(*exporter, "x1", "--namespace", "lab", "--name", "xn1", "--endpoint"),
        *("c1.example.com:443", "--token", "XT1"),
    )
    ours(
        config_env,
        *(*exporter, "x2", "--namespace", "lab", "--name", "xn2", "--endpoint"),
        *("c2.example.com:8082", "--token", "XT2", "-k", "--nointeractive"),
    )

    # Upstream's CLI listings and its Python models, all reading the same files.
    client_out, exporter_out = upstream_parallel(
        upstream_venv,
        config_env,
        ["config", "client", "list", "-o", "json"],
        ["config", "exporter", "list", "-o", "json"],
    )
    clients = json.loads(client_out)
    assert clients["currentConfig"] == "o2"
    items = by_alias(clients)
    assert sorted(items) == sorted(OUR_CLIENTS)
    for alias in OUR_CLIENTS:
        assert client_summary(items[alias]) == _expected_client(alias), alias
        assert items[alias]["path"] == str(home(config_env) / "clients" / f"{alias}.yaml")
    exporters = by_alias(json.loads(exporter_out))
    assert sorted(exporters) == ["x1", "x2"]
    for alias, item in exporters.items():
        n = alias[1]
        assert item["path"] == str(home(config_env) / "exporters" / f"{alias}.yaml")
        assert item["metadata"] == {"namespace": "lab", "name": f"xn{n}"}
        assert item["token"] == f"XT{n}"
        assert item["tls"] == {"ca": "", "insecure": alias == "x2"}
        assert item["export"] == {}
        assert item["hooks"] == {"beforeLease": None, "afterLease": None}
    assert exporters["x1"]["endpoint"] == "c1.example.com:443"
    assert exporters["x2"]["endpoint"] == "c2.example.com:8082"

    # Upstream's Python models, loading the same files.
    dumped = upstream_python(upstream_venv, config_env, _UPSTREAM_DUMP)
    assert dumped["current"] == "o2"
    assert {a: client_summary(c) for a, c in dumped["clients"].items()} == {
        a: _expected_client(a) for a in OUR_CLIENTS
    }
    assert {a: e for a, e in dumped["exporters"].items()} == {
        a: {k: v for k, v in e.items() if k != "path"} for a, e in exporters.items()
    }

    # Upstream's `use` works on our files, and we read what it wrote.
    upstream(upstream_venv, config_env, "config", "client", "use", "o3")
    assert current_in_file(config_env) == "o3"
    assert ours_json(config_env, "config", "client", "list")["currentConfig"] == "o3"


# --- 4. a hand-written exporter config with a driver tree -----------------------------------

TREE_YAML = """\
apiVersion: jumpstarter.dev/v1alpha1
kind: ExporterConfig
metadata:
  namespace: lab
  name: bench-1
endpoint: grpc.example.com:443
tls:
  ca: ''
  insecure: false
token: EXPTOK
grpcOptions:
  grpc.keepalive_time_ms: 20000
  grpc.lb_policy_name: round_robin
description: Bench one
export:
  power:
    type: jumpstarter_driver_power.driver.MockPower
    description: Mains power
  serial:
    type: jumpstarter_driver_pyserial.driver.PySerial
    config:
      url: "loop://"
  group:
    children:
      inner:
        type: jumpstarter_driver_power.driver.MockPower
  alias:
    ref: power
hooks:
  beforeLease:
    script: echo before
    timeout: 30
    onFailure: endLease
"""

TREE_HOOKS = {
    "beforeLease": {"script": "echo before", "exec": None, "timeout": 30, "onFailure": "endLease"},
    "afterLease": None,
}

_UPSTREAM_TREE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from jumpstarter.config.exporter import (
        ExporterConfigV1Alpha1, ExporterConfigV1Alpha1DriverInstance,
    )

    config = ExporterConfigV1Alpha1.load_path(Path(sys.argv[1]))
    root = ExporterConfigV1Alpha1DriverInstance(
        type="jumpstarter_driver_composite.driver.Composite",
        description=config.description,
        children=config.export,
    ).instantiate()

    def kinds(driver):
        return {
            name: [type(child).__name__, kinds(child)]
            for name, child in getattr(driver, "children", {}).items()
        }

    print(json.dumps({
        "config": config.model_dump(mode="json", by_alias=True, exclude={"path", "alias"}),
        "drivers": kinds(root),
        "serial_url": root.children["serial"].url,
        "power_description": root.children["power"].description,
        "ref": root.children["alias"].ref,
    }))
    """
)

# Upstream's dump fills in every default of a typed driver entry; the file leaves them out.
_ENTRY_DEFAULTS = {"description": None, "methods_description": {}, "config": {}, "children": {}}


def _prune(entries: dict[str, Any]) -> dict[str, Any]:
    pruned = {}
    for name, entry in entries.items():
        entry = {k: v for k, v in entry.items() if _ENTRY_DEFAULTS.get(k, ...) != v}
        if "children" in entry:
            entry["children"] = _prune(entry["children"])
        pruned[name] = entry
    return pruned


def test_hand_written_driver_tree_loads_in_both(upstream_venv: Path, config_env: dict) -> None:
    path = home(config_env) / "exporters" / "tree.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(TREE_YAML)
    written = yaml.safe_load(TREE_YAML)

    # Ours: `check` (by alias and by path) sees the tree and the hook...
    rows = check_rows(config_env, "exporter", "tree")
    by_path = ours_json(
        config_env, "config", "exporter", "check", "--exporter-config", str(path), "--show-secrets"
    )
    assert {r["key"]: (r["value"], r["source"]) for r in by_path["values"]} == rows
    values = {key: value for key, (value, _) in rows.items()}
    assert {
        key: values[key]
        for key in (
            "description",
            "token",
            "grpcOptions",
            "export.power.type",
            "export.power.description",
            "export.serial.type",
            "export.serial.config.url",
            "export.group.children.inner.type",
            "export.alias.ref",
            "hooks.beforeLease.script",
            "hooks.beforeLease.timeout",
            "hooks.beforeLease.onFailure",
            "hooks.afterLease",
        )
    } == {
        "description": "Bench one",
        "token": "EXPTOK",
        "grpcOptions": {"grpc.keepalive_time_ms": 20000, "grpc.lb_policy_name": "round_robin"},
        "export.power.type": "jumpstarter_driver_power.driver.MockPower",
        "export.power.description": "Mains power",
        "export.serial.type": "jumpstarter_driver_pyserial.driver.PySerial",
        "export.serial.config.url": "loop://",
        "export.group.children.inner.type": "jumpstarter_driver_power.driver.MockPower",
        "export.alias.ref": "power",
        "hooks.beforeLease.script": "echo before",
        "hooks.beforeLease.timeout": 30,
        "hooks.beforeLease.onFailure": "endLease",
        "hooks.afterLease": None,
    }
    ref_line = TREE_YAML.splitlines().index("    ref: power") + 1
    assert file_line(rows["export.alias.ref"][1]) == ref_line
    # ...and `list` gives back the file's structure exactly (defaults added only outside export).
    [item] = ours_json(config_env, "config", "exporter", "list", "--show-secrets")["items"]
    assert item["export"] == written["export"]
    assert item["hooks"] == TREE_HOOKS
    assert item["grpcOptions"] == written["grpcOptions"]
    assert item["description"] == "Bench one"
    assert item["metadata"] == written["metadata"]

    # Upstream: the model loads the same structure, and the drivers instantiate.
    theirs = json.loads(
        _run(
            [str(upstream_venv / "bin" / "python"), "-c", _UPSTREAM_TREE, str(path)],
            config_env,
            "upstream python",
        )
    )
    config = theirs["config"]
    assert _prune(config["export"]) == written["export"]
    assert config["hooks"] == TREE_HOOKS
    assert config["grpcOptions"] == written["grpcOptions"]
    assert config["description"] == "Bench one"
    assert config["metadata"] == written["metadata"]
    assert config["token"] == "EXPTOK"
    assert {k: config[k] for k in item if k not in ("alias", "path", "export")} == {
        k: v for k, v in item.items() if k not in ("alias", "path", "export")
    }
    assert theirs["drivers"] == {
        "power": ["MockPower", {}],
        "serial": ["PySerial", {}],
        "group": ["Composite", {"inner": ["MockPower", {}]}],
        "alias": ["Proxy", {}],
    }
    assert theirs["serial_url"] == "loop://"
    assert theirs["power_description"] == "Mains power"
    assert theirs["ref"] == "power"


# --- 5. file modes, and upstream rewriting our files ----------------------------------------


def test_modes_and_upstream_rewrites(upstream_venv: Path, config_env: dict) -> None:
    _our_client(config_env, "c1", "-a", "a.*")
    _our_client(config_env, "c2", "-a", "b.*")
    ours(config_env, "config", "client", "use", "c2")
    ours(
        config_env,
        *("config", "exporter", "create", "e1", "--namespace", "lab", "--name", "xn"),
        *("--endpoint", "c.example.com:443", "--token", "XT"),
    )
    cfg = home(config_env)
    written = [
        cfg / "config.yaml",
        cfg / "clients" / "c1.yaml",
        cfg / "clients" / "c2.yaml",
        cfg / "exporters" / "e1.yaml",
    ]
    assert {str(p): oct(mode(p)) for p in written} == {str(p): "0o600" for p in written}
    # No temporary file is left behind next to them.
    assert sorted(p.name for p in (cfg / "clients").iterdir()) == ["c1.yaml", "c2.yaml"]
    assert sorted(p.name for p in (cfg / "exporters").iterdir()) == ["e1.yaml"]

    # Upstream rewrites config.yaml (`use`) and a client file (`create --out` over ours).
    # (`create --out` does not touch config.yaml, so the two can run at once.)
    upstream_parallel(
        upstream_venv,
        config_env,
        ["config", "client", "use", "c1"],
        [
            *("config", "client", "create", "c2", "--out", str(cfg / "clients" / "c2.yaml")),
            *("--namespace", "ns-new", "--name", "name-new", "-e", "new.example.com:443"),
            *("-t", "tok-new", "-a", "z.*,y.*", "-k", "--nointeractive"),
        ],
    )
    assert mode(cfg / "clients" / "c2.yaml") == 0o600
    assert mode(cfg / "config.yaml") == 0o600  # upstream rewrites in place, keeping our mode
    listing = ours_json(config_env, "config", "client", "list", "--show-secrets")
    assert listing["currentConfig"] == "c1"
    assert client_summary(by_alias(listing)["c2"]) == {
        "namespace": "ns-new",
        "name": "name-new",
        "endpoint": "new.example.com:443",
        "token": "tok-new",
        "insecure": True,
        "ca": "",
        "allow": ["z.*", "y.*"],
        "unsafe": False,
        "use_profiles": False,
        "leases": DEFAULT_LEASES,
    }
    assert check_values(config_env, "client", "c1")["drivers.allow"] == ["a.*"]

    # Upstream deleting the current client moves current-client on; deleting the last one
    # writes `current-client: null`. We read both states.
    upstream(upstream_venv, config_env, "config", "client", "delete", "c1")
    assert ours_json(config_env, "config", "client", "list")["currentConfig"] == "c2"
    upstream(upstream_venv, config_env, "config", "client", "delete", "c2")
    assert current_in_file(config_env) is None
    listing = ours_json(config_env, "config", "client", "list")
    assert listing["currentConfig"] is None
    assert listing["items"] == []
