"""Hotplug: udev matching against this machine's real devices, and the DeviceWatcher with a
real systemd-udevd (``shared/tools/host-udevd``), synthetic uevents on ttys, a real vc device
that comes and goes (a virtual console allocated and freed), and a socat pty.

What this machine offers (testinfra.md §5): no real tty hotplug (no USB, no modules), so
uevents are written to ``/sys/class/tty/ttyS0/uevent`` with a ``SYNTH_ARG_*`` tag to
recognise our own; ptys emit no uevents at all. ttyS0's ancestors are serial-base/port,
serial-base/ctrl and pnp ``00:00`` (driver ``serial``, ``id`` PNP0501). Needs root; outside
CI a missing prerequisite skips, with ``CI=true`` it fails. udevd is the session-wide
``udevd`` fixture of ``conftest.py`` (stopped at the end of the session unless it was already
running); socat, the VT and the test udev rule are always cleaned up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jumpstarter_exporter.errors import DeviceUnavailable
from jumpstarter_exporter.hotplug import (
    AmbiguousMatch,
    DeviceMatch,
    DeviceWatch,
    DeviceWatcher,
    find,
    resolve,
    udev_running,
)
from tests.harness import unmet

REPO = Path(__file__).resolve().parent.parent
TTYS0 = Path("/sys/class/tty/ttyS0")
VT = 47  # a virtual console nobody uses; allocating it makes vcs47/vcsa47/vcsu47 appear
VT_DISALLOCATE = 0x5608
RULES_DIR = Path("/run/udev/rules.d")
RULE = RULES_DIR / "99-jumpstarter-hotplug-test.rules"
# Copies our uevent's tag into a udev property, the way udev's rules set ID_SERIAL_SHORT:
# it lives in udev's database, so enumeration (not the event) is what sees it.
# tty37 rather than ttyS0: other tests send plain uevents to ttyS0, and any of them would
# rewrite the database entry (dropping the property) in the middle of this one.
RULE_TTY = "tty37"
RULE_TEXT = (
    f'ACTION!="remove", SUBSYSTEM=="tty", KERNEL=="{RULE_TTY}", '
    'ENV{SYNTH_ARG_JMPHOTPLUG}=="?*", ENV{JMP_HOTPLUG_TEST}="$env{SYNTH_ARG_JMPHOTPLUG}"\n'
)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root() -> None:
    if os.geteuid() != 0:
        unmet("needs root (uevent files, udevd, virtual consoles)")


@pytest.fixture(scope="module")
def ttys0(root: None) -> Path:
    if not (TTYS0 / "uevent").exists() or not Path("/dev/ttyS0").exists():
        unmet("no /dev/ttyS0 on this machine")
    return Path("/dev/ttyS0")


@pytest.fixture
def udev_rule(root: None, udevd: None) -> Iterator[Path]:
    """A transient rule in /run/udev/rules.d (tmpfs), removed afterwards; yields the node."""
    udevadm = shutil.which("udevadm")
    if udevadm is None:
        unmet("udevadm is missing")
    node = Path("/dev") / RULE_TTY
    if not node.exists() or not Path(f"/sys/class/tty/{RULE_TTY}/uevent").exists():
        unmet(f"no {node} on this machine")
    made_dir = not RULES_DIR.exists()
    RULES_DIR.mkdir(parents=True, exist_ok=True)
    RULE.write_text(RULE_TEXT)
    subprocess.run([udevadm, "control", "--reload"], check=True, timeout=30)
    try:
        yield node
    finally:
        RULE.unlink(missing_ok=True)
        if made_dir:
            with contextlib.suppress(OSError):
                RULES_DIR.rmdir()
        subprocess.run([udevadm, "control", "--reload"], check=True, timeout=30)
        uevent(RULE_TTY, "change")  # rewrite its database entry without our property


def _vt_free() -> None:
    # Only an allocated VT: freeing one that is not gives EBUSY (the kernel compares the
    # missing console with the missing selection owner, both NULL, and calls it busy).
    # Right after a close the VT can still be busy too: the kernel drops the tty's last
    # reference from a work queue, a moment later. So retry EBUSY for a while.
    for attempt in range(100):
        if not Path(f"/sys/class/vc/vcs{VT}").exists():
            return
        fd = os.open("/dev/tty0", os.O_RDWR | os.O_NOCTTY)
        try:
            fcntl.ioctl(fd, VT_DISALLOCATE, VT)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or attempt == 99:
                raise
        finally:
            os.close(fd)
        time.sleep(0.02)


def _vt_allocate() -> None:
    os.close(os.open(f"/dev/tty{VT}", os.O_RDWR | os.O_NOCTTY))  # opening allocates it


@pytest.fixture
def free_vt(root: None) -> Iterator[None]:
    if not Path("/dev/tty0").exists() or not Path(f"/dev/tty{VT}").exists():
        unmet("no virtual consoles (/dev/tty0) on this machine")
    try:
        _vt_free()
    except OSError as exc:
        unmet(f"VT {VT} cannot be freed: {exc}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            _vt_free()


class Socat:
    """A socat pty pair whose ``dut`` link is the watched path (what a serial test uses)."""

    def __init__(self, directory: Path) -> None:
        self.dut = directory / "dut"
        self.host = directory / "host"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            [
                "socat",
                f"pty,link={self.dut},raw,echo=0",
                f"pty,link={self.host},raw,echo=0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        """SIGTERM: socat closes the ptys and removes its links."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def socat(tmp_path: Path) -> Iterator[Socat]:
    if shutil.which("socat") is None:
        unmet("socat is missing")
    pair = Socat(tmp_path)
    try:
        yield pair
    finally:
        pair.stop()


