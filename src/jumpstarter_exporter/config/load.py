"""Loading configs with the documented precedence, and saying where every value came from.

Precedence, highest first (the documentation's promise; upstream 0.9 lets the file win and
ignores JMP_ENDPOINT/JMP_TOKEN for exporters, protocol-facts §8.5):

1. command-line flags (passed in as ``overrides``),
2. environment variables (``ENV_RULES`` below),
3. the file: for an alias, the user directory first, then the system directory,
4. model defaults.

Each layer is a pydantic-settings source; pydantic-settings deep-merges them. The file to
read is handed to the sources through a context variable for the duration of one load, so a
model built directly (``ExporterConfig(...)``) never picks up the environment by accident.
"""

from __future__ import annotations

import contextvars
import copy
import difflib
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from jumpstarter_exporter.config import paths
from jumpstarter_exporter.config.models import (
    SECRET_KEYS,
    ClientConfig,
    ExporterConfig,
    UserConfig,
)
from jumpstarter_exporter.config.yamlio import KeyPath, read_mapping
from jumpstarter_exporter.errors import ConfigError, NotFoundError

T = TypeVar("T", ClientConfig, ExporterConfig)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _flag(name: str, raw: str) -> bool | None:
    """``1``/``true`` turns a switch on; ``0``/empty leaves the file's value alone."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return None
    raise ConfigError(f"environment variable {name}={raw!r}: expected 1 or 0")


def _text(_name: str, raw: str) -> str | None:
    return raw if raw != "" else None


def _comma_list(_name: str, raw: str) -> list[str] | None:
    items = [item.strip() for item in raw.split(",") if item.strip()]
    return items or None


@dataclass(frozen=True)
class EnvRule:
    """One environment variable that overrides one key."""

    var: str
    key: KeyPath
    parse: Callable[[str, str], Any] = _text


_COMMON_RULES = (
    EnvRule("JMP_ENDPOINT", ("endpoint",)),
    EnvRule("JMP_TOKEN", ("token",)),
    EnvRule("JMP_NAMESPACE", ("metadata", "namespace")),
    EnvRule("JMP_NAME", ("metadata", "name")),
    # Both spellings exist upstream; when both are set the documented one wins.
    EnvRule("JMP_GRPC_INSECURE", ("tls", "insecure"), _flag),
    EnvRule("JUMPSTARTER_GRPC_INSECURE", ("tls", "insecure"), _flag),
)

ENV_RULES: dict[type[BaseSettings], tuple[EnvRule, ...]] = {
    ExporterConfig: _COMMON_RULES,
    ClientConfig: (*_COMMON_RULES, EnvRule("JMP_DRIVERS_ALLOW", ("drivers", "allow"), _comma_list)),
}


def _set_path(data: dict[str, Any], key: KeyPath, value: Any) -> None:
    for part in key[:-1]:
        data = data.setdefault(part, {})
    data[key[-1]] = value


def _get_path(data: Any, key: KeyPath) -> tuple[bool, Any]:
    for part in key:
        if not isinstance(data, dict) or part not in data:
            return False, None
        data = data[part]
    return True, data


def env_overrides(
    cls: type[BaseSettings], environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[KeyPath, str]]:
    """The environment layer: nested data, and which variable set each key."""
    data: dict[str, Any] = {}
    origin: dict[KeyPath, str] = {}
    for rule in ENV_RULES.get(cls, ()):
        if rule.var not in environ:
            continue
        value = rule.parse(rule.var, environ[rule.var])
        if value is not None:
            _set_path(data, rule.key, value)
            origin[rule.key] = rule.var
    return data, origin


@dataclass
class _Layers:
    """The inputs of one load, kept so that errors and ``check`` can name each value's origin."""

    path: Path | None
    file_data: dict[str, Any]
    lines: dict[KeyPath, int]
    env_data: dict[str, Any]
    env_origin: dict[KeyPath, str]
    flags: dict[str, Any] = field(default_factory=dict)

    def origin(self, key: KeyPath) -> str:
        if _get_path(self.flags, key)[0]:
            return "command line"
        for env_key, var in self.env_origin.items():
            if key[: len(env_key)] == env_key:
                return f"environment {var}"
        if _get_path(self.file_data, key)[0]:
            return f"line {self.lines[key]}" if key in self.lines else "file"
        return "default"

    def line(self, key: KeyPath) -> int | None:
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return None


