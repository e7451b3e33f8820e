"""Prints, after the kernel benchmarks, the median ratios that issue 2's targets name."""

from __future__ import annotations

import json
import os

TARGETS = [
    # (label, numerator impl, denominator impl, n values, bound)
    ("fastfib / gmpy2 (n <= 93: table path)", "fastfib", "gmpy2", [25, 30, 93], 1.5),
    ("fastfib / gmpy2 (n = 1000)", "fastfib", "gmpy2", [1000], 2.5),
    ("fastfib / gmpy2 (n >= 1e5)", "fastfib", "gmpy2", [10**5, 10**6, 10**7], 1.05),
    ("fastfib / pure-doubling (n = 1e6), must be <= 1/25", "fastfib", "pure-doubling", [10**6], 1 / 25),
]


def _medians(session) -> dict[tuple[str, int], float]:
    bs = getattr(session.config, "_benchmarksession", None)
    out = {}
    for b in getattr(bs, "benchmarks", []) or []:
        info = b.extra_info
        if "impl" in info and b.stats is not None and b.stats.rounds:
            out[(info["impl"], info["n"])] = b.stats.median
    return out


def pytest_sessionfinish(session, exitstatus):
    med = _medians(session)
    if not med:
        return
    rows = []
    for label, num, den, ns, bound in TARGETS:
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
        lines.append(f"{r['target']:54} {r['n']:>9} {r['ratio']:>8.3f} {r['bound']:>7.3f}  {'yes' if r['met'] else 'NO'}")
    text = "\n".join(lines)
    print(text)
    out = os.environ.get("FASTFIB_KERNEL_RATIOS")
    if out:
        with open(out, "w") as fh:
            json.dump(rows, fh, indent=2)
