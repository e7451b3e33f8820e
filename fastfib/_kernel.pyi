"""Type stubs for the compiled kernel, fastfib._kernel."""

from typing import Literal, SupportsIndex

import gmpy2

MAX_N: int
TABLE_MAX_N: int
THREADS_MIN_N: int

def fib(n: SupportsIndex, threads: SupportsIndex = 1) -> gmpy2.mpz: ...
def fib_encoded(
    n: SupportsIndex, fmt: Literal["decimal", "binary"] = "decimal", threads: SupportsIndex = 1
) -> bytes: ...
def encode(z: int | gmpy2.mpz, fmt: Literal["decimal", "binary"] = "decimal") -> bytes: ...
def gmp_library_version() -> str: ...
