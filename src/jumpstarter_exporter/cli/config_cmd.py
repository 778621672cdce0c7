"""``jmp config client|exporter …``: the commands of the configuration documentation page.

Options, prompts, messages, outputs and exit codes follow upstream 0.9 (protocol-facts
§8.6-8.7) so that scripts written for upstream keep working. Where we differ, it is on
purpose: prompts only on a terminal (a missing option is a usage error, not a hang on a
closed stdin), tokens are redacted in listings unless ``--show-secrets``, client aliases are
validated like exporter aliases, and ``edit`` never leaves an invalid file in place.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from jumpstarter_exporter.cli.output import OUTPUT_CHOICES, emit, show, table
from jumpstarter_exporter.config import paths, store
from jumpstarter_exporter.config.load import load, load_client, load_exporter, load_user
from jumpstarter_exporter.config.models import (
    SECRET_KEYS,
    ClientConfig,
    DriversConfig,
    ExporterConfig,
    ObjectMeta,
    TLSConfig,
)
from jumpstarter_exporter.config.yamlio import atomic_write
from jumpstarter_exporter.errors import (
    AlreadyExistsError,
    ConfigError,
    ExitCode,
    NotFoundError,
)

INSECURE_WARNING = (
    "Insecure TLS mode is enabled. Certificate verification will be disabled for HTTPS "
    "connections. Continue?"
)


def _interactive() -> bool:
    return sys.stdin.isatty()


def _ask(
    value: str | None, option: str, prompt: str, *, hide: bool = False, default: str | None = None
) -> str:
    """The option's value, else a prompt on a terminal, else a usage error naming the option."""
    if value is not None:
        return value
    if _interactive():
        return click.prompt(
            prompt, hide_input=hide, default=default, show_default=default not in (None, "")
        )
    if default is not None:
        return default
    raise click.UsageError(f"missing option {option} (stdin is not a terminal, so no prompt)")


def _confirm_insecure(insecure: bool, nointeractive: bool) -> None:
    if not insecure or nointeractive:
        return
    if not _interactive():
        raise click.UsageError("--insecure-tls needs confirmation: add --nointeractive")
    if not click.confirm(INSECURE_WARNING):
        click.echo("Aborting.")
        raise click.exceptions.Exit(int(ExitCode.FAILURE))


def _redacted(data: Any, show_secrets: bool) -> Any:
    if show_secrets:
        return data
    if isinstance(data, dict):
        return {
            k: ("<redacted>" if k in SECRET_KEYS and v else _redacted(v, show_secrets))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_redacted(v, show_secrets) for v in data]
    return data


