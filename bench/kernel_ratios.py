"""The kernel's own targets, measured in one process with every side interleaved.

    python -m bench.kernel_ratios [--quick] [--seed S] [--out FILE]    one JSON document

``python -m bench`` runs it in a subprocess before the server cells (row
"kernel"); it also runs alone. Two measurements:

- **encoding**: each repeat draws a fresh random n in [10^5, 10^6] and times
  ``fib_encoded(n, "binary")``, ``gmpy2.fib(n)``, ``fib_encoded(n, "decimal")``
  and ``gmpy2.fib(n).digits()`` once each, in a shuffled order, so that a burst
  of load from other processes hits all four alike. The ratios are medians of
  the per-repeat ratios.
- **threads**: at each n of a ladder (and at the calibrated threshold), rounds
  of ``fib(n, threads=1)``, ``fib(n, threads=2)`` and a second
  ``fib(n, threads=1)`` (the control: two identical runs, whose ratio shows the
  noise) in a shuffled order; at 10^7 also ``gmpy2.fib(n)``. Medians of the
  per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import gmpy2

import fastfib
from fastfib import _kernel, gmp_dispatch

ENCODING_RANGE = (100_000, 1_000_000)
THREAD_NS = (30_000, 2**17, 300_000, 600_000, 10**6, 2 * 10**6, 4 * 10**6, 10**7)
BIG_N = 10**7


def _timed(f, n: int, batch: int) -> float:
    t0 = time.perf_counter()
    for _ in range(batch):
        f(n)
    return (time.perf_counter() - t0) / batch


def measure_encoding(repeats: int, seed: int) -> dict:
    """Per-repeat ratios of the encoded kernel to gmpy2 (see the module docstring)."""
    calls = {
        "binary": lambda n: fastfib.fib_encoded(n, "binary"),
        "gmpy2_fib": gmpy2.fib,
        "decimal": lambda n: fastfib.fib_encoded(n, "decimal"),
        "gmpy2_digits": lambda n: gmpy2.fib(n).digits(),
    }
    rng = random.Random(seed)
    times: dict[str, list[float]] = {k: [] for k in calls}
    ns = []
    for f in calls.values():  # first-call costs (imports, the allocator's first pages) out of the way
        f(ENCODING_RANGE[0])
    for _ in range(repeats):
        n = rng.randint(*ENCODING_RANGE)
        ns.append(n)
        order = list(calls)
        rng.shuffle(order)
        for k in order:
            times[k].append(_timed(calls[k], n, 1))
    binary = [a / b for a, b in zip(times["binary"], times["gmpy2_fib"], strict=True)]
    decimal = [a / b for a, b in zip(times["decimal"], times["gmpy2_digits"], strict=True)]
    return {
        "repeats": repeats,
        "n_range": list(ENCODING_RANGE),
        "binary_vs_gmpy2_fib": statistics.median(binary),
        "decimal_vs_gmpy2_digits": statistics.median(decimal),
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "quartiles": {
            "binary_vs_gmpy2_fib": statistics.quantiles(binary, n=4),
            "decimal_vs_gmpy2_digits": statistics.quantiles(decimal, n=4),
        },
    }


def measure_threads(n: int, seconds: float, seed: int, with_gmpy2: bool = False, min_rounds: int = 3) -> dict:
    """threads=2 / threads=1, and the control threads=1 / threads=1, at one n: rounds for
    ``seconds``, and at least ``min_rounds`` (a large n takes tens of ms a call)."""
    calls = {
        "t1": lambda m: fastfib.fib(m, threads=1),
        "t2": lambda m: fastfib.fib(m, threads=2),
        "t1_control": lambda m: fastfib.fib(m, threads=1),
    }
    if with_gmpy2:
        calls["gmpy2"] = gmpy2.fib
    one = _timed(calls["t1"], n, 1)
    batch = max(1, min(10_000, int(5e-4 / max(one, 1e-9))))  # a timing lasts >= ~0.5 ms
    rng = random.Random(seed + n)
    times: dict[str, list[float]] = {k: [] for k in calls}
    end = time.monotonic() + seconds
    while time.monotonic() < end or len(times["t1"]) < min_rounds:
        order = list(calls)
        rng.shuffle(order)
        for k in order:
            times[k].append(_timed(calls[k], n, batch))

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    out = {
        "n": n,
        "rounds": len(times["t1"]),
        "batch": batch,
        "t2_vs_t1": ratio("t2", "t1"),
        "control_t1_vs_t1": ratio("t1_control", "t1"),
        "median_s": {k: statistics.median(v) for k, v in times.items()},
    }
    if with_gmpy2:
        out["t2_vs_gmpy2"] = ratio("t2", "gmpy2")
    return out


def busy_cpus(seconds: float = 0.2) -> float | None:
    """Cores that other processes kept busy over a short look (Linux /proc/stat), or None."""
    def snap():
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
        return sum(f) - f[3] - f[4], sum(f)
    try:
        b0, a0 = snap()
        time.sleep(seconds)
        b1, a1 = snap()
    except (OSError, ValueError):
        return None
    return round((b1 - b0) / max(a1 - a0, 1) * (os.cpu_count() or 1), 2)


def run(quick: bool, seed: int = 20261130) -> dict:
    t0 = time.perf_counter()
    gmp_dispatch.apply()  # before any timing: gmpy2.fib and the kernel share GMP's routines here
    out = {
        "quick": quick,
        "seed": seed,
        "busy_cpus_before": busy_cpus(),
        "kernel": fastfib.kernel_info(),
        "encoding": measure_encoding(60 if quick else 300, seed),
    }
    threshold = _kernel.threads_min_n()
    out["threads_min_n"] = threshold
    out["threads_calibration"] = _kernel.threads_calibration()
    ns = sorted(set(THREAD_NS) | ({threshold} if threshold <= BIG_N else set()))
    per_n, min_rounds = (0.4, 5) if quick else (2.0, 21)
    out["threads"] = [measure_threads(n, per_n, seed, with_gmpy2=(n == BIG_N), min_rounds=min_rounds) for n in ns]
    # A "never" is measured again during the rounds (5 s later, then 10 s, ...): the state at the end.
    out["threads_calibration_end"] = _kernel.threads_calibration()
    out["threads_adaptation"] = _kernel.threads_adaptation()  # what the size-by-size choice measured
    out["busy_cpus_after"] = busy_cpus()
    out["seconds"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel_ratios", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and shorter rounds (indicative)")
    p.add_argument("--seed", type=int, default=20261130)
    p.add_argument("--out", help="write the JSON here instead of standard output")
    args = p.parse_args(argv)
    doc = json.dumps(run(args.quick, args.seed), indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(doc + "\n")
    else:
        print(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
