"""Reading and writing config YAML: line numbers for errors, atomic 0600 writes.

Reading follows YAML 1.2's booleans (only ``true``/``false``): under PyYAML's default
YAML 1.1 rules a key written ``on:`` (say, in ``methods_description``) becomes the boolean
``True`` and upstream then silently drops the whole driver entry (protocol-facts §9.1).
Values such as ``insecure: yes`` still work, because pydantic accepts "yes"/"on" as booleans.
Duplicate keys are an error instead of last-one-wins.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from jumpstarter_exporter.errors import ConfigError

KeyPath = tuple[str | int, ...]

_BOOL_TAG = "tag:yaml.org,2002:bool"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema booleans."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class _Dumper(yaml.SafeDumper):
    """Writes strings that YAML 1.1 readers (upstream) would take for booleans in quotes."""


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    if data.lower() in {"yes", "no", "on", "off", "y", "n"}:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="'")
    return dumper.represent_str(data)


_Dumper.add_representer(str, _represent_str)


def _line_map(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], where: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise ConfigError(
                    f"duplicate key {'.'.join(map(str, (*path, key)))!r} "
                    f"at line {key_node.start_mark.line + 1}",
                    path=where,
                )
            seen.add(key)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _line_map(value_node, (*path, key), lines, where)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            _line_map(item, (*path, index), lines, where)


def parse_yaml(text: str, where: Path) -> tuple[Any, dict[KeyPath, int]]:
    """Parse text into Python data and a map from key path to 1-based line number."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines: dict[KeyPath, int] = {}
        _line_map(node, (), lines, where)
        return loader.construct_document(node), lines
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"invalid YAML: {at}{problem}", path=where) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path=where) from None
    finally:
        loader.dispose()


def read_mapping(path: Path) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    """Read a config file that must hold one YAML mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read file: {reason}", path=path) from None
    data, lines = parse_yaml(text, path)
    if data is None:
        raise ConfigError("file is empty", path=path)
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping at the top level, found {type(data).__name__}", path=path
        )
    return data, lines


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves either the old or the new file.

    Temp file in the same directory (rename is atomic only within one filesystem), chmod
    before any byte is written (a token never sits in a world-readable file), fsync the
    file, rename, then fsync the directory so the rename itself survives a power cut.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
