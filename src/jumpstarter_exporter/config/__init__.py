"""Configuration: where files live, their typed models, and loading with precedence.

Public surface (pinned by tests/test_public_surface.py)::

    paths       config_home, resolve_exporter, validate_alias, ...
    models      UserConfig, ClientConfig, ExporterConfig and their parts
    load        load_exporter, load_client, load_user, Loaded.explain
    store       atomic, 0600 saving of the three kinds
"""

from jumpstarter_exporter.config.load import Loaded, load_client, load_exporter, load_user
from jumpstarter_exporter.config.models import ClientConfig, ExporterConfig, UserConfig

__all__ = [
    "ClientConfig",
    "ExporterConfig",
    "Loaded",
    "UserConfig",
    "load_client",
    "load_exporter",
    "load_user",
]
