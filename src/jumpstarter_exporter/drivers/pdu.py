"""Switched PDU outlets over SNMP v1/v2c/v3: ``PduPower``, driven by upstream's ``PowerClient``.

``PduPower`` switches one outlet of a network PDU (or one PoE port). The vendor is data, not
code: ``profile`` picks a row of ``PROFILES`` (the control column, its on/off values, the
column that reads the state back and its on/off values, and whether the PDU's id is part of
the index); ``profile: custom`` takes the same fields from the config.

Every switch is confirmed, because agents do not always say when they did nothing (a missing
outlet comes back from some agents as a ``noSuchInstance`` value with no error-status):

1. the SET's response must carry no error-status and exactly the varbind sent: same OID, an
   INTEGER, the same value (``noSuchInstance``/``noSuchObject`` mean "no such outlet");
2. then the state column is read until it shows the new state (``confirm_timeout``, default
   5 s: real PDUs take a moment) and anything else is an error.

Errors are ``DeviceError`` subclasses whose text names the PDU (host, port), the outlet, the
profile and the credential used (SNMP version, which community by its config key, or the v3
user and context), never a community or password. No response at all (a wrong community, a
wrong v3 context, or an unreachable PDU: SNMP cannot tell these apart) is ``PduUnreachable``.

pysnmp (its asyncio API) is imported on first use, so an exporter without a PDU never loads
it. Each operation uses its own SNMP engine, closed when the operation ends: nothing stays
open between calls, and ``cycle`` (off, wait, on) runs under the driver's lock.

``read`` (upstream's power readings, a stream of ``{"voltage", "current"}``) needs metering
OIDs from the config, because the built-in profiles measure nothing that is common to all
models: ``voltage_oid`` and/or ``current_oid`` are full OIDs, GET as written after
substituting ``{outlet}`` and ``{pdu_id}``; the INTEGER (or Gauge32) read is multiplied by
``voltage_scale``/``current_scale`` (default 1.0; e.g. 0.1 for tenths of amps). Each call
yields one reading; a field whose OID is not configured reads 0.0. With neither configured,
``read`` raises ``NotImplementedError`` (the client sees UNIMPLEMENTED) naming those keys.
``state()`` is the outlet's confirmed state (``True`` on).

Upstream's SNMP driver (``jumpstarter_driver_snmp.driver.SNMPServer``: v3 only, on=1/off=0
written to ``oid`` + ``plug``) is accepted by ``SNMPServer``, which maps its keys onto
``PduPower``: a known control column in ``oid`` selects its vendor profile (so an APC column
gets APC's off value 2, which upstream cannot send), anything else is a custom profile with
on=1/off=0 read back from the same OID.
"""

from __future__ import annotations

import asyncio
import importlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from jumpstarter_exporter.drivers.base import Driver, DriverConfig, export
from jumpstarter_exporter.drivers.power import POWER_CLIENT, PowerReading
from jumpstarter_exporter.errors import DeviceError, DeviceUnavailable