def _alias_arg(kind: str):
    def callback(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return paths.validate_alias(value, kind)
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


_output_path = click.option(
    "-o",
    "--output",
    "output",
    type=click.Choice(["path"]),
    help="Print the path of the file written.",
)
_insecure_tls = click.option(
    "-k", "--insecure-tls", is_flag=True, help="Trust the server's certificate on first use."
)
_nointeractive = click.option(
    "--nointeractive", is_flag=True, help="Do not ask to confirm --insecure-tls."
)
_show_secrets = click.option(
    "--show-secrets", is_flag=True, help="Show tokens and passwords instead of <redacted>."
)


@click.group()
def config() -> None:
    """Manage user, client and exporter configs."""


# --- client ---------------------------------------------------------------------------------


@config.group()
def client() -> None:
    """Client configs (~/.config/jumpstarter/clients/*.yaml)."""


@client.command("create")
@click.argument("alias", callback=_alias_arg("client"))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write here instead of the clients directory.",
)
@click.option("--namespace", help="Client namespace in the controller.")
@click.option("--name", help="Client name in the controller.")
@click.option("-e", "--endpoint", help="Controller endpoint, host:port.")
@click.option("-t", "--token", help="Client auth token.")
@click.option("-a", "--allow", help="Comma-separated globs of driver client packages to load.")
@click.option("--unsafe", is_flag=True, help="Load any driver client package.")
@_insecure_tls
@_nointeractive
@_output_path
def client_create(
    alias: str,
    out: Path | None,
    namespace: str | None,
    name: str | None,
    endpoint: str | None,
    token: str | None,
    allow: str | None,
    unsafe: bool,
    insecure_tls: bool,
    nointeractive: bool,
    output: str | None,
) -> None:
    """Create a client config named ALIAS."""
    target = out or paths.client_path(alias)
    if out is None and target.exists():
        raise AlreadyExistsError(f"A client with the name '{alias}' already exists.")
    namespace = _ask(namespace, "--namespace", "Enter a valid Jumpstarter client namespace")
    name = _ask(name, "--name", "Enter a valid Jumpstarter client name")
    endpoint = _ask(endpoint, "--endpoint", "Enter a valid Jumpstarter service endpoint")
    token = _ask(token, "--token", "Enter a Jumpstarter auth token (hidden)", hide=True)
    allow = _ask(
        allow,
        "--allow",
        "Enter a comma-separated list of allowed driver packages (optional)",
        default="",
    )
    _confirm_insecure(insecure_tls, nointeractive)
    globs = [g.strip() for g in allow.split(",") if g.strip()]
    cfg = ClientConfig(
        metadata=ObjectMeta(namespace=namespace, name=name),
        endpoint=endpoint,
        token=token,
        tls=TLSConfig(insecure=insecure_tls),
        drivers=DriversConfig(allow=globs, unsafe=unsafe),
    )
    if out is None:
        store.add_client(cfg, alias)
    else:
        store.save_client(cfg, target)
    if output == "path":
        click.echo(target)


def _client_missing(path: Path) -> NotFoundError:
    return NotFoundError(
        "File not found. Verify the path and retry. "
        f"Details: Client config '{path}' does not exist."
    )


@client.command("use")
@click.argument("alias", callback=_alias_arg("client"))
@_output_path
def client_use(alias: str, output: str | None) -> None:
    """Make ALIAS the current client."""
    path = paths.client_path(alias)
    if not path.exists():
        raise _client_missing(path)
    user = load_user()
    user.config.config.current_client = alias
    written = store.save_user(user.config)
    if output == "path":
        click.echo(written)


def _client_items(show_secrets: bool) -> list[dict[str, Any]]:
    items = []
    for path in paths.list_yaml(paths.clients_dir()):
        try:
            data = load(ClientConfig, path, environ={}).config.model_dump(
                mode="json", by_alias=True, exclude={"refresh_token"}
            )
            data["leases"].pop("dial_timeout", None)
        except ConfigError as exc:
            click.echo(f"Warning: {exc}", err=True)
            data = {"error": str(exc)}
        items.append(
            {"alias": paths.alias_of(path), "path": str(path), **_redacted(data, show_secrets)}
        )
    return items


@client.command("list")
@click.option("-o", "--output", type=OUTPUT_CHOICES, help="json, yaml or name.")
@_show_secrets
def client_list(output: str | None, show_secrets: bool) -> None:
    """List client configs; * marks the current one."""
    current = load_user().config.config.current_client
    items = _client_items(show_secrets)
    if output == "name":
        for item in items:
            click.echo(item["alias"])
        return
    if output in ("json", "yaml"):
        emit(
            {
                "apiVersion": "jumpstarter.dev/v1alpha1",
                "currentConfig": current,
                "items": items,
                "kind": "ClientConfigList",
            },
            output,
        )
        return
    if not items:
        click.echo("No resources found.")
        return
    rows = [
        ["*" if i["alias"] == current else "", i["alias"], i.get("endpoint") or "", i["path"]]
        for i in items
    ]
    click.echo(table(["CURRENT", "ALIAS", "ENDPOINT", "PATH"], rows))


