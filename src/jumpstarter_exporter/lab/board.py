"""The lab's simulated board: a serial console on a pty, powered by an outlet of the lab PDU.

The board holds one end of a socat pty pair (the exporter's ``PySerial`` opens the other) and
learns its power state the way a real board does, from its outlet: it polls the simulated
PDU's ``rPDUOutletStatusOutletState`` with SNMP GETs (``POLL`` seconds apart; a GET costs a few
milliseconds). When the outlet goes on it boots: a short boot log, then ``login:``. It answers
like a small embedded Linux: any user name logs in (no password), a shell prompt, a handful of
commands (``help`` lists them), ``exit`` goes back to ``login:``; input is echoed, as a
getty's terminal would. When the outlet goes off it stops mid-sentence and is silent, input is
dropped; a power cycle (off long enough to be seen, then on) is a reboot with a higher boot
count. Output that nobody reads is dropped once the pty's buffer is full (a UART drops too).

Run as ``python -m jumpstarter_exporter.lab.board --tty PATH --pdu HOST:PORT [--community C]
[--outlet N]``; it logs power changes to stderr and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import termios
import time
import tty
from collections.abc import Awaitable, Callable

from jumpstarter_exporter.lab.pdusim import APC_RPDU_STATE, SnmpGetter

POLL = 0.1
HOSTNAME = "lab-board"
KERNEL = "Linux lab-board 6.1.0-lab #1 SMP PREEMPT armv7l GNU/Linux"
LOGIN = f"{HOSTNAME} login: "
# (delay before the line in seconds, the line); {boot} is the boot count
BOOT_LOG: list[tuple[float, str]] = [
    (0.05, "U-Boot 2024.01-lab (simulated board)"),
    (0.05, "DRAM:  512 MiB"),
    (0.10, "Hit any key to stop autoboot:  0"),
    (0.10, "Starting kernel ..."),
    (0.05, "[    0.000000] Booting Linux on physical CPU 0x0 (boot #{boot})"),
    (0.10, "[    0.000000] Linux version 6.1.0-lab (lab@jumpstarter) #1 SMP PREEMPT"),
    (0.10, "[    0.412000] console [ttyS0] enabled"),
    (0.15, "[    0.805000] EXT4-fs (mmcblk0p2): mounted filesystem"),
    (0.15, "[    1.210000] systemd[1]: Reached target Multi-User System"),
    (0.05, ""),
    (0.00, "Lab Board OS 1.0 " + HOSTNAME + " ttyS0"),
    (0.00, ""),
]

PowerProbe = Callable[[], Awaitable[bool | None]]


def snmp_probe(host: str, port: int, community: str, outlet: int) -> tuple[PowerProbe, SnmpGetter]:
    """A probe reading the outlet's state from the PDU: True on, False off, None no answer."""
    getter = SnmpGetter(host, port, community, wait=1.0)
    oid = f"{APC_RPDU_STATE}.{outlet}"

    async def probe() -> bool | None:
        value = await getter.get(oid)
        return {1: True, 2: False}.get(value) if isinstance(value, int) else None

    return probe, getter