# --- vendor profiles ------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """How one MIB switches an outlet. ``status_oid`` ``None``: the control column reads the
    state back; ``status_on``/``status_off`` ``None``: the same values as ``on``/``off``.
    ``pdu_in_index``: the instance index is ``<pdu_id>.<outlet>`` instead of ``<outlet>``."""

    name: str
    control_oid: str
    on: int
    off: int
    status_oid: str | None = None
    status_on: int | None = None
    status_off: int | None = None
    pdu_in_index: bool = False
    description: str = ""

    def index(self, outlet: int, pdu_id: int) -> str:
        return f"{pdu_id}.{outlet}" if self.pdu_in_index else str(outlet)

    def control(self, outlet: int, pdu_id: int) -> str:
        return f"{self.control_oid}.{self.index(outlet, pdu_id)}"

    def status(self, outlet: int, pdu_id: int) -> str:
        return f"{self.status_oid or self.control_oid}.{self.index(outlet, pdu_id)}"

    @property
    def reads_on(self) -> int:
        return self.on if self.status_on is None else self.status_on

    @property
    def reads_off(self) -> int:
        return self.off if self.status_off is None else self.status_off


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "apc-rpdu",
            control_oid="1.3.6.1.4.1.318.1.1.12.3.3.1.1.4",
            on=1,
            off=2,
            status_oid="1.3.6.1.4.1.318.1.1.12.3.5.1.1.4",
            status_on=1,
            status_off=2,
            description="APC Switched Rack PDU (AP78xx/79xx/89xx), PowerNet-MIB "
            "rPDUOutletControlOutletCommand (1 immediateOn, 2 immediateOff), state from "
            "rPDUOutletStatusOutletState (1 on, 2 off)",
        ),
        Profile(
            "apc-spdu",
            control_oid="1.3.6.1.4.1.318.1.1.4.4.2.1.3",
            on=1,
            off=2,
            description="APC MasterSwitch (AP92xx, AP79xx), PowerNet-MIB sPDUOutletCtl "
            "(1 outletOn, 2 outletOff; reads the state back)",
        ),
        Profile(
            "apc-rpdu2",
            control_oid="1.3.6.1.4.1.318.1.1.26.9.2.4.1.5",
            on=1,
            off=2,
            description="APC Rack PDU 2G (AP84xx/86xx/89xx), PowerNet-MIB "
            "rPDU2OutletSwitchedControlCommand (1 immediateOn, 2 immediateOff; reads the "
            "state back)",
        ),
        Profile(
            "raritan",
            control_oid="1.3.6.1.4.1.13742.6.4.1.2.1.2",
            on=1,
            off=0,
            status_oid="1.3.6.1.4.1.13742.6.4.1.2.1.3",
            status_on=7,
            status_off=8,
            pdu_in_index=True,
            description="Raritan PX2/PX3, PDU2-MIB switchingOperation (0 off, 1 on), state "
            "from outletSwitchingState (7 on, 8 off); index <pdu_id>.<outlet>",
        ),
        Profile(
            "poe",
            control_oid="1.3.6.1.2.1.105.1.1.1.3",
            on=1,
            off=2,
            pdu_in_index=True,
            description="PoE switch port, POWER-ETHERNET-MIB pethPsePortAdminEnable "
            "(1 true, 2 false; reads the state back); index <pdu_id (group)>.<port>",
        ),
    )
}

ProfileName = Literal["apc-rpdu", "apc-spdu", "apc-rpdu2", "raritan", "poe", "custom"]
DEFAULT_PROFILE: ProfileName = "apc-rpdu"

# --- errors ---------------------------------------------------------------------------------


class PduError(DeviceError):
    """An outlet could not be switched or read; the text names PDU, outlet and credential."""


class PduUnreachable(PduError, DeviceUnavailable):
    """No SNMP response: wrong community or v3 context, or the PDU is unreachable."""


class PduRejected(PduError):
    """The agent refused the request (an error-status, or a varbind that is not the answer)."""


class PduNoSuchOutlet(PduRejected):
    """The outlet's OID does not exist on the agent (``noSuchInstance``/``noSuchObject``)."""


class PduStateMismatch(PduError):
    """The SET was accepted but the outlet does not read back the new state."""


# --- configuration --------------------------------------------------------------------------

Version = Literal["v1", "v2c", "v3"]
AuthProtocol = Literal["NONE", "MD5", "SHA", "SHA224", "SHA256", "SHA384", "SHA512"]
PrivProtocol = Literal[
    "NONE", "DES", "3DES", "AES", "AES192", "AES256", "AES192-BLUMENTHAL", "AES256-BLUMENTHAL"
]

