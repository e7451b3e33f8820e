"""What a quorum queue costs against a classic one, at n=20 (issue 14).

    python -m bench.queue_kinds [--seconds 5] [--repeats 5] [--workers 2] [--window 32]

For each queue declaration (quorum: the default, as the current tutorial declares it; classic
durable; classic transient: the seed tutorial's) one ``fastfib serve`` pool serves its own fresh
queue. The runs are interleaved (one round = every kind once, in turn) and each round gives
the ratio of quorum to each classic kind: pipelined throughput (``--window`` calls in flight)
and the median round trip of sequential calls. Medians over the rounds are printed.
"""

from __future__ import annotations

import argparse
import json
import uuid

from .compat_pool import DEFAULT_URL, PipelinedClient, ServePool, delete_queue, median

KINDS = {
    "quorum": ("--queue-type", "quorum"),
    "classic-durable": ("--queue-type", "classic"),
    "classic-transient": ("--queue-type", "classic", "--no-queue-durable"),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.queue_kinds", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--window", type=int, default=32)
    args = parser.parse_args(argv)

    pools, clients = {}, {}
    try:
        for kind, flags in KINDS.items():
            queue = f"bench-kinds-{kind}-{uuid.uuid4().hex[:6]}"
            pools[kind] = ServePool(queue, *flags, url=args.url, workers=args.workers)
        for kind, pool in pools.items():
            pool.wait_ready()
            clients[kind] = PipelinedClient(pool.queue, args.url)
            clients[kind].run(b"20", b"6765", 1.0)  # warm-up
        rounds = []
        for _ in range(args.repeats):
            row = {}
            for kind, client in clients.items():
                rate = client.run(b"20", b"6765", args.seconds, window=args.window)
                client.run(b"20", b"6765", min(2.0, args.seconds), window=1)
                lat = median(client.latencies) * 1e6
                assert client.wrong == 0
                row[kind] = {"calls_per_s": rate, "sequential_median_us": lat}
            rounds.append(row)
            print(json.dumps({k: {m: round(v, 1) for m, v in d.items()} for k, d in row.items()}), flush=True)
    finally:
        for client in clients.values():
            client.close()
        for pool in pools.values():
            pool.stop()
            delete_queue(pool.queue, args.url)
    summary = {"workers": args.workers, "window": args.window, "seconds": args.seconds, "repeats": args.repeats}
    for kind in KINDS:
        summary[kind] = {
            "calls_per_s_median": round(median([r[kind]["calls_per_s"] for r in rounds]), 1),
            "sequential_median_us_median": round(median([r[kind]["sequential_median_us"] for r in rounds]), 1)}
    for other in ("classic-durable", "classic-transient"):
        summary[f"quorum_vs_{other}"] = {
            "throughput_ratio_median": round(median(
                [r["quorum"]["calls_per_s"] / r[other]["calls_per_s"] for r in rounds]), 3),
            "latency_ratio_median": round(median(
                [r["quorum"]["sequential_median_us"] / r[other]["sequential_median_us"] for r in rounds]), 3)}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
