"""What publisher confirms cost the blocking client: confirms=True against confirms=False, interleaved.

    python -m bench.confirms [--url URL] [--workers 1] [--batch 2000] [--window 32] [--rounds 20] [--n 20]

Starts a ``fastfib serve`` pool on a queue of its own, then two clients in this
process, one with publisher confirms (the default) and one without, which run
``call_many`` batches in turn (the order alternating each round). Reports the
median throughput and client CPU per call of each, and the medians of the
per-round ratios (confirms / no confirms), which move less with the machine's
load than either number alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    from fastfib.client import FibonacciRpcClient
    from fastfib.protocol import DEFAULT_URL

    parser = argparse.ArgumentParser(prog="python -m bench.confirms", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("FASTFIB_URL", DEFAULT_URL))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--n", type=int, default=20)
    args = parser.parse_args(argv)

    queue = f"fastfib-bench-confirms-{uuid.uuid4().hex[:8]}"
    log = Path(tempfile.mkstemp(prefix="fastfib-bench-confirms-", suffix=".log")[1])
    pool = subprocess.Popen(
        [sys.executable, "-m", "fastfib", "serve", "--url", args.url, "--queue", queue, "--workers",
         str(args.workers)], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while f"all {args.workers} workers consuming" not in log.read_text():
            if pool.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the pool did not start:\n{log.read_text()}")
            time.sleep(0.1)
        clients = {"confirms": FibonacciRpcClient(args.url, queue, confirms=True),
                   "no confirms": FibonacciRpcClient(args.url, queue, confirms=False)}
        batch = [args.n] * args.batch
        rate: dict[str, list[float]] = {k: [] for k in clients}
        cpu: dict[str, list[float]] = {k: [] for k in clients}
        for client in clients.values():
            client.call_many(batch, window=args.window)  # warm-up
        for r in range(args.rounds):
            for name in (list(clients) if r % 2 == 0 else list(clients)[::-1]):
                t, c = time.perf_counter(), time.process_time()
                clients[name].call_many(batch, window=args.window)
                rate[name].append(len(batch) / (time.perf_counter() - t))
                cpu[name].append(1e6 * (time.process_time() - c) / len(batch))
        for client in clients.values():
            client.close()
    finally:
        pool.terminate()
        pool.wait(30)
        log.unlink()

    def ratio(values: dict[str, list[float]]) -> float:
        return statistics.median(a / b for a, b in zip(values["confirms"], values["no confirms"], strict=True))

    print(f"call_many of {args.batch} x F({args.n}), window {args.window}, {args.workers} worker(s), "
          f"{args.rounds} rounds, {os.cpu_count()} cores")
    for name in clients:
        print(f"{name:12s} {statistics.median(rate[name]):8.0f} calls/s  "
              f"{statistics.median(cpu[name]):6.1f} us client CPU per call (medians)")
    print(f"confirms / no confirms: throughput {ratio(rate):.3f}, client CPU per call {ratio(cpu):.3f} "
          "(medians of per-round ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
