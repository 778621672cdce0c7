"""Rendering command output: tables for people, json/yaml/name/path for scripts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

from jumpstarter_exporter.config.yamlio import dump_yaml

OUTPUT_CHOICES = click.Choice(["json", "yaml", "name"])


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(str(c))) for w, c in zip(widths, row, strict=True)]
    lines = [headers, *rows]
    return "\n".join(
        "   ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def show(value: Any) -> str:
    """A JSON value as a person reads it in a table (YAML spelling for scalars)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def emit(document: Any, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(document, indent=4))
    elif fmt == "yaml":
        click.echo(dump_yaml(document), nl=False)
    else:  # pragma: no cover - guarded by click.Choice
        raise click.UsageError(f"unknown output format {fmt!r}")
