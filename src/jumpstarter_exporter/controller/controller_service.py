"""``jumpstarter.v1.ControllerService``: what exporters (and legacy clients) call.

Behaviour follows upstream's Go controller where upstream clients and exporters depend on it
(protocol-facts §7.1); error texts keep the substrings upstream clients match on ("permission
denied", "not ready").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import structlog

from jumpstarter_exporter._proto.jumpstarter.v1 import jumpstarter_pb2, jumpstarter_pb2_grpc
from jumpstarter_exporter.controller import selectors
from jumpstarter_exporter.controller.convert import conditions
from jumpstarter_exporter.controller.core import Core, LeaseRequestError
from jumpstarter_exporter.controller.store import Lease
from jumpstarter_exporter.controller.tokens import mint_router_token
from jumpstarter_exporter.wire.status import STATUS_NAMES

log = structlog.get_logger("jumpstarter.controller")

RESERVED_PREFIX = "jumpstarter.dev/"
STATUS_REFRESH = 10.0  # how often a quiet Status stream refreshes last_seen (upstream: 10 s)
DIAL_READY_BUDGET = 30.0  # Dial waits this long for a leased exporter to report LeaseReady
# Statuses in which a leased exporter can take a connection (protocol-facts §7.1).
DIALABLE = {"LeaseReady", "BeforeLeaseHook", "AfterLeaseHook", "Unspecified", ""}


class ControllerService(jumpstarter_pb2_grpc.ControllerServiceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    # --- exporters ----------------------------------------------------------------------

    async def Register(self, request, context):
        me = await self.core.authenticate(context, "Exporter")
        exporter = self.core.store.get_exporter(me.namespace, me.name)
        assert exporter is not None
        # Like upstream: drop every jumpstarter.dev/ label, then keep only such labels from
        # the request; labels set by the admin (used by selectors) are never touched.
        labels = {k: v for k, v in exporter.labels.items() if not k.startswith(RESERVED_PREFIX)}
        labels.update({k: v for k, v in request.labels.items() if k.startswith(RESERVED_PREFIX)})
        exporter.labels = labels
        exporter.devices = [
            {
                "uuid": report.uuid,
                "parent_uuid": report.parent_uuid if report.HasField("parent_uuid") else None,
                "labels": dict(report.labels),
            }
            for report in request.reports
        ]
        exporter.last_seen = time.time()
        self.core.store.update_exporter(exporter)
        log.info(
            "exporter registered",
            exporter=me.name,
            namespace=me.namespace,
            devices=len(exporter.devices),
        )
        self.core.wake()
        return jumpstarter_pb2.RegisterResponse(uuid=exporter.uid)

    async def Unregister(self, request, context):
        me = await self.core.authenticate(context, "Exporter")
        exporter = self.core.store.get_exporter(me.namespace, me.name)
        assert exporter is not None
        exporter.devices = None
        exporter.status = "Offline"
        exporter.status_message = request.reason or "Exporter unregistered"
        self.core.store.update_exporter(exporter)
        log.info("exporter unregistered", exporter=me.name, reason=request.reason)
        self.core.wake()
        return jumpstarter_pb2.UnregisterResponse()

    async def ReportStatus(self, request, context):
        me = await self.core.authenticate(context, "Exporter")
        exporter = self.core.store.get_exporter(me.namespace, me.name)
        assert exporter is not None
        status = STATUS_NAMES.get(request.status, "Unspecified")
        if status != exporter.status:
            log.info("exporter status", exporter=me.name, status=status, message=request.message)
        exporter.status = status
        exporter.status_message = request.message
        exporter.last_seen = time.time()
        self.core.store.update_exporter(exporter)
        if request.HasField("release_lease") and request.release_lease:
            lease = self.core.lease_for_exporter(me.namespace, me.name)
            if lease is not None and not lease.released:
                lease.released = True
                self.core.store.update_lease(lease)
        self.core.wake()
        return jumpstarter_pb2.ReportStatusResponse()

    def _status(self, namespace: str, name: str) -> jumpstarter_pb2.StatusResponse:
        lease = self.core.lease_for_exporter(namespace, name)
        if lease is None:
            return jumpstarter_pb2.StatusResponse(leased=False)
        return jumpstarter_pb2.StatusResponse(
            leased=True, lease_name=lease.name, client_name=lease.client
        )

    async def Status(self, request, context) -> AsyncIterator[jumpstarter_pb2.StatusResponse]:
        me = await self.core.authenticate(context, "Exporter")
        key = (me.namespace, me.name)
        try:
            with self.core.hub.connected(key):
                self._came_online(me)
                last = None
                while True:
                    event = self.core.hub.event(key)
                    current = self._status(*key)
                    if current != last:
                        yield current
                        last = current
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(), STATUS_REFRESH)
                    exporter = self.core.store.get_exporter(*key)
                    if exporter is None:  # deleted by the admin
                        return
                    exporter.last_seen = time.time()
                    self.core.store.update_exporter(exporter)
        finally:
            if not self.core.hub.is_online(key):
                self._went_offline(me)
            self.core.wake()

    def _came_online(self, me) -> None:
        exporter = self.core.store.get_exporter(me.namespace, me.name)
        assert exporter is not None
        exporter.last_seen = time.time()
        if exporter.status == "Offline":
            # An exporter that said goodbye and is back starts clean (upstream does too).
            exporter.status = ""
        self.core.store.update_exporter(exporter)
        self.core.wake()  # online again: pending leases may now fit it
        log.info("exporter online", exporter=me.name, namespace=me.namespace)

    def _went_offline(self, me) -> None:
        # The last Status stream is gone: show it offline at once (upstream waits for a
        # minute of silence) so admins and clients see what the scheduler sees.
        exporter = self.core.store.get_exporter(me.namespace, me.name)
        if exporter is not None and exporter.status != "Offline":
            exporter.status, exporter.status_message = "Offline", "connection lost"
            self.core.store.update_exporter(exporter)
        log.info("exporter offline", exporter=me.name, namespace=me.namespace)

    async def Listen(self, request, context):
        me = await self.core.authenticate(context, "Exporter")
        if not request.lease_name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty lease name")
        lease = self.core.store.get_lease(me.namespace, request.lease_name)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"lease {request.lease_name} not found")
        if lease.exporter != me.name:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"permission denied: lease {lease.name} is not held by exporter {me.name}",
            )
        key = (me.namespace, me.name)
        with self.core.hub.listening(lease.key) as listener:
            while True:
                event = self.core.hub.event(key)
                current = self.core.store.get_lease(*lease.key)
                if current is None or current.ended:
                    return
                get = asyncio.ensure_future(listener.queue.get())
                superseded = asyncio.ensure_future(listener.superseded.wait())
                changed = asyncio.ensure_future(event.wait())
                try:
                    await asyncio.wait(
                        {get, superseded, changed}, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for task in (superseded, changed):
                        task.cancel()
                    if not get.done():
                        get.cancel()
                if get.done() and not get.cancelled():
                    yield get.result()
                elif listener.superseded.is_set():
                    # Hand over: tokens already queued still reach the old stream's reader.
                    while not listener.queue.empty():
                        yield listener.queue.get_nowait()
                    return

    # --- clients ------------------------------------------------------------------------

    async def Dial(self, request, context):
        me = await self.core.authenticate(context, "Client")
        lease = self.core.store.get_lease(me.namespace, request.lease_name)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"lease {request.lease_name} not found")
        if lease.client != me.name:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"permission denied: lease {lease.name} belongs to another client",
            )
        if not lease.active:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"lease {lease.name} is not active"
            )
        await self._wait_dialable(lease, context)
        listener = self.core.hub.listeners.get(lease.key)
        if listener is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"exporter is not listening on lease {lease.name}"
            )
        token = mint_router_token(self.core.router_key)
        response = jumpstarter_pb2.ListenResponse(
            router_endpoint=self.core.advertise, router_token=token
        )
        try:
            listener.queue.put_nowait(response)
        except asyncio.QueueFull:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"listener buffer full on lease {lease.name}"
            )
        log.info("dial", lease=lease.name, client=me.name, exporter=lease.exporter)
        return jumpstarter_pb2.DialResponse(router_endpoint=self.core.advertise, router_token=token)

    async def _wait_dialable(self, lease: Lease, context) -> None:
        """An exporter that was just leased reports LeaseReady a moment later: wait for it
        (0.5 s doubling to 3 s, 30 s in all, as upstream's controller does)."""
        deadline = time.monotonic() + DIAL_READY_BUDGET
        delay = 0.5
        while True:
            key = (lease.namespace, lease.exporter)
            exporter = self.core.store.get_exporter(*key)
            if exporter is None or not self.core.hub.is_online(key):
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "exporter is offline")
            if exporter.status in DIALABLE:
                return
            if exporter.status != "Available" or time.monotonic() + delay > deadline:
                reason = {
                    "BeforeLeaseHookFailed": "exporter beforeLease hook failed",
                    "AfterLeaseHookFailed": "exporter afterLease hook failed",
                    "Offline": "exporter is offline",
                }.get(exporter.status, f"exporter is not ready (status: {exporter.status})")
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)

    async def ReleaseLease(self, request, context):
        me = await self.core.authenticate(context, "Exporter", "Client")
        lease = self.core.store.get_lease(me.namespace, request.name)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"lease {request.name} not found")
        holder = lease.exporter if me.kind == "Exporter" else lease.client
        if holder != me.name:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION
                if me.kind == "Exporter"
                else grpc.StatusCode.PERMISSION_DENIED,
                f"permission denied: lease {lease.name} is not held by {me}",
            )
        if not lease.ended and not lease.released:
            self.core.release_lease(lease, me)
        return jumpstarter_pb2.ReleaseLeaseResponse()

    async def GetLease(self, request, context):
        me = await self.core.authenticate(context, "Client")
        lease = self.core.store.get_lease(me.namespace, request.name)
        if lease is None or lease.client != me.name:
            await context.abort(grpc.StatusCode.NOT_FOUND, "GetLease permission denied")
        response = jumpstarter_pb2.GetLeaseResponse(conditions=conditions(lease))
        response.duration.FromSeconds(int(lease.duration))
        if lease.effective_begin is not None:
            response.begin_time.FromSeconds(int(lease.effective_begin))
        if lease.effective_end is not None:
            response.end_time.FromSeconds(int(lease.effective_end))
        if lease.exporter:
            exporter = self.core.store.get_exporter(lease.namespace, lease.exporter)
            if exporter is not None:
                response.exporter_uuid = exporter.uid
        return response

    async def RequestLease(self, request, context):
        """Legacy (unused by 0.9's Python client): a lease from a LabelSelector message."""
        me = await self.core.authenticate(context, "Client")
        try:
            lease = self.core.create_lease(
                me.namespace,
                me.name,
                selector=selectors.from_proto(request.selector),
                duration=request.duration.ToTimedelta().total_seconds(),
            )
        except LeaseRequestError as exc:
            await context.abort(exc.code, str(exc))
        return jumpstarter_pb2.RequestLeaseResponse(name=lease.name)

    async def ListLeases(self, request, context):
        me = await self.core.authenticate(context, "Client")
        names = [
            lease.name
            for lease in self.core.store.list_leases(me.namespace, active_only=True)
            if lease.client == me.name
        ]
        return jumpstarter_pb2.ListLeasesResponse(names=names)

    async def GetServiceEndpoints(self, request, context):
        await self.core.authenticate(context, "Exporter")
        # No telemetry service on a single node: an empty answer means "none" (upstream HEAD).
        return jumpstarter_pb2.GetServiceEndpointsResponse()
