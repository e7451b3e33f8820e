"""A worker's counters (:class:`Stats`) and a rate-limited logger for recurring anomalies."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .. import protocol


@dataclass
class Stats:
    """Counters of one worker: the hook for pool-wide metrics (issue 7).

    Plain ints, incremented on the I/O thread only; reading them from another
    thread gives a slightly stale but consistent-enough view.
    """

    received: int = 0
    replied: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(protocol.ERROR_KINDS, 0))
    no_reply_to: int = 0
    expired: int = 0
    #: Deliveries the broker marked redelivered (a worker died or gave them back before).
    redelivered: int = 0
    #: Deliveries that could not be decoded: rejected without requeue (an error reply if possible).
    undecodable: int = 0
    offloaded: int = 0
    cache_hits: int = 0
    requeued_on_stop: int = 0
    connections: int = 0
    connection_losses: int = 0

    def snapshot(self) -> dict[str, Any]:
        snap = dict(self.__dict__)
        snap["errors"] = dict(self.errors)
        return snap


class RateLimitedLog:
    """Log a recurring anomaly at most once per ``interval`` seconds, counting the rest."""

    def __init__(self, logger: logging.Logger, level: int, interval: float = 5.0) -> None:
        self._logger, self._level, self._interval = logger, level, interval
        self._next = 0.0
        self._suppressed = 0

    def __call__(self, msg: str, *args: Any, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" ({self._suppressed} more like it not logged)"
            self._suppressed = 0
        self._next = now + self._interval
        self._logger.log(self._level, msg, *args, exc_info=exc_info)
