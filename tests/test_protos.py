"""The .proto files, their generated stubs, and wire compatibility with upstream 0.9.0.

* freshness: scripts/gen-protos regenerates into a temporary directory and the result must
  equal the committed stubs in src/jumpstarter_exporter/_proto byte for byte;
* the stubs import and carry the numbers the rest of the code relies on;
* interop: the descriptors of our five files are compared with those of
  ``jumpstarter-protocol==0.9.0``. Both register ``jumpstarter/v1/*.proto``, so they cannot
  share one descriptor pool: tests/upstream/dump_descriptors.py runs once in the upstream
  venv and once in ours, and the two JSON dumps are compared. Every upstream service,
  method (with streaming flags), message (nested and map-entry types included), enum, field
  (number, type, label, type name, proto3 optional, JSON name, oneof) and every method,
  message, field, enum and enum value option (serialized bytes, e.g. google.api.http and
  field_behavior) must be identical in ours. Ours may add only the elements listed in
  ALLOWED_ADDITIONS. File-level options (java_package, ruby_package, ... added by upstream's
  buf managed mode) carry no wire meaning and are not compared.
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
GEN_SCRIPT = REPO / "scripts" / "gen-protos"
STUBS = REPO / "src" / "jumpstarter_exporter" / "_proto"
DUMPER = Path(__file__).resolve().parent / "upstream" / "dump_descriptors.py"

V1 = "jumpstarter/v1/jumpstarter.proto"
CLIENT = "jumpstarter/client/v1/client.proto"

# Elements present upstream only after 0.9.0 (on main) that we deliberately carry. Each is
# wire-safe against 0.9.0 peers: protobuf ignores unknown fields, and a 0.9.0 controller
# answers the new RPC with UNIMPLEMENTED. An entry allows the element and everything below it.
ALLOWED_ADDITIONS: dict[tuple[str, ...], str] = {
    (V1, "service", ".jumpstarter.v1.ControllerService", "method", "GetServiceEndpoints"): (
        "telemetry endpoint discovery"
    ),
    (V1, "message", ".jumpstarter.v1.GetServiceEndpointsRequest"): "GetServiceEndpoints",
    (V1, "message", ".jumpstarter.v1.GetServiceEndpointsResponse"): "GetServiceEndpoints",
    (V1, "message", ".jumpstarter.v1.TelemetryEndpoint"): "GetServiceEndpoints",
    (V1, "message", ".jumpstarter.v1.StatusResponse", "field", "context"): "lease context",
    (V1, "message", ".jumpstarter.v1.StatusResponse.ContextEntry"): "map entry of context",
    (V1, "message", ".jumpstarter.v1.GetReportResponse", "field", "motd"): "message of the day",
    (V1, "message", ".jumpstarter.v1.LogStreamResponse", "field", "driver_type"): "log metadata",
    (V1, "message", ".jumpstarter.v1.LogStreamResponse", "field", "operation"): "log metadata",
    (V1, "message", ".jumpstarter.v1.LogStreamResponse", "field", "timestamp"): "log metadata",
    (V1, "message", ".jumpstarter.v1.LogStreamResponse", "field", "structured_fields"): (
        "log metadata"
    ),
    (V1, "message", ".jumpstarter.v1.LogStreamResponse.StructuredFieldsEntry"): (
        "map entry of structured_fields"
    ),
    # proto3 `optional` fields get a synthetic oneof each.
    (V1, "message", ".jumpstarter.v1.LogStreamResponse", "oneof", "_driver_type"): "optional",
    (V1, "message", ".jumpstarter.v1.LogStreamResponse", "oneof", "_operation"): "optional",
    (V1, "message", ".jumpstarter.v1.LogStreamResponse", "oneof", "_timestamp"): "optional",
    (CLIENT, "message", ".jumpstarter.client.v1.Lease", "field", "context"): "lease context",
    (CLIENT, "message", ".jumpstarter.client.v1.Lease.ContextEntry"): "map entry of context",
}

# JSON container key -> singular word used in difference paths (and ALLOWED_ADDITIONS).
_SEGMENT = {
    "messages": "message",
    "enums": "enum",
    "services": "service",
    "methods": "method",
    "fields": "field",
    "values": "value",
    "oneofs": "oneof",
}
_CONTAINER = {word: key for key, word in _SEGMENT.items()}


def _relative_files(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def _is_options(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"hex", "text"}


def _show(value: Any) -> str:
    if _is_options(value):
        return f"[{value['text']}]"
    return json.dumps(value, sort_keys=True)


def _named(children: Any) -> dict[str, Any]:
    """A container as a name-keyed dict (oneofs are dumped as a list of names)."""
    return {name: True for name in children} if isinstance(children, list) else children


def _lookup(dump: dict[str, Any], path: tuple[str, ...]) -> bool:
    """Whether the element at ``path`` (file, then word/name pairs) exists in ``dump``."""
    node: Any = dump.get(path[0])
    for word, name in zip(path[1::2], path[2::2], strict=True):
        if not isinstance(node, dict):
            return False
        node = _named(node.get(_CONTAINER[word], {})).get(name)
        if node is None:
            return False
    return node is not None


def _allowed(path: tuple[str, ...]) -> bool:
    return any(path[: len(allowed)] == allowed for allowed in ALLOWED_ADDITIONS)


def compare_dumps(upstream: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """Every difference between two descriptor dumps, one readable line each.

    Upstream elements must exist identically in ours; ours may have extra elements only
    where ALLOWED_ADDITIONS says so. Options are compared as serialized bytes and shown as
    text.
    """
    diffs: list[str] = []

    def children(up: dict[str, Any], our: dict[str, Any], path: tuple[str, ...]) -> None:
        for name in sorted(up.keys() | our.keys()):
            child = (*path, name)
            if name not in our:
                diffs.append(f"missing {' '.join(child)}")
            elif name not in up:
                if not _allowed(child):
                    diffs.append(f"extra {' '.join(child)} (not in ALLOWED_ADDITIONS)")
            else:
                element(up[name], our[name], child)

    def element(up: Any, our: Any, path: tuple[str, ...]) -> None:
        where = " ".join(path)
        if _is_options(up) or _is_options(our):
            if (up or {}).get("hex") != (our or {}).get("hex"):
                diffs.append(f"changed {where}: upstream {_show(up)}, ours {_show(our)}")
        elif isinstance(up, dict) and isinstance(our, dict):
            for key in sorted(up.keys() | our.keys()):
                if key not in our or key not in up:
                    side = "ours" if key not in our else "upstream"
                    diffs.append(f"changed {where}: {key!r} absent in {side}")
                elif key in _SEGMENT and isinstance(up[key], dict | list):
                    children(_named(up[key]), _named(our[key]), (*path, _SEGMENT[key]))
                else:
                    element(up[key], our[key], (*path, key))
        elif up != our:
            diffs.append(f"changed {where}: upstream {_show(up)}, ours {_show(our)}")

    children(upstream, ours, ())
    return diffs


def _dump(python: Path | str, prefix: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    out = subprocess.run(
        [str(python), str(DUMPER), prefix],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=120,
    )
    assert out.returncode == 0, f"{python} {DUMPER.name} {prefix} failed:\n{out.stderr}"
    return json.loads(out.stdout)


# --- freshness -------------------------------------------------------------------------------


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    subprocess.run([sys.executable, str(GEN_SCRIPT), str(out)], check=True, timeout=120)
    fresh, committed = _relative_files(out), _relative_files(STUBS)
    problems = [f"missing (not committed): {name}" for name in sorted(fresh - committed)]
    problems += [f"stale extra file: {name}" for name in sorted(committed - fresh)]
    problems += [
        f"stale: {name}"
        for name in sorted(fresh & committed)
        if not filecmp.cmp(out / name, STUBS / name, shallow=False)
    ]
    assert not problems, (
        "generated stubs differ from src/jumpstarter_exporter/_proto; run scripts/gen-protos\n"
        + "\n".join(problems)
    )


# --- our stubs -------------------------------------------------------------------------------


def test_stubs_import_and_key_numbers() -> None:
    from jumpstarter_exporter._proto.jumpstarter.client.v1 import client_pb2, client_pb2_grpc
    from jumpstarter_exporter._proto.jumpstarter.v1 import (
        common_pb2,
        jumpstarter_pb2,
        jumpstarter_pb2_grpc,
        router_pb2,
        router_pb2_grpc,
    )

    fields = jumpstarter_pb2.UnregisterRequest.DESCRIPTOR.fields_by_name
    assert fields["reason"].number == 2
    assert list(fields) == ["reason"]
    assert router_pb2.FrameType.Value("FRAME_TYPE_GOAWAY") == 7
    assert common_pb2.ExporterStatus.Value("EXPORTER_STATUS_LEASE_READY") == 4
    assert jumpstarter_pb2.DESCRIPTOR.name == "jumpstarter/v1/jumpstarter.proto"
    assert client_pb2.DESCRIPTOR.package == "jumpstarter.client.v1"
    for stub in (
        jumpstarter_pb2_grpc.ControllerServiceStub,
        jumpstarter_pb2_grpc.ExporterServiceStub,
        router_pb2_grpc.RouterServiceStub,
        client_pb2_grpc.ClientServiceStub,
    ):
        assert callable(stub)
    # proto3 optional keeps presence on the wire.
    resp = jumpstarter_pb2.StatusResponse(leased=False)
    assert not resp.HasField("lease_name")
    again = jumpstarter_pb2.StatusResponse.FromString(
        jumpstarter_pb2.StatusResponse(leased=True, lease_name="").SerializeToString()
    )
    assert again.HasField("lease_name")


def test_compare_dumps_reports_every_kind_of_difference() -> None:
    """The comparison itself must fail loudly; checked without the upstream venv."""
    opts = {"hex": "0801", "text": "deprecated: true"}
    upstream = {
        V1: {
            "package": "jumpstarter.v1",
            "messages": {
                ".jumpstarter.v1.A": {
                    "oneofs": ["_x"],
                    "fields": {
                        "x": {"number": 1, "label": "optional", "options": opts},
                        "y": {"number": 2, "label": "optional", "options": None},
                    },
                },
                ".jumpstarter.v1.Gone": {"oneofs": [], "fields": {}},
            },
            "services": {
                ".jumpstarter.v1.S": {
                    "options": None,
                    "methods": {"M": {"server_streaming": True, "options": None}},
                }
            },
        }
    }
    ours = json.loads(json.dumps(upstream))
    msgs = ours[V1]["messages"]
    msgs[".jumpstarter.v1.A"]["fields"]["x"]["number"] = 3
    msgs[".jumpstarter.v1.A"]["fields"]["y"]["options"] = opts
    msgs[".jumpstarter.v1.A"]["fields"]["z"] = {"number": 9}
    del msgs[".jumpstarter.v1.Gone"]
    msgs[".jumpstarter.v1.TelemetryEndpoint"] = {"oneofs": [], "fields": {}}  # allowed
    ours[V1]["services"][".jumpstarter.v1.S"]["methods"]["M"]["server_streaming"] = False
    diffs = compare_dumps(upstream, ours)
    assert diffs == [
        f"changed {V1} message .jumpstarter.v1.A field x number: upstream 1, ours 3",
        f"changed {V1} message .jumpstarter.v1.A field y options: upstream null, "
        "ours [deprecated: true]",
        f"extra {V1} message .jumpstarter.v1.A field z (not in ALLOWED_ADDITIONS)",
        f"missing {V1} message .jumpstarter.v1.Gone",
        f"changed {V1} service .jumpstarter.v1.S method M server_streaming: "
        "upstream true, ours false",
    ]
    assert compare_dumps(upstream, upstream) == []


# --- wire compatibility with upstream 0.9.0 ---------------------------------------------------


@pytest.mark.interop
def test_wire_compatible_with_upstream_0_9(upstream_venv: Path) -> None:
    upstream = _dump(upstream_venv / "bin" / "python", "jumpstarter_protocol")
    ours = _dump(sys.executable, "jumpstarter_exporter._proto")
    diffs = compare_dumps(upstream, ours)
    assert not diffs, (
        f"{len(diffs)} difference(s) between upstream jumpstarter-protocol 0.9.0 and "
        "protos/:\n" + "\n".join(diffs)
    )
    # Every allowance must still be needed, so the list never silently outgrows reality.
    for path in ALLOWED_ADDITIONS:
        assert _lookup(ours, path), f"ALLOWED_ADDITIONS entry not in our protos: {path}"
        assert not _lookup(upstream, path), f"ALLOWED_ADDITIONS entry is upstream now: {path}"