# pysnmp.hlapi.v3arch.asyncio names, resolved when pysnmp is first imported.
_AUTH_NAMES = {
    "NONE": "USM_AUTH_NONE",
    "MD5": "USM_AUTH_HMAC96_MD5",
    "SHA": "USM_AUTH_HMAC96_SHA",
    "SHA224": "USM_AUTH_HMAC128_SHA224",
    "SHA256": "USM_AUTH_HMAC192_SHA256",
    "SHA384": "USM_AUTH_HMAC256_SHA384",
    "SHA512": "USM_AUTH_HMAC384_SHA512",
}
_PRIV_NAMES = {
    "NONE": "USM_PRIV_NONE",
    "DES": "USM_PRIV_CBC56_DES",
    "3DES": "USM_PRIV_CBC168_3DES",
    "AES": "USM_PRIV_CFB128_AES",
    "AES192": "USM_PRIV_CFB192_AES",
    "AES256": "USM_PRIV_CFB256_AES",
    "AES192-BLUMENTHAL": "USM_PRIV_CFB192_AES_BLUMENTHAL",
    "AES256-BLUMENTHAL": "USM_PRIV_CFB256_AES_BLUMENTHAL",
}
_VERSIONS = {"1": "v1", "v1": "v1", "2": "v2c", "2c": "v2c", "v2c": "v2c", "3": "v3", "v3": "v3"}
_OID = re.compile(r"^\d+(\.\d+)+$")
_CUSTOM_KEYS = (
    "control_oid",
    "status_oid",
    "on_value",
    "off_value",
    "status_on_value",
    "status_off_value",
)


_PLACEHOLDERS = ("{outlet}", "{pdu_id}")


def _metering_oid(value: str | None) -> str | None:
    """A metering OID: numeric, except that ``{outlet}``/``{pdu_id}`` may stand for a part."""
    if value is None:
        return None
    value = str(value).strip().removeprefix(".")
    probe = value
    for placeholder in _PLACEHOLDERS:
        probe = probe.replace(placeholder, "1")
    if not _OID.match(probe):
        raise ValueError(
            "must be a numeric OID, optionally with {outlet} and {pdu_id} placeholders, "
            "such as 1.3.6.1.4.1.318.1.1.26.9.4.3.1.6.{outlet}"
        )
    return value


def _oid(value: str | None) -> str | None:
    if value is None:
        return None
    value = str(value).strip().removeprefix(".")
    if not _OID.match(value):
        raise ValueError("must be a numeric OID such as 1.3.6.1.4.1.318.1.1.12.3.3.1.1.4")
    return value


@dataclass(frozen=True)
class SnmpSettings:
    """Where and how to talk SNMP; secrets are left out of ``repr``."""

    host: str
    port: int
    version: Version
    timeout: float
    retries: int
    read_community: str | None = field(default=None, repr=False)
    write_community: str | None = field(default=None, repr=False)
    read_community_source: str = ""  # the config key it came from, or "default"
    write_community_source: str = ""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    auth_protocol: str = "NONE"
    priv_password: str | None = field(default=None, repr=False)
    priv_protocol: str = "NONE"
    context: str = ""

    def secrets(self) -> list[str]:
        values = (self.read_community, self.write_community, self.password, self.priv_password)
        return [v for v in values if v]

    def credential(self, write: bool) -> str:
        """Which credential a request uses, by name only (never its value)."""
        if self.version == "v3":
            return f"SNMPv3 user {self.username!r}, context {self.context!r}"
        kind, source = (
            ("write", self.write_community_source)
            if write
            else ("read", self.read_community_source)
        )
        origin = "the default" if source == "default" else f"config key {source!r}"
        return f"SNMP{self.version} {kind} community from {origin}"


@dataclass(frozen=True)
class PduSettings:
    """Everything ``PduPower`` needs, resolved from a config (ours or upstream's)."""

    snmp: SnmpSettings
    profile: Profile
    outlet: int
    pdu_id: int
    cycle_wait: float
    confirm_timeout: float
    voltage_oid: str | None = None  # resolved: placeholders substituted
    current_oid: str | None = None
    voltage_scale: float = 1.0
    current_scale: float = 1.0

    @property
    def control_oid(self) -> str:
        return self.profile.control(self.outlet, self.pdu_id)

    @property
    def status_oid(self) -> str:
        return self.profile.status(self.outlet, self.pdu_id)

    def where(self, write: bool) -> str:
        return (
            f"PDU {self.snmp.host}:{self.snmp.port} outlet {self.outlet} "
            f"(profile {self.profile.name}, {self.snmp.credential(write)})"
        )