class Board:
    """The console state machine on ``fd`` (a pty end, made raw), powered by ``probe``."""

    def __init__(self, fd: int, probe: PowerProbe, *, speed: float = 1.0) -> None:
        self.fd = fd
        self.probe = probe
        self.speed = speed  # boot log delays are multiplied by this
        self.powered = False
        self.boots = 0
        self.booted_at = 0.0
        self.mode = "off"  # off | booting | login | shell
        self.user = ""
        self.line = bytearray()
        self._last_cr = False
        self._boot: asyncio.Task[None] | None = None
        self.dropped = 0

    # -- output ------------------------------------------------------------------------------

    def write(self, text: str) -> None:
        data = text.encode()
        try:
            os.write(self.fd, data)
        except BlockingIOError:
            self.dropped += len(data)  # nobody reads the console: drop, as a UART would

    def say(self, text: str = "") -> None:
        self.write(text + "\r\n")

    # -- power -------------------------------------------------------------------------------

    async def watch_power(self) -> None:
        while True:
            state = await self.probe()
            if state is not None and state != self.powered:
                self.set_power(state)
            await asyncio.sleep(POLL)

    def set_power(self, on: bool) -> None:
        self.powered = on
        if self._boot is not None:
            self._boot.cancel()
            self._boot = None
        self.line.clear()
        if on:
            self.boots += 1
            self.booted_at = time.monotonic()
            self.mode = "booting"
            log(f"power on: boot #{self.boots}")
            self._boot = asyncio.get_running_loop().create_task(self._boot_log())
        else:
            self.mode = "off"
            log("power off")

    async def _boot_log(self) -> None:
        self.write("\r\n")
        for delay, text in BOOT_LOG:
            await asyncio.sleep(delay * self.speed)
            self.say(text.format(boot=self.boots))
        self.mode = "login"
        self.write(LOGIN)

    # -- input -------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.mode not in ("login", "shell"):
            return  # off or booting: keystrokes are lost
        for byte in data:
            if byte in (0x0D, 0x0A):
                if byte == 0x0A and self._last_cr:
                    self._last_cr = False
                    continue
                self._last_cr = byte == 0x0D
                self.write("\r\n")
                self._enter(self.line.decode(errors="replace").strip())
                self.line.clear()
                continue
            self._last_cr = False
            if byte in (0x7F, 0x08):
                if self.line:
                    self.line.pop()
                    self.write("\b \b")
            elif byte == 0x03:  # ^C
                self.line.clear()
                self.write("^C\r\n")
                self._prompt()
            elif byte >= 0x20:
                self.line.append(byte)
                self.write(chr(byte))

    def _prompt(self) -> None:
        if self.mode == "login":
            self.write(LOGIN)
        else:
            self.write(f"{self.user}@{HOSTNAME}:~# " if self.user == "root" else "$ ")

    def _enter(self, line: str) -> None:
        if self.mode == "login":
            if line:
                self.user = line.split()[0]
                self.mode = "shell"
                self.say(f"Welcome to Lab Board OS 1.0, {self.user} (boot #{self.boots}).")
            self._prompt()
            return
        for text in self.run(line):
            self.say(text)
        if self.mode == "shell":
            self._prompt()

    def run(self, line: str) -> list[str]:
        """A shell command's output lines."""
        cmd, _, rest = line.partition(" ")
        uptime = time.monotonic() - self.booted_at
        match cmd:
            case "":
                return []
            case "help":
                return ["commands: uname [-a], uptime, echo TEXT, whoami, hostname, exit"]
            case "uname":
                return [KERNEL if rest.strip() == "-a" else "Linux"]
            case "uptime":
                return [f"up {uptime:.1f} s, boot #{self.boots}, load average: 0.00"]
            case "echo":
                return [rest]
            case "whoami":
                return [self.user]
            case "hostname":
                return [HOSTNAME]
            case "exit" | "logout":
                self.mode, self.user = "login", ""
                self.say()
                self.write(LOGIN)
                return []
            case _:
                return [f"-sh: {cmd}: not found"]

    async def read_input(self) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        def readable() -> None:
            try:
                data = os.read(self.fd, 4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""  # EIO: the other end of the pair went away
            queue.put_nowait(data)
            if not data:
                loop.remove_reader(self.fd)

        loop.add_reader(self.fd, readable)
        try:
            while data := await queue.get():
                self.feed(data)
        finally:
            loop.remove_reader(self.fd)

    async def run_forever(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.watch_power())
            group.create_task(self.read_input())


def open_console(path: str) -> int:
    """Open the pty end non-blocking and raw (no echo, no line discipline: we are the UART)."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd, termios.TCSANOW)
    return fd


def log(message: str) -> None:
    sys.stderr.write(f"board: {message}\n")
    sys.stderr.flush()


async def main(args: argparse.Namespace) -> None:
    host, _, port = args.pdu.rpartition(":")
    probe, getter = snmp_probe(host, int(port), args.community, args.outlet)
    fd = open_console(args.tty)
    board = Board(fd, probe, speed=args.speed)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    log(f"console {args.tty}, outlet {args.outlet} of {args.pdu} ({args.community})")
    try:
        await board.run_forever()
    finally:
        getter.close()
        os.close(fd)


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m jumpstarter_exporter.lab.board")
    parser.add_argument("--tty", required=True, help="pty end the board holds")
    parser.add_argument("--pdu", required=True, help="HOST:PORT of the SNMP PDU")
    parser.add_argument("--community", default="lab")
    parser.add_argument("--outlet", type=int, default=1)
    parser.add_argument("--speed", type=float, default=1.0, help="boot log delay factor")
    args = parser.parse_args()
    with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
        asyncio.run(main(args))


if __name__ == "__main__":
    cli()
