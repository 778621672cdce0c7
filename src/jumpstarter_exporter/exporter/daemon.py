"""The exporter's lifecycle, one explicit state machine (uvicorn-style)::

    STARTING ─► REGISTERING ─► AVAILABLE ─► LEASED ─► DRAINING ─► exit 0
       │ bad config    │ auth refused / budget spent             ▲
       ▼               ▼                                         │ SIGTERM/SIGINT (2nd: force)
    exit 78         exit 77 / 69                                 │ SIGHUP: after the lease

- READY=1 goes to systemd on the first entry to AVAILABLE, never before (so a bad token or
  an unreachable controller never looks "started"); every state sets STATUS=.
- After a lease is released the process exits 0 (unless ``exitOnLeaseEnd: false``), so its
  service manager starts it fresh: no driver state leaks from one user to the next.
- The controller may go away at any time: streams reconnect with backoff; an active lease
  keeps serving meanwhile; an idle exporter gives up after ``controller_budget`` seconds
  (exit 69) and lets systemd restart it, instead of hanging silently.
- Status reports are latest-wins and re-sent after every reconnect.
- Devices behind drivers (a serial port's path or ``match:``) are watched by one
  ``hotplug.DeviceWatcher`` for the whole process, started before registration: a missing
  device makes its driver unavailable (its calls fail, the report and STATUS say so), never
  the exporter; it recovers when the device returns. No watched device: no watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import grpc.aio
import structlog

from jumpstarter_exporter._proto.jumpstarter.v1 import common_pb2
from jumpstarter_exporter.config.models import ExporterConfig
from jumpstarter_exporter.drivers.base import Driver
from jumpstarter_exporter.drivers.registry import build_tree
from jumpstarter_exporter.errors import (
    ConfigError,
    ControllerUnavailable,
    ExitCode,
    JumpstarterError,
)
from jumpstarter_exporter.exporter import hooks
from jumpstarter_exporter.exporter.backoff import Backoff
from jumpstarter_exporter.exporter.hooks import HookResult
from jumpstarter_exporter.exporter.link import ControllerLink, classify
from jumpstarter_exporter.exporter.notify import Notifier
from jumpstarter_exporter.hotplug.monitor import DeviceWatch, DeviceWatcher
from jumpstarter_exporter.wire.channel import open_secure_channel

if TYPE_CHECKING:
    from jumpstarter_exporter.exporter.session import Session

log = structlog.get_logger("jumpstarter.exporter")

S = common_pb2  # status names: S.EXPORTER_STATUS_AVAILABLE, …

STATUS_SEEN_TIMEOUT = 3.0  # how long we wait for a client to read our final status

# ReleaseLease answers from controllers that predate it: fall back to the old path (§3.12).
FALLBACK_CODES = {
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
}


@dataclass
class RunOptions:
    exit_after_lease: bool = True
    controller_budget: float = 300.0  # seconds an idle exporter tries an absent controller
    stop_grace: float = 10.0  # seconds for a graceful stop before we give up on goodbyes


def resume_gc() -> None:
    """Turn the cyclic collector back on once start-up is over, if ``cli.entry`` paused it.

    What start-up built (modules, models, the driver tree) lives as long as the process, so
    it is frozen out of every later collection rather than walked on each one.
    """
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def start_device_watcher(
    root: Driver, on_change: Callable[[DeviceWatch], object]
) -> DeviceWatcher | None:
    """Offer one ``DeviceWatcher`` to the driver tree; start it if any driver watches a
    device (else it is dropped unstarted: pyudev is never imported). Call in the loop.

    Logs a WARNING when a device goes away and INFO when it returns; ``on_change`` then
    updates whatever shows the state (sd_notify STATUS).
    """
    watcher = DeviceWatcher()
    root.attach_watcher(watcher)
    if not watcher.watches:
        return None

    def changed(watch: DeviceWatch) -> None:
        if watch.available:
            log.info("device is back", device=watch.name, node=str(watch.node))
        else:
            log.warning("device went away", device=watch.name, reason=watch.reason)
        on_change(watch)

    watcher.on_change(changed)
    watcher.start()
    log.info("watching devices", devices=[w.describe() for w in watcher.watches])
    if missing := watcher.status_text():
        log.warning("starting without a device: its driver is unavailable", status=missing)
    return watcher


class _Novelty:
    """Log the first failure of a kind at WARNING and its repeats at DEBUG."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def warn(self, kind: str, message: str, **fields) -> None:
        level = log.debug if kind in self.seen else log.warning
        self.seen.add(kind)
        level(message, **fields)

    def clear(self, kind: str) -> None:
        self.seen.discard(kind)


