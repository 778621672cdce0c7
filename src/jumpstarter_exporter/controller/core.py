"""The controller's core: durable store + runtime hub + the reconcile step, shared by the
three gRPC services (controller, client, router)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid

import grpc
import structlog

from jumpstarter_exporter.controller import leases, selectors
from jumpstarter_exporter.controller.auth import Identity, Kind, Refused, authenticate
from jumpstarter_exporter.controller.hub import Hub
from jumpstarter_exporter.controller.store import Lease, Store

log = structlog.get_logger("jumpstarter.controller")

# Idle wake-up of the scheduler: lease expiry is computed, this only bounds clock drift.
MAX_SLEEP = 30.0


class Core:
    def __init__(self, store: Store, advertise: str) -> None:
        self.store = store
        self.hub = Hub()
        self.advertise = advertise
        # Router tokens are signed with a key that lives only in this process: a restart
        # invalidates every token that is not yet paired, and nothing secret sits on disk.
        self.router_key = secrets.token_bytes(32)

    async def authenticate(self, context: grpc.aio.ServicerContext, *kinds: Kind) -> Identity:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        try:
            return authenticate(self.store, metadata, set(kinds))
        except Refused as exc:
            log.warning("refused", method=_method(context), reason=exc.message)
            await context.abort(exc.code, exc.message)
            raise AssertionError("unreachable") from None  # abort always raises

    def reconcile(self) -> None:
        before = {lease.key: lease for lease in self.store.list_leases(active_only=True)}
        changed = leases.reconcile(self.store, set(self.hub.online), time.time())
        for key, old in before.items():
            new = self.store.get_lease(*key)
            if new is None:
                continue
            if new.ended:
                log.info(
                    "lease ended",
                    lease=new.name,
                    namespace=new.namespace,
                    client=new.client,
                    exporter=new.exporter,
                    reason=new.reason,
                )
            elif new.exporter and not old.exporter:
                log.info(
                    "lease ready",
                    lease=new.name,
                    namespace=new.namespace,
                    client=new.client,
                    exporter=new.exporter,
                )
        self.hub.changed(changed)

    async def run_scheduler(self) -> None:
        """Reconcile on every wake-up and at the next lease deadline."""
        while True:
            self.hub.wake_scheduler.clear()
            self.reconcile()
            deadline = leases.next_deadline(self.store)
            timeout = MAX_SLEEP
            if deadline is not None:
                timeout = min(max(deadline - time.time(), 0.01), MAX_SLEEP)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.hub.wake_scheduler.wait(), timeout)

    def wake(self) -> None:
        self.hub.wake_scheduler.set()

    def create_lease(
        self,
        namespace: str,
        client: str,
        *,
        selector: str = "",
        exporter_name: str = "",
        duration: float = 0.0,
        begin_time: float | None = None,
        end_time: float | None = None,
        tags: dict[str, str] | None = None,
        lease_id: str = "",
    ) -> Lease:
        """Validate, store and (if an exporter is free) immediately assign a new lease."""
        if not selector and not exporter_name:
            raise LeaseRequestError("a lease needs a selector or an exporter name")
        try:
            selectors.parse(selector)
        except selectors.SelectorError as exc:
            raise LeaseRequestError(str(exc)) from None
        if duration <= 0 and not (begin_time is not None and end_time is not None):
            raise LeaseRequestError("a lease needs a positive duration (or begin and end time)")
        if duration <= 0:
            duration = end_time - begin_time  # type: ignore[operator]
        for key in tags or {}:
            if "/" in key or not key:
                raise LeaseRequestError(f"tag key {key!r} must be non-empty without '/'")
        name = lease_id or uuid7()
        if self.store.get_lease(namespace, name) is not None:
            raise LeaseRequestError(f"lease {name} already exists", grpc.StatusCode.ALREADY_EXISTS)
        lease = self.store.add_lease(
            Lease(
                namespace=namespace,
                name=name,
                client=client,
                duration=duration,
                selector=selector,
                exporter_name=exporter_name,
                begin_time=begin_time,
                end_time=end_time,
                tags=dict(tags or {}),
            )
        )
        log.info(
            "lease created",
            lease=name,
            namespace=namespace,
            client=client,
            selector=selector,
            exporter=exporter_name or None,
        )
        self.reconcile()
        return self.store.get_lease(namespace, name) or lease

    def release_lease(self, lease: Lease, by: Identity) -> None:
        """Mark ``lease`` released (by a client or its exporter) and end it at once."""
        lease.released = True
        self.store.update_lease(lease)
        log.info("lease release requested", lease=lease.name, by=str(by))
        self.reconcile()

    def lease_for_exporter(self, namespace: str, exporter: str) -> Lease | None:
        return leases.active_lease_for(self.store, namespace, exporter)


class LeaseRequestError(Exception):
    def __init__(
        self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT
    ) -> None:
        super().__init__(message)
        self.code = code


def uuid7() -> str:
    """A time-ordered UUID (RFC 9562 version 7), as upstream names leases."""
    ms = int(time.time() * 1000)
    rand = int.from_bytes(secrets.token_bytes(10), "big")
    value = (
        (ms << 80)
        | (0x7 << 76)
        | ((rand >> 66) & 0xFFF) << 64
        | (0b10 << 62)
        | (rand & ((1 << 62) - 1))
    )
    return str(uuid.UUID(int=value))


def _method(context: grpc.aio.ServicerContext) -> str:
    try:
        return context._rpc_event.call_details.method.decode()  # type: ignore[attr-defined]
    except AttributeError:
        return "?"
