"""What the controller knows only while it runs: who is online, who is listening, who waits.

- ``online``: exporters with an open Status stream. An exporter whose stream is gone is
  offline at once (upstream waits a minute of silence) and gets no new lease.
- ``watch``/``changed``: wake the Status streams of exporters whose lease state changed.
- ``listeners``: one queue of router tokens per lease, filled by Dial, drained by the
  exporter's Listen stream. A new Listen for the same lease supersedes the old one, as
  upstream's does, so a reconnecting exporter never misses a token.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from jumpstarter_exporter._proto.jumpstarter.v1 import jumpstarter_pb2

Key = tuple[str, str]
LISTEN_QUEUE_SIZE = 8


class Listener:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[jumpstarter_pb2.ListenResponse] = asyncio.Queue(LISTEN_QUEUE_SIZE)
        self.superseded = asyncio.Event()


class Hub:
    def __init__(self) -> None:
        self.online: Counter[Key] = Counter()
        self._events: dict[Key, asyncio.Event] = {}
        self.listeners: dict[Key, Listener] = {}
        self.wake_scheduler = asyncio.Event()

    @contextmanager
    def connected(self, exporter: Key) -> Iterator[None]:
        self.online[exporter] += 1
        try:
            yield
        finally:
            self.online[exporter] -= 1
            if self.online[exporter] <= 0:
                del self.online[exporter]

    def is_online(self, exporter: Key) -> bool:
        return self.online[exporter] > 0

    def event(self, exporter: Key) -> asyncio.Event:
        return self._events.setdefault(exporter, asyncio.Event())

    def changed(self, exporters: set[Key] | list[Key]) -> None:
        for key in exporters:
            event = self._events.pop(key, None)
            if event is not None:
                event.set()

    @contextmanager
    def listening(self, lease: Key) -> Iterator[Listener]:
        old = self.listeners.get(lease)
        if old is not None:
            old.superseded.set()
        listener = Listener()
        self.listeners[lease] = listener
        try:
            yield listener
        finally:
            if self.listeners.get(lease) is listener:
                del self.listeners[lease]
