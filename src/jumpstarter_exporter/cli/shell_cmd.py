"""``jmp shell``: lease a board, run a command (or a shell) that can reach it, release it.

Inside, ``JUMPSTARTER_HOST`` names a private Unix socket; each connection to it is bridged
through the router to the exporter (``client.lease``). ``j`` and the Python ``connect()`` use
it. Exit status: the command's own (128+N when a signal ended it); before the command runs,
the client error's code (see the README): 1 no exporter matches / bad lease, 69 controller
unreachable, 75 no matching exporter became free in time, 77 token refused, 78 bad config.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
from pathlib import Path

import click

from jumpstarter_exporter.cli.client_options import (
    DURATION,
    client_config_options,
    load_client_config,
)
from jumpstarter_exporter.client.lease import Lease


class _Terminated(BaseException):
    """SIGTERM/SIGHUP while leasing: unwind (releasing the lease), then exit 128+N."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, _frame) -> None:
    raise _Terminated(signum)


def _run(command: list[str], env: dict[str, str]) -> int:
    """Run ``command`` in the foreground and return its status (128+N for signal N).

    Ctrl-C reaches the command through the terminal; we only wait for it (then release the
    lease). A SIGTERM/SIGHUP sent to us is passed on to the command.
    """
    proc: subprocess.Popen | None = None
    pending: list[int] = []

    def forward(signum: int, _frame) -> None:
        if proc is None:
            pending.append(signum)  # arrived while starting it: sent once it runs
        elif proc.poll() is None:
            proc.send_signal(signum)

    # Installed before the command starts, so no signal finds a handler that unwinds. Python
    # handlers, not SIG_IGN: the command itself starts with default dispositions.
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        proc = subprocess.Popen(command, env=env)
        for signum in pending:
            proc.send_signal(signum)
        status = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - status if status < 0 else status


@click.command(
    "shell", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@client_config_options
@click.option("-l", "--selector", default="", help="Label selector, e.g. board=rpi4,site=lab.")
@click.option("-n", "--exporter-name", default="", help="Lease this exporter by name.")
@click.option(
    "--lease",
    "lease_name",
    default="",
    help="Use this existing lease (from `jmp create lease`); it is not released on exit.",
)
@click.option(
    "--duration",
    type=DURATION,
    default="00:30:00",
    show_default=True,
    help="Lease length: 00:30:00, 30m, 2h, PT30M or seconds.",
)
@click.option(
    "--acquisition-timeout",
    type=click.FloatRange(min=1),
    default=None,
    help="Seconds to wait for a free exporter [default: the config's leases.acquisition_timeout].",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def shell(
    client_alias: str | None,
    client_config: Path | None,
    selector: str,
    exporter_name: str,
    lease_name: str,
    duration: dt.timedelta,
    acquisition_timeout: float | None,
    command: tuple[str, ...],
) -> None:
    """Lease a matching board and run COMMAND (default: your $SHELL) with JUMPSTARTER_HOST
    set, so that `j` and scripts reach it. The lease is released when COMMAND ends; jmp shell
    exits with COMMAND's status.

    \b
    Example:
      jmp shell --client lab --selector board=rpi4 -- j power cycle
    """
    if not selector and not exporter_name and not lease_name:
        raise click.UsageError("give --selector (e.g. board=rpi4), --exporter-name or --lease")
    config = load_client_config(client_alias, client_config)
    timeout = acquisition_timeout or float(config.leases.acquisition_timeout)
    argv = list(command) or [os.environ.get("SHELL") or "/bin/sh"]
    # From here on a SIGTERM unwinds through the `with`, so the lease is released.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    held = Lease(
        config, selector, duration, timeout, exporter_name=exporter_name, existing=lease_name
    )
    try:
        status = _shell(held, command, argv)
    except _Terminated as exc:
        status = 128 + exc.signum
    click.get_current_context().exit(status)


def _shell(held: Lease, command: tuple[str, ...], argv: list[str]) -> int:
    with held as board:
        env = {
            **os.environ,
            "JUMPSTARTER_HOST": str(held.socket_path),
            "JMP_DRIVERS_ALLOW": held.allow.to_env(),
            "JMP_LEASE": board.lease_name,
            "JMP_EXPORTER": board.exporter_name,
        }
        if not command:
            click.echo(
                f"leased {board.exporter_name} (lease {board.lease_name}); "
                "`j --help` lists its drivers, exit the shell to release it",
                err=True,
            )
        try:
            status = _run(argv, env)
        except FileNotFoundError:
            click.echo(f"Error: command not found: {argv[0]}", err=True)
            status = 127
    return status
