"""The report: ``report.json`` (everything), ``report.md`` (for people), a rich table (for the terminal).

``python -m bench report DIR`` rebuilds ``report.md`` and the plots from
``DIR/report.json``, so the presentation can change without measuring again.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import sys
from pathlib import Path

from . import harness
from .common import AIO_BASELINE_ROW, AIO_ROW, CLIENT_BASELINE_ROW, CLIENT_ROW, grouped_rows, median
from .harness import AIO_CALLS, AIO_INFLIGHT

SCHEMA = 1


# --- targets -------------------------------------------------------------------------------


def _row(rows: dict, server: str, cell: str) -> dict | None:
    r = rows.get(f"{server}|{cell}")
    return r if r is not None and r.get("status") == "ok" else None


def _metric(row: dict, metric: str):
    if metric == "throughput":
        return row["throughput_rps"]
    if metric == "client_cpu":
        return row["cpu"].get("side_us_per_reply")
    return (row.get("latency_us") or {}).get("p50")


def _run_metric(run: dict, metric: str):
    if metric == "throughput":
        return run["throughput_rps"]
    if metric == "client_cpu":
        return run["cpu"].get("side_us_per_reply")
    return (run.get("latency_us") or {}).get("p50")


COMPUTE = "distinct/binary/pipe"
AIO_CELL = "n=20/decimal/pipe/aio"
COMPUTE_WORDS = "compute-bound load (distinct n in [10^5, 10^6], binary, window 8, fresh n in every repeat)"


def _server_specs(servers: list[dict]) -> list[tuple]:
    """The targets read from the server rows: (key, group, words, numerator, denominator, metric, op, threshold)."""
    pools = sorted((s for s in servers if s["kind"] == "fastfib" and s["cache"]), key=lambda s: s["workers"])
    if not pools:  # still list the targets, as not measured
        pools = [{"key": "fastfib-w2", "workers": 2}]
    specs = []
    for p in pools:
        k, w = p["key"], p["workers"]
        pool = f"fastfib with {w} worker{'s' if w > 1 else ''}"
        specs += [
            (f"n20-naive-w{w}", "transport", f"n=20 decimal, window 32: {pool} serves at least 5× the replies/s of the tutorial's server",
             (k, "n=20/decimal/pipe"), ("naive", "n=20/decimal/pipe"), "throughput", ">=", 5.0),
            (f"n20-gmpy2-w{w}", "transport", f"n=20 decimal, window 32: {pool} serves at least as many replies/s as the gmpy2 single-process server",
             (k, "n=20/decimal/pipe"), ("gmpy2", "n=20/decimal/pipe"), "throughput", ">=", 1.0),
            (f"n20-echo-w{w}", "transport", f"n=20 decimal, window 32: {pool} serves at least 0.9× the replies/s of the echo server (the transport limit)",
             (k, "n=20/decimal/pipe"), ("echo", "n=20/decimal/pipe"), "throughput", ">=", 0.9),
            (f"n20-seq-w{w}", "transport", f"n=20 decimal, one request at a time: {pool} has a median round trip at most 1.1× the echo server's",
             (k, "n=20/decimal/seq"), ("echo", "n=20/decimal/seq"), "p50", "<=", 1.1),
        ]
    echo_n = {s["workers"]: s["key"] for s in servers if s["kind"] == "echo" and s["workers"] > 1}
    for p in pools:
        if p["workers"] in echo_n:
            specs.append((f"n20-echo-p{p['workers']}", "transport",
                          f"n=20 decimal, window 32: fastfib with {p['workers']} workers serves at least 0.9× the replies/s of "
                          f"{p['workers']} echo processes (stricter than the transport limit above)",
                          (p["key"], "n=20/decimal/pipe"), (echo_n[p["workers"]], "n=20/decimal/pipe"), "throughput", ">=", 0.9))
    specs += [
        ("compute-w1", "compute", f"{COMPUTE_WORDS}: 1 fastfib worker serves at least 1.1× the replies/s of one plain gmpy2 process",
         ("fastfib-w1", COMPUTE), ("gmpy2", COMPUTE), "throughput", ">=", 1.1),
        ("compute-w2", "compute", f"{COMPUTE_WORDS}: 2 fastfib workers serve at least 1.3× the replies/s of one plain gmpy2 process",
         ("fastfib-w2", COMPUTE), ("gmpy2", COMPUTE), "throughput", ">=", 1.3),
        ("compute-w2-p2", "compute", f"{COMPUTE_WORDS}: 2 fastfib workers serve at least as many replies/s as two plain gmpy2 processes",
         ("fastfib-w2", COMPUTE), ("gmpy2-p2", COMPUTE), "throughput", ">=", 1.0),
    ]
    for p in pools:
        specs.append((f"hot-w{p['workers']}", "cache", f"hot n in {{5·10^5, 10^6}} decimal: fastfib with {p['workers']} worker(s) "
                      "(its cache on) serves at least 6× the replies/s of the gmpy2 single-process server",
                      (p["key"], "hot/decimal/pipe"), ("gmpy2", "hot/decimal/pipe"), "throughput", ">=", 6.0))
    specs += [
        ("client-call-p50", "client", "FibonacciRpcClient.call, one call at a time (n=20, binary): its median round trip is at most "
         "1.1× that of a bare pika loop doing the same round trip, the two interleaved",
         (CLIENT_ROW, "n=20/binary/seq/client"), (CLIENT_BASELINE_ROW, "n=20/binary/seq/client"), "p50", "<=", 1.1),
        ("client-many-cpu", "client", "FibonacciRpcClient.call_many (n=20, binary, window 32) spends at most 0.5× the client CPU per "
         "reply of a bare pika pipelined loop doing the same round trip, the two interleaved",
         (CLIENT_ROW, "n=20/binary/pipe/client"), (CLIENT_BASELINE_ROW, "n=20/binary/pipe/client"), "client_cpu", "<=", 0.5),
        ("client-many-rate", "client", "FibonacciRpcClient.call_many (n=20, binary, window 32) gets at least 1.2× the replies/s of "
         "that bare pika pipelined loop",
         (CLIENT_ROW, "n=20/binary/pipe/client"), (CLIENT_BASELINE_ROW, "n=20/binary/pipe/client"), "throughput", ">=", 1.2),
        ("aio", "client", f"AsyncFibonacciRpcClient ({AIO_CALLS} calls of n=20, {AIO_INFLIGHT} in flight) gets at least 3× the replies/s "
         "of aio-pika's RPC client written as aio-pika's documentation shows, same calls, same server",
         (AIO_ROW, AIO_CELL), (AIO_BASELINE_ROW, AIO_CELL), "throughput", ">=", 3.0),
    ]
    return specs


def _kernel_targets(kernel: dict | None) -> list[dict]:
    """The kernel's targets, from bench.kernel_ratios (already medians of per-repeat ratios)."""
    enc = (kernel or {}).get("encoding") or {}
    threads = (kernel or {}).get("threads") or []
    worst = max(threads, key=lambda t: t["t2_vs_t1"]) if threads else None
    big = next((t for t in threads if "t2_vs_gmpy2" in t), None)
    specs = [
        ("encode-binary", "fib_encoded(n, \"binary\") takes at most 1.03× the time of gmpy2.fib(n), median over random n in [10^5, 10^6]",
         enc.get("binary_vs_gmpy2_fib"), "<=", 1.03, None),
        ("encode-decimal", "fib_encoded(n, \"decimal\") takes at most 1.0× the time of gmpy2.fib(n).digits(), median over random n in [10^5, 10^6]",
         enc.get("decimal_vs_gmpy2_digits"), "<=", 1.0, None),
        ("threads-never-slower", "fib(n, threads=2) is never slower than threads=1: at every n measured (10^4.5 to 10^7 and the "
         "calibrated threshold) the median ratio is at most 1.02 (two identical runs differ by up to ~2% here: see the control)",
         worst["t2_vs_t1"] if worst else None, "<=", 1.02,
         None if not worst else f"worst at n={worst['n']}; control {worst['control_t1_vs_t1']:.3f}; "
         f"calibrated threshold {_threshold_n(kernel.get('threads_min_n'))}"),
        ("threads-10M", "fib(10^7, threads=2) takes at most 0.75× the time of gmpy2.fib(10^7)",
         big["t2_vs_gmpy2"] if big else None, "<=", 0.75, None),
    ]
    out = []
    for key, words, ratio, op, threshold, detail in specs:
        t = {"key": key, "group": "kernel", "description": words, "metric": "time", "op": op, "threshold": threshold,
             "numerator": "bench.kernel_ratios", "denominator": None}
        if ratio is None:
            t.update(status="not_measured", ratio=None, passed=None,
                     reason="not measured: the kernel ratios were not run (--servers without kernel)")
        else:
            t.update(status="measured", ratio=ratio, ratio_of_medians=None, ratios_by_repeat=[],
                     passed=ratio <= threshold, detail=detail)
        out.append(t)
    return out


