"""Prints, after the kernel benchmarks, the median ratios that issues 2 and 8 name as targets."""

from __future__ import annotations

import json
import os

TARGETS = [
    # (label, numerator impl, denominator impl, n values, bound)
    ("fastfib / gmpy2 (n <= 93: table path)", "fastfib", "gmpy2", [25, 30, 93], 1.5),
    ("fastfib / gmpy2 (n = 1000)", "fastfib", "gmpy2", [1000], 2.5),
    ("fastfib / gmpy2 (n >= 1e5)", "fastfib", "gmpy2", [10**5, 10**6, 10**7], 1.05),
    ("fastfib / pure-doubling (n = 1e6), must be <= 1/25", "fastfib", "pure-doubling", [10**6], 1 / 25),
    # Issue 8: two threads.
    ("fib(n, threads=2) / gmpy2 (n >= 1e6)", "fastfib-t2", "gmpy2", [10**6, 10**7], 0.75),
    ("fib(n, threads=2) / fib(n, threads=1), every n", "fastfib-t2", "fastfib-t1", None, 1.05),
]


def _medians(session) -> dict[tuple[str, int], float]:
    bs = getattr(session.config, "_benchmarksession", None)
    out = {}
    for b in getattr(bs, "benchmarks", []) or []:
        info = b.extra_info
        if "impl" in info and b.stats is not None and b.stats.rounds:
            out[(info["impl"], info["n"])] = b.stats.median
    return out


# Issue 8's targets again, from bench/test_kernel.py::test_threads_interleaved.
INTERLEAVED_TARGETS = [
    ("interleaved: threads=2 / gmpy2 (n >= 1e6)", "t2/gmpy2", lambda n: n >= 10**6, 0.75),
    ("interleaved: threads=2 / threads=1, every n", "t2/t1", lambda n: True, 1.05),
    # Issue 2's targets, interleaved too (the block-by-block rows below drift with the machine's load).
    ("interleaved: threads=1 / gmpy2 (n <= 93)", "t1/gmpy2", lambda n: n <= 93, 1.5),
    ("interleaved: threads=1 / gmpy2 (n = 1000)", "t1/gmpy2", lambda n: n == 1000, 2.5),
    ("interleaved: threads=1 / gmpy2 (n >= 1e5)", "t1/gmpy2", lambda n: n >= 10**5, 1.05),
]


def _interleaved(session) -> dict[int, dict]:
    bs = getattr(session.config, "_benchmarksession", None)
    return {
        b.extra_info["n"]: b.extra_info["interleaved"]
        for b in getattr(bs, "benchmarks", []) or []
        if "interleaved" in b.extra_info
    }


def pytest_sessionfinish(session, exitstatus):
    med = _medians(session)
    inter = _interleaved(session)
    if not med and not inter:
        return
    rows = []
    for label, key, wanted, bound in INTERLEAVED_TARGETS:
        for n in sorted(inter):
            if wanted(n):
                r = inter[n]
                rows.append(
                    {
                        "target": label,
                        "n": n,
                        "ratio": r[key],
                        "bound": bound,
                        "met": r[key] <= bound,
                        "rounds": r["rounds"],
                        "medians_s": r["median_s"],
                        "other_cpu": r.get("other_cpu"),
                    }
                )
    for label, num, den, ns, bound in TARGETS:
        if ns is None:  # every n measured for both
            ns = sorted(n for impl, n in med if impl == num)
        for n in ns:
            if (num, n) in med and (den, n) in med:
                ratio = med[(num, n)] / med[(den, n)]
                rows.append(
                    {
                        "target": label,
                        "n": n,
                        "numerator_median_s": med[(num, n)],
                        "denominator_median_s": med[(den, n)],
                        "ratio": ratio,
                        "bound": bound,
                        "met": ratio <= bound,
                    }
                )
    if not rows:
        return
    lines = ["", "Kernel median ratios (one run, side by side):"]
    lines.append(f"{'target':54} {'n':>9} {'ratio':>8} {'bound':>7}  met")
    for r in rows:
        lines.append(
            f"{r['target']:54} {r['n']:>9} {r['ratio']:>8.3f} {r['bound']:>7.3f}  {'yes' if r['met'] else 'NO'}"
        )
    if inter:
        lines.append(
            "(interleaved rows: medians of per-round ratios, fib(n, threads=1|2) and gmpy2.fib called in turn)"
        )
        busy = ", ".join(f"n={n}: {r.get('other_cpu')}" for n, r in sorted(inter.items()))
        lines.append(f"(cores other processes kept busy during each interleaved run: {busy})")
    text = "\n".join(lines)
    print(text)
    out = os.environ.get("FASTFIB_KERNEL_RATIOS")
    if out:
        with open(out, "w") as fh:
            json.dump(rows, fh, indent=2)
