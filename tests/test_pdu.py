"""PduPower: switched PDU outlets over SNMP, against a real SNMP agent (snmpsim).

The agent is PyPI's snmpsim, started per test on loopback with data files the test
writes (``tests/snmpsim.py`` says what it serves). Every state the tests assert is read with
their own pysnmp GETs, never through the driver. The last test drives the simulated APC and
Raritan PDUs from upstream 0.9's ``jmp shell`` through our exporter and controller.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog.testing
import yaml
from pydantic import ValidationError

from jumpstarter_exporter.config.models import ExporterConfig
from jumpstarter_exporter.drivers import registry
from jumpstarter_exporter.drivers.base import grpc_status_for, invoke, invoke_streaming
from jumpstarter_exporter.drivers.pdu import (
    PduNoSuchOutlet,
    PduPower,
    PduRejected,
    PduStateMismatch,
    PduUnreachable,
    SNMPServer,
)
from jumpstarter_exporter.drivers.power import POWER_CLIENT
from jumpstarter_exporter.errors import DeviceError, DeviceUnavailable
from tests.harness import (
    Controller,
    NotifySocket,
    start_exporter,
    unmet,
    upstream_env,
    wait_for,
)
from tests.snmpsim import (
    APC_RPDU2_CMD,
    APC_RPDU_CMD,
    APC_RPDU_STATE,
    APC_SPDU_CTL,
    DOC_PASSWORD,
    DOC_USER,
    INITIALLY_ON,
    LAB_AUTH,
    LAB_PRIV,
    LAB_USER,
    METER_CURRENT,
    METER_VOLTAGE,
    OUTLETS,
    POE_ADMIN,
    RARITAN_STATE,
    RARITAN_SWITCH,
    STUCK_OUTLET,
    SnmpSim,
    SnmpSimUnavailable,
    outlet_values,
    snmp_get,
    snmp_get_sync,
    snmp_set,
    snmpsim_venv,
)

pytestmark = pytest.mark.timeout(180)

PDU_TYPE = "jumpstarter_driver_power.driver.PduPower"
UPSTREAM_SNMP_TYPE = "jumpstarter_driver_snmp.driver.SNMPServer"


def run(coro: Any, timeout: float = 30) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(agen: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in agen]


@pytest.fixture(scope="session")
def snmpsim_dir() -> Path:
    """The snmpsim venv. In CI (CI=true) a failure to install it fails the tests."""
    try:
        return snmpsim_venv()
    except SnmpSimUnavailable as exc:
        unmet(f"snmpsim unavailable (scripts/snmpsim-venv): {exc}")


@pytest.fixture
def sim(snmpsim_dir: Path) -> Iterator[SnmpSim]:
    with SnmpSim(snmpsim_dir) as agent:
        yield agent
    assert agent.proc is not None and agent.proc.poll() is not None, "snmpsim left running"


def pdu(sim: SnmpSim, **config: Any) -> PduPower:
    return PduPower({"host": sim.host, "port": sim.port, **config})


def others(values: dict[int, Any], outlet: int) -> dict[int, Any]:
    return {n: v for n, v in values.items() if n != outlet}


# --- switching, per vendor profile ----------------------------------------------------------

# profile, extra config, community for the test's GETs, column read, its on/off values
PROFILE_CASES = {
    "apc-rpdu": ({"community": "apc"}, "apc", APC_RPDU_STATE, 1, 2),
    "apc-spdu": ({"community": "apc"}, "apc", APC_SPDU_CTL, 1, 2),
    "apc-rpdu2": ({"community": "apc"}, "apc", APC_RPDU2_CMD, 1, 2),
    "raritan": ({"community": "raritan"}, "raritan", RARITAN_STATE, 7, 8),
    "poe": ({"community": "poe"}, "poe", POE_ADMIN, 1, 2),
}


@pytest.mark.parametrize("profile", sorted(PROFILE_CASES))
def test_on_off_cycle_per_profile(sim: SnmpSim, profile: str) -> None:
    extra, community, column, on, off = PROFILE_CASES[profile]
    driver = pdu(sim, profile=profile, outlet=3, **extra)
    before = outlet_values(sim, community, column)
    assert before[3] == off and before[OUTLETS + 1] == "NoSuchInstance"

    assert run(invoke(driver, "on")) is None
    after_on = outlet_values(sim, community, column)
    assert after_on[3] == on
    assert others(after_on, 3) == others(before, 3)
    assert run(invoke(driver, "state")) is True

    assert run(invoke(driver, "off")) is None
    assert outlet_values(sim, community, column) == before
    assert run(invoke(driver, "state")) is False

    assert run(invoke(driver, "cycle", [0.1])) is None
    assert outlet_values(sim, community, column) == after_on


def test_cycle_goes_off_for_the_configured_time_then_on(sim: SnmpSim) -> None:
    driver = pdu(sim, community="apc", outlet=INITIALLY_ON, cycle_wait=0.8)
    oid = f"{APC_RPDU_STATE}.{INITIALLY_ON}"

    async def scenario() -> list[tuple[float, Any]]:
        seen: list[tuple[float, Any]] = []
        task = asyncio.create_task(invoke(driver, "cycle"))
        start = time.monotonic()
        while not task.done():
            seen.append((time.monotonic() - start, await snmp_get(sim, "apc", oid)))
            await asyncio.sleep(0.05)
        await task
        seen.append((time.monotonic() - start, await snmp_get(sim, "apc", oid)))
        return seen

    seen = run(scenario())
    off_times = [t for t, v in seen if v == 2]
    assert off_times, seen
    assert seen[-1][1] == 1
    # off for about cycle_wait (0.8 s), then on again
    assert 0.5 <= off_times[-1] - off_times[0] <= 2.0, seen


def test_cycle_wait_argument_is_validated(sim: SnmpSim) -> None:
    driver = pdu(sim, community="apc", outlet=2)
    with pytest.raises(ValueError) as info:
        run(invoke(driver, "cycle", [-1.0]))
    assert grpc_status_for(info.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert snmp_get_sync(sim, "apc", f"{APC_RPDU_STATE}.2") == 2  # nothing was switched


# --- versions and credentials ---------------------------------------------------------------


def test_v3_auth_priv_with_context(sim: SnmpSim) -> None:
    driver = pdu(
        sim,
        profile="raritan",
        outlet=4,
        username=LAB_USER,
        password=LAB_AUTH,
        priv_password=LAB_PRIV,
        context="raritan",
    )
    assert driver.settings.snmp.version == "v3"
    assert driver.settings.snmp.auth_protocol == "SHA"
    assert driver.settings.snmp.priv_protocol == "AES"
    before = outlet_values(sim, "raritan", RARITAN_STATE)
    run(invoke(driver, "on"))
    after = outlet_values(sim, "raritan", RARITAN_STATE)
    assert after[4] == 7 and others(after, 4) == others(before, 4)
    # the APC PDU served under another context did not move
    assert snmp_get_sync(sim, "apc", f"{APC_RPDU_STATE}.4") == 2


def test_the_documentation_shape_v3_user_password_default_context(sim: SnmpSim) -> None:
    """host, port, username, password and nothing else: SNMPv3 (SHA, no privacy), empty
    context, profile apc-rpdu, outlet 1."""
    driver = pdu(sim, username=DOC_USER, password=DOC_PASSWORD)
    assert driver.settings.outlet == 1
    assert driver.settings.profile.name == "apc-rpdu"
    assert driver.settings.snmp.context == ""
    run(invoke(driver, "on"))
    assert outlet_values(sim, "apc", APC_RPDU_STATE)[1] == 1
    run(invoke(driver, "off"))
    assert outlet_values(sim, "apc", APC_RPDU_STATE)[1] == 2


def test_v1(sim: SnmpSim) -> None:
    driver = pdu(sim, version=1, community="apc", outlet=6)
    assert driver.settings.snmp.version == "v1"
    run(invoke(driver, "on"))
    assert snmp_get_sync(sim, "apc", f"{APC_RPDU_STATE}.6") == 1


def test_separate_read_and_write_communities(sim: SnmpSim) -> None:
    read_only = pdu(sim, community="apc-ro", outlet=5)
    with pytest.raises(PduRejected) as info:
        run(invoke(read_only, "on"))
    assert "notWritable" in str(info.value)
    assert "write community from config key 'community'" in str(info.value)
    assert snmp_get_sync(sim, "apc", f"{APC_RPDU_STATE}.5") == 2

    split = pdu(sim, community="apc-ro", write_community="apc", outlet=5)
    run(invoke(split, "on"))
    assert snmp_get_sync(sim, "apc", f"{APC_RPDU_STATE}.5") == 1
    assert run(invoke(split, "state")) is True


# --- failures -------------------------------------------------------------------------------


def test_wrong_value_is_refused_and_nothing_changes(sim: SnmpSim) -> None:
    """A custom profile whose "on" is out of the column's range: the agent answers wrongValue."""
    driver = pdu(
        sim,
        community="apc",
        outlet=3,
        profile="custom",
        control_oid=APC_RPDU_CMD,
        status_oid=APC_RPDU_STATE,
        on_value=9,
        off_value=2,
    )
    before = outlet_values(sim, "apc", APC_RPDU_STATE)
    with pytest.raises(PduRejected) as info:
        run(invoke(driver, "on"))
    text = str(info.value)
    assert "wrongValue" in text
    assert f"PDU 127.0.0.1:{sim.port} outlet 3" in text
    assert f"SET {APC_RPDU_CMD}.3 = 9" in text
    assert grpc_status_for(info.value)[0] == grpc.StatusCode.INTERNAL
    assert outlet_values(sim, "apc", APC_RPDU_STATE) == before