_ACTIVE: contextvars.ContextVar[_Layers | None] = contextvars.ContextVar("_ACTIVE", default=None)


class _DictSource(PydanticBaseSettingsSource):
    """A settings source that hands pydantic-settings one prepared layer."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)


def layered_sources(
    settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource
) -> tuple[PydanticBaseSettingsSource, ...]:
    """Sources for the file models, highest precedence first (see the module docstring)."""
    layers = _ACTIVE.get()
    if layers is None:
        return (init_settings,)
    return (
        init_settings,
        _DictSource(settings_cls, layers.env_data),
        _DictSource(settings_cls, layers.file_data),
    )


@dataclass
class Loaded(Generic[T]):
    """A validated config together with where it came from."""

    config: T
    path: Path | None
    layers: _Layers

    @property
    def alias(self) -> str | None:
        return paths.alias_of(self.path) if self.path else None

    def explain(self, *, show_secrets: bool = False) -> list[tuple[str, Any, str]]:
        """(dotted key, JSON value, origin) for every leaf of the effective config."""
        rows = []
        data = self.config.model_dump(mode="json", by_alias=True)
        for key, value in _leaves(data):
            if not show_secrets and value and key[-1] in SECRET_KEYS:
                value = "<redacted>"
            rows.append((".".join(map(str, key)), value, self.layers.origin(key)))
        return rows


# Free-form maps whose keys contain dots (gRPC channel args) or are user text: one leaf each,
# so "grpcOptions.grpc.keepalive_time_ms" never has to be split back apart.
_MAP_LEAVES = frozenset({"grpcOptions", "methods_description"})


def _leaves(data: Any, prefix: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    if isinstance(data, dict) and data and (not prefix or prefix[-1] not in _MAP_LEAVES):
        for key, value in data.items():
            yield from _leaves(value, (*prefix, key))
    else:
        yield prefix, data


def load(
    cls: type[T],
    path: Path | None,
    *,
    overrides: dict[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Loaded[T]:
    """Load ``path`` (None: environment and flags only) into ``cls`` with full precedence."""
    env = os.environ if environ is None else environ
    file_data, lines = read_mapping(path) if path is not None else ({}, {})
    env_data, env_origin = env_overrides(cls, env)
    layers = _Layers(path, file_data, lines, env_data, env_origin, dict(overrides or {}))
    token = _ACTIVE.set(layers)
    try:
        config = cls(**layers.flags)
    except ValidationError as exc:
        raise _config_error(exc, cls, layers) from None
    finally:
        _ACTIVE.reset(token)
    return Loaded(config, path, layers)


def load_exporter(
    *,
    alias: str | None = None,
    path: Path | str | None = None,
    overrides: dict[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Loaded[ExporterConfig]:
    """``--exporter ALIAS`` (user dir, then system dir) or ``--exporter-config PATH``."""
    if (alias is None) == (path is None):
        raise ValueError("exactly one of alias or path")
    target = paths.resolve_exporter(alias, environ) if alias is not None else Path(path)
    if not target.exists():
        what = f'exporter "{alias}"' if alias is not None else f"exporter config {target}"
        raise NotFoundError(f"{what} does not exist")
    return load(ExporterConfig, target, overrides=overrides, environ=environ)


def load_client(
    *,
    alias: str | None = None,
    path: Path | str | None = None,
    overrides: dict[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Loaded[ClientConfig]:
    """Select and load a client config.

    Order: ``--client``/``--client-config`` (the arguments), then ``JMP_CLIENT_CONFIG`` (a
    path), then ``JMP_CLIENT`` (an alias), then a config made from the environment alone when
    ``JMP_NAME`` and ``JMP_NAMESPACE`` are set, then ``current-client`` in config.yaml.
    """
    env = os.environ if environ is None else environ
    if alias is not None and path is not None:
        raise ConfigError("only one of --client and --client-config may be given")
    if alias is None and path is None:
        if env.get("JMP_CLIENT_CONFIG"):
            path = env["JMP_CLIENT_CONFIG"]
        elif env.get("JMP_CLIENT"):
            alias = env["JMP_CLIENT"]
        elif env.get("JMP_NAME") and env.get("JMP_NAMESPACE"):
            return load(ClientConfig, None, overrides=overrides, environ=env)
        else:
            alias = load_user(env).config.config.current_client
            if alias is None:
                raise NotFoundError(
                    "no client config selected: give --client or --client-config, set "
                    "JMP_CLIENT or JMP_CLIENT_CONFIG, or run `jmp config client use ALIAS`"
                )
    target = paths.client_path(alias, env) if alias is not None else Path(path)
    if not target.exists():
        what = f"client config '{alias}'" if alias is not None else "client config"
        raise NotFoundError(f"{what} {target} does not exist")
    return load(ClientConfig, target, overrides=overrides, environ=env)


@dataclass
class LoadedUser:
    config: UserConfig
    path: Path


def load_user(environ: Mapping[str, str] | None = None) -> LoadedUser:
    """config.yaml; a missing file is an empty config, a dangling current-client reads null."""
    path = paths.user_config_path(environ)
    if not path.exists():
        return LoadedUser(UserConfig(), path)
    data, lines = read_mapping(path)
    layers = _Layers(path, data, lines, {}, {})
    try:
        config = UserConfig.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, UserConfig, layers) from None
    current = config.config.current_client
    if current is not None and not paths.client_path(current, environ).exists():
        config.config.current_client = None
    return LoadedUser(config, path)


# --- error messages -------------------------------------------------------------------------

_UNION_TAGS = {"driver", "group", "ref"}


def _clean_loc(loc: tuple[Any, ...], data: Any) -> KeyPath:
    """Drop the union tags pydantic puts in error locations, guided by the data itself."""
    out: list[str | int] = []
    for part in loc:
        in_dict = isinstance(data, dict) and part in data
        in_list = isinstance(data, list) and isinstance(part, int) and part < len(data)
        if in_dict or in_list:
            data = data[part]
            out.append(part)
        elif part in _UNION_TAGS:
            continue
        else:
            data = None
            out.append(part)
    return tuple(out)


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _field(model: type[BaseModel], key: Any) -> FieldInfo | None:
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info
    return None


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that an error location (with union tags) points into."""
    tp: Any = root
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            info = _field(tp, part)
            if info is None:
                return None
            tp = info.annotation
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) in (typing.Union, types.UnionType):
            for member in typing.get_args(tp):
                tags = [m.tag for m in getattr(member, "__metadata__", ()) if hasattr(m, "tag")]
                if part in tags:
                    tp = member
                    break
            else:
                return None
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _known_keys(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _config_error(exc: ValidationError, cls: type[BaseModel], layers: _Layers) -> ConfigError:
    merged: dict[str, Any] = {}
    for layer in (layers.file_data, layers.env_data, layers.flags):
        merged = _deep_merge(merged, layer)
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        raw_loc = tuple(err["loc"])
        key = _clean_loc(raw_loc, merged)
        dotted = ".".join(map(str, key)) or "(top level)"
        where = layers.origin(key)
        if where == "default":
            # A missing key has no line of its own: point at its nearest written parent.
            where = f"line {layers.line(key)}" if layers.line(key) else ""
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = _model_at(cls, raw_loc[:-1])
            known = _known_keys(parent) if parent else []
            close = difflib.get_close_matches(str(key[-1]), known, n=1, cutoff=0.5)
            message = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
            if known:
                message += f"; allowed here: {', '.join(known)}"
        elif kind == "missing":
            message = "required key is missing"
        else:
            message = err["msg"].removeprefix("Value error, ")
        origin = f" [{where}]" if where else ""
        problems.append(f"{dotted}: {message}{origin}")
    label = "invalid configuration" if layers.path else "invalid configuration from environment"
    return ConfigError(label, path=layers.path, problems=problems)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
