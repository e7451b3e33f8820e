"""The size of a reply, known from n alone, and the ``--max-reply-bytes`` limit.

A broker refuses a message larger than its ``max_message_size`` (RabbitMQ
3.x: 128 MiB by default, 4.x: 16 MiB; see docs/compatibility.md), and a
refused reply costs the worker its channel. So the server checks, before it
computes anything, that F(n)'s reply fits in ``--max-reply-bytes``.

The size follows from n: F(n) = (phi^n - psi^n) / sqrt(5), so

    log10 F(n) = n*log10(phi) - log10(sqrt(5)) + log10(1 - (-1)^n * phi^(-2n))

and the decimal reply has floor(log10 F(n)) + 1 bytes; the binary reply
(unsigned big-endian, minimal length) has ceil((floor(log2 F(n)) + 1) / 8).
:func:`reply_bytes` evaluates this with 256-bit MPFR arithmetic (gmpy2) and
is exact unless the logarithm lies within 2^-200 of an integer, where it
returns the larger candidate (an upper bound off by at most one byte).

Public API:

- :data:`DEFAULT_MAX_REPLY_BYTES` (16 MiB, RabbitMQ 4.x's default ``max_message_size``);
- :func:`reply_bytes` ``(n, fmt) -> int``;
- :func:`largest_n_within` ``(limit, fmt, n_max) -> int``: the largest n whose reply fits;
- :class:`ReplySizeLimit`: the per-request check (two integer comparisons) and its error message;
- :func:`max_n_warning`: the startup warning for a ``--max-n`` whose replies cannot all fit.
"""

from __future__ import annotations

import gmpy2

from .errors import OutOfRange

#: Default ``--max-reply-bytes``: RabbitMQ 4.x's default ``max_message_size`` (16 MiB).
DEFAULT_MAX_REPLY_BYTES = 16 * 1024 * 1024

FORMATS = ("decimal", "binary")

_PRECISION = 256
_MARGIN_EXP = -200  # a logarithm closer than 2^-200 to an integer is treated as ambiguous
_EXACT_BELOW = 128  # F(n) for smaller n is computed exactly (cheap): no rounding question at all


def _small_fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def _floor_log(n: int, base: int) -> int:
    """floor(log_base F(n)) for n >= _EXACT_BELOW, rounded up when the evaluation cannot decide."""
    with gmpy2.context(gmpy2.get_context(), precision=_PRECISION):
        phi = (1 + gmpy2.sqrt(5)) / 2
        log = gmpy2.log10 if base == 10 else gmpy2.log2
        correction = gmpy2.log1p(-((-1) ** n) * phi ** (-2 * n))
        # log(1 + x) for the tiny correction, converted from natural log to the base.
        value = n * log(phi) - log(gmpy2.sqrt(5)) + correction / gmpy2.log(base)
        margin = gmpy2.mpfr(2) ** _MARGIN_EXP
        # floor(value - margin) == floor(value + margin) but for an ambiguous value: take the larger.
        return int(gmpy2.floor(value + margin))


def reply_bytes(n: int, fmt: str) -> int:
    """The body size, in bytes, of the reply carrying F(n) in ``fmt`` ("decimal" or "binary").

    Exact (see the module docstring for the one, never observed, exception, where it
    is one byte too large). ``n`` must be >= 0. Costs tens of microseconds: the request
    path compares n against :class:`ReplySizeLimit`'s precomputed bounds instead.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be 'decimal' or 'binary', not {fmt!r}")
    if n < 0:
        raise ValueError(f"n must not be negative, got {n}")
    if n < _EXACT_BELOW:
        value = _small_fib(n)
        return len(str(value)) if fmt == "decimal" else max(1, (value.bit_length() + 7) // 8)
    if fmt == "decimal":
        return _floor_log(n, 10) + 1
    return (_floor_log(n, 2) + 1 + 7) // 8


def largest_n_within(limit: int, fmt: str, n_max: int) -> int:
    """The largest n <= ``n_max`` whose reply in ``fmt`` has at most ``limit`` bytes (-1 if none).

    The reply size never decreases with n, so this is a binary search (about 30 evaluations).
    """
    if reply_bytes(n_max, fmt) <= limit:
        return n_max
    if reply_bytes(0, fmt) > limit:
        return -1
    lo, hi = 0, n_max  # reply_bytes(lo) <= limit < reply_bytes(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if reply_bytes(mid, fmt) <= limit:
            lo = mid
        else:
            hi = mid
    return lo


def _bytes(size: int) -> str:
    """``1045 bytes (1.02 KiB)``; below 1 KiB just ``900 bytes``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size} bytes ({size / scale:.2f} {unit})"
    return f"{size} bytes"


class ReplySizeLimit:
    """``--max-reply-bytes`` for one server: which n may be answered in which format.

    Built once at worker start (about 60 :func:`reply_bytes` evaluations); then
    :meth:`check` is two comparisons per request and raises
    :class:`~fastfib.errors.OutOfRange` naming the reply size and the limit.
    """

    def __init__(self, max_reply_bytes: int, max_n: int) -> None:
        if max_reply_bytes < 1:
            raise ValueError(f"max_reply_bytes must be at least 1, got {max_reply_bytes}")
        self.max_reply_bytes = max_reply_bytes
        self.max_n = max_n
        #: fmt -> the largest n whose reply fits (-1: none).
        self.largest_n = {fmt: largest_n_within(max_reply_bytes, fmt, max_n) for fmt in FORMATS}

    def check(self, n: int, fmt: str) -> None:
        """Raise :class:`~fastfib.errors.OutOfRange` if F(n)'s reply in ``fmt`` would exceed the limit."""
        if n > self.largest_n[fmt]:
            raise OutOfRange(self.message(n, fmt, reply_bytes(n, fmt)))

    def message(self, n: int, fmt: str, size: int) -> str:
        """The error text for a reply of ``size`` bytes (also used when the broker refused one)."""
        text = (f"the {fmt} reply for n={n} would be {_bytes(size)}, above the server's "
                f"reply size limit of {_bytes(self.max_reply_bytes)}")
        largest = self.largest_n[fmt]
        if largest >= 0:
            text += f"; the largest n it can answer in {fmt} is {largest}"
        other = "binary" if fmt == "decimal" else "decimal"
        if self.largest_n[other] >= n:
            text += f" (ask for {other} to get this one)"
        return text


def max_n_warning(max_n: int, max_reply_bytes: int) -> str | None:
    """The startup warning when some n <= ``max_n`` has a reply above ``max_reply_bytes``, else None."""
    limit = ReplySizeLimit(max_reply_bytes, max_n)
    short = [f"{fmt} above n={limit.largest_n[fmt]} ({reply_bytes(max_n, fmt)} bytes at n={max_n})"
             for fmt in FORMATS if limit.largest_n[fmt] < max_n]
    if not short:
        return None
    return (f"--max-n {max_n} allows replies larger than --max-reply-bytes {max_reply_bytes}: "
            f"{'; '.join(short)} get out_of_range. Lower --max-n, or raise --max-reply-bytes together "
            f"with the broker's max_message_size")
