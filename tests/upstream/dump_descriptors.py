"""Dump the wire-relevant shape of the Jumpstarter .proto files as JSON.

Usage: python dump_descriptors.py MODULE_PREFIX

MODULE_PREFIX is the package under which the generated ``jumpstarter/v1/*_pb2`` and
``jumpstarter/client/v1/client_pb2`` modules live: ``jumpstarter_protocol`` for upstream
0.9.0, ``jumpstarter_exporter._proto`` for ours. Both sides register the same
``jumpstarter/v1/*.proto`` files, so they cannot share one descriptor pool: the test runs
this script once per interpreter and compares the two outputs.

Only the standard library and protobuf are used, so the script runs unchanged in the
upstream venv and in ours.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

from google.protobuf import descriptor_pb2, text_format

# proto file name -> module path below the prefix
FILES = {
    "jumpstarter/v1/common.proto": "jumpstarter.v1.common_pb2",
    "jumpstarter/v1/kubernetes.proto": "jumpstarter.v1.kubernetes_pb2",
    "jumpstarter/v1/router.proto": "jumpstarter.v1.router_pb2",
    "jumpstarter/v1/jumpstarter.proto": "jumpstarter.v1.jumpstarter_pb2",
    "jumpstarter/client/v1/client.proto": "jumpstarter.client.v1.client_pb2",
}

# Importing these registers the googleapis option extensions, so options print by name.
OPTION_MODULES = (
    "google.api.annotations_pb2",
    "google.api.client_pb2",
    "google.api.field_behavior_pb2",
    "google.api.resource_pb2",
)

FIELD_TYPES = {
    v: k.removeprefix("TYPE_").lower()
    for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()  # type: ignore[attr-defined]
}
FIELD_LABELS = {
    v: k.removeprefix("LABEL_").lower()
    for k, v in descriptor_pb2.FieldDescriptorProto.Label.items()  # type: ignore[attr-defined]
}


def options(proto: Any) -> dict[str, str] | None:
    """The ``options`` of a descriptor proto: deterministic bytes (compared) and text (shown)."""
    if not proto.HasField("options"):
        return None
    opts = proto.options
    return {
        "hex": opts.SerializeToString(deterministic=True).hex(),
        "text": text_format.MessageToString(opts, as_one_line=True, print_unknown_fields=True),
    }


def dump_enum(enum: descriptor_pb2.EnumDescriptorProto, scope: str) -> dict[str, Any]:
    return {
        "full_name": f"{scope}.{enum.name}",
        "options": options(enum),
        "values": {v.name: {"number": v.number, "options": options(v)} for v in enum.value},
    }


def dump_message(
    msg: descriptor_pb2.DescriptorProto, scope: str, pool: Any, out: dict[str, Any]
) -> None:
    """Add ``msg`` and, recursively, its nested messages to ``out`` (keyed by full name)."""
    full = f"{scope}.{msg.name}"
    # The JSON name is taken from the live descriptor: protoc's Python generator leaves
    # json_name out of the embedded descriptor while buf fills it in, yet both resolve to
    # the same effective name.
    live = pool.FindMessageTypeByName(full.removeprefix(".")).fields_by_name
    oneofs = [o.name for o in msg.oneof_decl]
    fields = {}
    for f in msg.field:
        fields[f.name] = {
            "number": f.number,
            "type": FIELD_TYPES[f.type],
            "label": FIELD_LABELS[f.label],
            "type_name": f.type_name,
            "proto3_optional": f.proto3_optional,
            "json_name": live[f.name].json_name,
            "oneof": oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
            "default_value": f.default_value if f.HasField("default_value") else None,
            "options": options(f),
        }
    out[full] = {
        "options": options(msg),
        "oneofs": oneofs,
        "fields": fields,
        "enums": {e.name: dump_enum(e, full) for e in msg.enum_type},
        "reserved_ranges": [[r.start, r.end] for r in msg.reserved_range],
        "reserved_names": list(msg.reserved_name),
    }
    for nested in msg.nested_type:
        dump_message(nested, full, pool, out)


def dump_file(fdp: descriptor_pb2.FileDescriptorProto, pool: Any) -> dict[str, Any]:
    scope = f".{fdp.package}" if fdp.package else ""
    messages: dict[str, Any] = {}
    for msg in fdp.message_type:
        dump_message(msg, scope, pool, messages)
    services = {}
    for svc in fdp.service:
        services[f"{scope}.{svc.name}"] = {
            "options": options(svc),
            "methods": {
                m.name: {
                    "input_type": m.input_type,
                    "output_type": m.output_type,
                    "client_streaming": m.client_streaming,
                    "server_streaming": m.server_streaming,
                    "options": options(m),
                }
                for m in svc.method
            },
        }
    return {
        "package": fdp.package,
        "syntax": fdp.syntax or "proto2",
        "dependencies": sorted(fdp.dependency),
        "messages": messages,
        "enums": {f"{scope}.{e.name}": dump_enum(e, scope) for e in fdp.enum_type},
        "services": services,
    }


def main(prefix: str) -> dict[str, Any]:
    for name in OPTION_MODULES:
        importlib.import_module(name)
    result = {}
    for proto_name, module in FILES.items():
        mod = importlib.import_module(f"{prefix}.{module}")
        fdp = descriptor_pb2.FileDescriptorProto()
        mod.DESCRIPTOR.CopyToProto(fdp)
        if fdp.name != proto_name:
            raise SystemExit(f"{prefix}.{module} registers {fdp.name!r}, expected {proto_name!r}")
        result[proto_name] = dump_file(fdp, mod.DESCRIPTOR.pool)
    return result


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    json.dump(main(sys.argv[1]), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