def test_wrong_community_times_out_naming_everything_but_the_secret(sim: SnmpSim) -> None:
    secret = "not-the-community-s3cret"
    driver = pdu(sim, community=secret, outlet=3, timeout=0.3, retries=1)
    with structlog.testing.capture_logs() as logs, pytest.raises(PduUnreachable) as info:
        run(invoke(driver, "on"))
    text = str(info.value)
    assert "127.0.0.1" in text and str(sim.port) in text and "outlet 3" in text
    assert "community from config key 'community'" in text
    assert "no response after 2 tries of 0.3 s" in text
    assert secret not in text and secret not in repr(info.value)
    assert secret not in repr(logs) and secret not in repr(driver.config)
    assert secret not in repr(driver.settings)
    assert isinstance(info.value, DeviceUnavailable)
    code, details = grpc_status_for(info.value)
    assert code == grpc.StatusCode.UNAVAILABLE and secret not in details
    with pytest.raises(PduUnreachable):
        run(invoke(driver, "state"))


def test_wrong_v3_context_times_out_naming_user_and_context(sim: SnmpSim) -> None:
    driver = pdu(
        sim,
        username=LAB_USER,
        password=LAB_AUTH,
        priv_password=LAB_PRIV,
        context="no-such-pdu",
        timeout=0.3,
        retries=0,
    )
    with pytest.raises(PduUnreachable) as info:
        run(invoke(driver, "off"))
    text = str(info.value)
    assert f"PDU 127.0.0.1:{sim.port} outlet 1" in text
    assert "SNMPv3 user 'labuser', context 'no-such-pdu'" in text
    assert LAB_AUTH not in text and LAB_PRIV not in text


