"""ExporterStatus enum values ⇄ the status names upstream's controller stores and shows
(its CRD strings, protocol-facts §1.4). The controller stores the names; the client prints
them from ListExporters."""

from __future__ import annotations

from jumpstarter_exporter._proto.jumpstarter.v1 import common_pb2

STATUS_NAMES = {
    common_pb2.EXPORTER_STATUS_UNSPECIFIED: "Unspecified",
    common_pb2.EXPORTER_STATUS_OFFLINE: "Offline",
    common_pb2.EXPORTER_STATUS_AVAILABLE: "Available",
    common_pb2.EXPORTER_STATUS_BEFORE_LEASE_HOOK: "BeforeLeaseHook",
    common_pb2.EXPORTER_STATUS_LEASE_READY: "LeaseReady",
    common_pb2.EXPORTER_STATUS_AFTER_LEASE_HOOK: "AfterLeaseHook",
    common_pb2.EXPORTER_STATUS_BEFORE_LEASE_HOOK_FAILED: "BeforeLeaseHookFailed",
    common_pb2.EXPORTER_STATUS_AFTER_LEASE_HOOK_FAILED: "AfterLeaseHookFailed",
}
STATUS_VALUES = {name: value for value, name in STATUS_NAMES.items()}
