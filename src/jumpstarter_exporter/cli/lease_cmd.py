"""``jmp get exporters|leases``, ``jmp create lease``, ``jmp delete lease(s)``: the client's
view of the controller (ClientService, protocol-facts §1.8, §7.5).

Names in ``-o name`` output and accepted as arguments are short lease names; the full
``namespaces/<ns>/leases/<name>`` form is accepted too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from google.protobuf import timestamp_pb2

from jumpstarter_exporter._proto.jumpstarter.client.v1 import client_pb2
from jumpstarter_exporter.cli.client_options import (
    DURATION,
    client_config_options,
    load_client_config,
)
from jumpstarter_exporter.cli.output import OUTPUT_CHOICES, emit, table
from jumpstarter_exporter.client.lease import Controller, short_name
from jumpstarter_exporter.config import ClientConfig
from jumpstarter_exporter.wire.status import STATUS_NAMES

T = TypeVar("T")


def with_controller(config: ClientConfig, work: Callable[[Controller], Awaitable[T]]) -> T:
    """Run ``work`` with an open controller connection (closed afterwards)."""

    async def main() -> T:
        controller = Controller(config)
        await controller.open()
        try:
            return await work(controller)
        finally:
            await controller.close()

    return asyncio.run(main())


def _time(ts: timestamp_pb2.Timestamp) -> str:
    return ts.ToDatetime(dt.UTC).isoformat().replace("+00:00", "Z")


def exporter_doc(exporter: client_pb2.Exporter) -> dict[str, Any]:
    return {
        "name": short_name(exporter.name),
        "labels": dict(exporter.labels),
        "online": exporter.online,
        "status": STATUS_NAMES.get(exporter.status, "Unspecified"),
        "status_message": exporter.status_message,
        "enabled": exporter.enabled if exporter.HasField("enabled") else True,
    }


def lease_state(lease: client_pb2.Lease) -> str:
    true = {c.type for c in lease.conditions if c.status == "True"}
    if lease.HasField("effective_end_time"):
        return "Unsatisfiable" if "Unsatisfiable" in true else "Ended"
    for kind in ("Ready", "Unsatisfiable", "Invalid", "Pending"):
        if kind in true:
            return kind
    return "Unknown"


def lease_doc(lease: client_pb2.Lease) -> dict[str, Any]:
    reason = next((c.reason for c in lease.conditions if c.reason), "")
    return {
        "name": short_name(lease.name),
        "selector": lease.selector,
        "client": short_name(lease.client) if lease.HasField("client") else None,
        "exporter": short_name(lease.exporter) if lease.HasField("exporter") else None,
        "duration": lease.duration.ToTimedelta().total_seconds(),
        "state": lease_state(lease),
        "reason": reason,
        "begin_time": _time(lease.effective_begin_time)
        if lease.HasField("effective_begin_time")
        else None,
        "end_time": _time(lease.effective_end_time)
        if lease.HasField("effective_end_time")
        else None,
    }


def _duration_text(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(seconds)))


def show(kind: str, docs: list[dict[str, Any]], output: str | None) -> None:
    if output == "name":
        for doc in docs:
            click.echo(doc["name"])
    elif output:
        emit({kind: docs}, output)
    elif not docs:
        click.echo("No resources found.")
    elif kind == "exporters":
        rows = [
            [
                d["name"],
                d["status"],
                ",".join(f"{k}={v}" for k, v in sorted(d["labels"].items())),
            ]
            for d in docs
        ]
        click.echo(table(["NAME", "STATUS", "LABELS"], rows))
    else:
        rows = [
            [
                d["name"],
                d["selector"],
                d["exporter"] or "",
                d["state"],
                _duration_text(d["duration"]),
                d["begin_time"] or "",
            ]
            for d in docs
        ]
        click.echo(table(["NAME", "SELECTOR", "EXPORTER", "STATE", "DURATION", "BEGIN"], rows))


# --- get ------------------------------------------------------------------------------------


@click.command("get")
@click.argument("what", type=click.Choice(["exporters", "exporter", "leases", "lease"]))
@client_config_options
@click.option("-l", "--selector", default="", help="Label selector, e.g. board=rpi4.")
@click.option("--all", "show_all", is_flag=True, help="leases: include ended ones.")
@click.option("-o", "--output", type=OUTPUT_CHOICES, help="json, yaml or name.")
def get(
    what: str,
    client_alias: str | None,
    client_config: Path | None,
    selector: str,
    show_all: bool,
    output: str | None,
) -> None:
    """List the exporters you may lease, or your leases."""
    config = load_client_config(client_alias, client_config)
    if what.startswith("exporter"):
        exporters = with_controller(config, lambda c: c.list_exporters(selector))
        show("exporters", [exporter_doc(e) for e in exporters], output)
        return
    leases = with_controller(config, lambda c: c.list_leases(only_active=not show_all))
    mine = config.metadata.name
    docs = [lease_doc(lease) for lease in leases]
    docs = [d for d in docs if d["client"] in (None, mine)]
    show("leases", docs, output)


# --- create ---------------------------------------------------------------------------------


@click.group("create")
def create() -> None:
    """Create a lease."""


@create.command("lease")
@client_config_options
@click.option("-l", "--selector", default="", help="Label selector, e.g. board=rpi4.")
@click.option("-n", "--exporter-name", default="", help="Lease this exporter by name.")
@click.option(
    "--duration",
    type=DURATION,
    required=True,
    help="How long, e.g. 00:30:00, 30m, 2h or seconds.",
)
@click.option("-o", "--output", type=OUTPUT_CHOICES, help="json, yaml or name.")
def create_lease(
    client_alias: str | None,
    client_config: Path | None,
    selector: str,
    exporter_name: str,
    duration: dt.timedelta,
    output: str | None,
) -> None:
    """Request a lease; it is assigned an exporter as soon as a matching one is free."""
    if not selector and not exporter_name:
        raise click.UsageError("give --selector or --exporter-name")
    config = load_client_config(client_alias, client_config)
    seconds = duration.total_seconds()
    lease = with_controller(
        config, lambda c: c.create_lease(selector, seconds, exporter_name=exporter_name)
    )
    doc = lease_doc(lease)
    if output == "name":
        click.echo(doc["name"])
    elif output:
        emit(doc, output)
    else:
        show("leases", [doc], None)


# --- delete ---------------------------------------------------------------------------------


@click.group("delete")
def delete() -> None:
    """Release (delete) leases."""


def _delete_command(name: str, hidden: bool) -> click.Command:
    @click.command(name, hidden=hidden)
    @click.argument("names", nargs=-1)
    @client_config_options
    @click.option("--all", "delete_all", is_flag=True, help="Every active lease of yours.")
    @click.option("-o", "--output", type=click.Choice(["name"]), help="name: print each name.")
    def delete_leases(
        names: tuple[str, ...],
        client_alias: str | None,
        client_config: Path | None,
        delete_all: bool,
        output: str | None,
    ) -> None:
        """Release leases by name (the exporter is freed at once)."""
        if not names and not delete_all:
            raise click.UsageError("give lease NAMES or --all")
        config = load_client_config(client_alias, client_config)

        async def work(controller: Controller) -> list[str]:
            targets = list(names)
            if delete_all:
                mine = config.metadata.name
                targets += [
                    short_name(lease.name)
                    for lease in await controller.list_leases()
                    if short_name(lease.client) == mine
                ]
            for target in targets:
                await controller.delete_lease(target)
            return [short_name(t) for t in targets]

        for deleted in with_controller(config, work):
            click.echo(deleted if output == "name" else f"lease {deleted} deleted")

    return delete_leases


# Upstream spells it ``leases``; ``lease`` reads better and is what people type.
delete.add_command(_delete_command("lease", hidden=False))
delete.add_command(_delete_command("leases", hidden=True))