@pytest.mark.parametrize("version", ["v2c", "v1"])
def test_missing_outlet_is_no_such_outlet(sim: SnmpSim, version: str) -> None:
    """snmpsim answers a SET to a missing instance with a noSuchInstance value and no
    error-status (v2c), or noSuchName (v1): both are errors naming the outlet."""
    driver = pdu(sim, community="apc", outlet=OUTLETS + 1, version=version)
    before = outlet_values(sim, "apc", APC_RPDU_STATE)
    with pytest.raises(PduNoSuchOutlet) as info:
        run(invoke(driver, "on"))
    text = str(info.value)
    assert f"outlet {OUTLETS + 1}" in text and "no such outlet" in text
    assert ("noSuchInstance" if version == "v2c" else "noSuchName") in text
    assert isinstance(info.value, DeviceError)
    assert outlet_values(sim, "apc", APC_RPDU_STATE) == before
    with pytest.raises(PduNoSuchOutlet):
        run(invoke(driver, "state"))


def test_missing_pdu_id_is_no_such_outlet(sim: SnmpSim) -> None:
    driver = pdu(sim, community="raritan", profile="raritan", pdu_id=2, outlet=1)
    with pytest.raises(PduNoSuchOutlet) as info:
        run(invoke(driver, "on"))
    assert f"{RARITAN_SWITCH[:-2]}.2.1" in str(info.value)


