"""AMQP field tables built by hand, for tests that need tables pika's own encoder cannot build."""

from __future__ import annotations

import struct


def nested_table(depth: int) -> bytes:
    """{"a": {"a": ... {} ...}}, ``depth`` tables deep, encoded by hand (pika's encoder would recurse)."""
    inner = struct.pack(">I", 0)
    for _ in range(depth):
        entry = b"\x01aF" + inner
        inner = struct.pack(">I", len(entry)) + entry
    return inner
