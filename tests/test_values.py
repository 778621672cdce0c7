"""wire/values.py: driver args/results ↔ google.protobuf.Value, as upstream encodes them."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from dataclasses import dataclass

import pytest
from google.protobuf import json_format, struct_pb2
from pydantic import BaseModel

from jumpstarter_exporter.wire.values import from_value, from_values, to_value, to_values


class Colour(enum.Enum):
    RED = "red"


class Reading(BaseModel):
    voltage: float
    current: float


@dataclass
class Point:
    x: int
    y: int


@pytest.mark.parametrize(
    ("obj", "kind", "back"),
    [
        (None, "null_value", None),
        (True, "bool_value", True),
        (False, "bool_value", False),
        (1, "number_value", 1.0),
        (2.5, "number_value", 2.5),
        ("text", "string_value", "text"),
        (b"bytes", "string_value", "bytes"),
        ("é✓".encode(), "string_value", "é✓"),
        ((1, "a"), "list_value", [1.0, "a"]),
        ([], "list_value", []),
        ({}, "struct_value", {}),
        ({"a": [1, {"b": None}]}, "struct_value", {"a": [1.0, {"b": None}]}),
        ({1: "int key"}, "struct_value", {"1": "int key"}),
        (uuid.UUID(int=1), "string_value", "00000000-0000-0000-0000-000000000001"),
        (Colour.RED, "string_value", "red"),
        (dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC), "string_value", "2024-01-02T03:04:05Z"),
        (Reading(voltage=5, current=2), "struct_value", {"voltage": 5.0, "current": 2.0}),
        (Point(1, 2), "struct_value", {"x": 1.0, "y": 2.0}),
    ],
)
def test_round_trip(obj: object, kind: str, back: object) -> None:
    value = to_value(obj)
    assert value.WhichOneof("kind") == kind
    decoded = from_value(value)
    assert decoded == back
    assert type(decoded) is type(back)


def test_numbers_come_back_as_floats() -> None:
    decoded = from_value(to_value({"n": 1, "l": [2, 3]}))
    assert decoded == {"n": 1.0, "l": [2.0, 3.0]}
    assert isinstance(decoded["n"], float)
    assert all(isinstance(x, float) for x in decoded["l"])


def test_matches_protobuf_json_mapping() -> None:
    data = {"a": 1, "b": [True, None, "x", 2.5, {"c": []}], "big": 2**60}
    assert to_value(data) == json_format.ParseDict(data, struct_pb2.Value())
    assert from_value(to_value(data)) == json_format.MessageToDict(to_value(data))


def test_non_utf8_bytes_are_rejected() -> None:
    with pytest.raises(ValueError, match="UTF-8"):
        to_value(b"\xff\xfe")


def test_unencodable_object_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="cannot encode"):
        to_value(object())


def test_unset_value_decodes_as_none() -> None:
    assert from_value(struct_pb2.Value()) is None


def test_argument_list_helpers() -> None:
    values = to_values([1, "two", [3]])
    assert [v.WhichOneof("kind") for v in values] == ["number_value", "string_value", "list_value"]
    assert from_values(values) == [1.0, "two", [3.0]]
    assert to_values([]) == [] and from_values([]) == []
