"""A real SNMP agent for the PDU tests: snmpsim serving simulated APC, Raritan and PoE PDUs.

``SnmpSim`` (a context manager) writes the data files into a fresh directory, starts
``snmpsim-command-responder`` from the venv built by ``scripts/snmpsim-venv`` on
``127.0.0.1:<free port>``, waits until it answers, and stops it (its whole process group) on
exit. Nothing else is shared with the code under test: tests check outlet states with their
own pysnmp GETs (``snmp_get``).

What the agent serves (SNMPv1/v2c community = SNMPv3 context name = data file name):

==================  ==========================================================================
``apc``             APC Rack PDU, 8 outlets: ``rPDUOutletControlOutletCommand`` with
                    ``rPDUOutletStatusOutletState``, ``sPDUOutletCtl``, ``rPDU2`` control
                    (read-write); static metering rows ``METER_VOLTAGE``/``METER_CURRENT``
``apc-ro``          the same PDU, every column read-only (a read community)
``raritan``         Raritan PX2 (PDU2-MIB, pduId 1), 8 outlets: ``switchingOperation`` with
                    ``outletSwitchingState``
``poe``             PoE switch, group 1, 8 ports: ``pethPsePortAdminEnable``
``quirky``          an APC-like agent that misbehaves without an error-status: outlet 1's
                    SET is answered with 2 whatever was sent; outlet 2's state column is a
                    string
(empty context)     SNMPv3 requests with no context name get the APC PDU (data file
                    ``self.snmprec``; its v1/v2c community is ``self``)
==================  ==========================================================================

SNMPv3 users: ``labuser`` (SHA + AES, keys ``LAB_AUTH``/``LAB_PRIV``) and ``admin`` (SHA,
key ``DOC_PASSWORD``, no privacy: the shape of the documentation's example; its "secret" is
shorter than the 8 characters SNMPv3 agents, snmpsim included, require).

The agent's outlets have real state. The data files use a small variation module written
here (``pdu``, loaded with ``--variation-modules-dir``): every record of one outlet shares
one on/off state, so a SET on a control column changes what the status column (and the other
APC branches, which are views of the same outlet) read. A SET with a value outside the
column's range fails with ``wrongValue``, as a real agent does. Outlet 7 of every PDU is
"stuck": SETs are accepted but the outlet never changes (a confirmation failure); outlet 8
starts on, the others off. There is no outlet 9.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTLETS = 8
STUCK_OUTLET = 7
INITIALLY_ON = 8

LAB_USER = "labuser"
LAB_AUTH = "lab-auth-key-7"
LAB_PRIV = "lab-priv-key-7"
DOC_USER = "admin"
DOC_PASSWORD = "secret-doc"  # the doc example's "secret" is too short for SNMPv3 agents

# Column prefixes (the outlet index is appended), from the vendors' MIBs.
APC_RPDU_CMD = "1.3.6.1.4.1.318.1.1.12.3.3.1.1.4"
APC_RPDU_STATE = "1.3.6.1.4.1.318.1.1.12.3.5.1.1.4"
APC_SPDU_CTL = "1.3.6.1.4.1.318.1.1.4.4.2.1.3"
APC_RPDU2_CMD = "1.3.6.1.4.1.318.1.1.26.9.2.4.1.5"
RARITAN_SWITCH = "1.3.6.1.4.1.13742.6.4.1.2.1.2.1"  # .<pduId 1>
RARITAN_STATE = "1.3.6.1.4.1.13742.6.4.1.2.1.3.1"
POE_ADMIN = "1.3.6.1.2.1.105.1.1.1.3.1"  # .<group 1>
# Static metering rows in the APC data files (a test-only enterprise, not a vendor MIB):
# outlet 3 reads 2300 (tenths of volts) and 15 (tenths of amps) as Integer32; outlet 5 has
# only a current, 20 as a Gauge32. Other outlets have no readings.
METER_VOLTAGE = "1.3.6.1.4.1.99999.1.1"
METER_CURRENT = "1.3.6.1.4.1.99999.1.2"

# --- the variation module ------------------------------------------------------------------

# snmpsim exec()s this file with ``moduleContext`` (per module) and sets ``recordContext``
# (per record) before each call. A record's value is ``key=value`` pairs:
#   pdu, outlet   the shared state's key (all records of one physical outlet share it)
#   on, off       the column's values for "on" and "off" (GET answers one of them)
#   access        ro | rw
#   min, max      the values a SET accepts; others fail with wrongValue
#   cycle         a SET value that ends with the outlet on (reboot); others in range: no-op
#   stuck         1: SETs are answered but never change the outlet
#   answer        a SET's response carries this value instead of the value sent
#   init          on | off
PDU_VARIATION = """
from pysnmp.smi import error
from snmpsim.grammar.snmprec import SnmprecGrammar
from snmpsim.record.snmprec import SnmprecRecord