@client.command("delete")
@click.argument("alias", callback=_alias_arg("client"))
@_output_path
def client_delete(alias: str, output: str | None) -> None:
    """Delete the client config ALIAS (if current, another one becomes current)."""
    path = paths.client_path(alias)
    if not path.exists():
        raise _client_missing(path)
    user = load_user()
    if user.config.config.current_client == alias:
        others = [p for p in paths.list_yaml(paths.clients_dir()) if p != path]
        user.config.config.current_client = paths.alias_of(others[0]) if others else None
        store.save_user(user.config)
    path.unlink()
    if output == "path":
        click.echo(path)


@client.command("check")
@click.argument("alias", required=False, callback=_alias_arg("client"))
@click.option(
    "--client-config",
    "client_config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Check this file instead of an alias.",
)
@click.option("-o", "--output", type=click.Choice(["json"]), help="json")
@_show_secrets
def client_check(
    alias: str | None, client_config: Path | None, output: str | None, show_secrets: bool
) -> None:
    """Validate the selected client config and show each value's origin.

    With no ALIAS: JMP_CLIENT_CONFIG, JMP_CLIENT, the environment, then the current client.
    """
    loaded = load_client(alias=alias, path=client_config)
    _print_explain(loaded.path, loaded.explain(show_secrets=show_secrets), output, [])


def _print_explain(
    path: Path | None, rows: list[tuple[str, Any, str]], output: str | None, notes: list[str]
) -> None:
    if output == "json":
        emit(
            {
                "path": str(path) if path else None,
                "valid": True,
                "notes": notes,
                "values": [{"key": k, "value": v, "source": s} for k, v, s in rows],
            },
            "json",
        )
        return
    click.echo(f"{path or '(environment)'}: valid")
    click.echo(table(["KEY", "VALUE", "SOURCE"], [(k, show(v), s) for k, v, s in rows]))
    for note in notes:
        click.echo(f"note: {note}", err=True)


# --- exporter -------------------------------------------------------------------------------


@config.group()
def exporter() -> None:
    """Exporter configs (~/.config/jumpstarter/exporters, then /etc/jumpstarter/exporters)."""


@exporter.command("create")
@click.argument("alias", default="default", callback=_alias_arg("exporter"))
@click.option("--namespace", help="Exporter namespace in the controller.")
@click.option("--name", help="Exporter name in the controller.")
@click.option("--endpoint", help="Controller endpoint, host:port.")
@click.option("--token", help="Exporter auth token.")
@_insecure_tls
@_nointeractive
@_output_path
def exporter_create(
    alias: str,
    namespace: str | None,
    name: str | None,
    endpoint: str | None,
    token: str | None,
    insecure_tls: bool,
    nointeractive: bool,
    output: str | None,
) -> None:
    """Create an exporter config named ALIAS in the user directory."""
    path = paths.user_exporter_path(alias)
    if path.exists():
        raise AlreadyExistsError(f'exporter "{alias}" exists')
    namespace = _ask(namespace, "--namespace", "Namespace")
    name = _ask(name, "--name", "Name")
    endpoint = _ask(endpoint, "--endpoint", "Endpoint")
    token = _ask(token, "--token", "Token", hide=True)
    _confirm_insecure(insecure_tls, nointeractive)
    cfg = ExporterConfig(
        metadata=ObjectMeta(namespace=namespace, name=name),
        endpoint=endpoint,
        token=token,
        tls=TLSConfig(insecure=insecure_tls),
    )
    store.add_exporter(cfg, alias)
    if output == "path":
        click.echo(path)


def _exporter_paths() -> list[Path]:
    """User files shadow same-named system files."""
    found: dict[str, Path] = {}
    for directory in (paths.system_exporters_dir(), paths.user_exporters_dir()):
        for path in paths.list_yaml(directory):
            found[paths.alias_of(path)] = path
    return [found[a] for a in sorted(found)]


