"""``python -m bench``: the benchmark suite. Run it from the repository root.

    python -m bench [--quick] [--out DIR] [options]   measure; write report.json, report.md, PNGs
    python -m bench kernel [pytest options]          the kernel micro-benchmarks (pytest-benchmark)
    python -m bench report DIR                       rebuild report.md and the plots from DIR/report.json

Exit status: 0 when the run completed (whatever the targets say), 1 when it
failed (a wrong or lost reply, a server that would not start, an interrupt),
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

# One clear line, rather than a ModuleNotFoundError, when the [bench] extra is missing.
for _name in ("psutil", "hdrh", "rich", "matplotlib", "pytest_benchmark"):
    try:
        importlib.import_module(_name)
    except ImportError as _exc:
        sys.exit(f"python -m bench needs the [bench] extra ({_exc}); from the repository root: pip install '.[bench]'")

from . import harness  # noqa: E402

DEFAULT_OUT = harness.ROOT / "bench" / "results" / "latest"
ALL_SERVERS = ("echo", "naive", "gmpy2", "fastfib", "nocache", "pikawire", "client", "aio", "kernel")


def _workers(text: str) -> list[int]:
    try:
        ws = sorted({int(w) for w in text.split(",") if w.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of worker counts: {text!r}") from None
    if not ws or ws[0] < 1:
        raise argparse.ArgumentTypeError("worker counts must be positive")
    return ws


def _servers(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ALL_SERVERS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown server(s) {', '.join(bad)}; choose from {', '.join(ALL_SERVERS)}")
    return kinds


def build_parser() -> argparse.ArgumentParser:
    cpu = os.cpu_count() or 1
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Round-trip latency and throughput of fastfib serve against the naive tutorial server, "
        "a single-process gmpy2 server and an echo server, side by side. "
        "Other commands: `python -m bench kernel [pytest args]`, `python -m bench report DIR`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a reduced grid and short windows (< 2 min on 2 cores)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--url", default=harness.DEFAULT_URL, help="broker URL (env FASTFIB_URL)")
    p.add_argument("--duration", type=float, default=None, help="measurement window per cell, seconds (quick 0.8, full 2.5)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up per cell, seconds (quick 0.25, full 0.5)")
    p.add_argument("--repeat", type=int, default=None, help="repeats of the cells the targets use (quick 1, full 3); the rest runs once")
    p.add_argument("--clients", type=int, default=1, help="load processes in pipelined cells")
    p.add_argument("--window", type=int, default=32, help="requests in flight per client in pipelined cells")
    p.add_argument("--workers", type=_workers, default=sorted({1, 2, cpu}), help="fastfib worker counts to sweep, e.g. 1,2,4")
    p.add_argument("--servers", type=_servers, default=list(ALL_SERVERS),
                   help="what to measure, comma-separated: " + ", ".join(ALL_SERVERS)
                   + " (nocache: a fastfib pool with --cache-bytes 0 at the largest worker count; pikawire: one with --wire pika, at n=20; "
                   "client: fastfib.FibonacciRpcClient; "
                   "aio: fastfib.aio.AsyncFibonacciRpcClient against aio-pika's RPC client; kernel: the encoding and "
                   "two-thread ratios of bench.kernel_ratios)")
    p.add_argument("--naive-calls", type=int, default=None, help="calls to the naive server at n=30 (quick 3, full 5)")
    p.add_argument("--cache-bytes", type=int, default=None, help="fastfib serve --cache-bytes (default: fastfib's default)")
    p.add_argument("--lost-timeout", type=float, default=30.0, help="a reply that has not come after this many seconds is lost")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    return p


def run_main(argv: list[str]) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from . import report as report_mod

    args = build_parser().parse_args(argv)
    if args.clients < 1 or args.window < 1:
        print("python -m bench: --clients and --window must be at least 1", file=sys.stderr)
        return 2
    quick = args.quick
    settings = harness.Settings(
        quick=quick,
        url=args.url,
        out=args.out.resolve(),
        duration=args.duration if args.duration is not None else (0.8 if quick else 2.5),
        warmup=args.warmup if args.warmup is not None else (0.25 if quick else 0.5),
        repeat=args.repeat if args.repeat is not None else (1 if quick else 3),
        clients=args.clients,
        window=args.window,
        workers=args.workers,
        servers=args.servers,
        naive_calls=args.naive_calls if args.naive_calls is not None else (3 if quick else 5),
        lost_timeout=args.lost_timeout,
        cache_bytes=args.cache_bytes,
        plots=not args.no_plots,
        grid="quick" if quick else "full",
    )
    console = Console(stderr=True, log_path=False)
    if not console.is_terminal:
        console = Console(stderr=True, log_path=False, width=160)
    out_console = Console() if Console().is_terminal else Console(width=160)
    settings.out.mkdir(parents=True, exist_ok=True)
    for stale in ("report.json", "report.md"):
        (settings.out / stale).unlink(missing_ok=True)
    for png in settings.out.glob("*.png"):
        png.unlink()
    console.log(f"benchmark ({settings.grid} grid) into {settings.out}")
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=False) as progress:
            raw = harness.run(settings, progress=progress, console=console)
    except harness.BenchFailure as exc:  # failed before any measurement (e.g. no broker)
        console.print(f"[bold red]BENCHMARK FAILED:[/bold red] {exc}")
        return 1
    except Exception as exc:
        if type(exc).__module__.startswith("pika"):
            console.print(f"[bold red]BENCHMARK FAILED:[/bold red] cannot talk to the broker at {settings.url}: {exc!r}")
            return 1
        raise
    report = report_mod.build_report(raw)
    report_mod.render(report, settings.out, plots=settings.plots)
    report_mod.print_tables(report, out_console)
    console.log(f"report: {settings.out / 'report.md'} ({report['duration_s']:.0f} s)")
    if report["status"] != "ok":
        console.print(f"[bold red]BENCHMARK FAILED:[/bold red] {report['failure']}")
        return 1
    return 0


def kernel_main(argv: list[str]) -> int:
    """`pytest bench/test_kernel.py --benchmark-only [argv...]`."""
    cmd = [sys.executable, "-m", "pytest", str(harness.ROOT / "bench" / "test_kernel.py"), "--benchmark-only", *argv]
    print("+ " + " ".join(cmd[1:]), file=sys.stderr)
    return subprocess.call(cmd, cwd=harness.ROOT)


def report_main(argv: list[str]) -> int:
    from rich.console import Console

    from . import report as report_mod

    p = argparse.ArgumentParser(prog="python -m bench report", description="rebuild report.md and the plots from DIR/report.json")
    p.add_argument("dir", type=Path, nargs="?", default=DEFAULT_OUT)
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if not (args.dir / "report.json").exists():
        print(f"python -m bench report: no report.json in {args.dir}", file=sys.stderr)
        return 2
    report = report_mod.rerender(args.dir, plots=not args.no_plots)
    report_mod.print_tables(report, Console() if Console().is_terminal else Console(width=160))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "kernel":
        return kernel_main(argv[1:])
    if argv and argv[0] == "report":
        return report_main(argv[1:])
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
