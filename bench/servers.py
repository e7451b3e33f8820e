"""Reference servers the benchmark compares fastfib against.

Each one is the project's own code and runs as its own process::

    python -m bench.servers naive --queue Q     # the tutorial's server: naive recursion, prefetch 1
    python -m bench.servers gmpy2 --queue Q     # what a user would write: one process, gmpy2.fib
                                                # (it does not import fastfib: GMP runs as shipped)
    python -m bench.servers echo  --queue Q     # the transport limit: replies the body unchanged
    python -m bench.servers echo  --queue Q --procs 2   # N such processes on one queue

They are written the way the RabbitMQ RPC tutorial writes its ``rpc_server.py``
(``BlockingConnection``, ``queue_declare(queue=Q)``, ``basic_qos``,
``basic_consume``, publish the reply, then ack), on purpose: they are the
baselines a user would otherwise run. None of them implements protocol v1's
error replies; the benchmark only sends them valid requests.

``faulty`` is not a baseline: it is a gmpy2 server that answers wrong or not at
all every K-th request, so that the tests can prove the load generator notices.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import pika

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
BINARY = "application/octet-stream"
DECIMAL = "text/plain"

#: The prefetch each reference server uses unless told otherwise.
DEFAULT_PREFETCH = {
    # the tutorial's `channel.basic_qos(prefetch_count=1)`, kept as it is
    "naive": 1,
    # a user who cares about throughput raises it; the baseline should not be crippled
    "gmpy2": 64,
    # the transport limit should be the best the transport can do
    "echo": 64,
    "faulty": 64,
}


def _accept(props: pika.BasicProperties) -> str | None:
    accept = (props.headers or {}).get("accept")
    if isinstance(accept, bytes):
        accept = accept.decode("utf-8", "replace")
    return accept


def naive_handler(ch, method, props, body):
    # The tutorial's on_request: no content_type, always decimal text. Imported here, not at the
    # top: the gmpy2 and echo servers are plain baselines and never import fastfib, so nothing of
    # it (fastfib.gmp_dispatch switches GMP's routines on some CPUs) can touch their GMP.
    from fastfib.reference import fib_naive  # the tutorial's fib, verbatim: exponential-time recursion

    n = int(body)
    response = fib_naive(n)
    ch.basic_publish(
        exchange="",
        routing_key=props.reply_to,
        properties=pika.BasicProperties(correlation_id=props.correlation_id),
        body=str(response),
    )
    ch.basic_ack(delivery_tag=method.delivery_tag)


def _gmpy2_reply(n: int, accept: str | None) -> tuple[bytes | str, str]:
    import gmpy2

    f = gmpy2.fib(n)
    if accept == BINARY:
        return f.to_bytes((f.bit_length() + 7) // 8 or 1, "big"), BINARY
    return str(f), DECIMAL


def gmpy2_handler(ch, method, props, body):
    n = int(body)
    payload, content_type = _gmpy2_reply(n, _accept(props))
    ch.basic_publish(
        exchange="",
        routing_key=props.reply_to,
        properties=pika.BasicProperties(correlation_id=props.correlation_id, content_type=content_type),
        body=payload,
    )
    ch.basic_ack(delivery_tag=method.delivery_tag)


def echo_handler(ch, method, props, body):
    ch.basic_publish(
        exchange="",
        routing_key=props.reply_to,
        properties=pika.BasicProperties(correlation_id=props.correlation_id),
        body=body,
    )
    ch.basic_ack(delivery_tag=method.delivery_tag)


def make_faulty_handler(fault: str, every: int):
    seen = 0

    def faulty_handler(ch, method, props, body):
        nonlocal seen
        seen += 1
        if seen % every == 0:
            if fault == "lose":  # acknowledge without replying: a lost reply
                ch.basic_ack(delivery_tag=method.delivery_tag)
                return
            if fault == "wrong":  # F(n + 1) instead of F(n)
                body = str(int(body) + 1).encode()
        gmpy2_handler(ch, method, props, body)

    return faulty_handler


def serve(kind: str, queue: str, url: str = DEFAULT_URL, prefetch: int | None = None, fault: str = "wrong", every: int = 100) -> None:
    handler = {
        "naive": naive_handler,
        "gmpy2": gmpy2_handler,
        "echo": echo_handler,
    }.get(kind) or make_faulty_handler(fault, every)
    if prefetch is None:
        prefetch = DEFAULT_PREFETCH[kind]
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue=queue)
    channel.basic_qos(prefetch_count=prefetch)
    channel.basic_consume(queue=queue, on_message_callback=handler)

    def stop(signum, frame):
        # Leave the consuming loop from inside pika's own loop; unacked requests go back to the queue.
        connection.add_callback_threadsafe(channel.stop_consuming)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        channel.start_consuming()
    finally:
        try:
            connection.close()
        except Exception:  # the broker may already be gone
            pass


def serve_many(argv: list[str], procs: int) -> int:
    """Run ``procs`` copies of this server (each its own process and connection) until SIGTERM."""
    import subprocess

    cmd = [sys.executable, "-m", "bench.servers", *argv, "--procs", "1"]
    children = [subprocess.Popen(cmd) for _ in range(procs)]

    def stop(signum, frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes = [c.wait() for c in children]
    return max(codes, key=abs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.servers", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["naive", "gmpy2", "echo", "faulty"])
    parser.add_argument("--queue", required=True)
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--prefetch", type=int, default=None, help="default: naive 1 (the tutorial's), others 64")
    parser.add_argument("--fault", choices=["wrong", "lose"], default="wrong", help="faulty only")
    parser.add_argument("--every", type=int, default=100, help="faulty only: the K-th request is faulty")
    parser.add_argument("--procs", type=int, default=1, help="run this many server processes on the queue")
    args = parser.parse_args(argv)
    if args.procs > 1:
        one = [args.kind, "--queue", args.queue, "--url", args.url, "--fault", args.fault, "--every", str(args.every)]
        if args.prefetch is not None:
            one += ["--prefetch", str(args.prefetch)]
        return serve_many(one, args.procs)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    serve(args.kind, args.queue, args.url, args.prefetch, args.fault, args.every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
