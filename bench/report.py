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
from .common import CLIENT_BASELINE_ROW, CLIENT_ROW, grouped_rows, median

SCHEMA = 1


# --- targets -------------------------------------------------------------------------------


def _row(rows: dict, server: str, cell: str) -> dict | None:
    r = rows.get(f"{server}|{cell}")
    return r if r is not None and r.get("status") == "ok" else None


def _metric(row: dict, metric: str):
    if metric == "throughput":
        return row["throughput_rps"]
    return (row.get("latency_us") or {}).get("p50")


def _run_metric(run: dict, metric: str):
    if metric == "throughput":
        return run["throughput_rps"]
    return (run.get("latency_us") or {}).get("p50")


def compute_targets(rows_list: list[dict], servers: list[dict], fastfib_status: dict) -> list[dict]:
    rows = {r["id"]: r for r in rows_list}
    pools = sorted((s for s in servers if s["kind"] == "fastfib" and s["cache"]), key=lambda s: s["workers"])
    if not pools:  # still list the targets, as not measured
        pools = [{"key": "fastfib-w2", "workers": 2}]
    wmax = pools[-1]["key"] if pools else None
    specs = []
    for p in pools:
        k, w = p["key"], p["workers"]
        specs += [
            ("3.1", f"n=20 decimal, window 32: fastfib w={w} vs the tutorial's server", k, "n=20/decimal/pipe", "naive", "n=20/decimal/pipe", "throughput", ">=", 5.0),
            ("3.1", f"n=20 decimal, window 32: fastfib w={w} vs the gmpy2 single-process server", k, "n=20/decimal/pipe", "gmpy2", "n=20/decimal/pipe", "throughput", ">=", 1.0),
            ("3.1", f"n=20 decimal, window 32: fastfib w={w} vs the echo server", k, "n=20/decimal/pipe", "echo", "n=20/decimal/pipe", "throughput", ">=", 0.9),
            ("3.2", f"n=20 decimal, sequential p50: fastfib w={w} / echo server", k, "n=20/decimal/seq", "echo", "n=20/decimal/seq", "p50", "<=", 1.1),
        ]
    echo_n = {s["workers"]: s["key"] for s in servers if s["kind"] == "echo" and s["workers"] > 1}
    for p in pools:
        if p["workers"] in echo_n:
            specs.append(("3.1*", f"(stricter than the issue) n=20 decimal, window 32: fastfib w={p['workers']} vs "
                          f"{p['workers']} echo processes", p["key"], "n=20/decimal/pipe", echo_n[p["workers"]], "n=20/decimal/pipe",
                          "throughput", ">=", 0.9))
    specs.append(("3.3", "distinct n in [10^5, 10^6] binary, 2 workers: fastfib vs the gmpy2 server", "fastfib-w2",
                  "distinct/binary/pipe", "gmpy2", "distinct/binary/pipe", "throughput", ">=", 1.3))
    for p in pools:
        specs.append(("3.4", f"hot n in {{5·10^5, 10^6}} decimal: fastfib w={p['workers']} (cache) vs the gmpy2 server", p["key"], "hot/decimal/pipe", "gmpy2", "hot/decimal/pipe", "throughput", ">=", 6.0))
    if wmax:
        specs += [
            ("4.1", "sequential FibonacciRpcClient.call p50 / a bare pika loop doing the same round trip, interleaved (n=20, binary)",
             CLIENT_ROW, "n=20/binary/seq/client", CLIENT_BASELINE_ROW, "n=20/binary/seq/client", "p50", "<=", 1.1),
            ("4.2", "FibonacciRpcClient.call_many (window 32) / a bare pika pipelined loop doing the same round trip, interleaved (n=20, binary)",
             CLIENT_ROW, "n=20/binary/pipe/client", CLIENT_BASELINE_ROW, "n=20/binary/pipe/client", "throughput", ">=", 0.9),
        ]
    targets = []
    for issue, desc, num_srv, num_cell, den_srv, den_cell, metric, op, threshold in specs:
        t = {
            "issue": issue, "description": desc, "metric": metric, "op": op, "threshold": threshold,
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
    return targets


# --- report --------------------------------------------------------------------------------


def build_report(raw: dict) -> dict:
    rows = harness.aggregate(raw)
    targets = compute_targets(rows, raw["servers"], raw["fastfib"])
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
    if t["ratio"] is None:
        return "–"
    return f"{t['ratio']:.2f}×"


def verdict(t: dict) -> str:
    if t["status"] != "measured":
        return "not measured"
    return "PASS" if t["passed"] else "FAIL"


def write_markdown(report: dict, out: Path) -> Path:
    env = report["environment"]
    m, s = env["machine"], report["settings"]
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
        f"| RabbitMQ | {_rabbit(env)} |",
        f"| git commit | `{env['git']['commit']}`{' (uncommitted changes)' if env['git']['dirty'] else ''} |",
        f"| settings | duration {s['duration']} s, warm-up {s['warmup']} s, repeats {s['repeat']} (target cells), "
        f"{s['clients']} client(s) × window {s['window']}, fastfib workers {', '.join(map(str, s['workers']))} |",
        "",
        "## Targets (issues 3 and 4)",
        "",
        "Each repeat ran the servers side by side (a client cell: the client and the bare loop "
        "interleaved); `by repeat` gives each repeat's ratio and `measured` is their median.",
        "",
        "| issue | target | measured | threshold | by repeat | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for t in report["targets"]:
        by_rep = ", ".join(f"{x:.2f}" for x in t.get("ratios_by_repeat") or [])
        if t["status"] != "measured":
            lines.append(f"| {t['issue']} | {t['description']} | {t.get('reason')} | {t['op']} {t['threshold']}× | | not measured |")
        else:
            lines.append(f"| {t['issue']} | {t['description']} | {fmt_ratio(t)} | {t['op']} {t['threshold']}× | {by_rep} | **{verdict(t)}** |")
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

    tt = Table(title="targets (issues 3 and 4)")
    for col in ("issue", "target", "ratio", "threshold", "verdict"):
        tt.add_column(col)
    for t in report["targets"]:
        v = verdict(t)
        style = {"PASS": "green", "FAIL": "red"}.get(v, "yellow")
        tt.add_row(t["issue"], t["description"], fmt_ratio(t) if t["status"] == "measured" else (t.get("reason") or ""),
                   f"{t['op']} {t['threshold']}×", f"[{style}]{v}[/{style}]")
    console.print(tt)
    for n in report["notes"]:
        console.print(f"[yellow]note:[/yellow] {n}")


def render(report: dict, out: Path, plots: bool = True) -> dict:
    """Write report.json, the plots and report.md into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        from . import plots as plots_mod

        report["plots"] = plots_mod.make_plots(report, out)
    write_json(report, out)
    write_markdown(report, out)
    return report


def rerender(out: Path, plots: bool = True) -> dict:
    """Rebuild the report from ``out/report.json``: its rows as measured, the targets by this module's rules."""
    report = json.loads((out / "report.json").read_text())
    report["targets"] = compute_targets(report["rows"], report["servers"], report["fastfib"])
    return render(report, out, plots)