@exporter.command("list")
@click.option("-o", "--output", type=OUTPUT_CHOICES, help="json, yaml or name.")
@_show_secrets
def exporter_list(output: str | None, show_secrets: bool) -> None:
    """List exporter configs from the user and system directories."""
    found = _exporter_paths()
    if output == "name":
        for path in found:
            click.echo(paths.alias_of(path))
        return
    if output in ("json", "yaml"):
        items = []
        for path in found:
            try:
                data = load(ExporterConfig, path, environ={}).config.to_file()
            except ConfigError as exc:
                click.echo(f"Warning: {exc}", err=True)
                data = {"error": str(exc)}
            items.append(
                {"alias": paths.alias_of(path), "path": str(path), **_redacted(data, show_secrets)}
            )
        emit(
            {
                "apiVersion": "jumpstarter.dev/v1alpha1",
                "items": items,
                "kind": "ExporterConfigList",
            },
            output,
        )
        return
    if not found:
        click.echo("No resources found.")
        return
    click.echo(table(["ALIAS", "PATH"], [[paths.alias_of(p), str(p)] for p in found]))


@exporter.command("delete")
@click.argument("alias", default="default", callback=_alias_arg("exporter"))
@_output_path
def exporter_delete(alias: str, output: str | None) -> None:
    """Delete the user exporter config ALIAS (system configs are read-only)."""
    user = paths.user_exporter_path(alias)
    system = paths.system_exporter_path(alias)
    if not user.exists():
        if system.exists():
            raise NotFoundError(
                f"Exporter config '{alias}' exists only in the system location '{system}' "
                "and cannot be deleted."
            )
        raise NotFoundError(f'exporter "{alias}" does not exist')
    user.unlink()
    if system.exists():
        click.echo(
            f"Warning: exporter config '{alias}' deleted, but a system config at {system} "
            "still exists and will now be used.",
            err=True,
        )
    if output == "path":
        click.echo(user)


@exporter.command("edit")
@click.argument("alias", default="default", callback=_alias_arg("exporter"))
def exporter_edit(alias: str) -> None:
    """Edit ALIAS in $VISUAL/$EDITOR; the file is replaced only if the result is valid."""
    path = paths.resolve_exporter(alias)
    if not path.exists():
        raise NotFoundError(f'exporter "{alias}" does not exist')
    original = path.read_text(encoding="utf-8")
    draft = path.with_name(f".{path.name}.edit")
    atomic_write(draft, original)
    try:
        click.edit(filename=str(draft))
        edited = draft.read_text(encoding="utf-8")
        if edited == original:
            return
        try:
            load(ExporterConfig, draft, environ={})
        except ConfigError as exc:
            kept = path.with_name(f"{path.name}.rejected")
            atomic_write(kept, edited)
            raise ConfigError(
                f"edit not applied; {path} is unchanged and your edit is saved in {kept}",
                problems=[str(exc)],
            ) from None
        atomic_write(path, edited, mode=os.stat(path).st_mode & 0o777)
    finally:
        draft.unlink(missing_ok=True)


@exporter.command("check")
@click.argument("alias", required=False, callback=_alias_arg("exporter"))
@click.option(
    "--exporter-config",
    "exporter_config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Check this file.",
)
@click.option("-o", "--output", type=click.Choice(["json"]), help="json")
@_show_secrets
def exporter_check(
    alias: str | None, exporter_config: Path | None, output: str | None, show_secrets: bool
) -> None:
    """Validate an exporter config and show each effective value and where it came from."""
    if (alias is None) == (exporter_config is None):
        raise click.UsageError("give exactly one of ALIAS or --exporter-config")
    loaded = load_exporter(alias=alias, path=exporter_config)
    from jumpstarter_exporter.drivers.registry import validate

    problems = validate(loaded.config)
    if problems:
        raise ConfigError("invalid driver configuration", path=loaded.path, problems=problems)
    notes = [
        f"{key} is not set: needed to connect to a controller (not for --tls-grpc-listener)"
        for key in loaded.config.missing_for_controller()
    ]
    _print_explain(loaded.path, loaded.explain(show_secrets=show_secrets), output, notes)
