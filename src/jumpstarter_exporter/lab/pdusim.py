"""A simulated SNMP PDU: snmpsim serving APC, Raritan and PoE outlets with real on/off state.

One definition for the lab (``jmp lab up``) and the PDU tests (``tests/snmpsim.py``):
``SnmpSim`` (a context manager, or ``start()``/``stop()``) writes the data files into a fresh
world-readable directory, starts ``snmpsim-command-responder`` from the venv built by
``scripts/snmpsim-venv`` on ``127.0.0.1:<free port>`` in its own process group, waits until it
answers, and stops the whole group.

What the agent can serve (SNMPv1/v2c community = SNMPv3 context name = data file name):

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
``lab``             the lab's PDU: APC rPDU columns, 8 healthy outlets, all off at start,
                    and metering that follows the outlet: ``METER_VOLTAGE`` reads 2300
                    (tenths of volts, mains is there either way), ``METER_CURRENT`` reads
                    ``LAB_CURRENT`` (tenths of amps) while the outlet is on and 0 while off
==================  ==========================================================================

``TEST_FILES`` are the first six (the PDU tests), ``LAB_FILES`` only ``lab``.

SNMPv3 users: ``labuser`` (SHA + AES, keys ``LAB_AUTH``/``LAB_PRIV``) and ``admin`` (SHA,
key ``DOC_PASSWORD``, no privacy: the shape of the documentation's example; its "secret" is
shorter than the 8 characters SNMPv3 agents, snmpsim included, require).

The agent's outlets have real state. The data files use a small variation module written
here (``pdu``, loaded with ``--variation-modules-dir``): every record of one outlet shares
one on/off state, so a SET on a control column changes what the status column (and the other
APC branches, which are views of the same outlet) read. A SET with a value outside the
column's range fails with ``wrongValue``, as a real agent does. In the test files outlet 7 of
every PDU is "stuck": SETs are accepted but the outlet never changes (a confirmation
failure); outlet 8 starts on, the others off. There is no outlet 9.

``snmp_get`` is a plain SNMPv2c GET (pysnmp, not the PduPower driver): what the tests assert
with, and what the lab's board polls its outlet with (``SnmpGetter`` keeps one engine).
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
from typing import Any

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
# Metering rows (a test-only enterprise, not a vendor MIB). In the APC test files they are
# static: outlet 3 reads 2300 (tenths of volts) and 15 (tenths of amps) as Integer32; outlet 5
# has only a current, 20 as a Gauge32; other outlets have no readings. The lab file has them
# for every outlet, the current following the outlet's state.
METER_VOLTAGE = "1.3.6.1.4.1.99999.1.1"
METER_CURRENT = "1.3.6.1.4.1.99999.1.2"
LAB_CURRENT = 4  # tenths of amps: what the lab's small board draws
SYS_DESCR = "1.3.6.1.2.1.1.1.0"

TEST_FILES = ("apc", "apc-ro", "raritan", "poe", "quirky", "self")
LAB_FILES = ("lab",)

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


def _outlet_rows(
    pdu: str,
    prefix: str,
    access: str,
    *,
    stuck: int | None = STUCK_OUTLET,
    initially_on: int | None = INITIALLY_ON,
    **values: int | str,
) -> list[tuple[str, str]]:
    rows = []
    for n in range(1, OUTLETS + 1):
        settings = {"pdu": pdu, "outlet": n, "access": access, **values}
        if n == stuck:
            settings["stuck"] = 1
        if n == initially_on:
            settings["init"] = "on"
        body = ",".join(f"{k}={v}" for k, v in settings.items())
        rows.append((f"{prefix}.{n}", f"2:pdu|{body}"))
    return rows


def _snmprec(rows: list[tuple[str, str]]) -> str:
    """Rows sorted by OID (snmpsim needs that), as ``oid|tag|value`` lines."""

    def key(row: tuple[str, str]) -> tuple[int, ...]:
        return tuple(int(part) for part in row[0].split("."))

    return "".join(f"{oid}|{rest}\n" for oid, rest in sorted(rows, key=key))


def _apc_rows(pdu: str, access: str, **outlet_kw: Any) -> list[tuple[str, str]]:
    # rPDUOutletControlOutletCommand: 1 immediateOn .. 7 cancelPendingCommand, GET 1 on / 2 off
    rows = _outlet_rows(pdu, APC_RPDU_CMD, access, on=1, off=2, min=1, max=7, cycle=3, **outlet_kw)
    # rPDUOutletStatusOutletState (read-only): 1 outletStatusOn, 2 outletStatusOff
    rows += _outlet_rows(pdu, APC_RPDU_STATE, "ro", on=1, off=2, **outlet_kw)
    # sPDUOutletCtl: 1 outletOn, 2 outletOff, 3 outletReboot .. 7
    rows += _outlet_rows(pdu, APC_SPDU_CTL, access, on=1, off=2, min=1, max=7, cycle=3, **outlet_kw)
    # rPDU2OutletSwitchedControlCommand: 1 immediateOn .. 8 cancelPendingCommand
    rows += _outlet_rows(
        pdu, APC_RPDU2_CMD, access, on=1, off=2, min=1, max=8, cycle=3, **outlet_kw
    )
    return rows


def apc_records(access: str = "rw") -> str:
    rows = [
        (SYS_DESCR, "4|APC Rack PDU (simulated)"),
        ("1.3.6.1.2.1.1.2.0", "6|1.3.6.1.4.1.318.1.3.4.5"),
    ]
    rows += _apc_rows("apc", access)
    rows += [
        (f"{METER_VOLTAGE}.3", "2|2300"),
        (f"{METER_CURRENT}.3", "2|15"),
        (f"{METER_CURRENT}.5", "66|20"),
    ]
    return _snmprec(rows)


def lab_records() -> str:
    """The lab's PDU: healthy outlets, all off, a current only while an outlet is on."""
    rows = [
        (SYS_DESCR, "4|APC Rack PDU (jumpstarter lab, simulated)"),
        ("1.3.6.1.2.1.1.2.0", "6|1.3.6.1.4.1.318.1.3.4.5"),
    ]
    rows += _apc_rows("lab", "rw", stuck=None, initially_on=None)
    rows += _outlet_rows(
        "lab", METER_CURRENT, "ro", stuck=None, initially_on=None, on=LAB_CURRENT, off=0
    )
    rows += [(f"{METER_VOLTAGE}.{n}", "2|2300") for n in range(1, OUTLETS + 1)]
    return _snmprec(rows)


