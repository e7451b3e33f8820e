"""Benchmark cell: a pool spread over the 3 nodes of a cluster against the pool on 1 node.

    python -m bench.cluster [--workers 3] [--clients 3] [--seconds 8] [--repeats 3] [--n 20] [--out FILE]

Starts a local 3-node cluster (``scripts/cluster.sh``, AMQP 127.0.0.1:5681-5683,
in a data directory of its own, stopped at the end) and two ``fastfib serve``
pools of ``--workers`` workers, each on a quorum queue of its own (leader on
node 1, replicas on all 3 nodes):

- ``1 node``: the pool and every client connect to node 1 only;
- ``3 nodes``: the pool gets every node's URL (worker i starts on node i mod 3)
  and client k connects to node k mod 3.

Each client is a process running ``FibonacciRpcClient.call_many`` batches of
F(n) (``--window`` in flight). The two layouts are measured one after the other,
in alternating order, ``--repeats`` times; the report gives each layout's
median throughput (replies/s), the RabbitMQ nodes' CPU per reply, and the
median of the per-repeat ratios 3 nodes / 1 node. On a small host the three
nodes share the same cores, so spreading adds Erlang distribution traffic
without adding CPU: read the ratio as what the spread costs or gains on
this machine, not on three hosts.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cluster.sh"
LAYOUTS = ("1 node", "3 nodes")


def _client(url: str, queue: str, n: int, window: int, go, stop, out) -> None:
    """A load process: call_many batches until ``stop``; reports the replies counted after ``go``."""
    from fastfib.client import FibonacciRpcClient

    batch = [n] * (window * 16)
    counted = 0
    with FibonacciRpcClient(url, queue, timeout=60) as client:
        client.call_many(batch, window=window)  # warm-up
        out.put("ready")
        go.wait()
        while not stop.is_set():
            client.call_many(batch, window=window)
            counted += len(batch)
    out.put(counted)


def _beam_cpu(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
    return total


def _measure(urls: list[str], queue: str, clients: int, n: int, window: int, seconds: float, pids: list[int]) -> dict:
    ctx = mp.get_context("spawn")
    go, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(urls[k % len(urls)], queue, n, window, go, stop, out))
             for k in range(clients)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            if out.get(timeout=120) != "ready":
                raise RuntimeError("a load process failed")
        cpu0, t0 = _beam_cpu(pids), time.monotonic()
        go.set()
        time.sleep(seconds)
        stop.set()
        counts = [out.get(timeout=120) for _ in procs]
        elapsed, cpu = time.monotonic() - t0, _beam_cpu(pids) - cpu0
    finally:
        stop.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    replies = sum(counts)
    return {"replies_per_s": replies / elapsed, "broker_cpu_us_per_reply": 1e6 * cpu / replies, "replies": replies}


def _serve(urls: list[str], queue: str, workers: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastfib", "serve", "--url", " ".join(urls), "--queue", queue,
         "--queue-type", "quorum", "--workers", str(workers)],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while f"all {workers} workers consuming" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the pool did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="fastfib-bench-cluster-"))
    env = {**os.environ, "FASTFIB_CLUSTER_DIR": str(work / "cluster")}
    pools: list[subprocess.Popen] = []
    try:
        urls = subprocess.run([str(SCRIPT), "up"], env=env, capture_output=True, text=True, check=True,
                              timeout=300).stdout.split()
        pids = [int((work / "cluster" / f"node{i}" / "rabbitmq.pid").read_text()) for i in (1, 2, 3)]
        queues = {layout: f"fastfib-bench-{uuid.uuid4().hex[:8]}" for layout in LAYOUTS}
        pool_urls = {"1 node": urls[:1], "3 nodes": urls}
        for layout in LAYOUTS:
            pools.append(_serve(pool_urls[layout], queues[layout], args.workers, work / f"serve-{layout[0]}.log"))
        runs: dict[str, list[dict]] = {layout: [] for layout in LAYOUTS}
        for r in range(args.repeats):
            for layout in (LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]):
                result = _measure(pool_urls[layout], queues[layout], args.clients, args.n, args.window,
                                  args.seconds, pids)
                runs[layout].append(result)
                print(f"repeat {r + 1} {layout:8s} {result['replies_per_s']:9.0f} replies/s "
                      f"{result['broker_cpu_us_per_reply']:6.1f} us broker CPU/reply", flush=True)
    finally:
        for p in pools:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run([str(SCRIPT), "down"], env=env, capture_output=True, timeout=120)

    ratios = [b["replies_per_s"] / a["replies_per_s"] for a, b in zip(runs["1 node"], runs["3 nodes"], strict=True)]
    summary = {
        "cell": f"pipelined F({args.n}), {args.clients} client processes x window {args.window}, "
                f"{args.workers} workers, quorum queue, {args.seconds:g} s x {args.repeats} repeats",
        "cores": os.cpu_count(),
        "layouts": {layout: {
            "median_replies_per_s": round(statistics.median(r["replies_per_s"] for r in runs[layout])),
            "median_broker_cpu_us_per_reply": round(statistics.median(r["broker_cpu_us_per_reply"]
                                                                      for r in runs[layout]), 1),
        } for layout in LAYOUTS},
        "median_ratio_3_nodes_to_1": round(statistics.median(ratios), 3),
        "ratios": [round(x, 3) for x in ratios],
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if os.cpu_count() and os.cpu_count() < 6:
        print(f"note: {os.cpu_count()} cores: the 3 nodes, the workers and the clients compete for the same CPUs")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