class StatusReporter:
    """Latest-wins ReportStatus: a newer status replaces a pending one; failures retry."""

    def __init__(self, link: ControllerLink) -> None:
        self.link = link
        self.wanted: tuple[int, str] | None = None
        self.sent: tuple[int, str] | None = None
        self.changed = asyncio.Event()
        self.flushed = asyncio.Event()

    def set(self, code: int, message: str) -> None:
        self.wanted = (code, message)
        self.flushed.clear()
        self.changed.set()

    def delivered(self, code: int, message: str) -> None:
        """Record a status the caller already sent itself (nothing left to send)."""
        self.wanted = self.sent = (code, message)
        self.flushed.set()

    def resend(self) -> None:
        """After a reconnect the controller may have lost our state: send it again."""
        if self.wanted is not None:
            self.sent = None
            self.flushed.clear()
            self.changed.set()

    async def run(self) -> None:
        backoff = Backoff(initial=0.5, cap=10.0)
        while True:
            await self.changed.wait()
            self.changed.clear()
            wanted = self.wanted
            if wanted is None or wanted == self.sent:
                self.flushed.set()
                continue
            try:
                await self.link.report_status(*wanted)
            except (grpc.aio.AioRpcError, ConnectionError) as exc:
                log.debug("status report failed, will retry", error=str(exc))
                await asyncio.sleep(backoff.next_delay())
                self.changed.set()
                continue
            backoff.reset()
            self.sent = wanted
            if self.wanted == wanted:
                self.flushed.set()