def raritan_records() -> str:
    rows = [(SYS_DESCR, "4|Raritan PX2 (simulated)")]
    # switchingOperation: 0 off, 1 on, 2 cycle; outletSwitchingState: 7 on, 8 off
    rows += _outlet_rows("raritan", RARITAN_SWITCH, "rw", on=1, off=0, min=0, max=2, cycle=2)
    rows += _outlet_rows("raritan", RARITAN_STATE, "ro", on=7, off=8)
    return _snmprec(rows)


def poe_records() -> str:
    rows = [(SYS_DESCR, "4|PoE switch (simulated)")]
    # pethPsePortAdminEnable: TruthValue 1 true, 2 false
    rows += _outlet_rows("poe", POE_ADMIN, "rw", on=1, off=2)
    return _snmprec(rows)


def quirky_records() -> str:
    rows = [
        (SYS_DESCR, "4|Quirky PDU (simulated)"),
        (
            f"{APC_RPDU_CMD}.1",
            "2:pdu|pdu=quirky,outlet=1,access=rw,on=1,off=2,min=1,max=7,answer=2",
        ),
        (f"{APC_RPDU_CMD}.2", "2:pdu|pdu=quirky,outlet=2,access=rw,on=1,off=2,min=1,max=7"),
        (f"{APC_RPDU_STATE}.1", "2:pdu|pdu=quirky,outlet=1,access=ro,on=1,off=2"),
        (f"{APC_RPDU_STATE}.2", "4|on"),
    ]
    return _snmprec(rows)


DATA_FILES = {
    "apc": apc_records,
    "apc-ro": lambda: apc_records(access="ro"),
    "raritan": raritan_records,
    "poe": poe_records,
    "quirky": quirky_records,
    # snmpsim serves "self.snmprec" to SNMPv3 requests with an empty context name.
    "self": apc_records,
    "lab": lab_records,
}


def write_data(directory: Path, files: tuple[str, ...] = TEST_FILES) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in files:
        (directory / f"{name}.snmprec").write_text(DATA_FILES[name]())


# --- SNMP GET (pysnmp, independent of the PduPower driver) ---------------------------------


class SnmpGetter:
    """SNMPv2c GETs from one engine (cheap enough to poll with; close it when done)."""

    def __init__(self, host: str, port: int, community: str, wait: float = 2.0) -> None:
        self.host, self.port, self.community, self.wait = host, port, community, wait
        self._engine: Any = None
        self._target: Any = None
        self._init = asyncio.Lock()

    async def get(self, oid: str) -> int | str | None:
        """An int (or the type name of a non-integer value such as ``noSuchInstance``), or
        ``None`` when the agent did not answer within ``wait``."""
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

        if self._target is None:
            # Two first GETs at once must not both build (or half-see) the engine.
            async with self._init:
                if self._target is None:
                    self._engine = SnmpEngine()
                    self._target = await UdpTransportTarget.create(
                        (self.host, self.port), timeout=self.wait, retries=0
                    )
        err, status, _index, binds = await get_cmd(
            self._engine,
            CommunityData(self.community, mpModel=1),
            self._target,
            ContextData(),
            ObjectType(ObjectIdentity(oid)),
            lookupMib=False,
        )
        if err:
            return None
        if status:
            raise RuntimeError(f"GET {oid}: {status.prettyPrint()}")
        value = binds[0][1]
        return int(value) if isinstance(value, Integer) else type(value).__name__

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close_dispatcher()
            self._engine = self._target = None


