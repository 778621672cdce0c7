"""Typed models of the three config files, key for key with upstream 0.9 (protocol-facts §8.2-8.4).

The models are strict where upstream is lax: an unknown key is an error (upstream's exporter
config ignores it, which is how the documentation's ``grpcConfig`` typo goes unnoticed), and a
driver entry must fit exactly one of its three forms (upstream silently turns a typo'd typed
entry into an empty group). Everything upstream 0.9 writes still loads, and what we write
loads in upstream 0.9 (tests/test_config_interop.py checks both directions).

The file models are pydantic-settings ``BaseSettings`` so that the documented precedence
(flags > environment > file) is expressed as settings sources; see ``load.py``. Built
directly (``ExporterConfig(...)``) or validated (``model_validate``) they read no environment.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

API_VERSION = "jumpstarter.dev/v1alpha1"

# Keys whose values never appear in errors, logs or listings unless asked for.
SECRET_KEYS = frozenset(
    {
        "token",
        "refresh_token",
        "passphrase",
        "password",
        "authPassword",
        "privPassword",
        "community",
        "write_community",
        "priv_password",
        "auth_key",
        "priv_key",
    }
)

_STRICT = ConfigDict(extra="forbid", populate_by_name=True)


class ConfigModel(BaseModel):
    model_config = _STRICT


class ObjectMeta(ConfigModel):
    namespace: str | None = None
    name: str


class TLSConfig(ConfigModel):
    ca: str = ""
    insecure: bool = False

    @field_validator("ca")
    @classmethod
    def _ca_is_base64_pem(cls, value: str) -> str:
        """``tls.ca`` is base64 of a PEM bundle (not the PEM itself): check it decodes to one."""
        if not value:
            return value
        try:
            pem = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(
                "must be base64 of a PEM CA bundle (e.g. `base64 -w0 ca.pem`); "
                "it is not valid base64"
            ) from None
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            raise ValueError("decodes from base64, but holds no PEM certificate")
        return value

    def ca_pem(self) -> bytes | None:
        return base64.b64decode(self.ca) if self.ca else None


GrpcOptions = dict[str, str | int]


def _none_is_empty(value: Any) -> Any:
    # Upstream types grpcOptions as `dict | None`; a file saying `grpcOptions: null` must load.
    return {} if value is None else value


# --- client ---------------------------------------------------------------------------------


class DriversConfig(ConfigModel):
    allow: list[str] = Field(default_factory=list)
    unsafe: bool = False

    @field_validator("allow", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        # Upstream accepts "a.*,b.*" as well as a list.
        if isinstance(value, str):
            return [item.strip() for item in value.split(",")]
        return value

    @model_validator(mode="after")
    def _unsafe_entry(self) -> DriversConfig:
        # A literal UNSAFE entry means "allow everything", as upstream's JMP_DRIVERS_ALLOW does.
        if "UNSAFE" in self.allow:
            self.unsafe = True
        return self


class ShellConfig(ConfigModel):
    use_profiles: bool = False


class LeasesConfig(ConfigModel):
    acquisition_timeout: int = Field(default=7200, ge=5)
    dial_timeout: float = Field(default=30.0, gt=0)
    retry_timeout: float = Field(default=300.0, ge=0)


class _LayeredSettings(BaseSettings):
    """Base for the file models: strict keys, and precedence supplied by ``sources``."""

    model_config = SettingsConfigDict(extra="forbid", populate_by_name=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        from jumpstarter_exporter.config.load import layered_sources

        return layered_sources(settings_cls, init_settings)


class ClientConfig(_LayeredSettings):
    apiVersion: Literal["jumpstarter.dev/v1alpha1"] = API_VERSION
    kind: Literal["ClientConfig"] = "ClientConfig"
    metadata: ObjectMeta
    endpoint: str | None = None
    tls: TLSConfig = Field(default_factory=TLSConfig)
    token: str | None = None
    refresh_token: str | None = None
    grpcOptions: Annotated[GrpcOptions, BeforeValidator(_none_is_empty)] = Field(
        default_factory=dict
    )
    drivers: DriversConfig = Field(default_factory=DriversConfig)
    shell: ShellConfig = Field(default_factory=ShellConfig)
    leases: LeasesConfig = Field(default_factory=LeasesConfig)

    def to_file(self) -> dict[str, Any]:
        """What ``jmp config client create`` writes: upstream 0.9's shape and key order.

        Nulls are dropped and the ``leases`` block is omitted while it holds the defaults
        (0.7.x clients reject it). ``dial_timeout`` is never written: 0.9 marks it internal.
        """
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        leases = data.pop("leases")
        leases.pop("dial_timeout", None)
        defaults = LeasesConfig().model_dump(mode="json", exclude={"dial_timeout"})
        if leases != defaults:
            data["leases"] = leases
        return data


# --- user -----------------------------------------------------------------------------------


class UserSettings(ConfigModel):
    current_client: str | None = Field(default=None, alias="current-client")


class UserConfig(ConfigModel):
    apiVersion: Literal["jumpstarter.dev/v1alpha1"] = API_VERSION
    kind: Literal["UserConfig"] = "UserConfig"
    config: UserSettings = Field(default_factory=UserSettings)


# --- exporter -------------------------------------------------------------------------------

_TYPE_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


class DriverEntry(ConfigModel):
    """A driver: ``type`` is the class path (upstream's, or ours)."""

    type: str
    config: dict[str, Any] = Field(default_factory=dict)
    description: str | None = None
    methods_description: dict[str, str] = Field(default_factory=dict)
    children: dict[str, DriverInstance] = Field(default_factory=dict)

    @field_validator("type")
    @classmethod
    def _dotted(cls, value: str) -> str:
        if not _TYPE_PATH.match(value):
            raise ValueError(
                f"{value!r} is not a driver class path such as "
                "'jumpstarter_driver_power.driver.MockPower'"
            )
        return value


class CompositeEntry(ConfigModel):
    """A group of drivers with no behaviour of its own."""

    children: dict[str, DriverInstance]
    description: str | None = None


class RefEntry(ConfigModel):
    """Another name for an entry elsewhere in the tree (dot path from the root)."""

    ref: str


def _driver_form(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return {DriverEntry: "driver", CompositeEntry: "group", RefEntry: "ref"}.get(type(value))
    if not isinstance(value, dict):
        return None
    for key, form in (("type", "driver"), ("ref", "ref"), ("children", "group")):
        if key in value:
            return form
    return None


DriverInstance = Annotated[
    Annotated[DriverEntry, Tag("driver")]
    | Annotated[CompositeEntry, Tag("group")]
    | Annotated[RefEntry, Tag("ref")],
    Discriminator(
        _driver_form,
        custom_error_type="driver_form",
        custom_error_message=(
            "a driver entry needs `type:` (a driver class), `children:` (a group) "
            "or `ref:` (another entry's name)"
        ),
    ),
]

DriverEntry.model_rebuild()
CompositeEntry.model_rebuild()


class HookInstance(ConfigModel):
    script: str
    exec_: str | None = Field(default=None, alias="exec")
    timeout: int = Field(default=120, gt=0)
    on_failure: Literal["warn", "endLease", "exit"] = Field(default="warn", alias="onFailure")


class HooksConfig(ConfigModel):
    before_lease: HookInstance | None = Field(default=None, alias="beforeLease")
    after_lease: HookInstance | None = Field(default=None, alias="afterLease")


class FailureDetectionConfig(ConfigModel):
    max_rapid_failures: int = Field(default=5, ge=1, alias="maxRapidFailures")
    rapid_failure_window: int = Field(default=60, ge=1, alias="rapidFailureWindow")


def _walk_entries(
    entries: dict[str, Any], prefix: str = ""
) -> list[tuple[str, DriverEntry | CompositeEntry | RefEntry]]:
    found = []
    for name, entry in entries.items():
        path = f"{prefix}{name}"
        found.append((path, entry))
        if isinstance(entry, DriverEntry | CompositeEntry):
            found.extend(_walk_entries(entry.children, f"{path}."))
    return found


class ExporterConfig(_LayeredSettings):
    apiVersion: Literal["jumpstarter.dev/v1alpha1"] = API_VERSION
    kind: Literal["ExporterConfig"] = "ExporterConfig"
    metadata: ObjectMeta
    endpoint: str | None = None
    tls: TLSConfig = Field(default_factory=TLSConfig)
    token: str | None = None
    grpcOptions: Annotated[GrpcOptions, BeforeValidator(_none_is_empty)] = Field(
        default_factory=dict
    )
    description: str | None = None
    motd: str | None = None  # upstream HEAD
    export: dict[str, DriverInstance] = Field(default_factory=dict)
    hooks: HooksConfig = Field(default_factory=HooksConfig)
    failure_detection: FailureDetectionConfig = Field(
        default_factory=FailureDetectionConfig, alias="failureDetection"
    )
    # Upstream HEAD's key. None means our default: exit after the lease is released, as the
    # documentation promises. Only an explicit `false` keeps serving leases in one process.
    exit_on_lease_end: bool | None = Field(default=None, alias="exitOnLeaseEnd")

    @model_validator(mode="after")
    def _refs_resolve(self) -> ExporterConfig:
        entries = dict(_walk_entries(self.export))
        for path, entry in entries.items():
            if isinstance(entry, RefEntry):
                target = entries.get(entry.ref)
                if target is None:
                    raise ValueError(
                        f"export.{path}: ref {entry.ref!r} names no entry "
                        f"(known: {', '.join(sorted(entries)) or 'none'})"
                    )
                if isinstance(target, RefEntry):
                    raise ValueError(f"export.{path}: ref {entry.ref!r} names another ref")
        return self

    @property
    def exits_after_lease(self) -> bool:
        return self.exit_on_lease_end is not False

    def missing_for_controller(self) -> list[str]:
        """Keys a controller connection needs that are unset (standalone mode needs none)."""
        missing = [key for key in ("endpoint", "token") if not getattr(self, key)]
        if not self.metadata.namespace:
            missing.append("metadata.namespace")
        return missing

    def to_file(self) -> dict[str, Any]:
        """What ``jmp config exporter create`` writes: upstream 0.9's keys, order and nulls.

        HEAD-only keys (``motd``, ``exitOnLeaseEnd``) are written only when set, so a file we
        write stays valid for 0.9 and for HEAD (which rejects ``exitOnLeaseEnd: null``).
        """
        data = self.model_dump(mode="json", by_alias=True, exclude={"export"})
        data["export"] = {
            name: entry.model_dump(mode="json", by_alias=True, exclude_unset=True)
            for name, entry in self.export.items()
        }
        for key in ("motd", "exitOnLeaseEnd"):
            if data.get(key) is None:
                data.pop(key, None)
        order = [
            "apiVersion",
            "kind",
            "metadata",
            "endpoint",
            "tls",
            "token",
            "grpcOptions",
            "description",
            "motd",
            "export",
            "hooks",
            "failureDetection",
            "exitOnLeaseEnd",
        ]
        return {key: data[key] for key in order if key in data}
