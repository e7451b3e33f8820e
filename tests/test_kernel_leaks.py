"""The kernel frees every mpz_t and every bytes object on every path, error paths included."""

from __future__ import annotations

import gc

import psutil
import pytest

import fastfib
from fastfib import FibRangeError, fib, fib_encoded


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def _mixed_round(i: int) -> None:
    n = i % 3000
    fib(n)
    fib_encoded(n, "binary")
    fib_encoded(n, "decimal")
    for bad in (-1 - i, fastfib.MAX_N + 1 + i):
        with pytest.raises(FibRangeError):
            fib_encoded(bad, "binary")
    with pytest.raises(TypeError):
        fib(float(n))
    with pytest.raises(ValueError):
        fib_encoded(n, "octal")


@pytest.mark.slow
def test_no_leak_over_a_million_calls():
    # Warm up: the small-n temporaries and the allocator's pools reach their size.
    for i in range(20_000):
        _mixed_round(i)
    before = _rss_mb()
    for i in range(150_000):  # 7 calls a round: > 1 million calls, about a third of them raising
        _mixed_round(i)
    grown = _rss_mb() - before
    # One leaked F(1000)-sized mpz per call would be > 100 MB here.
    assert grown < 8, f"RSS grew by {grown:.1f} MB"


@pytest.mark.slow
def test_no_leak_large_n_with_gil_released():
    for n in (200_000, 200_001):
        fib(n)
        fib_encoded(n, "decimal")
    before = _rss_mb()
    for i in range(300):
        n = 200_000 + i
        fib(n)
        fib_encoded(n, "binary")
        fib_encoded(n, "decimal")
    grown = _rss_mb() - before
    # Each call's result is ~17 kB plus temporaries ~70 kB: 900 leaked calls would be ~60 MB.
    assert grown < 8, f"RSS grew by {grown:.1f} MB"