def compute_targets(rows_list: list[dict], servers: list[dict], fastfib_status: dict, kernel: dict | None = None) -> list[dict]:
    rows = {r["id"]: r for r in rows_list}
    targets = []
    for key, group, desc, (num_srv, num_cell), (den_srv, den_cell), metric, op, threshold in _server_specs(servers):
        t = {
            "key": key, "group": group, "description": desc, "metric": metric, "op": op, "threshold": threshold,
            "numerator": f"{num_srv}|{num_cell}", "denominator": f"{den_srv}|{den_cell}",
        }
        a, b = _row(rows, num_srv, num_cell), _row(rows, den_srv, den_cell)
        if a is None or b is None:
            missing = [x for x, r in ((f"{num_srv}|{num_cell}", a), (f"{den_srv}|{den_cell}", b)) if r is None]
            reason = "not measured: " + ", ".join(missing) + " not run"
            if num_srv == CLIENT_ROW and not fastfib_status.get("client"):
                reason = f"not measured: {fastfib_status.get('client_reason')}"
            elif num_srv.startswith("fastfib") and not fastfib_status.get("serve"):
                reason = f"not measured: {fastfib_status.get('serve_reason')}"
            t.update(status="not_measured", ratio=None, passed=None, reason=reason)
            targets.append(t)
            continue
        va, vb = _metric(a, metric), _metric(b, metric)
        of_medians = va / vb if va is not None and vb else None
        # the same comparison in each repeat (the servers ran side by side, repeat by repeat;
        # a client cell's two sides ran interleaved): the target is the median of these
        by_rep = {}
        for run in a["runs"]:
            by_rep.setdefault(run["repeat"], [None, None])[0] = _run_metric(run, metric)
        for run in b["runs"]:
            by_rep.setdefault(run["repeat"], [None, None])[1] = _run_metric(run, metric)
        per_repeat = [x / y for x, y in by_rep.values() if x is not None and y]
        ratio = median(per_repeat) if per_repeat else of_medians
        passed = None if ratio is None else (ratio >= threshold if op == ">=" else ratio <= threshold)
        t.update(status="measured", numerator_value=va, denominator_value=vb, ratio=ratio,
                 ratio_of_medians=of_medians, ratios_by_repeat=per_repeat, passed=passed)
        targets.append(t)
    return targets + _kernel_targets(kernel)


