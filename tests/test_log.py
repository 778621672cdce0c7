"""Logging: JSON off a terminal, text on one, and secrets never rendered."""

from __future__ import annotations

import io
import json
import subprocess

import structlog

from jumpstarter_exporter import log as logsetup


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_when_not_a_tty_and_secrets_redacted() -> None:
    stream = io.StringIO()
    logsetup.configure("INFO", "auto", stream=stream)
    logger = structlog.get_logger("t")
    logger.info("dialling", token="tok-123", lease="l1", detail="Bearer abc.def")
    logger.debug("hidden")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "dialling"
    assert event["lease"] == "l1"
    assert event["level"] == "info"
    assert "ts" in event
    assert event["token"] == "<redacted>"
    assert event["detail"] == "Bearer <redacted>"
    assert "tok-123" not in stream.getvalue() and "abc.def" not in stream.getvalue()


def test_text_on_a_tty_and_forced_json() -> None:
    tty = _Tty()
    logsetup.configure("DEBUG", "auto", stream=tty)
    structlog.get_logger("t").debug("hello", driver="power")
    assert "hello" in tty.getvalue()
    assert not tty.getvalue().lstrip().startswith("{")
    forced = _Tty()
    logsetup.configure("INFO", "json", stream=forced)
    structlog.get_logger("t").info("x")
    assert json.loads(forced.getvalue())["event"] == "x"


def test_internal_error_exits_70_with_traceback_in_log(tmp_path, config_env) -> None:
    """A bug (not a user error) is logged with its traceback and exits 70 (EX_SOFTWARE)."""
    exporters = tmp_path / "home" / ".config" / "jumpstarter" / "exporters"
    exporters.mkdir(parents=True)
    # A directory where a file is expected makes unlink() fail with an OSError our code does
    # not anticipate: exactly the "anything else" branch of the exit-code table.
    (exporters / "weird.yaml").mkdir()
    from tests.conftest import JMP

    out = subprocess.run(
        [str(JMP), "--log-format", "json", "config", "exporter", "delete", "weird"],
        env=config_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 70
    event = json.loads(out.stderr.strip().splitlines()[-1])
    assert event["event"] == "internal error"
    assert "IsADirectoryError" in event["exception"]


def test_stdlib_records_are_rendered_like_ours() -> None:
    """grpc and asyncio log through stdlib logging: those lines must be JSON too."""
    import logging

    stream = io.StringIO()
    logsetup.configure("DEBUG", "json", stream=stream)
    logging.getLogger("grpc.test").warning("socket %s closed", "x", extra={})
    event = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert event["event"] == "socket x closed"
    assert event["level"] == "warning"
    assert event["logger"] == "grpc.test"
    assert "ts" in event
