"""Options shared by the client commands (``jmp shell``, ``jmp get/create/delete``)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import TypeAdapter, ValidationError

from jumpstarter_exporter.config import ClientConfig, load_client

_TIMEDELTA: TypeAdapter[dt.timedelta] = TypeAdapter(dt.timedelta)
_SUFFIXED = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class DurationType(click.ParamType):
    """``00:30:00``, ``30m``/``2h``/``90s``, ISO 8601 (``PT30M``) or plain seconds."""

    name = "duration"

    def convert(self, value: Any, param, ctx) -> dt.timedelta:
        if isinstance(value, dt.timedelta):
            return value
        text = str(value)
        if match := _SUFFIXED.match(text):
            result = dt.timedelta(seconds=float(match[1]) * _UNIT[match[2]])
        else:
            try:
                result = _TIMEDELTA.validate_python(text)
            except ValidationError:
                self.fail(
                    f"{text!r} is not a duration (e.g. 00:30:00, 30m, 2h, PT30M, 1800)",
                    param,
                    ctx,
                )
        if result.total_seconds() <= 0:
            self.fail(f"{text!r}: a duration must be positive", param, ctx)
        return result


DURATION = DurationType()


def client_config_options(func: Callable) -> Callable:
    """``--client ALIAS`` / ``--client-config PATH`` (neither: JMP_CLIENT_CONFIG, JMP_CLIENT,
    the environment, then the current client, as ``config.load_client`` documents)."""
    func = click.option(
        "--client-config",
        "client_config",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Path of a client config file.",
    )(func)
    return click.option("--client", "client_alias", help="Alias of a client config.")(func)


def load_client_config(client_alias: str | None, client_config: Path | None) -> ClientConfig:
    if client_alias is not None and client_config is not None:
        raise click.UsageError("give only one of --client and --client-config")
    return load_client(alias=client_alias, path=client_config).config


__all__ = ["DURATION", "DurationType", "client_config_options", "load_client_config"]
