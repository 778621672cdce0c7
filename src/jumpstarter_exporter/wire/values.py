"""Driver call arguments and results ↔ ``google.protobuf.Value`` (protocol-facts §5.1).

Encoding follows upstream: dump to JSON-compatible data the way pydantic does in JSON mode
(models and dataclasses → dicts, UUID/datetime/Enum → their JSON form, tuples → lists,
bytes → their UTF-8 text), then map onto ``Value`` as the protobuf JSON mapping does. Bytes
that are not UTF-8 raise ``ValueError``. Decoding gives plain data; every number comes back
as a ``float`` (``1`` → ``1.0``), as upstream's peers expect.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import struct_pb2
from pydantic import TypeAdapter
from pydantic_core import PydanticSerializationError

_ANY: TypeAdapter[Any] = TypeAdapter(Any)


def to_jsonable(obj: Any) -> Any:
    """``obj`` as JSON-compatible data (pydantic JSON mode); ``ValueError`` if impossible."""
    try:
        return _ANY.dump_python(obj, mode="json")
    except UnicodeDecodeError as exc:
        raise ValueError(f"bytes are not valid UTF-8 text: {exc}") from None
    except PydanticSerializationError as exc:
        raise ValueError(f"cannot encode {type(obj).__name__} as a value: {exc}") from None


def _fill(value: struct_pb2.Value, data: Any) -> None:
    if data is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        value.bool_value = data
    elif isinstance(data, int | float):
        value.number_value = float(data)
    elif isinstance(data, str):
        value.string_value = data
    elif isinstance(data, list):
        value.list_value.SetInParent()
        for item in data:
            _fill(value.list_value.values.add(), item)
    elif isinstance(data, dict):
        value.struct_value.SetInParent()
        for key, item in data.items():
            _fill(value.struct_value.fields[str(key)], item)
    else:  # pragma: no cover - JSON mode yields nothing else
        raise ValueError(f"cannot encode {type(data).__name__} as a value")


def to_value(obj: Any) -> struct_pb2.Value:
    """Encode one argument or result."""
    value = struct_pb2.Value()
    _fill(value, to_jsonable(obj))
    return value


def from_value(value: struct_pb2.Value) -> Any:
    """Decode one argument or result; an unset ``Value`` decodes as ``None``."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {key: from_value(item) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [from_value(item) for item in value.list_value.values]
    return None


def to_values(items: Iterable[Any]) -> list[struct_pb2.Value]:
    """Encode positional arguments (for a request's ``args``)."""
    return [to_value(item) for item in items]


def from_values(values: Iterable[struct_pb2.Value]) -> list[Any]:
    """Decode a request's repeated ``args`` into positional arguments."""
    return [from_value(item) for item in values]


__all__ = ["from_value", "from_values", "to_jsonable", "to_value", "to_values"]