async def snmp_get(
    host: str, port: int, community: str, oid: str, *, wait: float = 2.0
) -> int | str | None:
    """One GET from a fresh engine (see ``SnmpGetter.get``)."""
    getter = SnmpGetter(host, port, community, wait)
    try:
        return await getter.get(oid)
    finally:
        getter.close()


# --- the agent -----------------------------------------------------------------------------


class SnmpSimUnavailable(RuntimeError):
    """snmpsim could not be installed or started."""


DEFAULT_VENV = Path("/opt/jumpstarter-snmpsim")
REPO = Path(__file__).resolve().parents[3]


def snmpsim_venv(build: bool = True) -> Path:
    """The snmpsim venv: built once by ``scripts/snmpsim-venv`` (from a checkout), else
    ``$JMP_SNMPSIM_VENV`` or ``/opt/jumpstarter-snmpsim`` as it is."""
    script = REPO / "scripts" / "snmpsim-venv"
    if build and script.exists():
        try:
            out = subprocess.run(
                [str(script)], check=True, capture_output=True, text=True, timeout=600
            )
        except (OSError, subprocess.SubprocessError) as exc:
            stderr = getattr(exc, "stderr", "") or ""
            raise SnmpSimUnavailable(f"scripts/snmpsim-venv failed: {exc}\n{stderr}") from exc
        venv = Path(out.stdout.strip().splitlines()[-1])
    else:
        venv = Path(os.environ.get("JMP_SNMPSIM_VENV") or DEFAULT_VENV)
    if not (venv / "bin" / "snmpsim-command-responder").exists():
        raise SnmpSimUnavailable(
            f"no snmpsim-command-responder in {venv} (build it with scripts/snmpsim-venv)"
        )
    return venv


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unprivileged_user() -> tuple[str, str]:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        raise SnmpSimUnavailable("no 'nobody' user to run snmpsim as") from None
    for group in ("nogroup", "nobody"):
        with contextlib.suppress(KeyError):
            grp.getgrnam(group)
            return "nobody", group
    raise SnmpSimUnavailable("no 'nogroup'/'nobody' group to run snmpsim as")


@dataclass
class SnmpSim:
    """snmpsim on 127.0.0.1:<free port>, serving ``files`` (see the module docstring)."""

    venv: Path
    host: str = "127.0.0.1"
    port: int = 0
    files: tuple[str, ...] = TEST_FILES
    start_timeout: float = 60.0
    workdir: Path = field(init=False)
    proc: subprocess.Popen | None = field(default=None, init=False)

    def __enter__(self) -> SnmpSim:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        # Not under a 0700 directory (pytest's tmp_path, /root): snmpsim drops to nobody.
        self.workdir = Path(tempfile.mkdtemp(prefix="jmp-snmpsim-"))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.spawn()
        self._wait_ready()

    def prepare(self) -> list[str]:
        """Write the files into ``workdir``; the agent's command line."""
        if not hasattr(self, "workdir"):
            self.workdir = Path(tempfile.mkdtemp(prefix="jmp-snmpsim-"))
        data, cache, variation = (self.workdir / d for d in ("data", "cache", "variation"))
        write_data(data, self.files)
        cache.mkdir(exist_ok=True)
        variation.mkdir(exist_ok=True)
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
        return cmd

    def spawn(self) -> None:
        """Start the agent in its own process group; not yet ready (see ``_wait_ready``)."""
        cmd = self.prepare()
        with (self.workdir / "responder.log").open("wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_ready(self) -> None:
        assert self.proc is not None
        community = self.files[0]
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise SnmpSimUnavailable(f"snmpsim exited {self.proc.returncode}: {self.log()}")
            probe = snmp_get(self.host, self.port, community, SYS_DESCR, wait=0.3)
            if asyncio.run(probe) is not None:
                return
            if time.monotonic() > deadline:
                raise SnmpSimUnavailable(
                    f"snmpsim did not answer within {self.start_timeout:g} s: {self.log()}"
                )
            time.sleep(0.1)

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
        if hasattr(self, "workdir"):
            shutil.rmtree(self.workdir, ignore_errors=True)
