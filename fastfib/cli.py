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
    serve.set_defaults(func=_serve)

    # --- call: owned by the client (fastfib.client) -------------------------------------
    call = sub.add_parser("call", help="call the service and print F(n), one per line")
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


def _serve(args: argparse.Namespace) -> int:
    raise SystemExit("fastfib serve: not implemented yet")


def _call(args: argparse.Namespace) -> int:
    raise SystemExit("fastfib call: not implemented yet")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
