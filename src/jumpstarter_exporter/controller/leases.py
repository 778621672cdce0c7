"""Lease scheduling: which pending lease gets which exporter, and when a lease ends.

``reconcile`` is the one place lease state changes over time. It is a plain function of the
stored state, the set of exporters that are online now, and the clock, so tests drive it
without a server. It returns the exporters whose "am I leased?" answer changed, for the
service to push down their Status streams.

Reasons follow upstream's controller (protocol-facts §7.3) so upstream clients print the
same things: Pending (Offline / NotAvailable / NotReady / NoMatch / ExporterDisabled /
Scheduled), Ready, Unsatisfiable (ExporterNotFound / SelectorMismatch), Released, Expired.
Unlike upstream, a lease whose exporters are all disabled waits (an admin may re-enable one).
"""

from __future__ import annotations

from collections.abc import Set

from jumpstarter_exporter.controller import selectors
from jumpstarter_exporter.controller.store import Exporter, Lease, Store

# Statuses an exporter may be in to receive a new lease: it finished cleaning up.
LEASABLE_STATUSES = {"", "Unspecified", "Available"}

ExporterKey = tuple[str, str]

# Reasons that end a lease at once as Unsatisfiable (upstream clients stop waiting on them).
UNSATISFIABLE_REASONS = {"ExporterNotFound", "SelectorMismatch"}


def _end(lease: Lease, reason: str, message: str, now: float) -> None:
    lease.ended = True
    lease.effective_end = now
    lease.reason = reason
    lease.message = message


def _candidates(
    lease: Lease, exporters: list[Exporter], online: Set[ExporterKey], busy: set[str]
) -> tuple[Exporter | None, str, str]:
    """The exporter to assign, or None with the Pending/Unsatisfiable reason and message."""
    requirements = selectors.parse(lease.selector)
    if lease.exporter_name:
        named = [e for e in exporters if e.name == lease.exporter_name]
        if not named:
            return None, "ExporterNotFound", f"exporter {lease.exporter_name} does not exist"
        if not selectors.matches(requirements, named[0].labels):
            return None, "SelectorMismatch", "the named exporter does not match the selector"
        matching = named
    else:
        matching = [e for e in exporters if selectors.matches(requirements, e.labels)]
    if not matching:
        return None, "NoMatch", "no exporter matches the selector yet"
    enabled = [e for e in matching if e.enabled]
    if not enabled:
        return None, "ExporterDisabled", "every matching exporter is disabled"
    live = [e for e in enabled if e.devices is not None and e.key in online]
    if not live:
        return None, "Offline", "matching exporters are offline"
    free = [e for e in live if e.name not in busy]
    if not free:
        return None, "NotAvailable", "matching exporters are all leased"
    ready = [e for e in free if e.status in LEASABLE_STATUSES]
    if not ready:
        return None, "NotReady", "matching exporters are still cleaning up a previous lease"
    return ready[0], "Ready", "an exporter was assigned"


def reconcile(store: Store, online: Set[ExporterKey], now: float) -> set[ExporterKey]:
    """End released and expired leases, then assign exporters to pending leases in order."""
    changed: set[ExporterKey] = set()
    active = store.list_leases(active_only=True)
    busy: dict[str, set[str]] = {}
    for lease in active:
        if lease.released:
            _end(lease, "Released", "the lease was released", now)
        elif (expiry := lease.expires_at()) is not None and expiry <= now:
            _end(lease, "Expired", "the lease expired", now)
        if lease.ended:
            store.update_lease(lease)
            if lease.exporter:
                changed.add((lease.namespace, lease.exporter))
        elif lease.exporter:
            busy.setdefault(lease.namespace, set()).add(lease.exporter)

    exporters_by_ns: dict[str, list[Exporter]] = {}
    for lease in active:
        if lease.ended or lease.exporter:
            continue
        if lease.begin_time is not None and lease.begin_time > now:
            reason, message = "Scheduled", "waiting for the requested begin time"
            if (lease.reason, lease.message) != (reason, message):
                lease.reason, lease.message = reason, message
                store.update_lease(lease)
            continue
        if lease.namespace not in exporters_by_ns:
            exporters_by_ns[lease.namespace] = store.list_exporters(lease.namespace)
        ns_busy = busy.setdefault(lease.namespace, set())
        exporter, reason, message = _candidates(
            lease, exporters_by_ns[lease.namespace], online, ns_busy
        )
        if exporter is not None:
            lease.exporter = exporter.name
            lease.effective_begin = now
            ns_busy.add(exporter.name)
            changed.add(exporter.key)
        elif reason in UNSATISFIABLE_REASONS:
            # A named exporter that does not exist or does not fit will not start to.
            _end(lease, reason, message, now)
        if (
            exporter is not None
            or lease.ended
            or (lease.reason, lease.message) != (reason, message)
        ):
            lease.reason, lease.message = reason, message
            store.update_lease(lease)
    return changed


def next_deadline(store: Store) -> float | None:
    """When reconcile next has something to do on its own (an expiry or a begin time)."""
    times = []
    for lease in store.list_leases(active_only=True):
        if lease.exporter and (expiry := lease.expires_at()) is not None:
            times.append(expiry)
        elif not lease.exporter:
            # A pending lease starts at its begin time and, unassigned, still ends at its end.
            times.extend(t for t in (lease.begin_time, lease.end_time) if t is not None)
    return min(times) if times else None


def active_lease_for(store: Store, namespace: str, exporter: str) -> Lease | None:
    for lease in store.list_leases(namespace, active_only=True):
        if lease.exporter == exporter:
            return lease
    return None
