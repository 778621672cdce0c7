"""``jmp lab up``: the whole product on one machine (see ``jumpstarter_exporter.lab.up``)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from jumpstarter_exporter import log as logsetup


@click.group()
def lab() -> None:
    """A one-machine lab: controller, simulated PDU and board, exporter, client."""


@lab.command("up")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Lab directory: controller state, configs, logs (default: "
    "$XDG_STATE_HOME/jumpstarter/lab, i.e. ~/.local/state/jumpstarter/lab). Reused by "
    "later runs.",
)
@click.option(
    "--boot-speed",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Factor on the simulated board's boot log delays (0: instant).",
)
@click.pass_context
def up_cmd(ctx: click.Context, directory: Path | None, boot_speed: float) -> None:
    """Start everything, run a scripted client session, stop everything.

    Exit status: 0 all steps passed, 1 a step failed (named in the output), 130 on SIGINT
    (Ctrl-C), 143 on SIGTERM; each after stopping every process it started.
    """
    root = ctx.find_root()
    if root.get_parameter_source("log_level") in (ParameterSource.DEFAULT, None):
        # The step lines are the output; the in-process client's INFO logs would bury them
        # (each process's own log is in the lab's logs/ directory).
        logsetup.configure("WARNING", root.params.get("log_format", "auto"))
    # The exporter is restarted (fork+exec) while the client's gRPC threads run: gRPC's fork
    # handlers only print a warning then, and are not needed for a child that execs.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from jumpstarter_exporter.lab.up import default_dir, up

    directory = (directory or default_dir()).expanduser().resolve()
    code = asyncio.run(up(directory, sys.stdout, speed=boot_speed))
    raise click.exceptions.Exit(code)
