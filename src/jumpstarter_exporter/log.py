"""Structured logging (structlog): JSON when stderr is not a terminal, never a secret.

``configure()`` is called once by the CLI. Library modules do
``log = structlog.get_logger(__name__)`` and bind fields (``exporter``, ``lease``, ``client``,
``driver``). The ``redact`` processor replaces the value of any secret-named field and any
``Bearer …`` text before rendering, so a careless ``log.info("x", token=token)`` leaks nothing.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, Literal

import structlog

from jumpstarter_exporter.config.models import SECRET_KEYS

LogFormat = Literal["auto", "json", "text"]
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\"]+")


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _BEARER.sub(r"\1<redacted>", value)
    return value


def redact(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in list(event):
        if key in SECRET_KEYS or key == "authorization":
            event[key] = "<redacted>"
        else:
            event[key] = _scrub(event[key])
    return event


# Sinks see every rendered-to-be event (after redaction): a lease session forwards them to
# its clients' LogStream. Plain functions, called on the logging thread; they must not block.
_SINKS: list = []


def add_sink(sink) -> None:
    _SINKS.append(sink)


def remove_sink(sink) -> None:
    if sink in _SINKS:
        _SINKS.remove(sink)


def _to_sinks(_logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    if _SINKS and method not in ("debug", "trace"):
        for sink in list(_SINKS):
            sink(method, dict(event))
    return event


def configure(level: str = "INFO", fmt: LogFormat = "auto", stream: Any = None) -> None:
    stream = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            redact,
            _to_sinks,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries that use stdlib logging (grpc, asyncio, pysnmp) go to the same stream, at
    # the same level and in the same format, so a JSON log stays one JSON object per line.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
