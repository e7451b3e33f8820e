"""Where a server's CPU goes per reply on the compute-bound load, thread by thread.

``python -m bench.thread_cpu`` starts ``fastfib serve`` (or, with
``--server gmpy2``, the plain gmpy2 server of :mod:`bench.servers`) on a
transient classic queue of its own, then one pika connection keeps
``--window`` requests in flight, each a random n in [10^5, 10^6] asking for
binary, for ``--seconds`` after a one-second warm-up. It prints replies per
second and, per reply, the user and system CPU of every thread of every
server process (``/proc/PID/task/TID/stat``), of the broker (``beam.smp``)
and of the load connection itself. Extra arguments go to ``fastfib serve``
(e.g. ``--inline-max-n 1000000``). Random n repeat rarely; the pool runs with
``--cache-bytes 0`` so that a repeat costs what a new n does.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
import uuid

import pika
import psutil

from .common import DEFAULT_URL, ROOT
from .compat_pool import delete_queue, stop_process
from .harness import broker_process

BINARY = "application/octet-stream"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


def _threads(pids: list[int]) -> dict[tuple[int, int, str], tuple[float, float]]:
    """(pid, tid, thread name) -> (user s, system s) of every thread of ``pids``."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                raw = open(f"/proc/{pid}/task/{tid}/stat").read()
            except FileNotFoundError:
                continue
            name = raw[raw.index("(") + 1:raw.rindex(")")]
            fields = raw.rsplit(")", 1)[1].split()
            out[(pid, int(tid), name)] = (int(fields[11]) / tick, int(fields[12]) / tick)
    return out


def measure(url: str, queue: str, pids: list[int], window: int, seconds: float, seed: int) -> dict:
    """Keep ``window`` requests in flight on ``queue``; CPU per reply of ``pids``' threads over ``seconds``."""
    rng = random.Random(seed)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    props = pika.BasicProperties(reply_to=DIRECT_REPLY_TO, headers={"accept": BINARY}, correlation_id="c")
    got = [0]

    def send() -> None:
        channel.basic_publish("", queue, str(rng.randint(10**5, 10**6)).encode(), props)

    def on_reply(_ch, _method, reply_props, _body) -> None:
        if (reply_props.headers or {}).get("x-error"):
            raise RuntimeError(f"error reply: {reply_props.headers}")
        got[0] += 1
        send()

    channel.basic_consume(DIRECT_REPLY_TO, on_reply, auto_ack=True)
    for _ in range(window):
        send()
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        connection.process_data_events(0.1)
    beam = broker_process()
    broker = beam.pid if beam is not None else None
    watched = pids + ([broker] if broker else [])
    before, n0, t0, me0 = _threads(watched), got[0], time.monotonic(), os.times()
    end = t0 + seconds
    while time.monotonic() < end:
        connection.process_data_events(0.1)
    after, n1, t1, me1 = _threads(watched), got[0], time.monotonic(), os.times()
    connection.close()
    replies = n1 - n0
    per = {}
    for key, (u1, s1) in after.items():
        u0, s0 = before.get(key, (0.0, 0.0))
        if u1 - u0 or s1 - s0:
            role = "broker" if key[0] == broker else "server"
            per[f"{role} {key[0]}/{key[2]}[{key[1]}]"] = (1e6 * (u1 - u0) / replies, 1e6 * (s1 - s0) / replies)
    per["load (this process)"] = (1e6 * (me1[0] - me0[0]) / replies, 1e6 * (me1[1] - me0[1]) / replies)
    return {"replies_per_s": replies / (t1 - t0), "replies": replies, "us_per_reply": per}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.thread_cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", choices=("fastfib", "gmpy2"), default="fastfib")
    ap.add_argument("--workers", type=int, default=1, help="fastfib workers, or gmpy2 processes")
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--url", default=DEFAULT_URL)
    args, extra = ap.parse_known_args(argv)
    queue = f"bench.thread-cpu.{uuid.uuid4().hex[:8]}"
    py = sys.executable
    if args.server == "fastfib":
        argv_ = [py, "-m", "fastfib", "serve", "--url", args.url, "--queue", queue, "--workers", str(args.workers),
                 "--queue-type", "classic", "--no-queue-durable", "--cache-bytes", "0", "--log-level", "warning",
                 *extra]
    else:
        argv_ = [py, "-m", "bench.servers", "gmpy2", "--queue", queue, "--url", args.url, "--procs", str(args.workers)]
    server = subprocess.Popen(argv_, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with pika.BlockingConnection(pika.URLParameters(args.url)) as c:
                    if c.channel().queue_declare(queue, passive=True).method.consumer_count >= args.workers:
                        break
            except pika.exceptions.ChannelClosedByBroker:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"the server did not start consuming from {queue}")
            time.sleep(0.2)
        top = psutil.Process(server.pid)
        pids = [top.pid, *(p.pid for p in top.children(recursive=True))]
        print(f"{' '.join(argv_[1:4])} ... ({args.workers} worker(s)/process(es), window {args.window}, "
              f"{args.seconds:g} s x {args.repeat})")
        for k in range(args.repeat):
            r = measure(args.url, queue, pids, args.window, args.seconds, seed=k)
            print(f"repeat {k}: {r['replies_per_s']:.0f} replies/s over {r['replies']} replies; "
                  "CPU per reply (user + system, us):")
            for name, (user, system) in sorted(r["us_per_reply"].items()):
                print(f"    {name:48s} {user:7.0f} + {system:5.0f}")
    finally:
        stop_process(server)
        delete_queue(queue, args.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