def test_outlet_that_does_not_follow_is_a_mismatch(sim: SnmpSim) -> None:
    driver = pdu(sim, community="apc", outlet=STUCK_OUTLET, confirm_timeout=0.4)
    started = time.monotonic()
    with pytest.raises(PduStateMismatch) as info:
        run(invoke(driver, "on"))
    assert time.monotonic() - started < 3
    text = str(info.value)
    assert f"switched on but {APC_RPDU_STATE}.{STUCK_OUTLET} still reads 2" in text
    assert "expected 1" in text


def test_a_set_answered_with_another_value_is_refused(sim: SnmpSim) -> None:
    """No error-status, but the response's varbind is not the value sent."""
    driver = pdu(sim, community="quirky", outlet=1)
    with pytest.raises(PduRejected) as info:
        run(invoke(driver, "on"))
    assert f"SET {APC_RPDU_CMD}.1 = 1 answered 2 instead of 1" in str(info.value)


def test_a_state_that_is_not_an_integer_is_refused(sim: SnmpSim) -> None:
    driver = pdu(sim, community="quirky", outlet=2)
    with pytest.raises(PduRejected) as info:
        run(invoke(driver, "on"))
    assert f"GET {APC_RPDU_STATE}.2 answered a OctetString, not an INTEGER" in str(info.value)


def test_unresolvable_host_is_unavailable() -> None:
    driver = PduPower({"host": "pdu.invalid", "community": "c0mmunity-secret", "timeout": 0.5})
    with pytest.raises(PduUnreachable) as info:
        run(invoke(driver, "on"))
    assert "pdu.invalid" in str(info.value) and "c0mmunity-secret" not in str(info.value)


def test_read_is_unimplemented_without_metering_oids(sim: SnmpSim) -> None:
    driver = pdu(sim, community="apc")
    with pytest.raises(NotImplementedError) as info:
        run(collect(invoke_streaming(driver, "read")))
    assert grpc_status_for(info.value)[0] == grpc.StatusCode.UNIMPLEMENTED
    text = str(info.value)
    assert "no power readings configured" in text
    assert "set voltage_oid and/or current_oid" in text and "current_scale" in text


METERING = {
    "voltage_oid": METER_VOLTAGE + ".{outlet}",
    "current_oid": METER_CURRENT + ".{outlet}",
    "voltage_scale": 0.1,
    "current_scale": 0.1,
}


def test_read_yields_the_scaled_metering_values(sim: SnmpSim) -> None:
    driver = pdu(sim, community="apc", outlet=3, **METERING)
    assert driver.settings.voltage_oid == f"{METER_VOLTAGE}.3"
    readings = run(collect(invoke_streaming(driver, "read")))
    assert [dict(r) for r in readings] == [{"voltage": 230.0, "current": 1.5}]
    # works the same over SNMPv3 and with any profile's switching keys
    v3 = pdu(
        sim, username=LAB_USER, password=LAB_AUTH, priv_password=LAB_PRIV, context="apc",
        profile="apc-rpdu2", outlet=3, **METERING,
    )  # fmt: skip
    assert [dict(r) for r in run(collect(invoke_streaming(v3, "read")))] == [
        {"voltage": 230.0, "current": 1.5}
    ]


def test_read_with_only_a_current_oid_reads_zero_volts(sim: SnmpSim) -> None:
    """A Gauge32 is accepted; the unconfigured voltage reads 0.0; no scale is 1.0."""
    driver = pdu(sim, community="apc", outlet=5, current_oid=f"{METER_CURRENT}.5")
    readings = run(collect(invoke_streaming(driver, "read")))
    assert [dict(r) for r in readings] == [{"voltage": 0.0, "current": 20.0}]


@pytest.mark.parametrize("version", ["v2c", "v1"])
def test_read_of_a_missing_metering_oid_is_no_such(sim: SnmpSim, version: str) -> None:
    driver = pdu(sim, community="apc", outlet=4, version=version, **METERING)
    with pytest.raises(PduNoSuchOutlet) as info:
        run(collect(invoke_streaming(driver, "read")))
    text = str(info.value)
    assert f"GET {METER_VOLTAGE}.4" in text and "check voltage_oid" in text
    assert ("noSuchInstance" if version == "v2c" else "noSuchName") in text
    assert "outlet 4" in text


