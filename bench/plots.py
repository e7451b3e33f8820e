"""PNG plots of a report: latency CDFs, throughput against workers, speedup against the naive reference.

Everything is drawn from ``report.json``'s rows, so ``python -m bench report DIR``
can redraw them without measuring again.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from .common import AIO_BASELINE_ROW, CLIENT_BASELINE_ROW, grouped_rows  # noqa: E402

COLORS = {"echo": "#7f7f7f", "naive": "#d62728", "gmpy2": "#1f77b4", "fastfib": "#2ca02c", "client": "#9467bd",
          "client-baseline": "#8c564b"}
DPI = 110


def _color(row: dict) -> str:
    if row["api"] != "pika":
        return COLORS["client-baseline" if row["server"] in (CLIENT_BASELINE_ROW, AIO_BASELINE_ROW) else "client"]
    return COLORS.get(row["server_kind"], "black")


def _style(row: dict) -> dict:
    style = {"color": _color(row)}
    if row["server_kind"] == "echo" and (row["workers"] or 1) > 1:
        style["linestyle"] = "-."
    if row["server_kind"] == "fastfib" and row["api"] != "client":
        # darker with more workers; dashed without the cache
        shades = ["#98df8a", "#2ca02c", "#1a6b1a", "#0b3d0b"]
        style["color"] = shades[min(int(math.log2(max(row["workers"], 1))), len(shades) - 1)]
        if row.get("cache") is False:
            style["linestyle"] = "--"
    return style


def _ms(v: float, pos=None) -> str:
    return f"{v:g}"


def _grid(k: int) -> tuple[int, int]:
    cols = min(k, 3)
    return math.ceil(k / cols), cols


def latency_cdfs(report: dict, out: Path, mode: str) -> str | None:
    groups = [(label, [r for r in rows if r["status"] == "ok" and r.get("cdf")])
              for label, rows in grouped_rows(report["rows"]) if rows[0]["mode"] == mode]
    groups = [(label, rows) for label, rows in groups if rows]
    if not groups:
        return None
    nr, nc = _grid(len(groups))
    fig, axes = plt.subplots(nr, nc, figsize=(5.2 * nc, 3.6 * nr), squeeze=False)
    for ax, (label, rows) in zip(axes.flat, groups, strict=False):
        for r in rows:
            xs = [max(v, 1) / 1000.0 for _, v in r["cdf"]]
            ys = [p / 100.0 for p, _ in r["cdf"]]
            ax.step([xs[0]] + xs, [0.0] + ys, where="post", label=r["server_label"], **_style(r))
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(_ms))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, pos: ""))
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("round-trip latency (ms)")
        ax.set_ylabel("fraction of replies")
        ax.set_ylim(0, 1.0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    title = {"seq": "sequential (one request in flight)", "pipe": "pipelined (window in flight)"}[mode]
    fig.suptitle(f"Latency CDF, {title}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    name = f"latency_cdf_{'sequential' if mode == 'seq' else 'pipelined'}.png"
    fig.savefig(out / name, dpi=DPI)
    plt.close(fig)
    return name


def throughput_vs_workers(report: dict, out: Path) -> str | None:
    groups = []
    for label, rows in grouped_rows(report["rows"]):
        rows = [r for r in rows if r["status"] == "ok"]
        if rows and rows[0]["mode"] == "pipe" and any(r["server_kind"] == "fastfib" for r in rows):
            groups.append((label, rows))
    if not groups:
        return None
    nr, nc = _grid(len(groups))
    fig, axes = plt.subplots(nr, nc, figsize=(5.2 * nc, 3.6 * nr), squeeze=False)
    for ax, (label, rows) in zip(axes.flat, groups, strict=False):
        pools = sorted((r for r in rows if r["server_kind"] == "fastfib" and r["api"] == "pika" and r.get("cache") is not False),
                       key=lambda r: r["workers"])
        workers = [r["workers"] for r in pools]
        if pools:
            ax.plot(workers, [r["throughput_rps"] for r in pools], "o-", color=COLORS["fastfib"], label="fastfib")
        # W plain gmpy2 processes against W workers (the compute-bound cell): per-process efficiency
        plain = sorted((r for r in rows if r["server_kind"] == "gmpy2"), key=lambda r: r["workers"] or 1)
        if len(plain) > 1:
            ax.plot([r["workers"] or 1 for r in plain], [r["throughput_rps"] for r in plain], "^--",
                    color=COLORS["gmpy2"], label="W plain gmpy2 processes")
        for r in rows:
            if r["server_kind"] == "gmpy2" and len(plain) > 1:
                continue
            if r["api"] != "pika" and r["server_kind"] == "fastfib":
                ax.plot([r["workers"]], [r["throughput_rps"]], "D", color=_color(r), label=r["server_label"])
            elif r["server_kind"] == "fastfib" and r.get("cache") is False:
                ax.plot([r["workers"]], [r["throughput_rps"]], "s", color=COLORS["fastfib"], fillstyle="none", label="fastfib, no cache")
            elif r["server_kind"] != "fastfib":
                ax.axhline(r["throughput_rps"], linestyle="-." if (r["workers"] or 1) > 1 else ":", color=_color(r), label=r["server_label"])
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("fastfib workers")
        ax.set_ylabel("replies / s")
        if workers:
            ax.set_xticks(sorted(set(workers)))
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle("Pipelined throughput against the number of fastfib workers", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    name = "throughput_vs_workers.png"
    fig.savefig(out / name, dpi=DPI)
    plt.close(fig)
    return name


def speedup_vs_naive(report: dict, out: Path) -> str | None:
    groups = []
    for label, rows in grouped_rows(report["rows"]):
        naive = next((r for r in rows if r["server_kind"] == "naive" and r["status"] == "ok"), None)
        if naive and naive["throughput_rps"]:
            others = [r for r in rows if r["status"] == "ok" and r["server_kind"] not in ("naive", "echo")]
            if others:
                groups.append((label, naive, others))
    if not groups:
        return None
    servers: list[str] = []
    for _, _, others in groups:
        for r in others:
            if r["server_label"] not in servers:
                servers.append(r["server_label"])
    fig, ax = plt.subplots(figsize=(min(13.0, max(6.0, 2.0 + 1.4 * len(groups))), 5.0))
    width = 0.8 / max(len(servers), 1)
    for i, srv in enumerate(servers):
        xs, ys, color = [], [], None
        for g, (_, naive, others) in enumerate(groups):
            r = next((r for r in others if r["server_label"] == srv), None)
            if r is not None:
                xs.append(g + (i - (len(servers) - 1) / 2) * width)
                ys.append(r["throughput_rps"] / naive["throughput_rps"])
                color = _style(r)["color"]
        bars = ax.bar(xs, ys, width=width, label=srv, color=color)
        for b, y in zip(bars, ys, strict=True):
            ax.annotate(f"{y:,.0f}×" if y >= 10 else f"{y:.1f}×", (b.get_x() + b.get_width() / 2, y),
                        ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([label.replace(" ", "\n", 2) for label, _, _ in groups], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("throughput / the naive server's")
    ax.axhline(1.0, color=COLORS["naive"], linewidth=0.8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Speedup against the tutorial's naive server (measured at n ≤ 30)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    name = "speedup_vs_naive.png"
    fig.savefig(out / name, dpi=DPI)
    plt.close(fig)
    return name


def make_plots(report: dict, out: Path) -> list[str]:
    names = [
        latency_cdfs(report, out, "seq"),
        latency_cdfs(report, out, "pipe"),
        throughput_vs_workers(report, out),
        speedup_vs_naive(report, out),
    ]
    return [n for n in names if n]
