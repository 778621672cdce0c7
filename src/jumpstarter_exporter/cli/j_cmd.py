"""``j``: drive the leased board from inside ``jmp shell`` (``JUMPSTARTER_HOST``).

The commands come from the exporter's GetReport: one group per driver, named as in the
exporter config (``j power on``, ``j serial console``). ``j --help`` lists what the leased
exporter offers. Driver classes outside ``JMP_DRIVERS_ALLOW`` are listed but refused.

Exit status: 0 done; 1 no such driver/method; 69 the exporter did not answer; 70 a driver
call failed; 78 JUMPSTARTER_HOST unset or a driver refused by the allow-list; 2 usage.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from typing import Any

import click

from jumpstarter_exporter import log as logsetup
from jumpstarter_exporter.client.board import Board
from jumpstarter_exporter.client.connect import connect
from jumpstarter_exporter.client.drivers import ByteStream, DriverClient, PowerClient, SerialClient
from jumpstarter_exporter.errors import JumpstarterError

ESCAPE = b"\x02"  # Ctrl-B, pressed three times in a row, leaves `j serial console`
ESCAPE_COUNT = 3

_board: Board | None = None


def board() -> Board:
    """The session behind JUMPSTARTER_HOST, connected once per process."""
    global _board
    if _board is None:
        _board = connect()
    return _board


def _driver(ctx: click.Context) -> DriverClient:
    return board()[ctx.obj]


# --- power ------------------------------------------------------------------------------------


def power_group(name: str, driver: PowerClient) -> click.Group:
    @click.group(name, help=_help(driver, "Power control."))
    @click.pass_context
    def group(ctx: click.Context) -> None:
        ctx.obj = name

    @group.command("on")
    @click.pass_context
    def on(ctx: click.Context) -> None:
        """Switch power on."""
        _driver(ctx).on()  # type: ignore[attr-defined]

    @group.command("off")
    @click.pass_context
    def off(ctx: click.Context) -> None:
        """Switch power off."""
        _driver(ctx).off()  # type: ignore[attr-defined]

    @group.command("cycle")
    @click.option("-w", "--wait", type=click.FloatRange(min=0), default=2.0, show_default=True)
    @click.pass_context
    def cycle(ctx: click.Context, wait: float) -> None:
        """Switch off, wait WAIT seconds, switch on."""
        _driver(ctx).cycle(wait)  # type: ignore[attr-defined]

    @group.command("read")
    @click.pass_context
    def read(ctx: click.Context) -> None:
        """Print the power readings (voltage, current)."""
        for reading in _driver(ctx).read():  # type: ignore[attr-defined]
            click.echo(f"{reading.get('voltage')} V  {reading.get('current')} A")

    return group


# --- serial -----------------------------------------------------------------------------------


def serial_group(name: str, driver: SerialClient) -> click.Group:
    @click.group(name, help=_help(driver, "Serial console."))
    @click.pass_context
    def group(ctx: click.Context) -> None:
        ctx.obj = name

    @group.command("console")
    @click.pass_context
    def console(ctx: click.Context) -> None:
        """Interactive console on this terminal. Leave it with Ctrl-B pressed 3 times."""
        if not sys.stdin.isatty():
            raise click.UsageError("serial console needs a terminal; use `serial pipe`")
        run_console(_driver(ctx).open_stream("connect"))

    # upstream's name for the same command
    group.add_command(click.Command("start-console", callback=console.callback, hidden=True))

    @group.command("pipe")
    @click.option("--no-input", is_flag=True, help="Do not send stdin to the device.")
    @click.option(
        "-t",
        "--timeout",
        type=click.FloatRange(min=0),
        default=None,
        help="Stop after this many seconds (default: until Ctrl-C or SIGTERM).",
    )
    @click.pass_context
    def pipe(ctx: click.Context, no_input: bool, timeout: float | None) -> None:
        """Device output to stdout; piped stdin goes to the device."""
        run_pipe(_driver(ctx).open_stream("connect"), not no_input, timeout)

    return group


class _Stop:
    """SIGINT/SIGTERM end a pipe or console cleanly (the stream is closed, exit 0)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _stdin_to_stream(stream: ByteStream, stop: threading.Event) -> None:
    fd = sys.stdin.fileno()
    while not stop.is_set():
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        data = os.read(fd, 65536)
        if not data:
            return  # EOF on stdin: keep showing the device's output
        stream.write(data)


