"""``jmp run``: the exporter daemon. Exit codes are the table in ``errors.py``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from jumpstarter_exporter.config import paths
from jumpstarter_exporter.config.load import load_exporter
from jumpstarter_exporter.errors import ConfigError, ExitCode


def _alias(_ctx, _param, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return paths.validate_alias(value, "exporter")
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("run")
@click.option("--exporter", "alias", callback=_alias, help="Alias of an exporter config.")
@click.option(
    "--exporter-config",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Path of an exporter config.",
)
@click.option(
    "--exit-on-lease-end/--no-exit-on-lease-end",
    default=None,
    help="Exit after each lease (default; overrides exitOnLeaseEnd).",
)
@click.option(
    "--controller-budget",
    type=click.FloatRange(min=1),
    default=300.0,
    envvar="JMP_CONTROLLER_BUDGET",
    show_default=True,
    help="Seconds an idle exporter keeps trying an unreachable controller before exiting 69.",
)
@click.option("--tls-grpc-listener", "listener", help="Standalone: serve on [HOST:]PORT.")
@click.option("--tls-grpc-insecure", is_flag=True, help="Standalone: plaintext gRPC.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--passphrase", envvar="JMP_PASSPHRASE", help="Standalone: required passphrase.")
def run(
    alias: str | None,
    path: Path | None,
    exit_on_lease_end: bool | None,
    controller_budget: float,
    listener: str | None,
    tls_grpc_insecure: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    passphrase: str | None,
) -> None:
    """Run an exporter: register, serve a lease, exit when it is released."""
    # upstream's exact texts (scripts and tests match them)
    if alias is None and path is None:
        raise click.BadParameter("one of --exporter, --exporter-config should be specified")
    if alias is not None and path is not None:
        raise click.BadParameter("only one of --exporter, --exporter-config should be specified")
    if listener is None and (tls_grpc_insecure or tls_cert or tls_key or passphrase):
        raise click.UsageError(
            "--tls-grpc-insecure, --tls-cert, --tls-key, and --passphrase require "
            "--tls-grpc-listener"
        )
    if listener is not None:
        if tls_grpc_insecure and (tls_cert or tls_key):
            raise click.UsageError(
                "--tls-grpc-insecure cannot be combined with --tls-cert / --tls-key"
            )
        if not tls_grpc_insecure and not (tls_cert and tls_key):
            raise click.UsageError(
                "--tls-grpc-listener requires either --tls-grpc-insecure or "
                "--tls-cert and --tls-key"
            )
    overrides = {} if exit_on_lease_end is None else {"exitOnLeaseEnd": exit_on_lease_end}
    loaded = load_exporter(alias=alias, path=path, overrides=overrides)
    # Heavy imports only now: `jmp run --help` and config errors stay fast.
    from jumpstarter_exporter.exporter.daemon import Exporter, RunOptions
    from jumpstarter_exporter.exporter.notify import Notifier

    notifier = Notifier()
    if listener is not None:
        from jumpstarter_exporter.exporter.standalone import serve_standalone

        code = asyncio.run(
            serve_standalone(
                loaded.config,
                listener,
                notifier,
                cert_pem=tls_cert.read_bytes() if tls_cert else None,
                key_pem=tls_key.read_bytes() if tls_key else None,
                passphrase=passphrase,
            )
        )
    else:
        options = RunOptions(
            exit_after_lease=loaded.config.exits_after_lease,
            controller_budget=controller_budget,
        )

        async def main() -> ExitCode:
            return await Exporter(loaded.config, options, notifier).run()

        code = asyncio.run(main())
    from jumpstarter_exporter.cli.main import exit_without_teardown

    exit_without_teardown()
    raise click.exceptions.Exit(int(code))
