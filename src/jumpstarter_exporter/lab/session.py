"""The lab's scripted client session: what a test script written against the client API does.

Runs synchronously (the client API is synchronous) in a worker thread of ``jmp lab up``.
Each step reports one line through ``say(step, text)``; a failure raises ``StepFailed``
naming the step, with what was seen on the console when it is about the console.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from jumpstarter_exporter.config.models import ClientConfig

Say = Callable[[str, str], None]
PROMPT = re.compile(rb"[#$] $")
LOGIN = b"login: "


class StepFailed(Exception):
    """A lab step did not do what it should; ``step`` names it."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


@dataclass
class Plan:
    config: ClientConfig
    selector: dict[str, str]
    outlet: int
    lease_timeout: float = 30.0
    boot_timeout: float = 20.0


@contextmanager
def step(name: str) -> Iterator[None]:
    """Any error inside becomes ``StepFailed(name, ...)``."""
    try:
        yield
    except StepFailed:
        raise
    except Exception as exc:  # every failure of a step is reported by name
        raise StepFailed(name, f"{type(exc).__name__}: {exc}") from exc


def _lines(data: bytes) -> list[str]:
    text = data.decode(errors="replace").replace("\r", "")
    return [line for line in text.split("\n") if line.strip()]


def _tail(data: bytes, n: int = 3) -> str:
    return " | ".join(_lines(data)[-n:]) or "nothing"


def first_lease(plan: Plan, say: Say) -> None:
    """Lease, power on, boot, log in, run a command, power cycle, reboot, read power, release."""
    from jumpstarter_exporter.client import lease

    with step("lease"):
        cm = lease(
            config=plan.config,
            selector=plan.selector,
            duration=300,
            timeout=plan.lease_timeout,
        )
        board = cm.__enter__()
    try:
        selector = ",".join(f"{k}={v}" for k, v in plan.selector.items())
        say(
            "lease",
            f"{board.lease_name} on exporter {board.exporter_name!r} (selector {selector})",
        )
        _first_session(board, plan, say)
    except BaseException:
        # The step's own error is the one to report, not a release that fails after it.
        with contextlib.suppress(Exception):
            cm.__exit__(*sys.exc_info())
        raise
    with step("release"):
        cm.__exit__(None, None, None)
    say("release", "lease released")


def _first_session(board, plan: Plan, say: Say) -> None:
    with step("power on"):
        board.serial.read(timeout=0.2)  # open the console first: we want to see the boot
        board.power.on()
        powered = time.monotonic()
        say("power on", f"PDU outlet {plan.outlet} switched on and confirmed")
    with step("console"):
        seen = _expect(board, LOGIN, plan.boot_timeout, "the login prompt")
        boot = next((line for line in _lines(seen) if "boot #" in line), "")
        count = re.search(r"boot #(\d+)", boot)
        say(
            "console",
            f"boot #{count.group(1) if count else '?'}: {len(_lines(seen))} lines of boot log, "
            f'"login:" after {time.monotonic() - powered:.1f} s',
        )
    with step("login"):
        board.serial.write(b"root\r")
        _expect(board, PROMPT, 10, "the shell prompt")
        board.serial.write(b"uname -a\r")
        out = _expect(board, PROMPT, 10, "uname's output")
        kernel = next((line for line in _lines(out) if line.startswith("Linux")), None)
        if kernel is None:
            raise StepFailed("login", f"uname -a printed no kernel line: {_tail(out)}")
        say("login", f"root; uname -a: {kernel.strip()}")
    with step("power cycle"):
        cycled = time.monotonic()
        board.power.cycle(wait=1.0)
        seen = _expect(board, LOGIN, plan.boot_timeout, "the login prompt after the cycle")
        count = re.search(rb"boot #(\d+)", seen)
        if count is None or int(count.group(1)) < 2:
            raise StepFailed("power cycle", f"no second boot on the console: {_tail(seen)}")
        say(
            "power cycle",
            f'off 1 s, on: boot #{int(count.group(1))}, "login:" again after '
            f"{time.monotonic() - cycled:.1f} s",
        )
    with step("power read"):
        readings = board.power.read()
        if not readings:
            raise StepFailed("power read", "the exporter returned no reading")
        r = readings[0]
        say(
            "power read",
            f"{r['voltage']:.1f} V, {r['current']:.1f} A (the PDU's meter on outlet {plan.outlet})",
        )


def _expect(board, pattern, timeout: float, what: str) -> bytes:
    try:
        return board.serial.expect(pattern, timeout=timeout)
    except Exception as exc:  # re-raised with what was awaited
        seen = getattr(exc, "seen", b"") or getattr(exc, "data", b"") or b""
        detail = f"; console showed: {_tail(seen)}" if seen else ""
        raise StepFailed("console", f"no {what} within {timeout:g} s ({exc}){detail}") from exc


def second_lease(plan: Plan, say: Say) -> None:
    """Lease the restarted exporter briefly: it is leasable again."""
    from jumpstarter_exporter.client import lease

    with step("lease again"):
        with lease(
            config=plan.config, selector=plan.selector, duration=60, timeout=plan.lease_timeout
        ) as board:
            name, exporter = board.lease_name, board.exporter_name
            state = "on" if board.power.read()[0]["current"] > 0 else "off"
        say(
            "lease again",
            f"{name} on {exporter!r} (board still {state}), released: leasable again",
        )