def run_pipe(stream: ByteStream, send_input: bool, timeout: float | None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    out = sys.stdout.buffer
    with _Stop() as stop:
        if send_input and not sys.stdin.isatty():
            threading.Thread(
                target=_stdin_to_stream, args=(stream, stop.event), daemon=True
            ).start()
        try:
            while not stop.event.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                data = stream.read(timeout=0.2)
                if data:
                    out.write(data)
                    out.flush()
                elif stream.eof:
                    break
        finally:
            stop.event.set()
            stream.close()


def run_console(stream: ByteStream) -> None:
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    sys.stderr.write("Connected. Press Ctrl-B three times to leave.\r\n")
    sys.stderr.flush()
    stop = threading.Event()

    def show() -> None:
        while not stop.is_set():
            data = stream.read(timeout=0.2)
            if data:
                os.write(sys.stdout.fileno(), data)
            elif stream.eof:
                stop.set()

    printer = threading.Thread(target=show, daemon=True)
    try:
        tty.setraw(fd)
        printer.start()
        pressed = 0
        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            data = os.read(fd, 1024)
            if not data:
                break
            for byte in data:
                pressed = pressed + 1 if bytes([byte]) == ESCAPE else 0
                if pressed >= ESCAPE_COUNT:
                    stop.set()
                    break
            if not stop.is_set():
                stream.write(data)
    finally:
        stop.set()
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)  # always give the terminal back
        printer.join(2)
        stream.close()
        sys.stderr.write("\nDisconnected.\n")


# --- any other driver -------------------------------------------------------------------------


def generic_group(name: str, driver: DriverClient) -> click.Group:
    @click.group(name, help=_help(driver, f"Driver {driver.client_class or 'without client'}."))
    @click.pass_context
    def group(ctx: click.Context) -> None:
        ctx.obj = name

    @group.command("call")
    @click.argument("method")
    @click.argument("args", nargs=-1)
    @click.pass_context
    def call(ctx: click.Context, method: str, args: tuple[str, ...]) -> None:
        """Call METHOD with ARGS (each parsed as JSON when it is JSON, else a string)."""
        result = _driver(ctx).call(method, *(_arg(a) for a in args))
        if result is not None:
            click.echo(json.dumps(result))

    return group


def _arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _help(driver: DriverClient, default: str) -> str:
    text = driver.description or default
    if not driver._board.allow.allows(driver.client_class):
        text += f" (refused: {driver.client_class} is not in JMP_DRIVERS_ALLOW)"
    if driver.methods:
        text += "\n\n\b\n" + "\n".join(f"{m}: {h}" for m, h in sorted(driver.methods.items()))
    return text


# --- the program ------------------------------------------------------------------------------


class JGroup(click.Group):
    """Commands built from the leased exporter's drivers; errors become exit codes."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        try:
            return list(board().drivers)
        except JumpstarterError as exc:
            if ctx.resilient_parsing or "--help" in sys.argv or "-h" in sys.argv:
                click.echo(f"(no drivers listed: {exc})", err=True)
                return []
            raise

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        driver = board().drivers.get(cmd_name)
        if driver is None:
            return None
        if isinstance(driver, PowerClient):
            return power_group(cmd_name, driver)
        if isinstance(driver, SerialClient):
            return serial_group(cmd_name, driver)
        return generic_group(cmd_name, driver)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except JumpstarterError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(int(exc.exit_code))

    def resolve_command(self, ctx: click.Context, args: list[str]):
        try:
            return super().resolve_command(ctx, args)
        except JumpstarterError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(int(exc.exit_code))


@click.group(cls=JGroup, context_settings={"help_option_names": ["-h", "--help"]})
def j() -> None:
    """Use the board leased by `jmp shell` (JUMPSTARTER_HOST).

    There is one command per driver of the leased exporter, named as in its config.
    """


def main() -> None:
    logsetup.configure("WARNING", "text")
    try:
        j.main(prog_name="j")
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        if _board is not None:
            with contextlib.suppress(Exception):
                _board.close()


__all__ = ["ESCAPE", "j", "main"]
