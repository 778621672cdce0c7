"""Stored objects → upstream's protobuf messages (names, statuses, conditions)."""

from __future__ import annotations

import datetime as dt

from google.protobuf import duration_pb2, timestamp_pb2

from jumpstarter_exporter._proto.jumpstarter.client.v1 import client_pb2
from jumpstarter_exporter._proto.jumpstarter.v1 import common_pb2, kubernetes_pb2
from jumpstarter_exporter.controller.leases import UNSATISFIABLE_REASONS
from jumpstarter_exporter.controller.store import Exporter, Lease
from jumpstarter_exporter.wire.status import STATUS_VALUES


def exporter_name(namespace: str, name: str) -> str:
    return f"namespaces/{namespace}/exporters/{name}"


def lease_name(namespace: str, name: str) -> str:
    return f"namespaces/{namespace}/leases/{name}"


def client_name(namespace: str, name: str) -> str:
    return f"namespaces/{namespace}/clients/{name}"


def parse_name(resource: str, kind: str) -> tuple[str, str]:
    """``namespaces/{ns}/{kind}/{name}`` → (ns, name); ValueError naming the expected form."""
    parts = resource.split("/")
    if len(parts) != 4 or parts[0] != "namespaces" or parts[2] != kind or not all(parts):
        raise ValueError(f"{resource!r} is not namespaces/<namespace>/{kind}/<name>")
    return parts[1], parts[3]


def parse_parent(resource: str) -> str:
    parts = resource.split("/")
    if len(parts) != 2 or parts[0] != "namespaces" or not parts[1]:
        raise ValueError(f"{resource!r} is not namespaces/<namespace>")
    return parts[1]


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt.datetime.fromtimestamp(seconds, dt.UTC))
    return ts


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(dt.timedelta(seconds=seconds))
    return d


def exporter_to_proto(exporter: Exporter, online: bool) -> client_pb2.Exporter:
    return client_pb2.Exporter(
        name=exporter_name(exporter.namespace, exporter.name),
        labels=exporter.labels,
        online=online,
        status=STATUS_VALUES.get(exporter.status, common_pb2.EXPORTER_STATUS_UNSPECIFIED)
        if online
        else common_pb2.EXPORTER_STATUS_OFFLINE,
        status_message=exporter.status_message if online else "offline",
        enabled=exporter.enabled,
    )


def conditions(lease: Lease) -> list[kubernetes_pb2.Condition]:
    when = lease.effective_end or lease.effective_begin or lease.created
    time = kubernetes_pb2.Time(seconds=int(when), nanos=int((when % 1) * 1e9))

    def cond(kind: str, status: str) -> kubernetes_pb2.Condition:
        return kubernetes_pb2.Condition(
            type=kind,
            status=status,
            reason=lease.reason,
            message=lease.message,
            lastTransitionTime=time,
            observedGeneration=1,
        )

    if lease.ended and lease.reason in UNSATISFIABLE_REASONS:
        return [cond("Pending", "False"), cond("Unsatisfiable", "True")]
    if lease.ended:
        return [cond("Pending", "False"), cond("Ready", "False")]
    if lease.exporter:
        return [cond("Pending", "False"), cond("Ready", "True")]
    return [cond("Pending", "True")]


def lease_to_proto(lease: Lease, now: float) -> client_pb2.Lease:
    msg = client_pb2.Lease(
        name=lease_name(lease.namespace, lease.name),
        selector=lease.selector,
        duration=_duration(lease.duration),
        client=client_name(lease.namespace, lease.client),
        conditions=conditions(lease),
        exporter_name=lease.exporter_name,
        tags=lease.tags,
    )
    if lease.begin_time is not None:
        msg.begin_time.CopyFrom(_ts(lease.begin_time))
    if lease.end_time is not None:
        msg.end_time.CopyFrom(_ts(lease.end_time))
    if lease.exporter:
        msg.exporter = exporter_name(lease.namespace, lease.exporter)
    if lease.effective_begin is not None:
        msg.effective_begin_time.CopyFrom(_ts(lease.effective_begin))
        until = lease.effective_end if lease.effective_end is not None else now
        msg.effective_duration.CopyFrom(_duration(max(until - lease.effective_begin, 0)))
    if lease.effective_end is not None:
        msg.effective_end_time.CopyFrom(_ts(lease.effective_end))
    return msg


def lease_labels(lease: Lease, equality: dict[str, str]) -> dict[str, str]:
    """The labels upstream puts on a Lease object, which ListLeases' ``filter`` matches."""
    return {**equality, **{f"metadata.jumpstarter.dev/{k}": v for k, v in lease.tags.items()}}
