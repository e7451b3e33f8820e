"""Kernel benchmarks (pytest-benchmark), not part of the default test run.

    python -m pytest bench/test_kernel.py --benchmark-only      (or: python -m bench kernel)

Each n is benchmarked with every implementation back to back, so that the
ratios printed at the end (bench/conftest.py) compare medians measured side by
side in one run.
"""

from __future__ import annotations

import gmpy2
import pytest

import fastfib
from fastfib.reference import fib_doubling, fib_naive

NS = [25, 30, 93, 1000, 10**5, 10**6, 10**7]

IMPLS = {
    "fastfib": fastfib.fib,
    "gmpy2": gmpy2.fib,
    "pure-doubling": fib_doubling,
    "naive": fib_naive,
}


def _runs(impl: str, n: int) -> bool:
    if impl == "naive":
        return n <= 25  # exponential: F(30) alone takes about a second
    if impl == "pure-doubling":
        return n <= 10**6  # Python's Karatsuba makes 10^7 take many seconds a call
    return True


CASES = [pytest.param(n, impl, id=f"{impl}-{n}") for n in NS for impl in IMPLS if _runs(impl, n)]


@pytest.mark.parametrize("n, impl", CASES)
def test_fib(benchmark, n, impl):
    benchmark.group = f"n={n}"
    benchmark.extra_info.update(n=n, impl=impl)
    result = benchmark(IMPLS[impl], n)
    assert result == gmpy2.fib(n)


@pytest.mark.parametrize("fmt", ["decimal", "binary"])
@pytest.mark.parametrize("n", [1000, 10**6])
def test_fib_encoded(benchmark, n, fmt):
    benchmark.group = f"encoded n={n}"
    benchmark.extra_info.update(n=n, impl=f"fib_encoded-{fmt}")
    out = benchmark(fastfib.fib_encoded, n, fmt)
    assert out
