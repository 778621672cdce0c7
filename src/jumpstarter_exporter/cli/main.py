"""The ``jmp`` entry point: global options, and the one place errors become exit codes."""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import sys

import click
import structlog

from jumpstarter_exporter import __version__
from jumpstarter_exporter import log as logsetup
from jumpstarter_exporter.errors import ExitCode, JumpstarterError

# Sub-commands are imported when used: the exporter restarts after every lease, and
# `jmp run` should not pay for importing the controller (cryptography, SQLite) each time.
COMMANDS = {
    "config": "jumpstarter_exporter.cli.config_cmd:config",
    "controller": "jumpstarter_exporter.cli.controller_cmd:controller",
    "create": "jumpstarter_exporter.cli.lease_cmd:create",
    "delete": "jumpstarter_exporter.cli.lease_cmd:delete",
    "get": "jumpstarter_exporter.cli.lease_cmd:get",
    "lab": "jumpstarter_exporter.cli.lab_cmd:lab",
    "run": "jumpstarter_exporter.cli.run_cmd:run",
    "shell": "jumpstarter_exporter.cli.shell_cmd:shell",
}


class JmpGroup(click.Group):
    """Maps our exception tree onto exit codes: a clear line for user errors, never a
    traceback; a traceback and 70 only for bugs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except JumpstarterError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(int(exc.exit_code))
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception:  # noqa: BLE001 - the last line of defence: log the bug, exit 70
            structlog.get_logger("jmp").exception("internal error")
            ctx.exit(int(ExitCode.SOFTWARE))


@click.group(cls=JmpGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="jmp")
@click.option(
    "--log-level",
    type=click.Choice(logsetup.LEVELS, case_sensitive=False),
    default="INFO",
    show_default=True,
    envvar="JMP_LOG_LEVEL",
    help="Log threshold.",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "text"]),
    default="auto",
    show_default=True,
    envvar="JMP_LOG_FORMAT",
    help="auto: JSON when stderr is not a terminal.",
)
@click.pass_context
def jmp(ctx: click.Context, log_level: str, log_format: str) -> None:
    """Jumpstarter: put lab hardware on the network for remote test clients."""
    logsetup.configure(log_level, log_format)  # type: ignore[arg-type]
    if ctx.invoked_subcommand != "run":
        gc.enable()  # paused by cli.entry for start-up; `jmp run` resumes it once registered


_exit_when_done = False


def exit_without_teardown() -> None:
    """For a command whose own shutdown is complete (``jmp run``: unregistered, channels
    and devices closed, STOPPING sent): end the process without the interpreter's
    finalization, which takes 60 ms after grpc and is on the lease turnaround path (the
    service manager starts the next exporter only once this one is gone)."""
    global _exit_when_done
    _exit_when_done = True


def main() -> None:
    try:
        jmp.main(prog_name="jmp")
    except KeyboardInterrupt:  # pragma: no cover - interactive only
        sys.exit(130)
    except SystemExit as done:
        if not _exit_when_done:
            raise
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)
