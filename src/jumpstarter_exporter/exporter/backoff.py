"""Exponential backoff with full jitter, a cap, and a reset only after proven health.

``reset()`` is called when the peer answered something meaningful (a Status message, a
successful Register), never merely when a connection opened: a controller that accepts and
then fails every stream must not reset the delay to its minimum each time (upstream #38/#396
show the crash loop that follows).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    attempt: int = 0
    first_failure: float | None = None
    _random: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        """The delay before the next attempt (and count this failure)."""
        if self.first_failure is None:
            self.first_failure = time.monotonic()
        ceiling = min(self.cap, self.initial * self.factor**self.attempt)
        self.attempt += 1
        # Full jitter between half and all of the ceiling: spreads a lab's exporters apart
        # after a controller restart without ever retrying in a hot loop.
        return self._random.uniform(ceiling / 2, ceiling)

    def failing_for(self) -> float:
        return 0.0 if self.first_failure is None else time.monotonic() - self.first_failure

    def reset(self) -> None:
        self.attempt = 0
        self.first_failure = None