# --- report --------------------------------------------------------------------------------


def build_report(raw: dict) -> dict:
    rows = harness.aggregate(raw)
    kernel = raw.get("kernel")
    targets = compute_targets(rows, raw["servers"], raw["fastfib"], kernel)
    notes = list(raw["notes"])
    if raw["failure"]:
        notes.insert(0, f"RUN FAILED: {raw['failure']}")
    return {
        "schema": SCHEMA,
        "status": "failed" if raw["failure"] else "ok",
        "failure": raw["failure"],
        "created": _dt.datetime.fromtimestamp(raw["started"], _dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": raw["duration_s"],
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "run_id": raw["run_id"],
        "settings": raw["settings"],
        "environment": raw["environment"],
        "fastfib": raw["fastfib"],
        "servers": raw["servers"],
        "targets": targets,
        "kernel": kernel,
        "rows": rows,
        "notes": notes,
        "plots": [],
    }


def write_json(report: dict, out: Path) -> Path:
    path = out / "report.json"
    text = json.dumps(report, indent=1)
    # one line per CDF point and per process is a long file for nothing: keep those short lists on one line
    text = re.sub(r"\[\s+([-0-9.e]+),\s+([-0-9.e]+)\s+\]", r"[\1, \2]", text)
    path.write_text(text + "\n")
    return path


def fmt_us(us) -> str:
    if us is None:
        return "–"
    if us >= 1_000_000:
        return f"{us / 1e6:.2f} s"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.0f} µs"


def fmt_rate(r) -> str:
    if r is None:
        return "–"
    if r >= 100:
        return f"{r:,.0f}"
    if r >= 1:
        return f"{r:.1f}"
    return f"{r:.3f}"


