"""A real SNMP agent for the PDU tests: snmpsim serving simulated APC, Raritan and PoE PDUs.

The simulator itself (data files, the ``pdu`` variation module that gives outlets real
state, starting and stopping snmpsim) is ``jumpstarter_exporter.lab.pdusim``, shared with
``jmp lab up``; its docstring says what the agent serves. This module adds what only tests
need: GET/SET helpers taking a running ``SnmpSim``. Tests check outlet states with these
plain pysnmp GETs, never through the PduPower driver under test.
"""

from __future__ import annotations

import asyncio

from jumpstarter_exporter.lab.pdusim import (
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
    free_udp_port,
    snmpsim_venv,
    write_data,
)
from jumpstarter_exporter.lab.pdusim import snmp_get as _get

__all__ = [
    "APC_RPDU2_CMD",
    "APC_RPDU_CMD",
    "APC_RPDU_STATE",
    "APC_SPDU_CTL",
    "DOC_PASSWORD",
    "DOC_USER",
    "INITIALLY_ON",
    "LAB_AUTH",
    "LAB_PRIV",
    "LAB_USER",
    "METER_CURRENT",
    "METER_VOLTAGE",
    "OUTLETS",
    "POE_ADMIN",
    "RARITAN_STATE",
    "RARITAN_SWITCH",
    "STUCK_OUTLET",
    "SnmpSim",
    "SnmpSimUnavailable",
    "free_udp_port",
    "outlet_values",
    "snmp_get",
    "snmp_get_sync",
    "snmp_set",
    "snmpsim_venv",
    "write_data",
]


async def snmp_get(
    sim: SnmpSim,
    community: str,
    oid: str,
    *,
    wait: float = 2.0,
) -> int | str | None:
    """GET ``oid`` with SNMPv2c ``community``: an int (or the text of a non-integer value such
    as ``noSuchInstance``), or ``None`` when the agent did not answer."""
    return await _get(sim.host, sim.port, community, oid, wait=wait)


async def snmp_set(sim: SnmpSim, community: str, oid: str, value: int) -> None:
    """SET an INTEGER with SNMPv2c ``community`` (test preconditions); fails on any error."""
    from pysnmp.hlapi.v3arch.asyncio import (
        CommunityData,
        ContextData,
        Integer32,
        ObjectIdentity,
        ObjectType,
        SnmpEngine,
        UdpTransportTarget,
        set_cmd,
    )

    engine = SnmpEngine()
    try:
        target = await UdpTransportTarget.create((sim.host, sim.port), timeout=2, retries=0)
        err, status, _index, _binds = await set_cmd(
            engine,
            CommunityData(community, mpModel=1),
            target,
            ContextData(),
            ObjectType(ObjectIdentity(oid), Integer32(value)),
            lookupMib=False,
        )
    finally:
        engine.close_dispatcher()
    assert not err and not status, (err, status)


def snmp_get_sync(sim: SnmpSim, community: str, oid: str, *, wait: float = 2.0):
    """``snmp_get`` from synchronous code (a fresh event loop)."""
    return asyncio.run(snmp_get(sim, community, oid, wait=wait))


def outlet_values(sim: SnmpSim, community: str, prefix: str) -> dict[int, int | str | None]:
    """Every outlet's value in column ``prefix`` (one GET each)."""

    async def all_values() -> dict[int, int | str | None]:
        return {n: await snmp_get(sim, community, f"{prefix}.{n}") for n in range(1, OUTLETS + 2)}

    return asyncio.run(all_values())
