"""fastfib: a fast Fibonacci RPC backend over RabbitMQ.

The public API is small:

- :func:`fib` and :func:`fib_encoded`, the compiled kernel;
- :class:`FibonacciRpcClient` (blocking) and :class:`fastfib.aio.AsyncFibonacciRpcClient`;
- the exceptions of :mod:`fastfib.errors`.

The kernel is a compiled extension; there is no pure-Python fallback. Import
fails, saying how to build it, when the extension is missing.
"""

from __future__ import annotations

from .errors import (  # noqa: F401
    ConnectionLost,
    FastFibError,
    FibRangeError,
    InternalServerError,
    InvalidArgument,
    OutOfRange,
    ProtocolError,
    RemoteError,
    RpcError,
    RpcTimeout,
    Unroutable,
    UnsupportedFormat,
)

try:
    from ._kernel import MAX_N, TABLE_MAX_N, encode, fib, fib_encoded, gmp_library_version, threads_min_n
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "fastfib's compiled kernel (fastfib._kernel) is not built or does not load "
        f"({exc}). Build it with `make build` (or `pip install .`; in a source checkout also "
        "`python setup.py build_ext --inplace`). fastfib has no pure-Python fallback."
    ) from exc

from . import gmp_dispatch as _gmp_dispatch

__version__ = "0.1.0"


def __getattr__(name: str):
    # The blocking client imports pika: loaded on first use, so that `import fastfib` and
    # `fastfib.fib(n)` do not load pika.
    if name == "FibonacciRpcClient":
        from .client import FibonacciRpcClient

        return FibonacciRpcClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def kernel_info() -> str:
    """One line naming the kernel, the gmpy2 and GMP it runs with, and GMP's code for this CPU."""
    import gmpy2

    return (
        f"fastfib {__version__} compiled kernel; gmpy2 {gmpy2.version()} "
        f"({gmpy2.mp_version()}); linked GMP {gmp_library_version()}; "
        f"GMP code: {_gmp_dispatch.status()}"
    )


__all__ = [
    "MAX_N",
    "TABLE_MAX_N",
    "fib",
    "fib_encoded",
    "FibonacciRpcClient",
    "encode",
    "kernel_info",
    "threads_min_n",
    "FastFibError",
    "FibRangeError",
    "RpcError",
    "RemoteError",
    "InvalidArgument",
    "OutOfRange",
    "UnsupportedFormat",
    "InternalServerError",
    "RpcTimeout",
    "Unroutable",
    "ConnectionLost",
    "ProtocolError",
]
