"""``fastfib health``: is the pool connected and consuming? Exit 0 if so, 1 if not, 2 on bad arguments.

Two checks, each one line on stdout (``broker: OK ...`` / ``pool: FAIL ...``):

- **broker** (unless ``--no-broker``): connects to the broker (``--url``,
  ``FASTFIB_URL``; several URLs are tried in turn) and declares the queue
  *passively*, which creates nothing and tells the queue's consumer count.
  Healthy when the queue exists and has at least ``--min-consumers``
  consumers (default 1). It sees the consumers of every pool on the queue,
  on every host: the check of a service, not of one process. A pool of N > 1
  workers holds N + 1 consumers (worker 0's idle consumer, docs/server.md).
- **pool** (with ``--metrics-url``, or when ``FASTFIB_METRICS_PORT`` is set):
  ``GET <metrics-url>/healthz`` on a pool started with ``--metrics-port``.
  Healthy on HTTP 200, which the supervisor answers when every one of its
  workers consumes; 503 while some do not (starting, reconnecting, a worker
  being restarted, stopping). The check of this host's pool.

Meant for process managers and probes: a container's health check, a
Kubernetes readiness probe, a monitoring script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

from .config import ConfigError, Option, add_arguments, non_empty, non_negative_int, resolve
from .exitcodes import EXIT_HEALTHY, EXIT_UNHEALTHY
from .logs import mask_url
from .protocol import DEFAULT_QUEUE, DEFAULT_URL


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"must be a number of seconds in (0, 3600), got {text}")
    return value


HEALTH_OPTIONS: tuple[Option, ...] = (
    Option("--url", "FASTFIB_URL", non_empty, (DEFAULT_URL,), kind="list", metavar="URL",
           help="broker URL; repeat it for the nodes of a cluster (tried in turn)", shown_default=DEFAULT_URL),
    Option("--queue", "FASTFIB_QUEUE", non_empty, DEFAULT_QUEUE, help="the service queue"),
    Option("--min-consumers", "FASTFIB_HEALTH_MIN_CONSUMERS", non_negative_int, 1, metavar="N",
           help="the broker check fails with fewer consumers on the queue"),
    Option("--metrics-url", "FASTFIB_HEALTH_METRICS_URL", non_empty, None, metavar="URL",
           help="also check the pool's /healthz at this base URL (e.g. http://127.0.0.1:9100)",
           shown_default="http://$FASTFIB_METRICS_HOST:$FASTFIB_METRICS_PORT when FASTFIB_METRICS_PORT is set, "
                         "else no pool check"),
    Option("--timeout", "FASTFIB_HEALTH_TIMEOUT", _positive_seconds, 5.0, metavar="SECONDS",
           help="give up on each check after this long"),
)


def add_health_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fastfib health``."""
    parser.description = __doc__.split("\n\n", 1)[0].replace("``", "")
    parser.epilog = ("Every option can also be set with the environment variable shown; a flag wins over the "
                     "environment, which wins over the default.")
    add_arguments(parser, HEALTH_OPTIONS)
    parser.add_argument("--no-broker", action="store_true",
                        help="skip the broker check (then --metrics-url is needed)")


@dataclass(frozen=True)
class Check:
    """The result of one check."""

    name: str
    ok: bool
    message: str

    def line(self) -> str:
        return f"{self.name}: {'OK' if self.ok else 'FAIL'} - {self.message}"


def check_broker(urls: tuple[str, ...], queue: str, min_consumers: int = 1, timeout: float = 5.0) -> Check:
    """Passive declare of ``queue``: it exists and has at least ``min_consumers`` consumers."""
    import pika
    import pika.exceptions

    params = []
    for url in urls:
        p = pika.URLParameters(url)
        p.connection_attempts, p.retry_delay = 1, 0
        p.socket_timeout = p.stack_timeout = p.blocked_connection_timeout = timeout
        p.client_properties = {"connection_name": f"fastfib-health pid={os.getpid()}"}
        params.append(p)
    where = ", ".join(mask_url(u) for u in urls)
    try:
        connection = pika.BlockingConnection(params)
    except pika.exceptions.AMQPError as exc:
        return Check("broker", False, f"cannot connect to {where}: {_describe(exc)}")
    try:
        channel = connection.channel()
        ok = channel.queue_declare(queue, passive=True).method
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return Check("broker", False, f"queue {queue!r} does not exist")
        return Check("broker", False, f"cannot inspect queue {queue!r}: {exc.reply_code} {exc.reply_text}")
    except pika.exceptions.AMQPError as exc:
        return Check("broker", False, f"cannot inspect queue {queue!r}: {_describe(exc)}")
    finally:
        try:
            connection.close()
        except Exception:  # already closed by the broker
            pass
    consumers, ready = ok.consumer_count, ok.message_count
    healthy = consumers >= min_consumers
    return Check("broker", healthy, f"queue {queue!r}: {consumers} consumer(s) (at least {min_consumers} wanted), "
                                    f"{ready} request(s) waiting")


def check_pool(metrics_url: str, timeout: float = 5.0) -> Check:
    """``GET <metrics_url>/healthz``: 200 is healthy."""
    url = metrics_url.rstrip("/")
    if not url.endswith("/healthz"):
        url += "/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - an operator-given URL
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Check("pool", False, f"cannot reach {url}: {reason}")
    try:
        info = json.loads(body)
        detail = f"{info['consuming']}/{info['workers']} workers consuming, status {info['status']}"
    except (ValueError, KeyError, TypeError):
        detail = f"unexpected answer {body[:100]!r}"
    return Check("pool", status == 200, f"{url}: HTTP {status}, {detail}")


def _describe(error: BaseException) -> str:
    inner = getattr(error, "exceptions", None)  # AMQPConnectionWorkflowFailed: the last attempt's error
    if inner:
        error = inner[-1]
    cause = getattr(error, "exception", None)
    if isinstance(cause, BaseException):
        error = cause
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _default_metrics_url(environ) -> str | None:
    port = environ.get("FASTFIB_METRICS_PORT", "").strip()
    if not port or port == "0":
        return None
    host = environ.get("FASTFIB_METRICS_HOST", "").strip() or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # listening everywhere: ask locally
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def run(args: argparse.Namespace, environ=None) -> int:
    """Run the checks ``args`` asks for, print one line each, return the exit code."""
    environ = os.environ if environ is None else environ
    try:
        values = resolve(args, environ, HEALTH_OPTIONS)
    except ConfigError as exc:
        args.parser.error(str(exc))
    metrics_url = values["metrics_url"] or _default_metrics_url(environ)
    if args.no_broker and not metrics_url:
        args.parser.error("--no-broker leaves nothing to check without --metrics-url")
    checks = []
    if not args.no_broker:
        try:
            checks.append(check_broker(values["url"], values["queue"], values["min_consumers"], values["timeout"]))
        except ValueError as exc:  # a malformed URL
            args.parser.error(f"bad broker URL: {exc}")
    if metrics_url:
        checks.append(check_pool(metrics_url, values["timeout"]))
    for check in checks:
        print(check.line())
    sys.stdout.flush()
    return EXIT_HEALTHY if all(c.ok for c in checks) else EXIT_UNHEALTHY
