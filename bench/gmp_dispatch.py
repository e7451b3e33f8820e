"""What fastfib.gmp_dispatch is worth on this machine: GMP's shipped routines against the switched ones.

    python -m bench.gmp_dispatch [--repeats 200] [--seed S]

In one process, each repeat draws a fresh n in [10^5, 10^6] and times
``gmpy2.fib(n)`` and ``fastfib.fib_encoded(n, "binary")`` with GMP's shipped
routines and with the switched ones, the four in a shuffled order; then a
few rounds at 10^7 the same way. It prints the medians of the per-repeat
ratios switched / shipped. Where fastfib.gmp_dispatch switched nothing (GMP
chose well for this CPU, or the checks did not hold) it says so.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import gmpy2

import fastfib
from fastfib import gmp_dispatch


def _time(f, n: int) -> float:
    t0 = time.perf_counter()
    f(n)
    return time.perf_counter() - t0


def measure(ns: list[int], seed: int) -> dict:
    calls = {"gmpy2": gmpy2.fib, "fastfib": lambda n: fastfib.fib_encoded(n, "binary")}
    rng = random.Random(seed)
    times: dict[tuple[str, bool], list[float]] = {(k, on): [] for k in calls for on in (False, True)}
    try:
        for n in ns:
            order = list(times)
            rng.shuffle(order)
            for k, on in order:
                gmp_dispatch.use_switched(on)
                times[(k, on)].append(_time(calls[k], n))
    finally:
        gmp_dispatch.use_switched(True)
    out = {}
    for k in calls:
        ratios = [b / a for a, b in zip(times[(k, False)], times[(k, True)], strict=True)]
        out[k] = {"switched_vs_shipped": statistics.median(ratios),
                  "median_ms": {"shipped": statistics.median(times[(k, False)]) * 1e3,
                                "switched": statistics.median(times[(k, True)]) * 1e3}}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gmp_dispatch", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=200, help="random n in [10^5, 10^6]")
    p.add_argument("--big-rounds", type=int, default=7, help="rounds at n = 10^7")
    p.add_argument("--seed", type=int, default=20261201)
    args = p.parse_args(argv)
    gmp_dispatch.apply()
    print(fastfib.kernel_info())
    if not gmp_dispatch.use_switched(True):
        print("nothing was switched on this machine: nothing to compare")
        return 0
    rng = random.Random(args.seed)
    for label, ns in (("n in [10^5, 10^6]", [rng.randint(10**5, 10**6) for _ in range(args.repeats)]),
                      ("n = 10^7", [10**7] * args.big_rounds)):
        r = measure(ns, args.seed)
        for k, v in r.items():
            print(f"{label}, {k}: switched / shipped {v['switched_vs_shipped']:.3f} (medians "
                  f"{v['median_ms']['switched']:.2f} ms against {v['median_ms']['shipped']:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