def fmt_ratio(t: dict) -> str:
    """The ratio with two decimals, or more where two would show it equal to its threshold (1.0991
    against >= 1.1 reads 1.099×, not a failing 1.10×)."""
    if t["ratio"] is None:
        return "–"
    ratio, threshold, digits = t["ratio"], t.get("threshold"), 2
    while threshold is not None and ratio != threshold and round(ratio, digits) == threshold and digits < 6:
        digits += 1
    return f"{ratio:.{digits}f}×"


def verdict(t: dict, quick: bool = False) -> str:
    if t["status"] != "measured":
        return "not measured"
    return ("PASS" if t["passed"] else "FAIL") + (" (indicative: --quick)" if quick else "")


def summary_lines(report: dict) -> list[str]:
    """The verdict in words: how many targets pass, which fail, which were not measured."""
    ts = report["targets"]
    quick = report["settings"].get("quick")
    passed = [t for t in ts if t["status"] == "measured" and t["passed"]]
    failed = [t for t in ts if t["status"] == "measured" and not t["passed"]]
    missing = [t for t in ts if t["status"] != "measured"]
    lines = [f"**{len(passed)} of {len(ts)} targets pass, {len(failed)} fail, {len(missing)} were not measured.**"]
    if quick:
        lines += ["", "This was a `--quick` run (short windows, one repeat): every verdict below is **indicative** only; "
                  "a full run (`python -m bench`) decides."]
    if failed:
        lines += ["", "Failing:"] + [f"- {t['description']}: measured {fmt_ratio(t)}, needs {t['op']} {t['threshold']}×" for t in failed]
    if missing:
        lines += ["", "Not measured:"] + [f"- {t['description']}: {(t.get('reason') or '').removeprefix('not measured: ')}"
                                          for t in missing]
    return lines


def _never(t: int) -> bool:
    """Whether a calibrated threshold is fastfib._kernel.THREADS_NEVER (two threads won on no rung)."""
    return t >= 2**63


def _threshold_n(t: int | None) -> str:
    if t is None:
        return "not recorded"
    return "none (no win)" if _never(t) else str(t)


def _threshold_words(cal: dict) -> str:
    t = cal.get("threads_min_n")
    if t is None:
        return "no calibration recorded"
    if _never(t):
        return ("the calibration found no size where two threads won by 10 %, so threads=2 started on one "
                "thread at every size")
    return f"calibrated threshold n ≥ {t}"


def _recalibrations(end: dict | None) -> str:
    """What the kernel measured again during the rounds (a "never" is measured again 5 s later, and so on)."""
    if not end or end.get("runs", 1) <= 1:
        return ""
    return f"; measured again {end['runs'] - 1} time(s) during the rounds, the last time: {_threshold_words(end)}"


def kernel_lines(kernel: dict | None) -> list[str]:
    """The kernel's own figures behind its targets."""
    if not kernel:
        return []
    enc = kernel["encoding"]
    cal = kernel.get("threads_calibration") or {}
    lines = ["", "### Kernel ratios (bench.kernel_ratios)", "",
             f"Encoding: {enc['repeats']} random n in [10^5, 10^6], each timed once per side in a shuffled order; "
             f"median per-repeat ratio binary / gmpy2.fib(n) {enc['binary_vs_gmpy2_fib']:.3f} "
             f"(quartiles {', '.join(f'{q:.3f}' for q in enc['quartiles']['binary_vs_gmpy2_fib'])}), "
             f"decimal / gmpy2.fib(n).digits() {enc['decimal_vs_gmpy2_digits']:.3f} "
             f"(quartiles {', '.join(f'{q:.3f}' for q in enc['quartiles']['decimal_vs_gmpy2_digits'])}).", "",
             f"Two threads: {_threshold_words(cal)} (calibration took {cal.get('ms', 0):.0f} ms)"
             f"{_recalibrations(kernel.get('threads_calibration_end'))}; after that, the calls' own timings "
             f"chose one or two threads size by size (docs/kernel.md). Cores kept busy by other processes: "
             f"{kernel.get('busy_cpus_before')} before, {kernel.get('busy_cpus_after')} after.", "",
             "| n | rounds | threads=2 / threads=1 | control: threads=1 / threads=1 | threads=2 / gmpy2.fib |",
             "|---|---|---|---|---|"]
    for t in kernel["threads"]:
        g = f"{t['t2_vs_gmpy2']:.3f}" if "t2_vs_gmpy2" in t else ""
        lines.append(f"| {t['n']} | {t['rounds']} | {t['t2_vs_t1']:.3f} | {t['control_t1_vs_t1']:.3f} | {g} |")
    return lines


