"""The ``fastfib`` command line: ``fastfib serve``, ``fastfib call`` and friends.

Each subcommand parses its arguments here and hands them to the module that
does the job (:mod:`fastfib.supervisor` for ``serve``, :mod:`fastfib.client`
for ``call``); this module holds no service logic.
"""

from __future__ import annotations

import argparse
import os
import sys

# Exit codes of `fastfib call` (issue 4); argparse itself exits 2 on bad arguments.
from .exitcodes import EXIT_OK, EXIT_REMOTE_ERROR, EXIT_TIMEOUT, EXIT_USAGE  # noqa: F401 - part of the CLI's API


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastfib", description="Fibonacci RPC over RabbitMQ.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="print a few Fibonacci numbers from the compiled kernel")
    demo.set_defaults(func=_demo)

    # --- serve: owned by the server pool (fastfib.supervisor) -------------------------
    serve = sub.add_parser("serve", help="run the RPC server pool")
    _add_serve_arguments(serve)
    serve.set_defaults(func=_serve, parser=serve)

    # --- health: owned by operations (fastfib.health) ---------------------------------
    health = sub.add_parser("health", help="check that a pool is connected and consuming (exit 0 if healthy)")
    _add_health_arguments(health)
    health.set_defaults(func=_health, parser=health)

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

    try:
        print(kernel_info())
        for n in (0, 1, 2, 10, 20, 30, 93, 94, 100, 1000):
            value = str(fib(n))
            shown = value if len(value) <= 60 else f"{value[:25]}...{value[-25:]} ({len(value)} digits)"
            print(f"F({n}) = {shown}", flush=True)
    except BrokenPipeError:
        # `fastfib demo | head`: the reader left; Python would print a traceback at exit while flushing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def _add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    from .config import add_serve_arguments

    serve.description = (
        "Run the RPC server pool in the foreground: a supervisor and N worker processes, each with its own "
        "broker connection (plus a Direct Reply-to probe connection on brokers before 3.12.0), answering "
        "protocol v1 requests (docs/protocol.md) on the queue. Logs to stderr; "
        "logs 'all N workers consuming' once ready. SIGTERM or SIGINT stops it gracefully (exit 0). "
        "Exit 2: a bad setting. Exit 77: the broker refused the credentials or a permission. "
        "Exit 78: the broker refused the queue declaration (e.g. RabbitMQ 4.3 and a transient queue)."
    )
    serve.epilog = (
        "Every option can also be set with the environment variable shown (an empty one counts as unset); a flag "
        "wins over the environment, which wins over the default. See docs/server.md and docs/deploy.md."
    )
    add_serve_arguments(serve)


def _serve(args: argparse.Namespace) -> int:
    from .config import ConfigError, serve_settings

    try:
        settings = serve_settings(args)
        if settings.metrics_port is not None:
            from .metrics import MetricsUnavailable, require_prometheus

            try:
                require_prometheus()
            except MetricsUnavailable as exc:
                raise ConfigError(str(exc)) from None
    except ConfigError as exc:
        args.parser.error(str(exc))  # usage and message on stderr, exit 2
    from .supervisor import serve

    return serve(settings.worker, settings.workers, metrics_port=settings.metrics_port,
                 metrics_host=settings.metrics_host)


def _add_health_arguments(health: argparse.ArgumentParser) -> None:
    from .health import add_health_arguments

    add_health_arguments(health)


def _health(args: argparse.Namespace) -> int:
    from .health import run

    return run(args)


def _add_call_arguments(call: argparse.ArgumentParser) -> None:
    from .protocol import DEFAULT_QUEUE, DEFAULT_TIMEOUT, DEFAULT_URL

    call.add_argument("n", nargs="+", type=_call_n, metavar="N", help="non-negative integers")
    call.add_argument(
        "--url", default=argparse.SUPPRESS,
        help="broker URL, or several (the nodes of a cluster) separated by spaces or commas: the client fails "
             "over to the next. Default: $FASTFIB_URL, else " + DEFAULT_URL.replace("%", "%%"),
    )
    call.add_argument("--queue", default=argparse.SUPPRESS,
                      help=f"the service queue. Default: $FASTFIB_QUEUE, else {DEFAULT_QUEUE}")
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

    from .client import FibonacciRpcClient
    from .errors import ConnectionLost, ProtocolError, RemoteError, RpcTimeout, Unroutable
    from .protocol import DEFAULT_QUEUE

    url = getattr(args, "url", None)  # None: the client reads $FASTFIB_URL
    queue = getattr(args, "queue", None) or os.environ.get("FASTFIB_QUEUE", "").strip() or DEFAULT_QUEUE
    try:
        client = FibonacciRpcClient(url, queue, timeout=args.timeout, format=args.format)
    except ValueError as exc:  # a URL list that does not parse
        print(f"fastfib call: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConnectionLost as exc:
        print(f"fastfib call: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    try:
        with client:
            if client.consumer_count() == 0:
                # Said at once, but the call still waits: a server may be starting.
                print(f"fastfib call: warning: queue {queue!r} has no consumer (is a server running?); "
                      f"waiting up to {args.timeout:g} s", file=sys.stderr, flush=True)
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