def test_metering_placeholders_are_substituted() -> None:
    s = PduPower(
        {"host": "h", "outlet": 7, "pdu_id": 2, "voltage_oid": ".1.3.6.1.4.1.9.{pdu_id}.{outlet}"}
    ).settings
    assert (s.voltage_oid, s.current_oid, s.voltage_scale) == ("1.3.6.1.4.1.9.2.7", None, 1.0)


def test_read_of_an_unreachable_pdu_is_unavailable(sim: SnmpSim) -> None:
    secret = "m3ter-community"
    driver = pdu(sim, community=secret, outlet=3, timeout=0.3, retries=0, **METERING)
    with pytest.raises(PduUnreachable) as info:
        run(collect(invoke_streaming(driver, "read")))
    assert f"GET {METER_VOLTAGE}.3" in str(info.value) and secret not in str(info.value)
    assert grpc_status_for(info.value)[0] == grpc.StatusCode.UNAVAILABLE


def test_concurrent_calls_are_serialised(sim: SnmpSim) -> None:
    driver = pdu(sim, community="apc", outlet=4)

    async def both() -> None:
        await asyncio.gather(invoke(driver, "cycle", [0.3]), invoke(driver, "off"))

    run(both())
    # whichever ran last, each finished confirmed: the outlet is in a definite state
    assert snmp_get_sync(sim, "apc", f"{APC_RPDU_STATE}.4") in (1, 2)
    assert run(invoke(driver, "state")) is (snmp_get_sync(sim, "apc", f"{APC_RPDU_STATE}.4") == 1)


# --- configuration --------------------------------------------------------------------------

# The exporter example of the documentation page the project implements, verbatim.
DOC_EXAMPLE = """\
apiVersion: jumpstarter.dev/v1alpha1
kind: ExporterConfig
metadata:
  name: myexporter # The name of the exporter in the cluster.
  namespace: jumpstarter-lab # The namespace of the exporter in the cluster.
tls:
  insecure: false # Enable insecure TLS for testing and development
  ca: "" # A CA certificate to use
endpoint: "jumpstarter.my-lab.com:1443" # The Jumpstarter service endpoint
token: "******************" # An authentication token
export: # Configure drivers to expose to the clients
  power:
    type: "jumpstarter_driver_power.driver.PduPower" # The driver Python class path and type
    config: # Dynamic configuration dict passed to the driver class
      host: "192.168.1.111"
      port: 1234
      username: "admin"
      password: "secret"
  serial:
    type: "jumpstarter_driver_pyserial.driver.PySerial"
    config:
      url: "/dev/ttyUSB0"
      baudrate: 115200
"""

# The example of upstream 0.9's jumpstarter-driver-snmp README, verbatim.
UPSTREAM_SNMP_EXAMPLE = """\
export:
  power:
    type: jumpstarter_driver_snmp.driver.SNMPServer
    config:
      host: "pdu.mgmt.com"
      user: "labuser"
      plug: 32
      port: 161
      oid: "1.3.6.1.4.1.13742.6.4.1.2.1.2.1"
      auth_protocol: "NONE"
      auth_key: null
      priv_protocol: "NONE"
      priv_key: null
      timeout: 5.0
"""


def _exporter(text: str) -> ExporterConfig:
    data = yaml.safe_load(text)
    data.setdefault("metadata", {"name": "e"})
    return ExporterConfig.model_validate(data)


def test_the_documentation_example_loads_and_builds() -> None:
    config = _exporter(DOC_EXAMPLE)
    assert registry.validate(config) == []
    root = registry.build_tree(config)
    power = root.children["power"]
    assert type(power) is PduPower and power.client == POWER_CLIENT
    s = power.settings
    assert (s.snmp.host, s.snmp.port, s.outlet, s.profile.name) == (
        "192.168.1.111",
        1234,
        1,
        "apc-rpdu",
    )
    assert (s.snmp.version, s.snmp.username, s.snmp.auth_protocol) == ("v3", "admin", "SHA")
    assert (s.snmp.priv_protocol, s.snmp.context) == ("NONE", "")
    assert "secret" not in repr(power.config) and "secret" not in repr(s)
    report = power.report(root.uuid, "power")
    assert report.labels["jumpstarter.dev/client"] == POWER_CLIENT