# --- helpers --------------------------------------------------------------------------------


def uevent(device: str, action: str, **tags: str) -> str:
    """Write a synthetic uevent for /sys/class/tty/<device>; returns its SYNTH_UUID."""
    tag = str(uuid.uuid4())
    args = "".join(f" {key}={value}" for key, value in tags.items())
    Path(f"/sys/class/tty/{device}/uevent").write_text(f"{action} {tag}{args}")
    return tag


async def until(predicate: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


async def reconciled_after(watcher: DeviceWatcher, *tags: str) -> None:
    """Wait until the watcher received the uevents ``tags`` and re-scanned after them."""

    def seq_of(tag: str) -> int | None:
        return next((e.seq for e in watcher.recent_events if e.synth_uuid == tag), None)

    await until(lambda: all(seq_of(t) is not None for t in tags), f"uevents {tags}")
    last = max(seq_of(t) or 0 for t in tags)
    await until(lambda: watcher.stats.rescanned_through >= last, "a re-scan after them")


async def transition(watch: DeviceWatch, available: bool, seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        await watch.wait_for(available)


# --- DeviceMatch (no udevd needed) ----------------------------------------------------------


def test_match_model_validates_and_prints() -> None:
    match = DeviceMatch.model_validate(
        {"SUBSYSTEM": "tty", "@ATTR{port_number}": 1, "ID_SERIAL_SHORT": "A1*|B2"}
    )
    assert match.root["@ATTR{port_number}"] == "1"  # YAML numbers are their text
    assert str(match) == "SUBSYSTEM=tty, @ATTR{port_number}=1, ID_SERIAL_SHORT=A1*|B2"
    assert match.literal("SUBSYSTEM") == "tty"
    assert match.literal("ID_SERIAL_SHORT") is None  # a glob: not a literal
    bad = [
        ({}, "a match needs at least one key"),
        ({"@": "x"}, "empty key '@'"),
        ({"ATTR{x": "y"}, r"sysfs attributes are written ATTR\{name\}"),
        ({"KERNEL": "a||b"}, "empty alternative"),
    ]
    for keys, message in bad:
        with pytest.raises(ValueError, match=message):
            DeviceMatch.model_validate(keys)
    with pytest.raises(ValueError, match="expected a pattern"):
        DeviceMatch.model_validate({"SUBSYSTEM": True})


def test_validating_a_match_does_not_import_pyudev() -> None:
    code = (
        "import sys\n"
        "from jumpstarter_exporter.hotplug import DeviceMatch, DeviceWatcher\n"
        "DeviceMatch.model_validate({'SUBSYSTEM': 'tty', '@ID_PATH': 'pci-*'})\n"
        "DeviceWatcher()\n"
        "print('pyudev' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_match_keys_against_ttys0(ttys0: Path) -> None:
    (device,) = find(None, {"SUBSYSTEM": "tty", "KERNEL": "ttyS0"})
    assert device.device_node == str(ttys0)
    yes = [
        {"SUBSYSTEM": "tty", "KERNEL": "ttyS0"},
        {"SUBSYSTEM": "tty", "sys_name": "ttyS[0-9]"},
        {"SUBSYSTEM": "tty", "DEVNAME": "ttyS0"},  # the name under /dev ...
        {"SUBSYSTEM": "tty", "DEVNAME": "/dev/ttyS*"},  # ... or the full path
        {"KERNEL": "ttyS0", "DEVPATH": "/devices/*/tty/ttyS0"},
        {"KERNEL": "ttyS0", "ATTR{port}": "0x3F8|0x2F8"},  # a sysfs attribute
        {"KERNEL": "ttyS0", "MAJOR": "4"},  # a udev property
        {"KERNEL": "ttyS0", "@SUBSYSTEM": "pnp"},  # ancestors: the pnp device ...
        {"KERNEL": "ttyS0", "@DRIVER": "serial"},
        {"KERNEL": "ttyS0", "@SUBSYSTEM": "serial-base", "@DRIVER": "port"},
        {"KERNEL": "ttyS0", "@ATTR{id}": "PNP0501"},
        {"KERNEL": "ttyS0", "@id": "PNP05*"},  # labgrid's bare attribute key
    ]
    no = [
        {"SUBSYSTEM": "tty", "KERNEL": "ttyS0", "@SUBSYSTEM": "tty"},  # "@" excludes itself
        {"KERNEL": "ttyS0", "SUBSYSTEM": "pnp"},
        {"KERNEL": "ttyS0", "@DRIVER": "serial8250"},
        {"KERNEL": "ttyS0", "DEVNAME": "ttyS1"},
        {"KERNEL": "ttyS0", "ID_SERIAL_SHORT": "*"},  # an absent key never matches
        {"KERNEL": "ttyS0", "ATTR{no_such_attribute}": "*"},
        {"KERNEL": "ttyS0", "@ATTR{id}": "pnp0501"},  # case-sensitive
    ]
    for keys in yes:
        assert DeviceMatch.model_validate(keys).matches(device), keys
    for keys in no:
        assert not DeviceMatch.model_validate(keys).matches(device), keys


def test_resolve_single_none_and_ambiguous(ttys0: Path) -> None:
    assert resolve({"SUBSYSTEM": "tty", "@DRIVER": "serial"}) == ttys0
    assert resolve({"SUBSYSTEM": "tty", "@ATTR{id}": "PNP0501", "KERNEL": "tty*"}) == ttys0
    assert resolve({"SUBSYSTEM": "tty", "KERNEL": "ttyUSB*"}) is None
    assert resolve({"SUBSYSTEM": "no-such-subsystem"}) is None
    with pytest.raises(AmbiguousMatch) as caught:
        resolve({"SUBSYSTEM": "tty", "KERNEL": "ttyS0|tty5"})
    assert caught.value.candidates == [Path("/dev/tty5"), ttys0]
    assert isinstance(caught.value, DeviceUnavailable)  # a driver just has no device
    assert "2 devices match SUBSYSTEM=tty, KERNEL=ttyS0|tty5: /dev/tty5, /dev/ttyS0" in str(
        caught.value
    )
    # A match with no literal SUBSYSTEM enumerates everything and still finds ttyS0.
    assert resolve({"DEVNAME": "ttyS0"}) == ttys0


def test_udev_running_needs_a_listening_daemon(tmp_path: Path) -> None:
    assert not udev_running(str(tmp_path / "missing"))
    stale = tmp_path / "control"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.bind(str(stale))  # the file outlives the socket, like a dead udevd's
    assert stale.exists()
    assert not udev_running(str(stale))
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.bind(str(tmp_path / "live"))
        sock.listen(1)
        assert udev_running(str(tmp_path / "live"))


# --- DeviceWatcher with a real udevd --------------------------------------------------------


def test_watcher_reconciles_instead_of_trusting_a_remove(udevd: None, ttys0: Path) -> None:
    """A synthetic ``remove`` of ttyS0 is seen, but re-enumeration finds ttyS0 still there:
    the watch stays available and nobody is told of a change."""

    async def main() -> None:
        async with DeviceWatcher() as watcher:
            assert watcher.source == "udev"
            watch = watcher.watch({"SUBSYSTEM": "tty", "KERNEL": "ttyS0"}, name="console")
            path = watcher.watch(ttys0, name="console-path")
            assert watch.node == ttys0 and path.node == ttys0
            seen: list[DeviceWatch] = []
            watcher.on_change(seen.append)
            rescans = watcher.stats.rescans

            removed = uevent("ttyS0", "remove", JMPHOTPLUG="gone")
            await reconciled_after(watcher, removed)
            assert watcher.stats.rescans > rescans
            assert watch.available and watch.node == ttys0
            added = uevent("ttyS0", "add", JMPHOTPLUG="back")
            await reconciled_after(watcher, added)
            events = {e.synth_uuid: e for e in watcher.recent_events}
            assert events[removed].action == "remove" and events[removed].sys_name == "ttyS0"
            assert events[added].action == "add"
            assert watch.available and path.available
            assert seen == []
            assert watcher.status_text() == ""

    asyncio.run(main())


def test_watch_follows_a_udev_property_in_the_database(udev_rule: Path) -> None:
    """A match on a property set by a udev rule (as ID_SERIAL_SHORT is) appears and goes
    with udev's database, which only enumeration reads: the ``change`` event carries no
    clue for the watcher, the re-scan does."""
    token = uuid.uuid4().hex[:12]

    async def main() -> None:
        async with DeviceWatcher() as watcher:
            watch = watcher.watch({"SUBSYSTEM": "tty", "JMP_HOTPLUG_TEST": token}, name="tagged")
            assert not watch.available
            assert watch.reason == f"no device matches SUBSYSTEM=tty, JMP_HOTPLUG_TEST={token}"
            changes: list[tuple[str, Path | None]] = []
            watcher.on_change(lambda w: changes.append((w.name, w.node)))

            uevent(RULE_TTY, "change", JMPHOTPLUG=token)
            await transition(watch, True)
            assert watch.node == udev_rule
            uevent(RULE_TTY, "change")  # the rule no longer sets the property
            await transition(watch, False)
            with pytest.raises(DeviceUnavailable, match="device tagged is unavailable"):
                watch.require()
            assert changes == [("tagged", udev_rule), ("tagged", None)]

    asyncio.run(main())


def test_watch_follows_a_real_device_that_comes_and_goes(udevd: None, free_vt: None) -> None:
    """Allocating and freeing a virtual console adds and removes a real device (vcs47):
    absent at start (allowed, reported), then available, gone, and back, without restart."""
    node = Path(f"/dev/vcs{VT}")

    async def main() -> None:
        async with DeviceWatcher() as watcher:
            watch = watcher.watch({"SUBSYSTEM": "vc", "KERNEL": f"vcs{VT}"}, name="vc")
            assert not watch.available
            assert "device unavailable: vc (no device matches" in watcher.status_text()
            for _ in range(2):
                _vt_allocate()
                await transition(watch, True)
                assert watch.node == node and watcher.status_text() == ""
                _vt_free()
                await transition(watch, False)
            assert watch.changes == 4

    asyncio.run(main())


def _flood(count: int) -> None:
    """Fire uevents while the event loop is blocked, so the monitor's buffer overflows."""
    for i in range(count):
        uevent("ttyS0", "change", JMPFLOOD=str(i))
    # Let udevd process them all (and send them to the monitor) while nobody reads it.
    subprocess.run(["udevadm", "settle", "--timeout=30"], check=True, timeout=60)


def test_monitor_overflow_makes_a_full_rescan(udevd: None, ttys0: Path) -> None:
    async def main() -> None:
        # 1 byte → the kernel's minimum (about 2 KiB): a few events overflow it.
        async with DeviceWatcher(receive_buffer_size=1) as watcher:
            watch = watcher.watch({"SUBSYSTEM": "tty", "KERNEL": "ttyS0"}, name="console")
            rescans = watcher.stats.rescans
            _flood(40)
            await until(lambda: watcher.stats.overflows >= 1, "ENOBUFS to be noticed")
            await until(lambda: watcher.stats.rescans > rescans, "a re-scan")
            assert watcher.stats.events < 40  # events were really lost ...
            assert watch.available  # ... and the state is right regardless
            marker = uevent("ttyS0", "change")  # the monitor still works afterwards
            await reconciled_after(watcher, marker)

    asyncio.run(main())


def test_without_udevd_the_kernel_source_reconciles(
    ttys0: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` falls back to kernel uevents when udevd is not running (simulated here, so
    the test does not depend on whether this machine's udevd runs); they drive the same
    re-scan."""
    monkeypatch.setattr("jumpstarter_exporter.hotplug.monitor.udev_running", lambda: False)

    async def main() -> None:
        async with DeviceWatcher() as watcher:
            assert watcher.source == "kernel"
            watch = watcher.watch({"SUBSYSTEM": "tty", "KERNEL": "ttyS0"}, name="console")
            tag = uevent("ttyS0", "change", JMPKERNEL="x")
            await reconciled_after(watcher, tag)
            assert watch.node == ttys0

    asyncio.run(main())


# --- plain paths: a socat pty ---------------------------------------------------------------


def test_pty_link_goes_and_comes_back(socat: Socat) -> None:
    """ptys emit no uevents: a plain-path watch notices a socat link by polling, both ways,
    within a bounded time, and the node it reports is the live pty."""

    async def main() -> None:
        async with DeviceWatcher(poll_interval=0.1) as watcher:
            watch = watcher.watch(socat.dut, name="serial")
            assert not watch.available  # start-up with the device missing is allowed
            assert watch.reason == f"{socat.dut} does not exist"
            with pytest.raises(DeviceUnavailable, match=f"{socat.dut} does not exist"):
                watch.require()
            flips: list[bool] = []
            watcher.on_change(lambda w: flips.append(w.available))
            for _ in range(2):
                socat.start()
                await transition(watch, True, seconds=5)
                assert watch.require() == socat.dut
                await until(socat.host.exists, "socat's other end")
                _echo_through(watch.require(), socat.host)
                socat.stop()
                await transition(watch, False, seconds=5)
            assert flips == [True, False, True, False]
        with pytest.raises(DeviceUnavailable, match="watcher closed"):
            await watch.wait_for(True)

    asyncio.run(main())


def _echo_through(dut: Path, host: Path) -> None:
    """Bytes written to ``dut`` arrive at ``host``: the watched node is the live pty."""
    a = os.open(dut, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    b = os.open(host, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        os.write(a, b"ping")
        got = b""
        while len(got) < 4 and select.select([b], [], [], 5.0)[0]:
            got += os.read(b, 64)
        assert got == b"ping"
    finally:
        os.close(a)
        os.close(b)


def test_subscriber_errors_do_not_stop_others(tmp_path: Path) -> None:
    async def main() -> None:
        async with DeviceWatcher(poll_interval=0.05) as watcher:
            target = tmp_path / "node"
            watch = watcher.watch(target, name="file")
            heard: list[bool] = []

            def broken(_: DeviceWatch) -> None:
                raise RuntimeError("subscriber bug")

            watcher.on_change(broken)
            unsubscribe = watcher.on_change(lambda w: heard.append(w.available))
            target.touch()
            await transition(watch, True, seconds=2)
            unsubscribe()
            target.unlink()
            await transition(watch, False, seconds=2)
            assert heard == [True]

    asyncio.run(main())


def test_dangling_link_is_unavailable(tmp_path: Path) -> None:
    """A link whose target is gone (socat killed with SIGKILL leaves its links) is absent."""
    link, target = tmp_path / "dut", tmp_path / "target"
    link.symlink_to(target)

    async def main() -> None:
        async with DeviceWatcher(poll_interval=0.05) as watcher:
            watch = watcher.watch(link, name="serial")
            assert not watch.available
            target.touch()
            await transition(watch, True, seconds=2)
            assert watch.node == link  # the configured path, not where it points

    asyncio.run(main())


def test_a_watcher_of_ptys_alone_opens_no_udev_monitor(socat: Socat, ttys0: Path) -> None:
    """ptys emit no uevents, so watching only ptys (a socat link) needs no monitor and the
    exporter need not load pyudev for it; a watch that events can announce, added later,
    opens the monitor then."""

    async def main() -> None:
        socat.start()
        await until(socat.dut.exists, "socat's link")
        watcher = DeviceWatcher(poll_interval=0.1)
        watch = watcher.watch(socat.dut, name="serial")
        async with watcher:
            assert watch.available
            assert watcher.source is None
            socat.stop()
            await transition(watch, False, seconds=5)  # polling alone still notices
            watcher.watch(ttys0, name="console")
            assert watcher.source in ("udev", "kernel")

    asyncio.run(main())