def write_markdown(report: dict, out: Path) -> Path:
    env = report["environment"]
    m, s = env["machine"], report["settings"]
    quick = s.get("quick")
    lines = [
        "# fastfib benchmark report",
        "",
        f"Run `{report['run_id']}` on {report['created']}, {report['duration_s']:.0f} s, "
        f"{'**quick**' if s['quick'] else 'full'} grid: `{report['command']}`. "
        "Methodology and what each row means: `docs/benchmarks.md` in the repository.",
        "",
    ]
    if report["status"] != "ok":
        lines += [f"> **RUN FAILED**: {report['failure']}", ""]
    lines += [
        "## Machine and versions",
        "",
        "| | |",
        "|---|---|",
        f"| machine | {m['cpu']}, {m['cpu_count']} logical CPUs, {m['memory_gib']} GiB; {m['platform']} |",
        f"| load average at start | {', '.join(f'{x:.2f}' for x in (m['load_average_at_start'] or []))} |",
        f"| Python | {env['python']['implementation']} {env['python']['version']} |",
        f"| pika / gmpy2 / GMP | {env['packages']['pika']} / {env['packages']['gmpy2']} / {env['gmp']} |",
        f"| fastfib | {env['fastfib'].get('kernel') or env['fastfib'].get('error')} |",
        *([f"| GMP code | fastfib's processes: {env['fastfib']['gmp_code']}; the plain gmpy2 and echo servers: "
           "GMP as shipped (they do not import fastfib; fastfib.gmp_dispatch) |"] if env["fastfib"].get("gmp_code") else []),
        f"| RabbitMQ | {_rabbit(env)} |",
        f"| git commit | `{env['git']['commit']}`{' (uncommitted changes)' if env['git']['dirty'] else ''} |",
        f"| settings | duration {s['duration']} s, warm-up {s['warmup']} s, repeats {s['repeat']} (target cells), "
        f"{s['clients']} client(s) × window {s['window']}, fastfib workers {', '.join(map(str, s['workers']))} |",
        "",
        "## Targets",
        "",
        *summary_lines(report),
        "",
        "How to read this: each target compares fastfib with a peer measured side by side in the same run, as the "
        "median of per-repeat ratios (servers: each repeat ran every server in turn; a client cell: the two clients "
        "interleaved in one process; the kernel: each call timed against its peer in a shuffled order, over many "
        "random n). `by repeat` lists the per-repeat ratios. The machine may have been shared with other work: "
        "ratios, not absolute figures, are what this report compares.",
        "",
        "Exit status: `python -m bench` exits 0 when the run completed, **whether or not the targets pass**: a "
        "failing target is reported here and in the terminal table, not in the exit status. It exits 1 when the run "
        "itself failed (a wrong or lost reply, a server that did not start, an interrupt) and 2 for bad arguments.",
        "",
        "| group | target | measured | threshold | by repeat | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for t in report["targets"]:
        by_rep = ", ".join(fmt_ratio({"ratio": x, "threshold": t["threshold"]})[:-1]
                           for x in t.get("ratios_by_repeat") or [])
        if t.get("detail"):
            by_rep = (by_rep + "; " if by_rep else "") + t["detail"]
        if t["status"] != "measured":
            lines.append(f"| {t['group']} | {t['description']} | {t.get('reason')} | {t['op']} {t['threshold']}× | | not measured |")
        else:
            lines.append(f"| {t['group']} | {t['description']} | {fmt_ratio(t)} | {t['op']} {t['threshold']}× | {by_rep} | "
                         f"**{verdict(t, quick)}** |")
    lines += kernel_lines(report.get("kernel"))
    lines += [
        "",
        "## Results",
        "",
        "Throughput in replies per second; latency is the round trip as the load client sees it; "
        "CPU is per reply, the server's processes (all of them) and the load processes'. Medians over the repeats.",
        "",
    ]
    for label, rows in grouped_rows(report["rows"]):
        lines += [f"### {label}", "", "| server | clients × window | replies/s | p50 | p90 | p99 | p99.9 | server CPU/reply | load CPU/reply | replies | repeats |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {r['server_label']} | | *{r['reason']}* | | | | | | | | |")
                continue
            lat = r["latency_us"] or {}
            cpu = r["cpu"]
            lines.append(
                f"| {r['server_label']} | {r['clients']} × {r['window']} | {fmt_rate(r['throughput_rps'])} | "
                f"{fmt_us(lat.get('p50'))} | {fmt_us(lat.get('p90'))} | {fmt_us(lat.get('p99'))} | {fmt_us(lat.get('p99.9'))} | "
                f"{fmt_us(cpu['server_us_per_reply'])} | {fmt_us(cpu['load_us_per_reply'])} | {r['count']} | {r['repeats']} |"
            )
        notes = sorted({f"{r['server_label']}: {n}" for r in rows if r["status"] == "ok" for n in r.get("notes", [])})
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        lines.append("")
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    lines += ["## Servers", "", "| server | command | ready after |", "|---|---|---|"]
    for srv in report["servers"]:
        ready = f"{srv['startup_s']:.1f} s" if srv.get("startup_s") is not None else "–"
        lines.append(f"| {srv['label']} | `{srv['command']}` | {ready} |")
    lines.append("")
    if report["plots"]:
        lines += ["## Plots", ""]
        for p in report["plots"]:
            lines += [f"![{p}]({p})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _rabbit(env: dict) -> str:
    rmq = env["rabbitmq"]
    sp = rmq.get("server_properties") or {}
    version = sp.get("version") or rmq.get("rabbitmqctl_version") or "?"
    platform_ = sp.get("platform")
    return f"{sp.get('product', 'RabbitMQ')} {version}" + (f" on {platform_}" if platform_ else "")


def print_tables(report: dict, console) -> None:
    from rich.table import Table

    table = Table(title="fastfib benchmark", show_lines=False)
    for col, just in (("workload", "left"), ("server", "left"), ("c×w", "right"), ("replies/s", "right"),
                      ("p50", "right"), ("p99", "right"), ("p99.9", "right"), ("srv CPU/reply", "right")):
        table.add_column(col, justify=just)
    for label, rows in grouped_rows(report["rows"]):
        first = True
        for r in rows:
            if r["status"] != "ok":
                continue
            lat = r["latency_us"] or {}
            table.add_row(label if first else "", r["server_label"], f"{r['clients']}×{r['window']}", fmt_rate(r["throughput_rps"]),
                          fmt_us(lat.get("p50")), fmt_us(lat.get("p99")), fmt_us(lat.get("p99.9")),
                          fmt_us(r["cpu"]["server_us_per_reply"]))
            first = False
        if not first:
            table.add_section()
    console.print(table)

    quick = report["settings"].get("quick")
    tt = Table(title="targets" + (" (--quick: verdicts are indicative)" if quick else ""))
    for col in ("group", "target", "ratio", "threshold", "verdict"):
        tt.add_column(col)
    for t in report["targets"]:
        v = verdict(t, quick)
        style = {"PASS": "green", "FAIL": "red"}.get(v.split()[0], "yellow")
        tt.add_row(t["group"], t["description"], fmt_ratio(t) if t["status"] == "measured" else (t.get("reason") or ""),
                   f"{t['op']} {t['threshold']}×", f"[{style}]{v}[/{style}]")
    console.print(tt)
    for line in summary_lines(report)[:1]:
        console.print(line.replace("**", ""))
    console.print("exit status 0: the run completed; a failing target does not change it (see report.md)")
    for n in report["notes"]:
        console.print(f"[yellow]note:[/yellow] {n}")


def render(report: dict, out: Path, plots: bool = True) -> dict:
    """Write report.json, the plots and report.md into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out)  # first: a failure in the plots must not lose the measurements
    if plots:
        from . import plots as plots_mod

        report["plots"] = plots_mod.make_plots(report, out)
    write_json(report, out)
    write_markdown(report, out)
    return report


def rerender(out: Path, plots: bool = True) -> dict:
    """Rebuild the report from ``out/report.json``: its rows as measured, the targets by this module's rules."""
    report = json.loads((out / "report.json").read_text())
    report["targets"] = compute_targets(report["rows"], report["servers"], report["fastfib"], report.get("kernel"))
    return render(report, out, plots)
