"""fastfib.limits: the reply size of F(n) from n alone, against the real kernel output (issue 14)."""

import random

import pytest

from fastfib import fib_encoded, limits
from fastfib.errors import OutOfRange

FORMATS = ("decimal", "binary")


@pytest.mark.parametrize("fmt", FORMATS)
def test_reply_bytes_exact_for_every_small_n(fmt):
    for n in range(0, 4000):
        assert limits.reply_bytes(n, fmt) == len(fib_encoded(n, fmt)), n


@pytest.mark.parametrize("fmt", FORMATS)
def test_reply_bytes_exact_at_every_size_boundary_up_to_5e4(fmt):
    # Where the size steps up, on both sides: the n that would show an off-by-one.
    steps = [n for n in range(1, 50_000) if limits.reply_bytes(n, fmt) != limits.reply_bytes(n - 1, fmt)]
    assert len(steps) > 500
    for n in random.Random(14).sample(steps, 200) + steps[-5:]:
        for m in (n - 1, n):
            assert limits.reply_bytes(m, fmt) == len(fib_encoded(m, fmt)), m


@pytest.mark.parametrize("fmt", FORMATS)
def test_reply_bytes_exact_for_random_large_n(fmt):
    rng = random.Random(1414)
    for n in [rng.randrange(10**5, 3 * 10**6) for _ in range(25)]:
        assert limits.reply_bytes(n, fmt) == len(fib_encoded(n, fmt)), n


@pytest.mark.parametrize(("limit", "fmt"), [(1 << 20, "decimal"), (1 << 20, "binary"), (4_000_000, "decimal")])
def test_largest_n_within_is_the_real_boundary(limit, fmt):
    n = limits.largest_n_within(limit, fmt, 10**9)
    assert len(fib_encoded(n, fmt)) <= limit < len(fib_encoded(n + 1, fmt))


def test_default_limit_binary_boundary_is_real():
    # 16 MiB in binary: the largest n is where the issue says (about 1.93e8); 2 kernel calls, ~1 s each.
    n = limits.largest_n_within(limits.DEFAULT_MAX_REPLY_BYTES, "binary", 10**9)
    assert 1.93e8 < n < 1.94e8
    assert len(fib_encoded(n, "binary")) <= limits.DEFAULT_MAX_REPLY_BYTES < len(fib_encoded(n + 1, "binary"))


def test_default_limit_decimal_boundary_matches_the_digit_count():
    n = limits.largest_n_within(limits.DEFAULT_MAX_REPLY_BYTES, "decimal", 10**9)
    assert 8.0e7 < n < 8.1e7
    # F(10^9) has 208,987,640 decimal digits (a published value; the kernel agrees, test_kernel checks MAX_N).
    assert limits.reply_bytes(10**9, "decimal") == 208_987_640


def test_largest_n_within_edges():
    assert limits.largest_n_within(10**12, "decimal", 500) == 500
    assert limits.largest_n_within(0, "decimal", 500) == -1
    assert limits.largest_n_within(1, "decimal", 500) == 6  # F(6) = 8, F(7) = 13
    assert limits.largest_n_within(1, "binary", 500) == 13  # F(13) = 233 < 256, F(14) = 377


def test_reply_bytes_rejects_bad_input():
    with pytest.raises(ValueError):
        limits.reply_bytes(-1, "decimal")
    with pytest.raises(ValueError):
        limits.reply_bytes(10, "hex")


def test_limit_check_gives_size_and_limit():
    limit = limits.ReplySizeLimit(1000, 10**6)
    limit.check(4700, "decimal")  # 983 digits
    with pytest.raises(OutOfRange) as info:
        limit.check(5000, "decimal")
    text = str(info.value)
    assert "1045 bytes" in text and "1000 bytes" in text and "largest n" in text
    assert "ask for binary" in text  # 5000 fits in binary (434 bytes)
    limit.check(5000, "binary")
    with pytest.raises(OutOfRange):
        limit.check(limit.largest_n["binary"] + 1, "binary")


def test_max_n_warning():
    assert limits.max_n_warning(10**6, limits.DEFAULT_MAX_REPLY_BYTES) is None
    text = limits.max_n_warning(10**9, limits.DEFAULT_MAX_REPLY_BYTES)
    assert "--max-n 1000000000" in text and "decimal above n=80278509" in text
    assert "binary above n=193329913" in text
