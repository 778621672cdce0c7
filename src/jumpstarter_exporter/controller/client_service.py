"""``jumpstarter.client.v1.ClientService``: what ``jmp get/create/delete`` and ``jmp shell``
call (protocol-facts §1.8, §7.5). Resource names are ``namespaces/{ns}/{kind}/{name}``; a
caller only ever sees its own namespace."""

from __future__ import annotations

import time

import grpc
import structlog
from google.protobuf import empty_pb2, timestamp_pb2

from jumpstarter_exporter._proto.jumpstarter.client.v1 import client_pb2, client_pb2_grpc
from jumpstarter_exporter.controller import selectors
from jumpstarter_exporter.controller.convert import (
    exporter_to_proto,
    lease_labels,
    lease_to_proto,
    parse_name,
    parse_parent,
)
from jumpstarter_exporter.controller.core import Core, LeaseRequestError
from jumpstarter_exporter.controller.tokens import new_token, token_hash

log = structlog.get_logger("jumpstarter.controller")

TOKEN_LIFETIME = 365 * 24 * 3600  # reported expiry of a rotated token (upstream's default)


async def _namespace(context, resource: str, kind: str | None, mine: str) -> tuple[str, str]:
    try:
        ns, name = parse_name(resource, kind) if kind else (parse_parent(resource), "")
    except ValueError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if ns != mine:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "namespace mismatch")
    return ns, name


def _page(items: list, page_size: int, page_token: str) -> tuple[list, str]:
    start = int(page_token) if page_token.isdigit() else 0
    if page_size <= 0:
        return items[start:], ""
    end = start + page_size
    return items[start:end], (str(end) if end < len(items) else "")


class ClientService(client_pb2_grpc.ClientServiceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    async def GetExporter(self, request, context):
        me = await self.core.authenticate(context, "Client")
        ns, name = await _namespace(context, request.name, "exporters", me.namespace)
        exporter = self.core.store.get_exporter(ns, name)
        if exporter is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"exporter {name} not found")
        return exporter_to_proto(exporter, self.core.hub.is_online(exporter.key))

    async def ListExporters(self, request, context):
        me = await self.core.authenticate(context, "Client")
        ns, _ = await _namespace(context, request.parent, None, me.namespace)
        try:
            wanted = selectors.parse(request.filter)
        except selectors.SelectorError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        exporters = [
            e for e in self.core.store.list_exporters(ns) if selectors.matches(wanted, e.labels)
        ]
        page, token = _page(exporters, request.page_size, request.page_token)
        return client_pb2.ListExportersResponse(
            exporters=[exporter_to_proto(e, self.core.hub.is_online(e.key)) for e in page],
            next_page_token=token,
        )

    async def _own_lease(self, context, resource: str):
        me = await self.core.authenticate(context, "Client")
        ns, name = await _namespace(context, resource, "leases", me.namespace)
        lease = self.core.store.get_lease(ns, name)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"lease {name} not found")
        if lease.client != me.name:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"permission denied: lease {name} belongs to another client",
            )
        return me, lease

    async def GetLease(self, request, context):
        _me, lease = await self._own_lease(context, request.name)
        return lease_to_proto(lease, time.time())

    async def ListLeases(self, request, context):
        me = await self.core.authenticate(context, "Client")
        ns, _ = await _namespace(context, request.parent, None, me.namespace)
        only_active = request.only_active if request.HasField("only_active") else True
        try:
            wanted = selectors.parse(request.filter)
            tag_wanted = selectors.parse(
                ",".join(
                    f"metadata.jumpstarter.dev/{t.strip()}"
                    for t in request.tag_filter.split(",")
                    if t.strip()
                )
            )
        except selectors.SelectorError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        leases = []
        for lease in self.core.store.list_leases(ns, active_only=only_active):
            equality = {
                r.key: r.values[0]
                for r in selectors.parse(lease.selector)
                if r.operator == "In" and len(r.values) == 1
            }
            labels = lease_labels(lease, equality)
            if selectors.matches(wanted, labels) and selectors.matches(tag_wanted, labels):
                leases.append(lease)
        page, token = _page(leases, request.page_size, request.page_token)
        now = time.time()
        return client_pb2.ListLeasesResponse(
            leases=[lease_to_proto(lease, now) for lease in page], next_page_token=token
        )

    async def CreateLease(self, request, context):
        me = await self.core.authenticate(context, "Client")
        ns, _ = await _namespace(context, request.parent, None, me.namespace)
        spec = request.lease
        try:
            lease = self.core.create_lease(
                ns,
                me.name,
                selector=spec.selector,
                exporter_name=spec.exporter_name,
                duration=spec.duration.ToTimedelta().total_seconds(),
                begin_time=_seconds(spec.begin_time) if spec.HasField("begin_time") else None,
                end_time=_seconds(spec.end_time) if spec.HasField("end_time") else None,
                tags=dict(spec.tags),
                lease_id=request.lease_id,
            )
        except LeaseRequestError as exc:
            await context.abort(exc.code, str(exc))
        return lease_to_proto(lease, time.time())

    async def UpdateLease(self, request, context):
        me, lease = await self._own_lease(context, request.lease.name)
        paths = set(request.update_mask.paths)
        unknown = paths - {"duration", "begin_time", "end_time", "client"}
        if unknown or not paths:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"update_mask must name duration, begin_time, end_time or client "
                f"(got {', '.join(sorted(paths)) or 'nothing'})",
            )
        if lease.ended:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"lease {lease.name} ended")
        if "duration" in paths:
            lease.duration = request.lease.duration.ToTimedelta().total_seconds()
            if lease.duration <= 0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "duration must be > 0")
        if "begin_time" in paths:
            if lease.effective_begin is not None:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, "begin_time cannot change after start"
                )
            lease.begin_time = _seconds(request.lease.begin_time)
        if "end_time" in paths:
            lease.end_time = _seconds(request.lease.end_time)
        if "client" in paths:
            try:
                ns, new_client = parse_name(request.lease.client, "clients")
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if ns != me.namespace or self.core.store.get_client(ns, new_client) is None:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"no client {request.lease.client}"
                )
            if lease.effective_begin is None:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, "a lease can be handed over once started"
                )
            log.info("lease transferred", lease=lease.name, client=me.name, to=new_client)
            lease.client = new_client
        self.core.store.update_lease(lease)
        self.core.reconcile()
        return lease_to_proto(self.core.store.get_lease(*lease.key) or lease, time.time())

    async def DeleteLease(self, request, context):
        me, lease = await self._own_lease(context, request.name)
        if lease.released or lease.ended:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"lease {lease.name} has already been released",
            )
        self.core.release_lease(lease, me)
        return empty_pb2.Empty()

    async def RotateToken(self, request, context):
        me = await self.core.authenticate(context, "Client")
        await _namespace(context, request.parent, None, me.namespace)
        token = new_token(f"client:{me.namespace}:{me.name}")
        self.core.store.set_client_token(me.namespace, me.name, token_hash(token))
        expiry = timestamp_pb2.Timestamp(seconds=int(time.time()) + TOKEN_LIFETIME)
        log.info("client token rotated", client=me.name, namespace=me.namespace)
        return client_pb2.RotateTokenResponse(token=token, expiry=expiry)


def _seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9
