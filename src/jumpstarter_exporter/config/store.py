"""Saving configs: atomic, mode 0600, in upstream 0.9's shape so upstream reads them too."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from jumpstarter_exporter.config import paths
from jumpstarter_exporter.config.models import ClientConfig, ExporterConfig, UserConfig
from jumpstarter_exporter.config.yamlio import atomic_write, dump_yaml
from jumpstarter_exporter.errors import AlreadyExistsError


def save_client(config: ClientConfig, path: Path) -> Path:
    atomic_write(path, dump_yaml(config.to_file()))
    return path


def save_exporter(config: ExporterConfig, path: Path) -> Path:
    atomic_write(path, dump_yaml(config.to_file()))
    return path


def save_user(config: UserConfig, environ: Mapping[str, str] | None = None) -> Path:
    path = paths.user_config_path(environ)
    atomic_write(path, dump_yaml(config.model_dump(mode="json", by_alias=True)))
    return path


def add_client(config: ClientConfig, alias: str, environ: Mapping[str, str] | None = None) -> Path:
    """Save a new client config under ``alias``; the first client becomes the current one."""
    path = paths.client_path(alias, environ)
    if path.exists():
        raise AlreadyExistsError(f"A client with the name '{alias}' already exists.")
    save_client(config, path)
    if paths.list_yaml(paths.clients_dir(environ)) == [path]:
        from jumpstarter_exporter.config.load import load_user

        user = load_user(environ)
        user.config.config.current_client = alias
        save_user(user.config, environ)
    return path


def add_exporter(
    config: ExporterConfig, alias: str, environ: Mapping[str, str] | None = None
) -> Path:
    """Save a new exporter config under ``alias`` in the user directory."""
    path = paths.user_exporter_path(alias, environ)
    if path.exists():
        raise AlreadyExistsError(f'exporter "{alias}" exists')
    return save_exporter(config, path)