def init(**context):
    moduleContext["outlets"] = {}


def shutdown(**context):
    pass


def variate(oid, tag, value, **context):
    if not context["nextFlag"] and not context["exactMatch"]:
        return context["origOid"], tag, context["errorStatus"]
    if "settings" not in recordContext:
        recordContext["settings"] = dict(kv.split("=", 1) for kv in value.split(","))
    s = recordContext["settings"]
    outlets = moduleContext["outlets"]
    key = (s["pdu"], s["outlet"])
    if key not in outlets:
        outlets[key] = s.get("init", "off") == "on"
    syntax = SnmprecGrammar.TAG_MAP[SnmprecRecord.unpack_tag(tag)[0]]
    on, off = int(s["on"]), int(s["off"])
    if context["setFlag"]:
        idx = max(0, context["varsTotal"] - context["varsRemaining"] - 1)
        if s.get("access") != "rw":
            raise error.NotWritableError(name=oid, idx=idx)
        new = context["origValue"]
        if not syntax().isSameTypeWith(new):
            raise error.WrongTypeError(name=oid, idx=idx)
        new = int(new)
        if not int(s.get("min", min(on, off))) <= new <= int(s.get("max", max(on, off))):
            raise error.WrongValueError(name=oid, idx=idx)
        if s.get("stuck") != "1":
            if new == on or new == int(s.get("cycle", on)):
                outlets[key] = True
            elif new == off:
                outlets[key] = False
        return oid, tag, syntax(int(s.get("answer", new)))
    return oid, tag, syntax(on if outlets[key] else off)
