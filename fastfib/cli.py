"""The ``fastfib`` command line: ``fastfib serve``, ``fastfib call`` and friends.

Each subcommand parses its arguments here and hands them to the module that
does the job (:mod:`fastfib.supervisor` for ``serve``, :mod:`fastfib.client`
for ``call``); this module holds no service logic.
"""

from __future__ import annotations

import argparse
import sys

# Exit codes of `fastfib call` (issue 4); argparse itself exits 2 on bad arguments.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REMOTE_ERROR = 3
EXIT_TIMEOUT = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastfib", description="Fibonacci RPC over RabbitMQ.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="print a few Fibonacci numbers from the compiled kernel")
    demo.set_defaults(func=_demo)

    # --- serve: owned by the server pool (fastfib.supervisor) -------------------------
    serve = sub.add_parser("serve", help="run the RPC server pool", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

    # --- call: owned by the client (fastfib.client) -------------------------------------
    call = sub.add_parser(
        "call",
        help="call the service and print F(n), one per line",
        description="Ask the service for F(N) of each N (pipelined over one connection) and print the "
        "values in decimal, one per line, in the order given. Nothing is printed unless every call succeeds.",
        epilog="Exit status: 0 success; 2 bad arguments; 3 the server answered with an error (or an "
        "undecodable reply); 4 no answer: timeout, unroutable request (no such queue), or the broker "
        "could not be reached.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_call_arguments(call)
    call.set_defaults(func=_call)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from . import fib, kernel_info

    print(kernel_info())
    for n in (0, 1, 2, 10, 20, 30, 93, 94, 100, 1000):
        value = str(fib(n))
        shown = value if len(value) <= 60 else f"{value[:25]}...{value[-25:]} ({len(value)} digits)"
        print(f"F({n}) = {shown}")
    return EXIT_OK


def _add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    import os

    from .cache import DEFAULT_CACHE_BYTES
    from .protocol import DEFAULT_MAX_N, DEFAULT_QUEUE, DEFAULT_URL
    from .worker import DEFAULT_INLINE_MAX_N, DEFAULT_PREFETCH

    serve.description = (
        "Run the RPC server pool in the foreground: a supervisor and N worker processes, each with its own "
        "broker connection, answering protocol v1 requests (docs/protocol.md) on the queue. Logs to stderr; "
        "logs 'all N workers consuming' once ready. SIGTERM or SIGINT stops it gracefully (exit 0). "
        "Exit 77: the broker refused the credentials or a permission."
    )
    serve.add_argument(
        "--url", action="append", metavar="URL", default=argparse.SUPPRESS,
        help="broker URL; repeat it for the nodes of a cluster (a worker that loses its node fails over to the "
             "next). Default: $FASTFIB_URL, else " + DEFAULT_URL.replace("%", "%%"),
    )
    serve.add_argument("--queue", default=DEFAULT_QUEUE, help="the service queue, declared like the tutorial's")
    serve.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1, help="worker processes")
    serve.add_argument("--prefetch", type=_positive_int, default=DEFAULT_PREFETCH,
                       help="unacknowledged requests each worker may hold (basic.qos prefetch_count)")
    serve.add_argument("--max-n", type=_non_negative_int, default=DEFAULT_MAX_N,
                       help="the largest n served; larger n get an out_of_range error")
    serve.add_argument("--cache-bytes", type=_non_negative_int, default=DEFAULT_CACHE_BYTES,
                       help="byte budget of each worker's LRU cache of large replies; 0 turns it off")
    serve.add_argument("--inline-max-n", type=_non_negative_int, default=DEFAULT_INLINE_MAX_N,
                       help="n up to this are computed on the I/O thread, larger n on the compute thread")
    serve.add_argument("--log-level", default="INFO", type=str.upper,
                       choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _serve(args: argparse.Namespace) -> int:
    import os

    from . import MAX_N
    from .protocol import DEFAULT_URL
    from .supervisor import serve
    from .worker import WorkerConfig

    if args.max_n > MAX_N:
        print(f"fastfib serve: --max-n {args.max_n} is above the kernel's limit {MAX_N}", file=sys.stderr)
        return EXIT_USAGE
    urls = tuple(getattr(args, "url", ())) or (os.environ.get("FASTFIB_URL") or DEFAULT_URL,)
    config = WorkerConfig(
        urls=urls,
        queue=args.queue,
        prefetch=args.prefetch,
        max_n=args.max_n,
        cache_bytes=args.cache_bytes,
        inline_max_n=args.inline_max_n,
        log_level=args.log_level,
    )
    try:
        import pika

        for url in urls:
            pika.URLParameters(url)
    except Exception as exc:
        print(f"fastfib serve: bad broker URL: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return serve(config, args.workers)


def _add_call_arguments(call: argparse.ArgumentParser) -> None:
    from .client import DEFAULT_TIMEOUT
    from .protocol import DEFAULT_QUEUE, DEFAULT_URL

    call.add_argument("n", nargs="+", type=_call_n, metavar="N", help="non-negative integers")
    call.add_argument(
        "--url", default=argparse.SUPPRESS,
        help="broker URL. Default: $FASTFIB_URL, else " + DEFAULT_URL.replace("%", "%%"),
    )
    call.add_argument("--queue", default=DEFAULT_QUEUE, help="the service queue")
    call.add_argument("--timeout", type=_call_timeout, default=DEFAULT_TIMEOUT,
                      help="seconds to wait for all the replies")
    call.add_argument("--format", choices=["decimal", "binary"], default="binary",
                      help="the reply encoding to ask the server for (the output is decimal either way)")


def _call_n(text: str) -> int:
    digits = text.strip()
    negative = digits.startswith("-")
    if negative:
        digits = digits[1:]
    if not (digits.isascii() and digits.isdigit()):
        raise argparse.ArgumentTypeError(f"not a decimal integer: {text!r}")
    if negative and digits.strip("0"):
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    if len(digits) > 64:
        raise argparse.ArgumentTypeError(f"more than 64 digits: {text[:20]}...")
    return int(digits)


def _call_timeout(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _call(args: argparse.Namespace) -> int:
    import os

    import gmpy2
    import pika

    from .client import FibonacciRpcClient
    from .errors import ConnectionLost, ProtocolError, RemoteError, RpcTimeout, Unroutable

    url = getattr(args, "url", None) or os.environ.get("FASTFIB_URL") or None
    if url is not None:
        try:
            pika.URLParameters(url)
        except Exception as exc:
            print(f"fastfib call: bad broker URL: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        with FibonacciRpcClient(url, args.queue, timeout=args.timeout, format=args.format) as client:
            values = client.call_many(args.n)
    except (RemoteError, ProtocolError) as exc:
        print(f"fastfib call: the server answered with an error: {exc}", file=sys.stderr)
        return EXIT_REMOTE_ERROR
    except (RpcTimeout, Unroutable, ConnectionLost) as exc:
        print(f"fastfib call: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    out = sys.stdout
    for value in values:
        out.write(gmpy2.mpz(value).digits())
        out.write("\n")
    out.flush()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
