"""Saving configs: atomic, mode 0600, in upstream 0.9's shape so upstream reads them too."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from jumpstarter_exporter.config import paths
from jumpstarter_exporter.config.models import ClientConfig, ExporterConfig, UserConfig
from jumpstarter_exporter.config.yamlio import atomic_write, dump_yaml


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
