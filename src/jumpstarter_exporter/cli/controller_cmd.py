"""``jmp controller …``: run the single-node controller and administer it."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import click

from jumpstarter_exporter.cli.output import OUTPUT_CHOICES, emit, table
from jumpstarter_exporter.config import paths, store
from jumpstarter_exporter.config.yamlio import atomic_write, dump_yaml
from jumpstarter_exporter.controller import admin
from jumpstarter_exporter.controller.server import StateDir, default_state_dir, serve


def _state_option(func):
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="JMP_CONTROLLER_STATE_DIR",
        help="State directory (default: $STATE_DIRECTORY, /var/lib/jumpstarter-controller "
        "as root, else ~/.local/state/jumpstarter/controller).",
    )(func)


def _state(state_dir: Path | None) -> StateDir:
    return StateDir(state_dir or default_state_dir())


def _labels(_ctx, _param, values: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        labels[key] = value
    return labels


@click.group()
def controller() -> None:
    """The single-node controller and router (SQLite state, TLS, no Kubernetes)."""


@controller.command("serve")
@click.option("--listen", default="0.0.0.0:8082", show_default=True, help="HOST:PORT to bind.")
@click.option("--advertise", help="HOST:PORT that exporters and clients use (router endpoint too).")
@click.option("--hostname", "hostnames", multiple=True, help="Extra name for the certificate.")
@_state_option
def serve_cmd(
    listen: str, advertise: str | None, hostnames: tuple[str, ...], state_dir: Path | None
) -> None:
    """Serve ControllerService, ClientService and RouterService on one TLS port."""
    asyncio.run(serve(_state(state_dir), listen, advertise, list(hostnames)))


@controller.group("create")
def create() -> None:
    """Create an exporter or a client and write its config."""


def _deliver(config: Any, kind: str, alias: str, save: bool, out: Path | None) -> None:
    if save:
        path = (store.add_exporter if kind == "exporter" else store.add_client)(config, alias)
        click.echo(f"saved {kind} config {path}", err=True)
    elif out is not None:
        atomic_write(out, dump_yaml(config.to_file()))
        click.echo(f"wrote {kind} config {out}", err=True)
    else:
        click.echo(dump_yaml(config.to_file()), nl=False)


_save = click.option("--save", is_flag=True, help="Save as a config in the user directory.")
_alias = click.option("--alias", help="Alias for --save (default: the name).")
_out = click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the config to this file."
)
_namespace = click.option("--namespace", default=admin.DEFAULT_NAMESPACE, show_default=True)
_endpoint = click.option("--endpoint", help="Endpoint to write (default: the advertised one).")


@create.command("exporter")
@click.argument("name")
@click.option(
    "-l",
    "--label",
    "labels",
    multiple=True,
    callback=_labels,
    help="KEY=VALUE label for lease selectors; repeatable.",
)
@_namespace
@_endpoint
@_save
@_alias
@_out
@_state_option
def create_exporter(
    name: str,
    labels: dict[str, str],
    namespace: str,
    endpoint: str | None,
    save: bool,
    alias: str | None,
    out: Path | None,
    state_dir: Path | None,
) -> None:
    """Create exporter NAME; print its config (or --save / --out)."""
    if save:
        paths.validate_alias(alias or name, "exporter")
    cfg = admin.create_exporter(_state(state_dir), name, labels, namespace, endpoint)
    _deliver(cfg, "exporter", alias or name, save, out)


@create.command("client")
@click.argument("name")
@click.option("-a", "--allow", default="", help="Comma-separated driver client globs.")
@click.option("--unsafe", is_flag=True, help="Let the client load any driver client.")
@_namespace
@_endpoint
@_save
@_alias
@_out
@_state_option
def create_client(
    name: str,
    allow: str,
    unsafe: bool,
    namespace: str,
    endpoint: str | None,
    save: bool,
    alias: str | None,
    out: Path | None,
    state_dir: Path | None,
) -> None:
    """Create client NAME; print its config (or --save / --out)."""
    if save:
        paths.validate_alias(alias or name, "client")
    globs = [g.strip() for g in allow.split(",") if g.strip()]
    cfg = admin.create_client(_state(state_dir), name, namespace, endpoint, globs, unsafe)
    _deliver(cfg, "client", alias or name, save, out)


def _when(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@controller.command("get")
@click.argument("what", type=click.Choice(["exporters", "clients", "leases"]))
@click.option("-o", "--output", type=OUTPUT_CHOICES)
@click.option("--all", "show_all", is_flag=True, help="leases: include ended ones.")
@_state_option
def get(what: str, output: str | None, show_all: bool, state_dir: Path | None) -> None:
    """List exporters, clients or leases from the state directory."""
    state = _state(state_dir)
    rows: list[dict[str, Any]]
    if what == "exporters":
        rows = [
            {
                "namespace": e.namespace,
                "name": e.name,
                "labels": e.labels,
                "registered": e.devices is not None,
                "status": e.status or "Unspecified",
                "message": e.status_message,
            }
            for e in admin.list_exporters(state)
        ]
        headers = ["NAMESPACE", "NAME", "STATUS", "LABELS"]
        cells = [
            [
                r["namespace"],
                r["name"],
                r["status"],
                ",".join(f"{k}={v}" for k, v in r["labels"].items()),
            ]
            for r in rows
        ]
    elif what == "clients":
        rows = [{"namespace": c.namespace, "name": c.name} for c in admin.list_clients(state)]
        headers, cells = ["NAMESPACE", "NAME"], [[r["namespace"], r["name"]] for r in rows]
    else:
        rows = [
            {
                "namespace": x.namespace,
                "name": x.name,
                "client": x.client,
                "exporter": x.exporter,
                "selector": x.selector,
                "reason": x.reason,
                "begin": _when(x.effective_begin),
                "end": _when(x.effective_end),
            }
            for x in admin.list_leases(state, active_only=not show_all)
        ]
        headers = ["NAME", "CLIENT", "EXPORTER", "SELECTOR", "STATE", "BEGIN"]
        cells = [
            [r["name"], r["client"], r["exporter"] or "", r["selector"], r["reason"], r["begin"]]
            for r in rows
        ]
    if output == "name":
        for r in rows:
            click.echo(r["name"])
    elif output:
        emit({"items": rows}, output)
    elif not rows:
        click.echo("No resources found.")
    else:
        click.echo(table(headers, cells))


@controller.command("delete")
@click.argument("what", type=click.Choice(["exporter", "client"]))
@click.argument("name")
@_namespace
@_state_option
def delete(what: str, name: str, namespace: str, state_dir: Path | None) -> None:
    """Delete an exporter or a client (its token stops working at once)."""
    state = _state(state_dir)
    (admin.delete_exporter if what == "exporter" else admin.delete_client)(state, name, namespace)
