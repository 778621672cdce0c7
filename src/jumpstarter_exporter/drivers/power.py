"""Mock power switches, wire-compatible with upstream's ``jumpstarter_driver_power`` drivers.

``on``/``off`` (DriverCall, return None) and ``read`` (StreamingDriverCall of
``{"voltage", "current"}`` readings) are what ``PowerClient`` calls (protocol-facts §6.1).
``cycle(wait)`` is an extra server-side call (upstream's client cycles client-side). The
current state is ``self.state``: ``True`` on, ``False`` off, ``None`` never switched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from pydantic import BaseModel, Field

from jumpstarter_exporter.drivers.base import Driver, export

POWER_CLIENT = "jumpstarter_driver_power.client.PowerClient"


class PowerReading(BaseModel):
    voltage: float
    current: float


# What upstream's mock drivers report (observed): off, then on at 5 V / 2 A.
MOCK_READINGS = (PowerReading(voltage=0.0, current=0.0), PowerReading(voltage=5.0, current=2.0))


class _PowerState(Driver):
    client = POWER_CLIENT

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.state: bool | None = None

    def _set(self, state: bool) -> None:
        self.state = state
        self.log.info("power on" if state else "power off")


class MockPower(_PowerState):
    """Asynchronous mock power switch."""

    @export
    async def on(self) -> None:
        self._set(True)

    @export
    async def off(self) -> None:
        self._set(False)

    @export
    async def read(self) -> AsyncIterator[PowerReading]:
        for reading in MOCK_READINGS:
            yield reading

    @export
    async def cycle(self, wait: Annotated[float, Field(ge=0)] = 2.0) -> None:
        await self.off()
        await asyncio.sleep(wait)
        await self.on()


class SyncMockPower(_PowerState):
    """The same with plain methods (run in a worker thread by ``invoke``)."""

    @export
    def on(self) -> None:
        self._set(True)

    @export
    def off(self) -> None:
        self._set(False)

    @export
    def read(self) -> Iterator[PowerReading]:
        yield from MOCK_READINGS

    @export
    def cycle(self, wait: Annotated[float, Field(ge=0)] = 2.0) -> None:
        self.off()
        time.sleep(wait)
        self.on()


__all__ = ["MOCK_READINGS", "POWER_CLIENT", "MockPower", "PowerReading", "SyncMockPower"]
