"""Two fastfib checkouts and an echo server, one request at a time, interleaved call by call.

``python -m bench.ab_seq --other PATH`` starts ``fastfib serve`` from this
checkout and from PATH (another checkout with its kernel built in place, e.g. a
``git worktree`` of an older commit), and the echo server, each on a queue of
its own, all serving the seed tutorial's transient classic queue. One pika
connection then sends n=20 to the three in turn, rotating which goes first,
and prints each one's median round trip and server CPU per reply, and the
ratios. Cells run one after another (``python -m bench``) see the machine at
different moments; here every ratio comes from calls that alternate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pika
import psutil

from .common import ROOT

DEFAULT_URL = os.environ.get("FASTFIB_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def _start(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=cwd, env=dict(os.environ, PYTHONPATH=str(cwd)))


def _cpu(proc: subprocess.Popen) -> float:
    top = psutil.Process(proc.pid)
    return sum(sum(p.cpu_times()[:2]) for p in [top, *top.children(recursive=True)])


def _knows_queue_type(checkout: Path) -> bool:
    """Whether that checkout's ``fastfib serve`` takes ``--queue-type``."""
    p = subprocess.run([sys.executable, "-m", "fastfib", "serve", "--help"], cwd=checkout, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(checkout)), timeout=60)
    return "--queue-type" in p.stdout


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.ab_seq", description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, required=True, help="the other checkout (kernel built in place)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--url", default=DEFAULT_URL)
    args = parser.parse_args(argv)

    tag = uuid.uuid4().hex[:8]
    serve = [sys.executable, "-m", "fastfib", "serve", "--workers", str(args.workers), "--url", args.url,
             "--log-level", "warning"]
    # The older checkout may not know --queue-type/--no-queue-durable: it declares the tutorial's queue by
    # default, and this one is told to declare the same kind. A checkout that does know them (this one
    # again, or a newer one: its serve --help lists them) is told the same, or it would serve a quorum queue.
    tutorial_queue = ["--queue-type", "classic", "--no-queue-durable"]
    other = args.other.resolve()
    sides = {
        "echo": ([sys.executable, "-m", "bench.servers", "echo", "--url", args.url], ROOT, []),
        "other": (serve, other, tutorial_queue if _knows_queue_type(other) else []),
        "this": (serve, ROOT, tutorial_queue),
    }
    queues = {name: f"bench.ab.{tag}.{name}" for name in sides}
    procs = {name: _start([*argv_, "--queue", queues[name], *extra], cwd) for name, (argv_, cwd, extra) in sides.items()}
    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    try:
        for name, queue in queues.items():
            deadline = time.monotonic() + 60
            while True:
                try:
                    if channel.queue_declare(queue, passive=True).method.consumer_count >= 1:
                        break
                except pika.exceptions.ChannelClosedByBroker:
                    channel = connection.channel()
                if procs[name].poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{name} did not start consuming from {queue}")
                time.sleep(0.2)
        replies: dict[str, bytes] = {}
        channel.basic_consume("amq.rabbitmq.reply-to", lambda ch, m, p, b: replies.__setitem__(p.correlation_id, b),
                              auto_ack=True)
        names = list(sides)
        latency: dict[str, list[float]] = {name: [] for name in names}
        cpu0 = {name: _cpu(procs[name]) for name in names}
        for r in range(args.rounds):
            for name in names[r % 3:] + names[:r % 3]:
                cid = uuid.uuid4().hex
                t0 = time.perf_counter()
                channel.basic_publish("", queues[name], b"20",
                                      pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id=cid))
                while cid not in replies:
                    connection.process_data_events(time_limit=None)
                latency[name].append(time.perf_counter() - t0)
                if replies.pop(cid) != (b"20" if name == "echo" else b"6765"):  # echo sends the body back
                    raise SystemExit(f"{name} answered n=20 wrongly")
        cpu = {name: (_cpu(procs[name]) - cpu0[name]) / args.rounds for name in names}
        p50 = {name: statistics.median(latency[name]) for name in names}
        result = {
            "rounds": args.rounds, "workers": args.workers, "other": str(args.other),
            "p50_us": {k: v * 1e6 for k, v in p50.items()},
            "server_cpu_per_reply_us": {k: v * 1e6 for k, v in cpu.items()},
            "this_vs_other_p50": p50["this"] / p50["other"],
            "this_vs_echo_p50": p50["this"] / p50["echo"],
            "other_vs_echo_p50": p50["other"] / p50["echo"],
        }
        for name in names:
            print(f"{name:5}  p50 {p50[name] * 1e6:7.1f} us   server CPU/reply {cpu[name] * 1e6:6.1f} us")
        print(f"this/other {result['this_vs_other_p50']:.3f}   this/echo {result['this_vs_echo_p50']:.3f}   "
              f"other/echo {result['other_vs_echo_p50']:.3f}")
        return result
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=60)
        for queue in queues.values():
            try:
                channel.queue_delete(queue)
            except pika.exceptions.AMQPError:
                channel = connection.channel()
                channel.queue_delete(queue)
        connection.close()


if __name__ == "__main__":
    main()