class Exporter:
    def __init__(self, config: ExporterConfig, options: RunOptions, notifier: Notifier) -> None:
        missing = config.missing_for_controller()
        if missing:
            raise ConfigError(
                f"{', '.join(missing)} not set: needed to connect to a controller "
                "(or run standalone with --tls-grpc-listener)"
            )
        self.config = config
        self.options = options
        self.notifier = notifier
        self.uuid = str(uuidlib.uuid4())
        self.name = config.metadata.name
        # HEAD's labels; a 0.9 controller keeps only jumpstarter.dev/ keys, so this is safe.
        self.labels = {"jumpstarter.dev/name": self.name}
        self.root: Driver = build_tree(config)
        self.link = ControllerLink(config)
        self.reporter = StatusReporter(self.link)
        self.registered = False
        self.lease: str | None = None
        self.client: str | None = None
        self.lease_ended = asyncio.Event()
        self.stop_requested = asyncio.Event()
        self.stop_after_lease = False
        self.leases_served = 0
        self.novelty = _Novelty()
        self.router_channels: dict[str, grpc.aio.Channel] = {}
        self._lease_task: asyncio.Task | None = None
        self._signals = 0
        self.exit_code = ExitCode.OK
        self.watcher: DeviceWatcher | None = None

    def _start_watcher(self) -> None:
        """One ``DeviceWatcher`` for every driver's device, if any driver watches one.

        Started before registration, so the first report and STATUS already say which
        device is missing; absence at start-up is allowed (reported, never fatal).
        """
        self.watcher = start_device_watcher(self.root, self._on_device_change)

    def _on_device_change(self, watch: DeviceWatch) -> None:
        if self.notifier.ready_sent and not self.stop_requested.is_set():
            self.notifier.status(self._steady_status())

    # --- public -------------------------------------------------------------------------

    async def run(self) -> ExitCode:
        structlog.contextvars.bind_contextvars(exporter=self.name)
        self._install_signals()
        try:
            self._start_watcher()
            self.notifier.status(self._with_devices("registering with the controller"))
            await self._register()
            if self.stop_requested.is_set():
                return ExitCode.OK
            self.notifier.ready(self._steady_status())
            log.info("ready", endpoint=self.config.endpoint)
            resume_gc()
            async with asyncio.TaskGroup() as tasks:
                workers = [
                    tasks.create_task(self.notifier.watchdog()),
                    tasks.create_task(self.reporter.run()),
                    tasks.create_task(self._status_loop()),
                ]
                await self.stop_requested.wait()
                await self._drain()
                for worker in workers:
                    worker.cancel()
            return self.exit_code
        except* JumpstarterError as group:
            raise group.exceptions[0] from None
        finally:
            await self._goodbye()

    def request_stop(self, reason: str) -> None:
        if not self.stop_requested.is_set():
            log.info("stopping", reason=reason)
            self.notifier.stopping(reason)
            self.stop_requested.set()

    # --- registration -------------------------------------------------------------------

    async def _register(self) -> None:
        backoff = Backoff()
        attempts = 0
        reports = [driver.report(parent, name) for driver, parent, name in self.root.walk()]
        while not self.stop_requested.is_set():
            attempts += 1
            try:
                await self.link.connect()
                await self.link.register(self.labels, reports)
                self.registered = True
                # Inline, not through the reporter: READY must wait until it was delivered.
                available = (S.EXPORTER_STATUS_AVAILABLE, "Exporter registered and available")
                await self.link.report_status(*available)
                self.reporter.delivered(*available)
                log.info("registered", devices=len(reports), attempts=attempts)
                return
            except grpc.aio.AioRpcError as exc:
                if (fatal := classify(exc, "registration", self.config)) is not None:
                    raise fatal from None
                error = f"{exc.code().name}: {exc.details()}"
            except (ConnectionError, OSError) as exc:
                error = str(exc)
            if backoff.failing_for() >= self.options.controller_budget:
                raise ControllerUnavailable(
                    f"controller {self.config.endpoint} unreachable for "
                    f"{backoff.failing_for():.0f} s ({attempts} attempts); last error: {error}"
                )
            resume_gc()  # the fast path is lost anyway; a long outage must not pile up garbage
            delay = backoff.next_delay()
            self.notifier.status(f"controller unreachable, retrying in {delay:.0f} s")
            self.novelty.warn(
                "register", "controller unreachable", error=error, retry_in=round(delay, 1)
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_requested.wait(), delay)

    # --- the Status stream ---------------------------------------------------------------

    async def _status_loop(self) -> None:
        backoff = Backoff()
        while True:
            try:
                call = self.link.status_stream()
                async for message in call:
                    if backoff.attempt:
                        log.info("controller reachable again")
                        self.reporter.resend()
                        self.notifier.status(self._steady_status())
                    backoff.reset()
                    self.novelty.clear("status")
                    self._on_status(message)
                log.debug("status stream ended by the controller; reconnecting")
                continue
            except grpc.aio.AioRpcError as exc:
                if (fatal := classify(exc, "the status stream", self.config)) is not None:
                    raise fatal from None
                error = f"{exc.code().name}: {exc.details()}"
            if self.lease is None and backoff.failing_for() >= self.options.controller_budget:
                raise ControllerUnavailable(
                    f"controller {self.config.endpoint} unreachable for "
                    f"{backoff.failing_for():.0f} s; last error: {error}"
                )
            delay = backoff.next_delay()
            self.novelty.warn(
                "status", "lost the controller", error=error, retry_in=round(delay, 1)
            )
            self.notifier.status(
                f"controller unreachable, retrying in {delay:.0f} s"
                + (f" (lease {self.lease} still served)" if self.lease else "")
            )
            await asyncio.sleep(delay)

    def _steady_status(self) -> str:
        """The sd_notify STATUS for the current state (with any missing device)."""
        if self.lease is None:
            state = "waiting for lease"
        elif self.stop_after_lease:
            state = f"leased by {self.client}; exiting after this lease"
        else:
            state = f"leased by {self.client} (lease {self.lease})"
        return self._with_devices(state)

    def _with_devices(self, state: str) -> str:
        devices = self.watcher.status_text() if self.watcher is not None else ""
        return f"{state}; {devices}" if devices else state

    def _on_status(self, message) -> None:
        if message.leased and message.lease_name:
            if self.lease is None and self._lease_task is None:
                self.lease, self.client = message.lease_name, message.client_name
                self.lease_ended.clear()
                self._lease_task = asyncio.get_running_loop().create_task(
                    self._serve_lease(message.lease_name, message.client_name)
                )
            elif message.lease_name != self.lease:
                log.warning(
                    "ignoring a second lease while one is active",
                    lease=self.lease,
                    other=message.lease_name,
                )
        elif not message.leased:
            if self.lease is not None:
                self.lease_ended.set()
            elif self.stop_after_lease and self._lease_task is None:
                self.request_stop("SIGHUP while idle")

    # --- a lease ------------------------------------------------------------------------

    async def _serve_lease(self, lease: str, client: str) -> None:
        # This task runs in its own context copy: the binding ends with the task.
        structlog.contextvars.bind_contextvars(lease=lease, client=client)
        # Imported at the first lease: the session server (h2 and the servicers, ~1.5 MB and
        # ~12 ms) is not needed while the exporter waits, which is most of its life; with a
        # lease already queued the import is on the same path either way.
        from jumpstarter_exporter.exporter.session import Session

        session = Session(self.root, self.uuid, self.labels, self.config.motd or "")
        try:
            await session.start_unix()
            # Before any hook runs, so a console log records what the hook does to the board.
            await self.root.start()
            log.info("lease started")
            tunnels: set[asyncio.Task] = set()
            listener = asyncio.ensure_future(self._listen(lease, session, tunnels))
            try:
                self.notifier.status(self._steady_status())
                run_after = await self._before_lease(session, lease, client)
                await self._until_lease_over(session, lease, client, run_after)
            finally:
                # This coroutine owns the listener and every tunnel it started.
                for task in (listener, *tunnels):
                    task.cancel()
                await asyncio.gather(listener, *tunnels, return_exceptions=True)
        finally:
            await session.stop(grace=1.0)
            await self.root.aclose()
            self.leases_served += 1
            log.info("lease ended")
            self.lease = self.client = None
            self._lease_task = None
            if not self.stop_requested.is_set():
                self.reporter.set(S.EXPORTER_STATUS_AVAILABLE, "Available for new lease")
                if self.options.exit_after_lease:
                    self.request_stop("lease released: exiting to start fresh")
                elif self.stop_after_lease:
                    self.request_stop("SIGHUP: the lease is over")
                else:
                    self.notifier.status(self._steady_status())

    async def _hook(self, session: Session, phase: str, lease: str, client: str) -> HookResult:
        hook = (
            self.config.hooks.before_lease
            if phase == "beforeLease"
            else (self.config.hooks.after_lease)
        )
        assert hook is not None
        source = (
            S.LOG_SOURCE_BEFORE_LEASE_HOOK
            if phase == "beforeLease"
            else S.LOG_SOURCE_AFTER_LEASE_HOOK
        )
        env = hooks.environment(str(session.socket_path), lease, client)
        result = await hooks.run_hook(hook, phase, env, lambda line: session.publish(line, source))
        log.info("hook finished", hook=phase, ok=result.ok, message=result.message)
        return result

    async def _before_lease(self, session: Session, lease: str, client: str) -> bool:
        """Run beforeLease (if any) and open the session to clients. Returns whether the
        afterLease hook should run at the end (not after an endLease/exit failure)."""
        hook = self.config.hooks.before_lease
        if hook is None:
            self._set_status(session, S.EXPORTER_STATUS_LEASE_READY, "Ready for commands")
            session.clients_allowed.set()
            return True
        self._set_status(session, S.EXPORTER_STATUS_BEFORE_LEASE_HOOK, "Running beforeLease hook")
        # Clients may already dial in (BeforeLeaseHook is dialable); their tunnels wait.
        result = await self._hook(session, "beforeLease", lease, client)
        if self.lease_ended.is_set():
            return False
        if result.ok or hook.on_failure == "warn":
            message = (
                "Ready for commands"
                if result.ok
                else (f"[HOOK_WARNING] beforeLease hook warning: {result.message}")
            )
            self._set_status(session, S.EXPORTER_STATUS_LEASE_READY, message)
            session.clients_allowed.set()
            return True
        failed = S.EXPORTER_STATUS_BEFORE_LEASE_HOOK_FAILED
        # Clients may connect now, but only to read the failure: driver calls stay refused.
        session.clients_allowed.set()
        if hook.on_failure == "endLease":
            self._set_status(
                session, failed, f"beforeLease hook failed (on_failure=endLease): {result.message}"
            )
            await self._let_client_see(session)
            await self._release(lease, session)
            return False
        self._set_status(
            session,
            failed,
            f"beforeLease hook failed (on_failure=exit, shutting down): {result.message}",
        )
        await self._let_client_see(session)
        self.reporter.set(
            S.EXPORTER_STATUS_OFFLINE, "Exporter shutting down due to beforeLease hook failure"
        )
        self.exit_code = ExitCode.HOOK_EXIT
        self.request_stop("beforeLease hook failed with onFailure: exit")
        return False

    async def _after_lease(self, session: Session, lease: str, client: str) -> None:
        hook = self.config.hooks.after_lease
        if hook is None:
            self._set_status(session, S.EXPORTER_STATUS_AVAILABLE, "Available for new lease")
            return
        self._set_status(session, S.EXPORTER_STATUS_AFTER_LEASE_HOOK, "Running afterLease hooks")
        result = await self._hook(session, "afterLease", lease, client)
        if result.ok or hook.on_failure == "warn":
            message = (
                "Available for new lease"
                if result.ok
                else (f"[HOOK_WARNING] afterLease hook warning: {result.message}")
            )
            self._set_status(session, S.EXPORTER_STATUS_AVAILABLE, message)
        elif hook.on_failure == "endLease":
            self._set_status(
                session,
                S.EXPORTER_STATUS_AFTER_LEASE_HOOK_FAILED,
                f"afterLease hook failed (on_failure=endLease): {result.message}",
            )
        else:
            self._set_status(
                session,
                S.EXPORTER_STATUS_AFTER_LEASE_HOOK_FAILED,
                f"afterLease hook failed (on_failure=exit, shutting down): {result.message}",
            )
            self.reporter.set(
                S.EXPORTER_STATUS_OFFLINE, "Exporter shutting down due to afterLease hook failure"
            )
            self.exit_code = ExitCode.HOOK_EXIT
            self.request_stop("afterLease hook failed with onFailure: exit")

    @staticmethod
    async def _let_client_see(session: Session) -> None:
        """Upstream's client polls GetStatus until it reads a final status (AVAILABLE or a
        hook failure); ending the session first would cut its tunnel and leave it waiting
        for minutes (upstream sleeps 1 s instead). Bounded: a client may never ask."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STATUS_SEEN_TIMEOUT):
                await session.wait_status_seen()

    async def _release(self, lease: str, session: Session) -> None:
        """Release our own lease (ReleaseLease as the exporter; old controllers: the
        deprecated ReportStatus(release_lease=true) path, protocol-facts §3.12)."""
        try:
            await self.link.release_lease(lease)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in FALLBACK_CODES:
                log.warning("could not release the lease", error=exc.details())
                return
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.link.report_status(
                    session.status.code,
                    "Lease released (compat: ReportStatus with release_lease)",
                    release_lease=True,
                )
        log.info("released the lease")

    async def _until_lease_over(
        self, session: Session, lease: str, client: str, run_after: bool
    ) -> None:
        """Wait for the release (leased=false) or a stop. EndSession first runs afterLease
        and reports AVAILABLE while the lease is still held (upstream's order); with an
        afterLease hook we then release the lease ourselves, as upstream does."""
        ended = asyncio.ensure_future(self.lease_ended.wait())
        stopping = asyncio.ensure_future(self.stop_requested.wait())
        end_session = asyncio.ensure_future(session.end_requested.wait())
        try:
            done, _ = await asyncio.wait(
                {ended, stopping, end_session}, return_when=asyncio.FIRST_COMPLETED
            )
            if end_session in done and ended not in done and stopping not in done:
                if run_after:
                    await self._after_lease(session, lease, client)
                    run_after = False
                    if (
                        self.config.hooks.after_lease is not None
                        and not self.stop_requested.is_set()
                    ):
                        await self._let_client_see(session)
                        await self._release(lease, session)
                await asyncio.wait({ended, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if run_after and self.config.hooks.after_lease is not None:
                # The lease ended (expiry, release) without EndSession: clean up now.
                await self._after_lease(session, lease, client)
        finally:
            for waiter in (ended, stopping, end_session):
                waiter.cancel()

    def _set_status(self, session: Session, code: int, message: str) -> None:
        session.set_status(code, message)
        self.reporter.set(code, message)

    async def _listen(self, lease: str, session: Session, tunnels: set[asyncio.Task]) -> None:
        backoff = Backoff()
        while True:
            try:
                async for message in self.link.listen(lease):
                    backoff.reset()
                    task = asyncio.ensure_future(self._tunnel(session, message))
                    tunnels.add(task)
                    task.add_done_callback(tunnels.discard)
                log.debug("listen stream ended; reconnecting")
            except grpc.aio.AioRpcError as exc:
                self.novelty.warn(
                    "listen", "listen stream failed", error=f"{exc.code().name}: {exc.details()}"
                )
                await asyncio.sleep(backoff.next_delay())

    async def _router_channel(self, endpoint: str) -> grpc.aio.Channel:
        """One long-lived channel per router (upstream opens one per connection)."""
        channel = self.router_channels.get(endpoint)
        if channel is None:
            channel = await open_secure_channel(endpoint, self.config.tls, self.config.grpcOptions)
            self.router_channels[endpoint] = channel
        return channel

    async def _tunnel(self, session: Session, message) -> None:
        """One client connection through the router, answered by the session in-process."""
        try:
            await session.clients_allowed.wait()  # held while beforeLease runs
            channel = await self._router_channel(message.router_endpoint)
            await session.serve_tunnel(channel, message.router_token)
        except (OSError, grpc.aio.AioRpcError, TimeoutError, ConnectionError) as exc:
            log.info("client connection failed", error=str(exc))

    # --- stopping -----------------------------------------------------------------------

    async def _drain(self) -> None:
        if self._lease_task is not None:
            self.lease_ended.set()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lease_task), self.options.stop_grace)

    async def _goodbye(self) -> None:
        """Tell the controller we are going, within a bound: a dead controller must not
        keep a stopping exporter alive."""
        try:
            if self.registered:
                async with asyncio.timeout(5):
                    await self.link.report_status(
                        S.EXPORTER_STATUS_OFFLINE, "Exporter shutting down"
                    )
                    await self.link.unregister("Exporter shutdown")
        except (grpc.aio.AioRpcError, TimeoutError, ConnectionError) as exc:
            log.debug("could not say goodbye to the controller", error=str(exc))
        finally:
            for channel in self.router_channels.values():
                await channel.close()
            await self.link.close()
            await self.root.aclose()
            if self.watcher is not None:
                await self.watcher.aclose()
            self._remove_signals()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _remove_signals(self) -> None:
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP and not self.stop_requested.is_set():
            if self.lease is None:
                self.request_stop("SIGHUP while idle")
            else:
                log.info("SIGHUP: exiting after the current lease", lease=self.lease)
                self.stop_after_lease = True
                self.notifier.status(self._steady_status())
            return
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now", signal=name)
            os._exit(128 + signum)
        self.request_stop(name)
