"""RPC latency of one large F(n) with one worker and 1 or 2 kernel threads (issue 8).

    python -m bench.rpc_threads [--ns 1000000,10000000] [--calls 7] [--out DIR]

Starts two pools side by side, each `fastfib serve --workers 1 --cache-bytes 0
--max-n 10^7` on a queue of its own, one with `--kernel-threads 1` and one with
`--kernel-threads 2`, and sends sequential binary calls through
`fastfib.FibonacciRpcClient`, alternating between the pools call by call so
that both see the same machine. Every reply is checked against gmpy2.fib.
Prints a table of median latencies and writes DIR/rpc_threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid

import gmpy2
import pika

from fastfib import FibonacciRpcClient

URL = os.environ.get("FASTFIB_URL", "amqp://guest:guest@localhost:5672/%2F")


def _start_pool(queue: str, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fastfib", "serve", "--queue", queue, "--workers", "1", "--cache-bytes", "0",
           "--max-n", "10000000", "--kernel-threads", str(threads), "--log-level", "warning", "--url", URL]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_consuming(queue: str, timeout: float = 30.0) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ch = conn.channel()
            try:
                if ch.queue_declare(queue, passive=True).method.consumer_count >= 1:
                    return
            except pika.exceptions.ChannelClosedByBroker:
                pass
            conn.sleep(0.1)
        raise SystemExit(f"rpc_threads: the pool on {queue} did not start consuming")
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rpc_threads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", default="1000000,10000000", help="comma-separated n values")
    parser.add_argument("--calls", type=int, default=7, help="timed calls per pool and n (after one warm-up call)")
    parser.add_argument("--out", default="bench/results/latest")
    args = parser.parse_args(argv)
    ns = [int(float(x)) for x in args.ns.split(",")]

    tag = uuid.uuid4().hex[:8]
    queues = {t: f"bench.{tag}.threads{t}" for t in (1, 2)}
    pools = {t: _start_pool(q, t) for t, q in queues.items()}
    rows = []
    try:
        for q in queues.values():
            _wait_consuming(q)
        clients = {t: FibonacciRpcClient(URL, q, timeout=120) for t, q in queues.items()}
        for n in ns:
            expected = gmpy2.fib(n)
            lat: dict[int, list[float]] = {1: [], 2: []}
            for i in range(args.calls + 1):
                for t in ((1, 2) if i % 2 == 0 else (2, 1)):
                    start = time.perf_counter()
                    value = clients[t].call(n)
                    elapsed = time.perf_counter() - start
                    if value != expected:
                        raise SystemExit(f"rpc_threads: WRONG reply for n={n} from the threads={t} pool")
                    if i:  # the first call of each pool is a warm-up
                        lat[t].append(elapsed)
            m1, m2 = statistics.median(lat[1]), statistics.median(lat[2])
            rows.append({"n": n, "calls": args.calls, "p50_s_threads1": m1, "p50_s_threads2": m2, "ratio_2_over_1": m2 / m1})
        for c in clients.values():
            c.close()
    finally:
        for p in pools.values():
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
        conn = pika.BlockingConnection(pika.URLParameters(URL))
        for q in queues.values():
            conn.channel().queue_delete(q)
        conn.close()

    print(f"{'n':>10} {'p50 threads=1':>15} {'p50 threads=2':>15} {'2/1':>6}")
    for r in rows:
        print(f"{r['n']:>10} {r['p50_s_threads1'] * 1e3:>12.1f} ms {r['p50_s_threads2'] * 1e3:>12.1f} ms {r['ratio_2_over_1']:>6.2f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rpc_threads.json"), "w") as fh:
        json.dump({"rows": rows, "cpus": os.cpu_count()}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
