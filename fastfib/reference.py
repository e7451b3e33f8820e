"""Pure-Python references, for tests and benchmarks only; the service never uses them.

- :func:`fib_naive` is the RabbitMQ tutorial's recursion, exponential in n.
- :func:`fib_doubling` is fast doubling on Python ints.
"""

from __future__ import annotations


def fib_naive(n: int) -> int:
    """F(n) exactly as the RabbitMQ RPC tutorial's server computes it (O(phi^n) calls)."""
    if n == 0:
        return 0
    elif n == 1:
        return 1
    else:
        return fib_naive(n - 1) + fib_naive(n - 2)


def fib_doubling(n: int) -> int:
    """F(n) by fast doubling on Python ints: F(2k) = F(k)(2F(k+1) - F(k)), F(2k+1) = F(k)^2 + F(k+1)^2."""
    if n < 0:
        raise ValueError("n must not be negative")
    a, b = 0, 1  # F(k), F(k+1) for k = the bits of n read so far
    for bit in bin(n)[2:]:
        c = a * (2 * b - a)
        d = a * a + b * b
        if bit == "1":
            a, b = d, c + d
        else:
            a, b = c, d
    return a
