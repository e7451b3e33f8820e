"""The per-worker result cache: an LRU of encoded replies with a byte budget.

Keys are ``(n, fmt)`` with ``fmt`` the kernel's encoding name (``"decimal"``
or ``"binary"``); values are the reply bodies exactly as they are published,
so a hit costs a dictionary lookup and no encoding. F(10^6) is 208,988 bytes
in decimal and 86,784 in binary.

The worker only caches what it computed off the I/O thread (n above its
inline threshold): below that, computing is about as cheap as a lookup.
Not thread-safe: a worker uses it from its I/O thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

#: Default budget per worker: 64 MiB holds about 300 decimal replies at n = 10^6.
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024

#: What one entry costs beyond its body: the key tuple, the bytes header, the dict slot.
ENTRY_OVERHEAD = 200


class ReplyCache:
    """Least-recently-used map of reply bodies whose sizes add up to at most ``max_bytes``.

    ``max_bytes=0`` turns the cache off. A body larger than the whole budget is
    not cached (it would evict everything and then itself).
    """

    __slots__ = ("max_bytes", "size", "hits", "misses", "_entries")

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"the cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.size = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, bytes] = OrderedDict()

    def get(self, key: Hashable) -> bytes | None:
        entries = self._entries
        value = entries.get(key)
        if value is None:
            self.misses += 1
            return None
        entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: Hashable, value: bytes) -> None:
        cost = len(value) + ENTRY_OVERHEAD
        if cost > self.max_bytes:
            return
        entries = self._entries
        old = entries.pop(key, None)
        if old is not None:
            self.size -= len(old) + ENTRY_OVERHEAD
        entries[key] = value
        self.size += cost
        while self.size > self.max_bytes:
            _, evicted = entries.popitem(last=False)
            self.size -= len(evicted) + ENTRY_OVERHEAD

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def clear(self) -> None:
        self._entries.clear()
        self.size = 0
