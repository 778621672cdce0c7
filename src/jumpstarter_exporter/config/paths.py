"""Where configuration files live, and how an alias becomes a path.

Config home: ``$JMP_CLIENT_CONFIG_HOME``, else ``$XDG_CONFIG_HOME/jumpstarter``, else
``~/.config/jumpstarter`` (upstream's order). System exporter configs live in
``/etc/jumpstarter/exporters``; ``$JMP_SYSTEM_EXPORTER_DIR`` moves that directory (tests and
unusual installs). Everything is read from the environment at call time, never at import
time, so one process can be pointed elsewhere (upstream freezes it at import).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from jumpstarter_exporter.errors import ConfigError

SYSTEM_EXPORTER_DIR = Path("/etc/jumpstarter/exporters")


def config_home(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("JMP_CLIENT_CONFIG_HOME"):
        return Path(env["JMP_CLIENT_CONFIG_HOME"])
    if env.get("XDG_CONFIG_HOME"):
        return Path(env["XDG_CONFIG_HOME"]) / "jumpstarter"
    return Path(env.get("HOME") or Path.home()) / ".config" / "jumpstarter"


def user_config_path(environ: Mapping[str, str] | None = None) -> Path:
    return config_home(environ) / "config.yaml"


def clients_dir(environ: Mapping[str, str] | None = None) -> Path:
    return config_home(environ) / "clients"


def user_exporters_dir(environ: Mapping[str, str] | None = None) -> Path:
    return config_home(environ) / "exporters"


def system_exporters_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return (
        Path(env["JMP_SYSTEM_EXPORTER_DIR"])
        if env.get("JMP_SYSTEM_EXPORTER_DIR")
        else (SYSTEM_EXPORTER_DIR)
    )


def validate_alias(alias: str, kind: str) -> str:
    """An alias names a file in a config directory: refuse anything that could escape it.

    Upstream checks this for exporters only; a client alias like ``../x`` writes outside
    ``clients/`` there. We check both kinds.
    """
    if not alias or alias in (".", "..") or "/" in alias or "\\" in alias or "\0" in alias:
        raise ConfigError(
            f"invalid {kind} alias {alias!r}: must be non-empty, not '.' or '..', "
            "and contain no path separators"
        )
    return alias


def client_path(alias: str, environ: Mapping[str, str] | None = None) -> Path:
    return clients_dir(environ) / f"{validate_alias(alias, 'client')}.yaml"


def user_exporter_path(alias: str, environ: Mapping[str, str] | None = None) -> Path:
    return user_exporters_dir(environ) / f"{validate_alias(alias, 'exporter')}.yaml"


def system_exporter_path(alias: str, environ: Mapping[str, str] | None = None) -> Path:
    return system_exporters_dir(environ) / f"{validate_alias(alias, 'exporter')}.yaml"


def resolve_exporter(alias: str, environ: Mapping[str, str] | None = None) -> Path:
    """User file if it exists, else the system file if it exists, else the user path.

    Returning the user path for a missing alias makes the "does not exist" error name the
    place where ``jmp config exporter create`` would put it.
    """
    user = user_exporter_path(alias, environ)
    if user.exists():
        return user
    system = system_exporter_path(alias, environ)
    if system.exists():
        return system
    return user


def alias_of(path: Path) -> str:
    """A config's alias is its file name up to the first dot (upstream's rule)."""
    return path.name.split(".")[0]


def list_yaml(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    # Hidden files are ours in flight (atomic-write temps, edit drafts), never configs.
    return sorted(
        p
        for p in directory.iterdir()
        if p.suffix == ".yaml" and not p.name.startswith(".") and p.is_file()
    )
