"""``DeviceWatcher``: which configured devices are present now, kept current from udev.

Desired state is the set of *watches* (a ``DeviceMatch``, or a plain device path); observed
state is, for each watch, the device node it resolves to now, or None with a reason. The
watcher never applies an event to that state. Every udev event (add, remove, change, bind,
anything) and every monitor overflow makes it re-enumerate and recompute every watch:
"reconcile, don't trust edges" (peers.md §4.6.8). A single event can mislead: a burst of
remove/add hides an unplug between two looks (labgrid PR #245), a ``remove`` can be
synthetic while the device is still there, and an overflow (``ENOBUFS``: the kernel dropped
events because we read too slowly) loses events outright. Enumeration is the truth. Events
that arrive together are coalesced into one re-scan.

Event source: udev's netlink group (events after udevd has applied its rules, so ``ID_*``
properties are in place). When udevd is not running (``/run/udev/control`` missing or not
answering, as on a host without systemd or a container without ``-v /run/udev:/run/udev``),
libudev would silently deliver nothing on that group, so the watcher falls back to the
kernel's group and logs a warning: add/remove still arrive, but properties set by udev rules
(every ``ID_*``) do not exist then and matches on them never resolve. The monitor's file
descriptor is read from the event loop (``loop.add_reader``), without a thread.

Plain paths are also polled (``os.path.exists``, every ``poll_interval`` s): a pty, such as
the link socat makes for a simulated serial port, emits no uevent when it appears or goes
away (devpts nodes are not in sysfs; testinfra.md §5), so looking is the only way to notice.
One ``stat`` per path per tick is cheap. Polling checks existence only: a dangling link to a
pty number that another process got since reads as present. A watcher whose watches are all
ptys opens no udev monitor at all (``source`` stays None).

Typical use (a driver or the exporter)::

    watcher = DeviceWatcher()
    serial = watcher.watch({"SUBSYSTEM": "tty", "ID_SERIAL_SHORT": "A10K1"}, name="serial")
    watcher.on_change(lambda w: notifier.status(watcher.status_text() or "waiting for lease"))
    watcher.start()                     # in the running loop
    node = serial.require()             # Path, or DeviceUnavailable naming why not
    async with asyncio.timeout(30):
        await serial.wait_for(True)     # until the device is back
    await watcher.aclose()

A watch that is absent at start is allowed: it is logged and reported, never raised.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import structlog

from jumpstarter_exporter.errors import DeviceUnavailable
from jumpstarter_exporter.hotplug.match import (
    AmbiguousMatch,
    DeviceMatch,
    enumerate_devices,
    enumeration_key,
    pick_node,
)
from jumpstarter_exporter.hotplug.match import context as udev_context

if TYPE_CHECKING:
    import pyudev

log = structlog.get_logger("jumpstarter.hotplug")

Source = Literal["auto", "udev", "kernel"]
UDEV_CONTROL = "/run/udev/control"
DEFAULT_POLL_INTERVAL = 0.5  # seconds between existence checks of plain paths
MAX_EVENTS_PER_WAKEUP = 1000  # then yield to the loop; the rest is read on the next wakeup


def udev_running(control: str = UDEV_CONTROL) -> bool:
    """Whether a udevd listens on its control socket.

    The socket file can outlive a dead udevd, so existing proves nothing: connect to it
    (udevd accepts and drops the idle connection; nothing is sent).
    """
    if not os.path.exists(control):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(control)
        except OSError:
            return False
    return True


class UdevEvent(NamedTuple):
    """One event as received (for diagnostics and tests; state never comes from it)."""

    seq: int  # the watcher's own counter, 1-based
    action: str | None
    subsystem: str | None
    sys_name: str | None
    node: str | None
    synth_uuid: str | None  # SYNTH_UUID of a synthetic uevent ("0" or None otherwise)


@dataclass
class WatcherStats:
    events: int = 0  # udev events received
    overflows: int = 0  # ENOBUFS (or other receive errors) met with a full re-scan
    rescans: int = 0  # full re-enumerations
    rescanned_through: int = 0  # seq of the last event received before the last re-scan
    last_rescan_reason: str = ""


def _uevents_can_announce(watch: DeviceWatch) -> bool:
    """Whether a udev monitor can tell us about ``watch``: a match always; a plain path
    unless it is (or links to) a pty. devpts nodes have no sysfs entry and emit no uevent
    (testinfra.md §5), and plain paths are polled anyway, so a watcher of ptys alone (a
    socat "board") needs no monitor, and the exporter does not load pyudev and libudev for it
    (about 1 MB of its idle memory)."""
    if watch.kind == "match":
        return True
    return not os.path.realpath(watch.target).startswith("/dev/pts/")


class DeviceWatch:
    """A handle on one watched device: its observed state and ways to wait for changes."""

    def __init__(self, watcher: DeviceWatcher, target: DeviceMatch | Path, name: str) -> None:
        self.watcher = watcher
        self.target = target
        self.name = name
        self.node: Path | None = None
        self.reason: str = "not checked yet"
        self.changes = 0  # bumped whenever ``node`` changes (appears, goes, moves)
        self._changed = asyncio.Event()

    @property
    def kind(self) -> Literal["match", "path"]:
        return "path" if isinstance(self.target, Path) else "match"

    @property
    def available(self) -> bool:
        return self.node is not None

    def describe(self) -> str:
        if self.node is not None:
            return f"{self.name}: {self.node}"
        return f"{self.name}: unavailable ({self.reason})"

    def __repr__(self) -> str:
        return f"<DeviceWatch {self.describe()}>"

    def require(self) -> Path:
        """The device node, or ``DeviceUnavailable`` saying why there is none."""
        if self.node is None:
            raise DeviceUnavailable(f"device {self.name} is unavailable: {self.reason}")
        return self.node

    async def wait_change(self) -> bool:
        """Wait until the state changes (or the watcher closes); returns ``available``.

        Bound the wait with ``asyncio.timeout`` as usual.
        """
        event = self._changed
        if self.watcher.closed:
            return self.available
        await event.wait()
        return self.available

    async def wait_for(self, available: bool = True) -> Path | None:
        """Wait until the device is (or is not) available; returns ``node``.

        ``DeviceUnavailable`` if the watcher is closed first.
        """
        while self.available != available:
            if self.watcher.closed:
                raise DeviceUnavailable(f"device {self.name}: watcher closed")
            await self.wait_change()
        return self.node

    def _set(self, node: Path | None, reason: str) -> bool:
        """Record an observation; True if the node changed (then waiters are woken)."""
        self.reason = reason
        if node == self.node:
            return False
        self.node = node
        self.changes += 1
        self._wake()
        return True

    def _wake(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()


class DeviceWatcher:
    """Observed presence of a set of devices, reconciled on every udev event (module doc)."""

    def __init__(
        self,
        *,
        source: Source = "auto",
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        receive_buffer_size: int | None = None,
    ) -> None:
        """``source``: "udev", "kernel", or "auto" (udev if udevd runs, else kernel).
        ``receive_buffer_size``: the monitor socket's buffer in bytes (libudev's default is
        large; setting it needs CAP_NET_ADMIN; tests make it tiny to provoke overflows)."""
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self._source_wanted: Source = source
        self.poll_interval = poll_interval
        self._receive_buffer_size = receive_buffer_size
        self._watches: list[DeviceWatch] = []
        self._subscribers: list[Callable[[DeviceWatch], Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: pyudev.Context | None = None
        self._monitor: pyudev.Monitor | None = None
        self._monitor_fd: int | None = None
        self._pending: asyncio.Handle | None = None
        self._pending_reasons: set[str] = set()
        self._poll_handle: asyncio.TimerHandle | None = None
        self._enumeration_error: str | None = None
        self.source: Literal["udev", "kernel"] | None = None  # after start; None: no monitor
        self.stats = WatcherStats()
        self.recent_events: collections.deque[UdevEvent] = collections.deque(maxlen=64)
        self.started = False
        self.closed = False
        self._monitor_tried = False

    # -- configuration -----------------------------------------------------------------------

    @property
    def watches(self) -> tuple[DeviceWatch, ...]:
        return tuple(self._watches)

    def watch(
        self, target: DeviceMatch | Mapping[str, Any] | str | os.PathLike[str], *, name: str
    ) -> DeviceWatch:
        """Watch a device given by a match (mapping or ``DeviceMatch``) or a plain path.

        The state is computed at once, so ``available`` is meaningful on return; a device
        that is absent is logged, not raised. It is kept current from ``start()`` until
        ``aclose()``.
        """
        if self.closed:
            raise RuntimeError("DeviceWatcher is closed")
        if isinstance(target, str | os.PathLike):
            resolved: DeviceMatch | Path = Path(target)
        else:
            resolved = DeviceMatch.coerce(target)
        handle = DeviceWatch(self, resolved, name)
        self._watches.append(handle)
        if self.started and not self._monitor_tried and _uevents_can_announce(handle):
            self._open_monitor()
        handle._set(*self._observation(handle, {}))
        if not handle.available:
            log.warning("device unavailable", watch=name, reason=handle.reason)
        return handle

    def unwatch(self, handle: DeviceWatch) -> None:
        with contextlib.suppress(ValueError):
            self._watches.remove(handle)

    def on_change(self, callback: Callable[[DeviceWatch], Any]) -> Callable[[], None]:
        """Call ``callback(watch)`` (a plain function, on the loop) whenever a watch's node
        changes: appears, goes away, or moves to another node. To wait in a coroutine, use
        ``DeviceWatch.wait_change``/``wait_for``. Returns a function that unsubscribes."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def unavailable(self) -> list[DeviceWatch]:
        return [w for w in self._watches if not w.available]

    def status_text(self) -> str:
        """One line for sd_notify STATUS / the report: "" when every device is present."""
        missing = self.unavailable()
        if not missing:
            return ""
        return "device unavailable: " + "; ".join(f"{w.name} ({w.reason})" for w in missing)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to udev events and start polling (call from the running loop).

        The monitor is opened before the first enumeration, so nothing that happens in
        between is missed. Idempotent.
        """
        if self.started:
            return
        if self.closed:
            raise RuntimeError("DeviceWatcher is closed")
        self._loop = asyncio.get_running_loop()
        self.started = True
        # With no watches yet, what comes may need events: open it now, before the first
        # enumeration, so nothing in between is missed.
        if not self._watches or any(_uevents_can_announce(w) for w in self._watches):
            self._open_monitor()
        self.rescan("start")
        self._poll_handle = self._loop.call_later(self.poll_interval, self._poll)

    async def aclose(self) -> None:
        """Stop watching; waiters of ``wait_change`` return, ``wait_for`` raises. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._loop is not None and self._monitor_fd is not None:
            self._loop.remove_reader(self._monitor_fd)
        for handle in (self._pending, self._poll_handle):
            if handle is not None:
                handle.cancel()
        self._pending = self._poll_handle = None
        self._monitor = None  # pyudev closes the socket when the monitor is released
        self._monitor_fd = None
        for watch in self._watches:
            watch._wake()

    async def __aenter__(self) -> DeviceWatcher:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the monitor -------------------------------------------------------------------------

    def _open_monitor(self) -> None:
        self._monitor_tried = True
        try:
            import pyudev

            self._context = pyudev.Context()
        except (ImportError, OSError) as exc:
            log.warning(
                "udev unavailable: only plain device paths can be watched (by polling)",
                error=str(exc),
            )
            return
        source = self._source_wanted
        if source == "auto":
            if udev_running():
                source = "udev"
            else:
                source = "kernel"
                log.warning(
                    "udevd is not running: watching kernel uevents instead; "
                    "matches on udev properties (ID_*) cannot resolve",
                    control=UDEV_CONTROL,
                )
        try:
            monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
            if self._receive_buffer_size is not None:
                monitor.set_receive_buffer_size(self._receive_buffer_size)
            monitor.start()
        except OSError as exc:
            log.warning(
                "cannot open a udev monitor: re-scanning every poll interval instead",
                source=source,
                error=str(exc),
            )
            return
        assert self._loop is not None
        self._monitor, self.source = monitor, source
        self._monitor_fd = monitor.fileno()
        self._loop.add_reader(self._monitor_fd, self._on_readable)
        log.info("watching udev events", source=source)

    def _on_readable(self) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        for _ in range(MAX_EVENTS_PER_WAKEUP):
            try:
                device = monitor.poll(timeout=0)
            except OSError as exc:
                # pyudev raises a bare OSError on POLLERR; the socket's pending error says
                # what it was (reading it also clears it).
                code = exc.errno or self._socket_error()
                self.stats.overflows += 1
                if code == errno.ENOBUFS:
                    log.warning("udev monitor overflowed (events lost); re-scanning")
                else:
                    log.warning(
                        "udev monitor receive failed; re-scanning",
                        error=os.strerror(code) if code else str(exc),
                    )
                self._schedule("overflow" if code == errno.ENOBUFS else "receive error")
                if not code:
                    break  # nothing to clear: do not spin on it
                continue
            if device is None:
                break
            self._record(device)
        else:
            self._schedule("udev event")  # more are waiting; the loop calls us again

    def _socket_error(self) -> int:
        if self._monitor_fd is None:
            return 0
        try:
            with socket.fromfd(self._monitor_fd, socket.AF_NETLINK, socket.SOCK_RAW) as sock:
                return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            return 0

    def _record(self, device: pyudev.Device) -> None:
        self.stats.events += 1
        event = UdevEvent(
            seq=self.stats.events,
            action=device.action,
            subsystem=device.subsystem,
            sys_name=device.sys_name,
            node=device.device_node,
            synth_uuid=device.properties.get("SYNTH_UUID"),
        )
        self.recent_events.append(event)
        log.debug("udev event", action=event.action, device=event.sys_name, node=event.node)
        self._schedule("udev event")

    def _schedule(self, reason: str) -> None:
        """Re-scan soon; everything that arrives before then is covered by that one scan."""
        self._pending_reasons.add(reason)
        if self._pending is None and self._loop is not None and not self.closed:
            self._pending = self._loop.call_soon(self._run_scheduled)

    def _run_scheduled(self) -> None:
        self._pending = None
        reasons, self._pending_reasons = self._pending_reasons, set()
        self.rescan(", ".join(sorted(reasons)))

    def _poll(self) -> None:
        self._poll_handle = None
        if self.closed or self._loop is None:
            return
        if self._monitor is None:
            self.rescan("poll")  # no events to wait for: look at everything
        else:
            self._reconcile(lambda w: w.kind == "path")
        self._poll_handle = self._loop.call_later(self.poll_interval, self._poll)

    # -- reconciling -------------------------------------------------------------------------

    def rescan(self, reason: str = "requested") -> None:
        """Re-enumerate now and recompute every watch (notifying subscribers of changes)."""
        if self.closed:
            return
        started = time.monotonic()
        self.stats.rescans += 1
        self.stats.rescanned_through = self.stats.events
        self.stats.last_rescan_reason = reason
        changed = self._reconcile(lambda w: True)
        log.debug(
            "re-scanned devices",
            reason=reason,
            changed=changed,
            ms=round((time.monotonic() - started) * 1000, 1),
        )

    def _reconcile(self, which: Callable[[DeviceWatch], bool]) -> int:
        cache: dict[tuple[str | None, str | None], list[pyudev.Device]] = {}
        changed = [w for w in list(self._watches) if which(w) and self._update(w, cache)]
        for watch in changed:
            self._notify(watch)
        return len(changed)

    def _update(self, watch: DeviceWatch, cache: dict) -> bool:
        was = watch.node
        if not watch._set(*self._observation(watch, cache)):
            return False
        if watch.node is None:
            log.warning("device unavailable", watch=watch.name, reason=watch.reason, was=str(was))
        elif was is None:
            log.info("device available", watch=watch.name, node=str(watch.node))
        else:
            log.info("device node changed", watch=watch.name, node=str(watch.node), was=str(was))
        return True

    def _observation(self, watch: DeviceWatch, cache: dict) -> tuple[Path | None, str]:
        """``(node, reason)`` for ``watch`` as things are now."""
        target = watch.target
        if isinstance(target, Path):
            if os.path.exists(target):
                return target, ""
            return None, f"{target} does not exist"
        key = enumeration_key(target)
        try:
            if key not in cache:
                cache[key] = enumerate_devices(self._enumeration_context(), key)
            node = pick_node(target, cache[key])
        except AmbiguousMatch as exc:
            return None, str(exc)
        except DeviceUnavailable as exc:  # udev itself cannot be used
            return None, str(exc)
        # Enumeration reads sysfs and the udev database through libudev; whatever it raises
        # (a device vanishing mid-scan, /sys not mounted), the watch is unavailable with that
        # reason and the watcher keeps running.
        except Exception as exc:  # noqa: BLE001
            if self._enumeration_error != str(exc):
                self._enumeration_error = str(exc)
                log.error("udev enumeration failed", error=str(exc))
            return None, f"udev enumeration failed: {exc}"
        self._enumeration_error = None
        if node is None:
            return None, f"no device matches {target}"
        return node, ""

    def _enumeration_context(self) -> pyudev.Context:
        if self._context is None:
            self._context = udev_context()
        return self._context

    def _notify(self, watch: DeviceWatch) -> None:
        for callback in list(self._subscribers):
            try:
                callback(watch)
            # A subscriber's bug must not stop the others from hearing about the change,
            # nor the watcher from reconciling the next event.
            except Exception:
                log.exception("device change subscriber failed", watch=watch.name)


__all__ = [
    "DEFAULT_POLL_INTERVAL",
    "DeviceWatch",
    "DeviceWatcher",
    "UdevEvent",
    "WatcherStats",
    "udev_running",
]