def test_the_upstream_snmp_example_loads_and_maps_to_the_raritan_profile() -> None:
    root = registry.build_tree(_exporter(UPSTREAM_SNMP_EXAMPLE))
    power = root.children["power"]
    assert isinstance(power, SNMPServer) and isinstance(power, PduPower)
    assert power.client == POWER_CLIENT
    s = power.settings
    assert (s.profile.name, s.pdu_id, s.outlet) == ("raritan", 1, 32)
    assert s.control_oid == "1.3.6.1.4.1.13742.6.4.1.2.1.2.1.32"
    assert s.status_oid == "1.3.6.1.4.1.13742.6.4.1.2.1.3.1.32"
    assert (s.snmp.version, s.snmp.username, s.snmp.auth_protocol) == ("v3", "labuser", "NONE")
    assert (s.snmp.host, s.snmp.port, s.snmp.timeout, s.snmp.retries) == (
        "pdu.mgmt.com",
        161,
        5.0,
        0,
    )
    assert registry.driver_class(UPSTREAM_SNMP_TYPE) is SNMPServer
    assert registry.driver_class("jumpstarter_exporter.drivers.pdu.SNMPServer") is SNMPServer
    assert registry.driver_class("jumpstarter_exporter.drivers.pdu.PduPower") is PduPower


@pytest.mark.parametrize(
    ("oid", "expected"),
    [
        (APC_RPDU_CMD, ("apc-rpdu", 2, f"{APC_RPDU_CMD}.5")),
        (APC_SPDU_CTL, ("apc-spdu", 2, f"{APC_SPDU_CTL}.5")),
        ("1.3.6.1.4.1.13742.6.4.1.2.1.2.3", ("raritan", 0, "1.3.6.1.4.1.13742.6.4.1.2.1.2.3.5")),
        ("1.3.6.1.2.1.105.1.1.1.3.1", ("poe", 2, "1.3.6.1.2.1.105.1.1.1.3.1.5")),
        ("1.3.6.1.4.1.99.1.2", ("custom", 0, "1.3.6.1.4.1.99.1.2.5")),
    ],
)
def test_upstream_oid_maps_to_a_profile(oid: str, expected: tuple[str, int, str]) -> None:
    """Upstream always writes 1/0; a known column gets its vendor's real off value."""
    driver = SNMPServer({"host": "h", "user": "u", "plug": 5, "oid": oid})
    s = driver.settings
    assert (s.profile.name, s.profile.off, s.control_oid) == expected
    assert s.profile.on == 1


