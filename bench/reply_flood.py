"""A legitimate client's throughput under a flood of unheard Direct Reply-to names (issue 14).

    python -m bench.reply_flood [--flood 20000] [--seconds 10] [--repeats 3] [--workers 2] [--root PATH]

The flood: ``--flood`` requests for F(20) whose ``reply_to`` is well formed, with a real pid (a
channel kept open by this script) and a random key each, so that nobody listens for the replies.
They are published as fast as one connection can, at the start of a ``--seconds`` window, while the
legitimate client (Direct Reply-to, 32 calls in flight, F(20)) runs for that window. Each round
runs the client alone, then under the flood (after the queue has drained), and gives the ratio
flood/alone; the median over the rounds is printed, with the number of reply-to probes the workers
logged (one per pid is the design). ``--root`` runs the pool from another checkout (e.g. /work/main
for the code before issue 14), for a before/after comparison on the same machine.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import threading
import time
import uuid
from pathlib import Path

import pika

from .compat_pool import DEFAULT_URL, ROOT, PipelinedClient, ServePool, delete_queue, median, queue_depth

PREFIX = "amq.rabbitmq.reply-to."


def learn_pid(channel, connection) -> str:
    """A real Direct Reply-to pid: the broker rewrites ``amq.rabbitmq.reply-to`` on a publish to ourselves."""
    queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
    channel.basic_consume(PREFIX[:-1], lambda *a: None, auto_ack=True)
    channel.basic_publish("", queue, b"", pika.BasicProperties(reply_to=PREFIX[:-1]))
    deadline = time.monotonic() + 10
    while True:
        method, props, _ = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            return props.reply_to[len(PREFIX):].partition(".")[0]
        if time.monotonic() > deadline:
            raise RuntimeError("the broker did not hand the message back")
        connection.process_data_events(0.02)


def flood(queue: str, pid: str, count: int, url: str) -> float:
    """Publish ``count`` requests to unheard names; returns the seconds it took."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    start = time.perf_counter()
    for _ in range(count):
        key = base64.b64encode(os.urandom(12)).decode()
        channel.basic_publish("", queue, b"20", pika.BasicProperties(
            reply_to=f"{PREFIX}{pid}.{key}", correlation_id=uuid.uuid4().hex))
    took = time.perf_counter() - start
    connection.close()
    return took


def wait_drained(queue: str, url: str, timeout: float = 300.0) -> float:
    start = time.monotonic()
    while queue_depth(queue, url) > 0:
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"the queue did not drain within {timeout} s")
        time.sleep(0.2)
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.reply_flood", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--flood", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout to run fastfib serve from")
    parser.add_argument("serve_args", nargs="*", help="extra `fastfib serve` flags (after --)")
    args = parser.parse_args(argv)

    queue = f"bench-flood-{uuid.uuid4().hex[:6]}"
    holder = pika.BlockingConnection(pika.URLParameters(args.url))  # keeps the flood's pid alive
    pid = learn_pid(holder.channel(), holder)
    pool = ServePool(queue, "--log-level", "DEBUG", *args.serve_args, url=args.url, workers=args.workers,
                     root=args.root)
    client = None
    rounds = []
    try:
        pool.wait_ready()
        client = PipelinedClient(queue, args.url)
        client.run(b"20", b"6765", 1.0)
        for _ in range(args.repeats):
            alone = client.run(b"20", b"6765", args.seconds)
            result: dict = {}

            def publish_flood(result: dict = result) -> None:
                result["took"] = flood(queue, pid, args.flood, args.url)

            thread = threading.Thread(target=publish_flood)
            thread.start()
            under = client.run(b"20", b"6765", args.seconds)
            thread.join()
            drained = wait_drained(queue, args.url)
            holder.process_data_events(0)
            row = {"alone_per_s": round(alone, 1), "under_flood_per_s": round(under, 1),
                   "ratio": round(under / alone, 3), "flood_published_in_s": round(result["took"], 2),
                   "drained_after_window_s": round(drained, 2), "wrong": client.wrong}
            rounds.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if client is not None:
            client.close()
        pool.stop()
        delete_queue(queue, args.url)
        holder.close()
    text = pool.text()
    summary = {
        "root": str(args.root), "workers": args.workers, "flood": args.flood, "seconds": args.seconds,
        "ratio_median": median([r["ratio"] for r in rounds]),
        "alone_per_s_median": median([r["alone_per_s"] for r in rounds]),
        "under_flood_per_s_median": median([r["under_flood_per_s"] for r in rounds]),
        "probes_logged": text.count("probing the Direct Reply-to pid"),
        "reconnections_logged": text.count("reconnecting"),
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