class PduPowerConfig(DriverConfig):
    """``PduPower``'s ``config:`` keys (see the module docstring and the README)."""

    host: str
    port: int = Field(161, ge=1, le=65535)
    outlet: int = Field(1, ge=1)
    profile: ProfileName = DEFAULT_PROFILE
    pdu_id: int = Field(1, ge=1)
    version: Version | None = None  # None: v3 when username is set, else v2c
    community: SecretStr | None = None  # None: "public"
    write_community: SecretStr | None = None  # None: community if set, else "private"
    username: str | None = None
    password: SecretStr | None = None
    auth_protocol: AuthProtocol | None = None  # None: SHA with a password, else NONE
    priv_password: SecretStr | None = None
    priv_protocol: PrivProtocol | None = None  # None: AES with a priv_password, else NONE
    context: str = ""
    timeout: float = Field(2.0, gt=0)
    retries: int = Field(1, ge=0)
    cycle_wait: float = Field(2.0, ge=0)
    confirm_timeout: float = Field(5.0, ge=0)
    # The custom profile's keys:
    control_oid: str | None = None
    status_oid: str | None = None
    on_value: int | None = None
    off_value: int | None = None
    status_on_value: int | None = None
    status_off_value: int | None = None
    # Power readings (any profile): full OIDs with {outlet}/{pdu_id} placeholders, and scales
    voltage_oid: str | None = None
    current_oid: str | None = None
    voltage_scale: float = Field(1.0, gt=0, allow_inf_nan=False)
    current_scale: float = Field(1.0, gt=0, allow_inf_nan=False)

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        if value is None:
            return None
        text = str(value).strip().lower()
        if text not in _VERSIONS:
            raise ValueError("must be v1, v2c or v3")
        return _VERSIONS[text]

    @field_validator("auth_protocol", "priv_protocol", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("control_oid", "status_oid")
    @classmethod
    def _numeric_oid(cls, value: str | None) -> str | None:
        return _oid(value)

    @field_validator("voltage_oid", "current_oid")
    @classmethod
    def _metering(cls, value: str | None) -> str | None:
        return _metering_oid(value)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        return value.removeprefix("[").removesuffix("]")

    @model_validator(mode="after")
    def _consistent(self) -> PduPowerConfig:
        version = self.snmp_version
        v3_keys = ("username", "password", "auth_protocol", "priv_password", "priv_protocol")
        if version == "v3":
            if not self.username:
                raise ValueError("SNMPv3 needs username")
            for key in ("community", "write_community"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} is for SNMPv1/v2c; SNMPv3 uses username/password")
            auth = self.auth_protocol
            if self.password is None and auth not in (None, "NONE"):
                raise ValueError(f"auth_protocol {auth} needs password")
            if self.password is not None and auth == "NONE":
                raise ValueError("password given but auth_protocol is NONE")
            if self.priv_password is not None and self.password is None:
                raise ValueError("priv_password needs password (SNMPv3 privacy implies auth)")
            priv = self.priv_protocol
            if self.priv_password is None and priv not in (None, "NONE"):
                raise ValueError(f"priv_protocol {priv} needs priv_password")
            if self.priv_password is not None and priv == "NONE":
                raise ValueError("priv_password given but priv_protocol is NONE")
        else:
            for key in v3_keys:
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} is SNMPv3 only (version is {version})")
            if self.context:
                raise ValueError(f"context is SNMPv3 only (version is {version})")
        metering = (self.voltage_oid, self.current_oid)
        if (
            "pdu_id" in self.model_fields_set
            and not (self.profile in PROFILES and PROFILES[self.profile].pdu_in_index)
            and not any(oid and "{pdu_id}" in oid for oid in metering)
        ):
            raise ValueError(
                f"pdu_id is not used by profile {self.profile} (only raritan and poe, or a "
                "{pdu_id} placeholder in voltage_oid/current_oid); for custom, put it in "
                "control_oid"
            )
        for kind in ("voltage", "current"):
            if f"{kind}_scale" in self.model_fields_set and getattr(self, f"{kind}_oid") is None:
                raise ValueError(f"{kind}_scale needs {kind}_oid")
        if self.profile == "custom":
            for key in ("control_oid", "on_value", "off_value"):
                if getattr(self, key) is None:
                    raise ValueError(f"profile custom needs {key}")
            if self.on_value == self.off_value:
                raise ValueError("on_value and off_value must differ")
            reads_on = self.on_value if self.status_on_value is None else self.status_on_value
            reads_off = self.off_value if self.status_off_value is None else self.status_off_value
            if reads_on == reads_off:
                raise ValueError("status_on_value and status_off_value must differ")
        else:
            given = [key for key in _CUSTOM_KEYS if getattr(self, key) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only with profile custom")
        return self

    @property
    def snmp_version(self) -> Version:
        if self.version is not None:
            return self.version
        return "v3" if self.username else "v2c"

    def resolve(self) -> PduSettings:
        def secret(value: SecretStr | None) -> str | None:
            return None if value is None else value.get_secret_value()

        version = self.snmp_version
        read = secret(self.community)
        write = secret(self.write_community)
        if version == "v3":
            snmp_creds: dict[str, Any] = {
                "username": self.username,
                "password": secret(self.password),
                "auth_protocol": self.auth_protocol or ("SHA" if self.password else "NONE"),
                "priv_password": secret(self.priv_password),
                "priv_protocol": self.priv_protocol or ("AES" if self.priv_password else "NONE"),
                "context": self.context,
            }
        else:
            snmp_creds = {
                "read_community": "public" if read is None else read,
                "read_community_source": "default" if read is None else "community",
                "write_community": write if write is not None else read or "private",
                "write_community_source": (
                    "write_community"
                    if write is not None
                    else "community"
                    if read is not None
                    else "default"
                ),
            }
        snmp = SnmpSettings(
            host=self.host,
            port=self.port,
            version=version,
            timeout=self.timeout,
            retries=self.retries,
            **snmp_creds,
        )
        if self.profile == "custom":
            assert self.control_oid is not None  # checked by _consistent
            assert self.on_value is not None and self.off_value is not None
            profile = Profile(
                "custom",
                control_oid=self.control_oid,
                on=self.on_value,
                off=self.off_value,
                status_oid=self.status_oid,
                status_on=self.status_on_value,
                status_off=self.status_off_value,
            )
        else:
            profile = PROFILES[self.profile]
        return PduSettings(
            snmp=snmp,
            profile=profile,
            outlet=self.outlet,
            pdu_id=self.pdu_id,
            cycle_wait=self.cycle_wait,
            confirm_timeout=self.confirm_timeout,
            voltage_oid=self._substitute(self.voltage_oid),
            current_oid=self._substitute(self.current_oid),
            voltage_scale=self.voltage_scale,
            current_scale=self.current_scale,
        )

    def _substitute(self, template: str | None) -> str | None:
        if template is None:
            return None
        return template.replace("{outlet}", str(self.outlet)).replace("{pdu_id}", str(self.pdu_id))


# --- SNMP -----------------------------------------------------------------------------------


def _hlapi() -> Any:
    return importlib.import_module("pysnmp.hlapi.v3arch.asyncio")


class _Scrubbed:
    """Removes secret values from text that did not come from us (library messages)."""

    def __init__(self, secrets: list[str]) -> None:
        self._secrets = sorted(set(secrets), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text


class _SnmpSession:
    """One SNMP engine for the length of one operation (``async with``)."""

    def __init__(self, settings: PduSettings) -> None:
        self._settings = settings
        self._snmp = settings.snmp
        self._scrub = _Scrubbed(self._snmp.secrets())
        self._engine: Any = None
        self._target: Any = None

    async def __aenter__(self) -> _SnmpSession:
        hl = _hlapi()
        self._hl = hl
        self._engine = hl.SnmpEngine()
        snmp = self._snmp
        target_cls = hl.Udp6TransportTarget if ":" in snmp.host else hl.UdpTransportTarget
        try:
            self._target = await asyncio.wait_for(
                target_cls.create(
                    (snmp.host, snmp.port), timeout=snmp.timeout, retries=snmp.retries
                ),
                snmp.timeout * (snmp.retries + 1),
            )
        except TimeoutError:
            self._close()
            raise PduUnreachable(
                f"{self._settings.where(False)}: resolving {snmp.host!r} timed out"
            ) from None
        except (OSError, *_pysnmp_errors()) as exc:
            self._close()
            raise PduUnreachable(
                f"{self._settings.where(False)}: cannot resolve {snmp.host!r}: "
                f"{self._scrub(str(exc))}"
            ) from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        if self._engine is not None:
            self._engine.close_dispatcher()
            self._engine = None

    def _auth(self, write: bool) -> Any:
        hl, snmp = self._hl, self._snmp
        if snmp.version == "v3":
            return hl.UsmUserData(
                snmp.username,
                authKey=snmp.password,
                privKey=snmp.priv_password,
                authProtocol=getattr(hl, _AUTH_NAMES[snmp.auth_protocol]),
                privProtocol=getattr(hl, _PRIV_NAMES[snmp.priv_protocol]),
            )
        community = snmp.write_community if write else snmp.read_community
        return hl.CommunityData(community, mpModel=0 if snmp.version == "v1" else 1)

    async def get(self, oid: str, key: str | None = None) -> int:
        """GET an INTEGER. ``key``: the config key ``oid`` came from (a metering OID): its
        name goes into a no-such error, and a Gauge32/Unsigned32 is accepted too."""
        return await self._request(oid, None, key)

    async def set(self, oid: str, value: int) -> None:
        await self._request(oid, value)

    async def _request(self, oid: str, value: int | None, key: str | None = None) -> int:
        hl, snmp = self._hl, self._snmp
        write = value is not None
        where = self._settings.where(write)
        what = f"SET {oid} = {value}" if write else f"GET {oid}"
        obj = (
            hl.ObjectType(hl.ObjectIdentity(oid), hl.Integer32(value))
            if write
            else hl.ObjectType(hl.ObjectIdentity(oid))
        )
        command = hl.set_cmd if write else hl.get_cmd
        try:
            err_ind, err_status, _index, binds = await command(
                self._engine,
                self._auth(write),
                self._target,
                hl.ContextData(contextName=snmp.context),  # "" unless v3 (checked by config)
                obj,
                lookupMib=False,
            )
        except _pysnmp_errors() as exc:  # local failures: bad key, no crypto, ...
            raise PduError(f"{where}: {what} failed: {self._scrub(str(exc))}") from None
        if err_ind:
            if isinstance(err_ind, _errind().RequestTimedOut):
                tries = snmp.retries + 1
                raise PduUnreachable(
                    f"{where}: {what}: no response after {tries} "
                    f"{'try' if tries == 1 else 'tries'} of {snmp.timeout:g} s (wrong "
                    f"{'context or credentials' if snmp.version == 'v3' else 'community'}, "
                    "or the PDU is unreachable)"
                )
            raise PduRejected(f"{where}: {what} failed: {self._scrub(str(err_ind))}")
        if err_status:
            status = err_status.prettyPrint()
            if status in ("noSuchName", "noCreation"):
                raise PduNoSuchOutlet(f"{where}: {what} refused with {status}: {_no_such(key)}")
            raise PduRejected(f"{where}: {what} refused by the PDU with {status}")
        return self._check_varbinds(where, what, oid, value, binds, key)

    def _check_varbinds(
        self,
        where: str,
        what: str,
        oid: str,
        value: int | None,
        binds: Any,
        key: str | None = None,
    ) -> int:
        """The single varbind of a response: the OID asked for, an INTEGER, and for a SET the
        value sent. Agents answer a missing instance with a no-such value, not an error."""
        if len(binds) != 1:
            raise PduRejected(f"{where}: {what} answered {len(binds)} varbinds instead of 1")
        got_oid, got = binds[0]
        if str(got_oid) != oid:
            raise PduRejected(f"{where}: {what} answered for another OID, {got_oid}")
        rfc1905 = importlib.import_module("pysnmp.proto.rfc1905")
        for cls, name in (
            (rfc1905.NoSuchInstance, "noSuchInstance"),
            (rfc1905.NoSuchObject, "noSuchObject"),
            (rfc1905.EndOfMibView, "endOfMibView"),
        ):
            if isinstance(got, cls):
                raise PduNoSuchOutlet(f"{where}: {what} answered {name}: {_no_such(key)}")
        univ = importlib.import_module("pyasn1.type.univ")
        tags = [univ.Integer.tagSet]
        if key is not None:
            tags.append(importlib.import_module("pysnmp.proto.rfc1902").Gauge32.tagSet)
        if not isinstance(got, univ.Integer) or got.tagSet not in tags:
            raise PduRejected(
                f"{where}: {what} answered a {got.__class__.__name__}, not an INTEGER"
            )
        if value is not None and int(got) != value:
            raise PduRejected(f"{where}: {what} answered {int(got)} instead of {value}")
        return int(got)


def _no_such(key: str | None) -> str:
    if key is None:
        return "the PDU has no such outlet (check outlet, pdu_id and profile)"
    return f"the PDU has no such OID (check {key}, outlet and pdu_id)"


def _errind() -> Any:
    return importlib.import_module("pysnmp.proto.errind")


def _pysnmp_errors() -> tuple[type[BaseException], ...]:
    """What pysnmp raises for a local failure (bad address, key, missing crypto, value)."""
    return (
        importlib.import_module("pysnmp.error").PySnmpError,
        importlib.import_module("pyasn1.error").PyAsn1Error,
        ValueError,
    )


# --- the drivers ----------------------------------------------------------------------------


class PduPower(Driver):
    """One switched outlet of a network PDU (or one PoE port), over SNMP."""

    Config: ClassVar[type[DriverConfig]] = PduPowerConfig
    client = POWER_CLIENT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings: PduSettings = self.config.resolve()  # type: ignore[attr-defined]
        self._lock = asyncio.Lock()

    # -- exported ----------------------------------------------------------------------------

    @export
    async def on(self) -> None:
        """Switch the outlet on and confirm it reads on."""
        async with self._lock:
            await self._switch(True)

    @export
    async def off(self) -> None:
        """Switch the outlet off and confirm it reads off."""
        async with self._lock:
            await self._switch(False)

    @export
    async def cycle(self, wait: Annotated[float, Field(ge=0)] | None = None) -> None:
        """Off, wait ``wait`` seconds (default: config ``cycle_wait``), on; each confirmed."""
        pause = self.settings.cycle_wait if wait is None else wait
        async with self._lock:
            await self._switch(False)
            await asyncio.sleep(pause)
            await self._switch(True)

    @export
    async def state(self) -> bool:
        """The outlet's state as the PDU reports it: ``True`` on, ``False`` off."""
        async with _SnmpSession(self.settings) as snmp:
            value = await snmp.get(self.settings.status_oid)
        decoded = self._decode(value)
        if decoded is None:
            raise PduRejected(f"{self.settings.where(False)}: {self._unknown(value)}")
        return decoded

    @export
    async def read(self) -> AsyncIterator[PowerReading]:
        """One reading from the configured metering OIDs (UNIMPLEMENTED without any)."""
        s = self.settings
        if s.voltage_oid is None and s.current_oid is None:
            raise NotImplementedError(
                f"PDU {s.snmp.host}:{s.snmp.port} outlet {s.outlet}: no power readings "
                f"configured (profile {s.profile.name} switches outlets but measures nothing "
                "common to all models); set voltage_oid and/or current_oid (and "
                "voltage_scale/current_scale) in the driver's config"
            )
        values = {"voltage": 0.0, "current": 0.0}
        async with _SnmpSession(s) as snmp:
            for kind, oid, scale in (
                ("voltage", s.voltage_oid, s.voltage_scale),
                ("current", s.current_oid, s.current_scale),
            ):
                if oid is not None:
                    raw = await snmp.get(oid, key=f"{kind}_oid")
                    # as decimals: 15 * 0.1 is 1.5, not 1.5000000000000002
                    values[kind] = float(Decimal(raw) * Decimal(repr(scale)))
        yield PowerReading(**values)

    # -- internals ---------------------------------------------------------------------------

    def _decode(self, value: int) -> bool | None:
        profile = self.settings.profile
        if value == profile.reads_on:
            return True
        if value == profile.reads_off:
            return False
        return None

    def _unknown(self, value: int) -> str:
        profile = self.settings.profile
        return (
            f"{self.settings.status_oid} reads {value}, which is neither on "
            f"({profile.reads_on}) nor off ({profile.reads_off})"
        )

    async def _switch(self, on: bool) -> None:
        s = self.settings
        word = "on" if on else "off"
        async with _SnmpSession(s) as snmp:
            await snmp.set(s.control_oid, s.profile.on if on else s.profile.off)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + s.confirm_timeout
            while True:
                value = await snmp.get(s.status_oid)
                state = self._decode(value)
                if state is on:
                    break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    seen = "reads" if state is not None else "reads unknown"
                    raise PduStateMismatch(
                        f"{s.where(True)}: switched {word} but {s.status_oid} still "
                        f"{seen} {value} after {s.confirm_timeout:g} s (expected "
                        f"{s.profile.reads_on if on else s.profile.reads_off})"
                    )
                await asyncio.sleep(min(0.25, remaining))
        self.log.info(
            "power on" if on else "power off",
            pdu=f"{s.snmp.host}:{s.snmp.port}",
            outlet=s.outlet,
            profile=s.profile.name,
        )


# --- upstream's SNMP driver -----------------------------------------------------------------

_UPSTREAM_DEFAULT_OID = "1.3.6.1.4.1.13742.6.4.1.2.1.2.1"  # Raritan switchingOperation, pdu 1


class SNMPServerConfig(DriverConfig):
    """Upstream 0.9 ``jumpstarter_driver_snmp.driver.SNMPServer`` keys, plus ``context``."""

    host: str
    user: str
    port: int = Field(161, ge=1, le=65535)
    plug: int = Field(ge=1)
    oid: str = _UPSTREAM_DEFAULT_OID
    auth_protocol: Literal["NONE", "MD5", "SHA"] = "NONE"
    auth_key: SecretStr | None = None
    priv_protocol: Literal["NONE", "DES", "AES"] = "NONE"
    priv_key: SecretStr | None = None
    timeout: float = Field(5.0, gt=0)
    context: str = ""

    @field_validator("auth_protocol", "priv_protocol", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("oid")
    @classmethod
    def _numeric_oid(cls, value: str) -> str:
        checked = _oid(value)
        assert checked is not None
        return checked

    @model_validator(mode="after")
    def _keys(self) -> SNMPServerConfig:
        # Upstream's rules: a protocol needs its key; privacy is only used with auth.
        if self.auth_protocol != "NONE" and self.auth_key is None:
            raise ValueError("auth_key required when auth_protocol is specified")
        if self.auth_protocol != "NONE" and self.priv_protocol != "NONE" and not self.priv_key:
            raise ValueError("priv_key required when priv_protocol is specified")
        return self

    def to_pdu_config(self) -> PduPowerConfig:
        """The equivalent ``PduPower`` config (see the module docstring)."""
        keys: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "outlet": self.plug,
            "version": "v3",
            "username": self.user,
            "context": self.context,
            "timeout": self.timeout,
            "retries": 0,
            "log_level": self.log_level,
        }
        if self.auth_protocol != "NONE":
            keys["auth_protocol"] = self.auth_protocol
            keys["password"] = self.auth_key
            if self.priv_protocol != "NONE":
                keys["priv_protocol"] = self.priv_protocol
                keys["priv_password"] = self.priv_key
        keys.update(_profile_for_column(self.oid))
        return PduPowerConfig.model_validate(keys)

    def resolve(self) -> PduSettings:
        return self.to_pdu_config().resolve()


def _profile_for_column(oid: str) -> dict[str, Any]:
    """The profile keys for upstream's ``oid`` (the column the plug number is appended to)."""
    for profile in PROFILES.values():
        if oid == profile.control_oid and not profile.pdu_in_index:
            return {"profile": profile.name}
        prefix = f"{profile.control_oid}."
        if profile.pdu_in_index and oid.startswith(prefix) and oid[len(prefix) :].isdigit():
            return {"profile": profile.name, "pdu_id": int(oid[len(prefix) :])}
    return {"profile": "custom", "control_oid": oid, "on_value": 1, "off_value": 0}


class SNMPServer(PduPower):
    """Upstream's SNMP power driver type, served by ``PduPower``."""

    Config: ClassVar[type[DriverConfig]] = SNMPServerConfig


__all__ = [
    "DEFAULT_PROFILE",
    "PROFILES",
    "PduError",
    "PduNoSuchOutlet",
    "PduPower",
    "PduPowerConfig",
    "PduRejected",
    "PduSettings",
    "PduStateMismatch",
    "PduUnreachable",
    "Profile",
    "SNMPServer",
    "SNMPServerConfig",
    "SnmpSettings",
]
