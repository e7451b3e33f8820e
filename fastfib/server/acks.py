"""Acknowledgement batching: one ``basic.ack(multiple=True)`` per I/O loop turn where it is safe.

A request is acknowledged once it was answered (or needs no answer). The
tags answered during a loop turn are acknowledged together at its end, with
one multiple ack up to the lowest request still in flight (being computed, or
waiting for the reply guard); the tags above it are acknowledged one by one,
so that no multiple ack ever covers a request still in flight.
"""

from __future__ import annotations

from collections.abc import Callable


class AckBatcher:
    """The acknowledgements of one channel, and the delivery tags still in flight on it."""

    __slots__ = ("channel", "inflight", "_acks", "_pending", "_request_flush")

    def __init__(self) -> None:
        self.channel = None
        #: Delivery tags that are neither answered nor acknowledged yet (computing, or held).
        self.inflight: set[int] = set()
        self._acks: list[int] = []
        self._pending = False
        self._request_flush: Callable[[], None] | None = None

    def bind(self, channel, request_flush: Callable[[], None] | None = None) -> None:
        """Start over on ``channel`` (None: none). Delivery tags belong to a channel: what was
        unacknowledged on the old one is redelivered. ``request_flush()`` asks for :meth:`flush`
        at the end of this loop turn."""
        self.channel = channel
        self.inflight = set()
        self._acks = []
        self._pending = False
        self._request_flush = request_flush

    def done(self, tag: int) -> None:
        """The request ``tag`` was answered (or needs no answer): acknowledge it at the end of this loop turn."""
        self._acks.append(tag)
        if not self._pending:
            self._pending = True
            if self._request_flush is not None:
                self._request_flush()

    def flush(self) -> None:
        """Send the acknowledgements collected since the last flush."""
        self._pending = False
        acks = self._acks
        if not acks:
            return
        self._acks = []
        channel = self.channel
        if channel is None or not channel.is_open:
            return
        inflight = self.inflight
        if not inflight:
            # Every request delivered up to max(acks) was answered: one ack covers them all.
            channel.basic_ack(max(acks), multiple=len(acks) > 1)
            return
        floor = min(inflight)
        low = [t for t in acks if t < floor]
        if low:
            channel.basic_ack(max(low), multiple=len(low) > 1)
        for t in acks:
            if t > floor:
                channel.basic_ack(t)