"""


# --- data files ----------------------------------------------------------------------------


def _outlet_rows(pdu: str, prefix: str, access: str, **values: int | str) -> list[str]:
    rows = []
    for n in range(1, OUTLETS + 1):
        settings = {"pdu": pdu, "outlet": n, "access": access, **values}
        if n == STUCK_OUTLET:
            settings["stuck"] = 1
        if n == INITIALLY_ON:
            settings["init"] = "on"
        body = ",".join(f"{k}={v}" for k, v in settings.items())
        rows.append((f"{prefix}.{n}", f"2:pdu|{body}"))
    return rows


def _snmprec(rows: list[tuple[str, str]]) -> str:
    """Rows sorted by OID (snmpsim needs that), as ``oid|tag|value`` lines."""

    def key(row: tuple[str, str]) -> tuple[int, ...]:
        return tuple(int(part) for part in row[0].split("."))

    return "".join(f"{oid}|{rest}\n" for oid, rest in sorted(rows, key=key))


def apc_records(access: str = "rw") -> str:
    rows = [
        ("1.3.6.1.2.1.1.1.0", "4|APC Rack PDU (simulated)"),
        ("1.3.6.1.2.1.1.2.0", "6|1.3.6.1.4.1.318.1.3.4.5"),
    ]
    # rPDUOutletControlOutletCommand: 1 immediateOn .. 7 cancelPendingCommand, GET 1 on / 2 off
    rows += _outlet_rows("apc", APC_RPDU_CMD, access, on=1, off=2, min=1, max=7, cycle=3)
    # rPDUOutletStatusOutletState (read-only): 1 outletStatusOn, 2 outletStatusOff
    rows += _outlet_rows("apc", APC_RPDU_STATE, "ro", on=1, off=2)
    # sPDUOutletCtl: 1 outletOn, 2 outletOff, 3 outletReboot .. 7
    rows += _outlet_rows("apc", APC_SPDU_CTL, access, on=1, off=2, min=1, max=7, cycle=3)
    # rPDU2OutletSwitchedControlCommand: 1 immediateOn .. 8 cancelPendingCommand
    rows += _outlet_rows("apc", APC_RPDU2_CMD, access, on=1, off=2, min=1, max=8, cycle=3)
    rows += [
        (f"{METER_VOLTAGE}.3", "2|2300"),
        (f"{METER_CURRENT}.3", "2|15"),
        (f"{METER_CURRENT}.5", "66|20"),
    ]
    return _snmprec(rows)


def raritan_records() -> str:
    rows = [("1.3.6.1.2.1.1.1.0", "4|Raritan PX2 (simulated)")]
    # switchingOperation: 0 off, 1 on, 2 cycle; outletSwitchingState: 7 on, 8 off
    rows += _outlet_rows("raritan", RARITAN_SWITCH, "rw", on=1, off=0, min=0, max=2, cycle=2)
    rows += _outlet_rows("raritan", RARITAN_STATE, "ro", on=7, off=8)
    return _snmprec(rows)


def poe_records() -> str:
    rows = [("1.3.6.1.2.1.1.1.0", "4|PoE switch (simulated)")]
    # pethPsePortAdminEnable: TruthValue 1 true, 2 false
    rows += _outlet_rows("poe", POE_ADMIN, "rw", on=1, off=2)
    return _snmprec(rows)


def quirky_records() -> str:
    rows = [
        ("1.3.6.1.2.1.1.1.0", "4|Quirky PDU (simulated)"),
        (
            f"{APC_RPDU_CMD}.1",
            "2:pdu|pdu=quirky,outlet=1,access=rw,on=1,off=2,min=1,max=7,answer=2",
        ),
        (f"{APC_RPDU_CMD}.2", "2:pdu|pdu=quirky,outlet=2,access=rw,on=1,off=2,min=1,max=7"),
        (f"{APC_RPDU_STATE}.1", "2:pdu|pdu=quirky,outlet=1,access=ro,on=1,off=2"),
        (f"{APC_RPDU_STATE}.2", "4|on"),
    ]
    return _snmprec(rows)


def write_data(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "apc.snmprec").write_text(apc_records())
    (directory / "apc-ro.snmprec").write_text(apc_records(access="ro"))
    (directory / "raritan.snmprec").write_text(raritan_records())
    (directory / "poe.snmprec").write_text(poe_records())
    (directory / "quirky.snmprec").write_text(quirky_records())
    # snmpsim serves "self.snmprec" to SNMPv3 requests with an empty context name.
    (directory / "self.snmprec").write_text(apc_records())


# --- the agent -----------------------------------------------------------------------------


class SnmpSimUnavailable(RuntimeError):
    """snmpsim could not be installed or started."""


def snmpsim_venv() -> Path:
    """The snmpsim venv (built once by ``scripts/snmpsim-venv``)."""
    try:
        out = subprocess.run(
            [str(REPO / "scripts" / "snmpsim-venv")],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        stderr = getattr(exc, "stderr", "") or ""
        raise SnmpSimUnavailable(f"scripts/snmpsim-venv failed: {exc}\n{stderr}") from exc
    venv = Path(out.stdout.strip().splitlines()[-1])
    if not (venv / "bin" / "snmpsim-command-responder").exists():
        raise SnmpSimUnavailable(f"no snmpsim-command-responder in {venv}")
    return venv


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unprivileged_user() -> tuple[str, str]:
    for user in ("nobody",):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            break
    else:
        raise SnmpSimUnavailable("no 'nobody' user to run snmpsim as")
    for group in ("nogroup", "nobody"):
        with contextlib.suppress(KeyError):
            grp.getgrnam(group)
            return user, group
    raise SnmpSimUnavailable("no 'nogroup'/'nobody' group to run snmpsim as")


@dataclass
class SnmpSim:
    """snmpsim on 127.0.0.1:<free port>, serving the PDUs described in the module docstring."""

    venv: Path
    host: str = "127.0.0.1"
    port: int = 0
    workdir: Path = field(init=False)
    proc: subprocess.Popen | None = field(default=None, init=False)

    def __enter__(self) -> SnmpSim:
        # Not under pytest's tmp_path: that is 0700 root, and snmpsim drops to nobody.
        self.workdir = Path(tempfile.mkdtemp(prefix="jmp-snmpsim-"))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        data, cache, variation = (self.workdir / d for d in ("data", "cache", "variation"))
        write_data(data)
        cache.mkdir()
        variation.mkdir()
        (variation / "pdu.py").write_text(PDU_VARIATION)
        for path in (self.workdir, *self.workdir.rglob("*")):
            path.chmod(0o777 if path.is_dir() else 0o644)
        self.port = self.port or free_udp_port()
        cmd = [
            str(self.venv / "bin" / "snmpsim-command-responder"),
            f"--data-dir={data}",
            f"--cache-dir={cache}",
            f"--variation-modules-dir={variation}",
            f"--agent-udpv4-endpoint={self.host}:{self.port}",
            "--log-level=error",
            f"--v3-user={LAB_USER}",
            f"--v3-auth-key={LAB_AUTH}",
            "--v3-auth-proto=SHA",
            f"--v3-priv-key={LAB_PRIV}",
            "--v3-priv-proto=AES",
            f"--v3-user={DOC_USER}",
            f"--v3-auth-key={DOC_PASSWORD}",
            "--v3-auth-proto=SHA",
        ]
        if os.geteuid() == 0:
            # As root snmpsim insists on dropping to an unprivileged user and group.
            user, group = _unprivileged_user()
            cmd += [f"--process-user={user}", f"--process-group={group}"]
        log = (self.workdir / "responder.log").open("wb")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise SnmpSimUnavailable(f"snmpsim exited {self.proc.returncode}: {self.log()}")
            if snmp_get_sync(self, "apc", "1.3.6.1.2.1.1.1.0", wait=0.3) is not None:
                return
            if time.monotonic() > deadline:
                raise SnmpSimUnavailable(f"snmpsim did not answer within 60 s: {self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        path = self.workdir / "responder.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)


# --- an independent SNMP client for the assertions -----------------------------------------


async def snmp_get(
    sim: SnmpSim,
    community: str,
    oid: str,
    *,
    wait: float = 2.0,
) -> int | str | None:
    """GET ``oid`` with SNMPv2c ``community``: an int (or the text of a non-integer value such
    as ``noSuchInstance``), or ``None`` when the agent did not answer."""
    from pyasn1.type.univ import Integer
    from pysnmp.hlapi.v3arch.asyncio import (
        CommunityData,
        ContextData,
        ObjectIdentity,
        ObjectType,
        SnmpEngine,
        UdpTransportTarget,
        get_cmd,
    )

    engine = SnmpEngine()
    try:
        target = await UdpTransportTarget.create((sim.host, sim.port), timeout=wait, retries=0)
        err, status, _index, binds = await get_cmd(
            engine,
            CommunityData(community, mpModel=1),
            target,
            ContextData(),
            ObjectType(ObjectIdentity(oid)),
            lookupMib=False,
        )
    finally:
        engine.close_dispatcher()
    if err:
        return None
    assert not status, status.prettyPrint()
    value = binds[0][1]
    return int(value) if isinstance(value, Integer) else type(value).__name__


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