def test_upstream_snmp_driver_switches_the_simulated_raritan(sim: SnmpSim) -> None:
    driver = SNMPServer(
        {
            "host": sim.host,
            "port": sim.port,
            "user": LAB_USER,
            "plug": 6,
            "auth_protocol": "SHA",
            "auth_key": LAB_AUTH,
            "priv_protocol": "AES",
            "priv_key": LAB_PRIV,
            "context": "raritan",
        }
    )
    run(invoke(driver, "on"))
    assert outlet_values(sim, "raritan", RARITAN_STATE)[6] == 7
    run(invoke(driver, "off"))
    assert outlet_values(sim, "raritan", RARITAN_STATE)[6] == 8


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "host"),
        ({"host": "h", "version": "v3"}, "SNMPv3 needs username"),
        ({"host": "h", "version": "v4"}, "must be v1, v2c or v3"),
        ({"host": "h", "username": "u", "community": "c"}, "community is for SNMPv1/v2c"),
        ({"host": "h", "password": "p4ssword"}, "password is SNMPv3 only"),
        ({"host": "h", "context": "x"}, "context is SNMPv3 only"),
        ({"host": "h", "username": "u", "priv_password": "p"}, "priv_password needs password"),
        ({"host": "h", "username": "u", "auth_protocol": "SHA"}, "SHA needs password"),
        ({"host": "h", "username": "u", "auth_protocol": "RC4"}, "auth_protocol"),
        ({"host": "h", "profile": "eaton"}, "profile"),
        ({"host": "h", "profile": "custom", "on_value": 1, "off_value": 2}, "needs control_oid"),
        ({"host": "h", "control_oid": "1.3.6.1"}, "only with profile custom"),
        ({"host": "h", "pdu_id": 2}, "pdu_id is not used by profile apc-rpdu"),
        ({"host": "h", "profile": "custom", "control_oid": "x", "on_value": 1}, "numeric OID"),
        ({"host": "h", "outlet": 0}, "outlet"),
        ({"host": "h", "voltage_oid": "1.3.x.{outlet}"}, "{outlet} and {pdu_id} placeholders"),
        ({"host": "h", "current_scale": 0.1}, "current_scale needs current_oid"),
        ({"host": "h", "current_oid": "1.3.6.1", "current_scale": 0}, "current_scale"),
        ({"host": "h", "bogus": 1}, "bogus"),
    ],
)  # fmt: skip
def test_config_errors(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        PduPower(config)
    assert message in str(info.value)
    problems = registry.validate(
        _exporter(yaml.safe_dump({"export": {"p": {"type": PDU_TYPE, "config": config}}}))
    )
    assert problems and all(p.startswith("export.p") for p in problems)
    assert not any("p4ssword" in p for p in problems)


def test_community_defaults() -> None:
    public = PduPower({"host": "h"}).settings.snmp
    assert (public.version, public.read_community, public.write_community) == (
        "v2c",
        "public",
        "private",
    )
    one = PduPower({"host": "h", "community": "lab"}).settings.snmp
    assert (one.read_community, one.write_community) == ("lab", "lab")
    assert "lab" not in repr(one)


# --- end to end: upstream 0.9 client → our controller → our exporter → snmpsim ---------------


@pytest.mark.interop
def test_upstream_client_power_cycles_the_simulated_pdus_through_our_exporter(
    sim: SnmpSim, controller: Controller, upstream_venv: Path, tmp_path: Path
) -> None:
    export = {
        "apc": {
            "type": PDU_TYPE,
            "config": {"host": sim.host, "port": sim.port, "outlet": 3, "community": "apc"},
        },
        "raritan": {
            "type": PDU_TYPE,
            "config": {
                "host": sim.host,
                "port": sim.port,
                "profile": "raritan",
                "outlet": 5,
                "username": LAB_USER,
                "password": LAB_AUTH,
                "priv_password": LAB_PRIV,
                "context": "raritan",
            },
        },
    }
    config = controller.create_exporter("pdu1", {"board": "pdu1"}, export, tmp_path / "pdu1.yaml")
    client = tmp_path / "client.yaml"
    controller.create_client("cl1", client, "--unsafe")
    run(snmp_set(sim, "apc", f"{APC_RPDU_CMD}.3", 1))  # on, so the cycle's "off" shows
    apc_before = outlet_values(sim, "apc", APC_RPDU_STATE)
    raritan_before = outlet_values(sim, "raritan", RARITAN_STATE)
    assert apc_before[3] == 1 and raritan_before[5] == 8

    notify = NotifySocket(tmp_path)
    exp = start_exporter(
        config, {**controller.env, "NOTIFY_SOCKET": str(notify.path)}, tmp_path / "exporter.log"
    )
    seen: list[Any] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(snmp_get_sync(sim, "apc", f"{APC_RPDU_STATE}.3", wait=0.5))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    try:
        wait_for(lambda: notify.seen("READY=1"), 30, what="exporter READY=1")
        watcher.start()
        shell = subprocess.run(
            ["jmp", "shell", "--client-config", str(client), "--selector", "board=pdu1",
             "--", "sh", "-c", "j apc cycle -w 1 && j raritan on"],
            env=upstream_env(upstream_venv, controller.env, tmp_path / "up-home"),
            capture_output=True, text=True, timeout=150,
        )  # fmt: skip
        stop.set()
        watcher.join(10)
        assert shell.returncode == 0, shell.stderr[-3000:] + exp.log()[-3000:]
        assert exp.wait(30) == 0
    finally:
        stop.set()
        exp.stop()
        notify.close()
    # APC outlet 3 went off (for about a second) and came back on; Raritan outlet 5 is on
    assert 2 in seen and seen[-1] == 1, seen
    assert seen.index(2) > 0 and seen[0] == 1
    apc_after = outlet_values(sim, "apc", APC_RPDU_STATE)
    raritan_after = outlet_values(sim, "raritan", RARITAN_STATE)
    assert apc_after == apc_before
    assert raritan_after[5] == 7 and others(raritan_after, 5) == others(raritan_before, 5)
    log = exp.log()
    assert LAB_AUTH not in log and LAB_PRIV not in log
    events = [e for e in exp.events() if e.get("driver_type") == "PduPower"]
    assert [e["event"] for e in events if e.get("driver") == "apc"] == ["power off", "power on"]
    assert [e["event"] for e in events if e.get("driver") == "raritan"] == ["power on"]
