"""Configuration of ``fastfib serve``: every flag, its ``FASTFIB_*`` variable and its default.

Each option is declared once in :data:`SERVE_OPTIONS`; from that table come the
argparse flags (``fastfib serve --help`` shows each default and variable),
the environment lookup and the validation. Precedence: a flag given on the
command line wins over the environment variable, which wins over the
default. An empty variable counts as unset (``FASTFIB_X=`` in a systemd
``EnvironmentFile``). A variable that does not parse is a usage error naming
the variable (``fastfib serve`` exits 2), the same as a bad flag.

``FASTFIB_URL`` may hold several URLs (cluster nodes) separated by spaces or
commas; a comma inside a URL must then be written ``%2C``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .cache import DEFAULT_CACHE_BYTES
from .limits import DEFAULT_MAX_REPLY_BYTES
from .logs import LOG_FORMATS, LOG_LEVELS, mask_url
from .protocol import DEFAULT_MAX_N, DEFAULT_QUEUE, DEFAULT_URL
from .server.settings import (
    DEFAULT_INLINE_MAX_N,
    DEFAULT_PREFETCH,
    MAX_INLINE_MAX_N,
    MAX_PREFETCH,
    MAX_SERVED_N,
    QUEUE_TYPES,
    WIRES,
    WorkerConfig,
)
from .urls import split_urls

DEFAULT_METRICS_HOST = "127.0.0.1"


class ConfigError(ValueError):
    """A bad or inconsistent setting; the message names the flag or variable."""


# --------------------------------------------------------------------------- parsers
# Each takes the text of a flag or of a variable and raises argparse.ArgumentTypeError.


def non_negative_int(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def port(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean (1/0, true/false, yes/no, on/off): {text!r}")


def choice(*values: str, fold: Callable[[str], str] = str.lower) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = fold(text.strip())
        if value not in values:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(values)})")
        return value

    parse.__name__ = "choice"  # argparse names the type in some messages
    return parse


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text.strip()


def url_list(text: str) -> list[str]:
    """URLs separated by spaces or commas (the form of ``FASTFIB_URL``, and of each ``--url``)."""
    try:
        return split_urls(text)
    except ValueError:
        raise argparse.ArgumentTypeError("no URL given") from None


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Option:
    """One ``serve`` setting: its flag, its environment variable, how it parses, its default."""

    flag: str
    env: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str | None = None
    kind: str = "value"  # "value", "bool" (--x / --no-x) or "list" (repeatable flag)
    shown_default: str | None = None  # how --help shows the default, when str(default) will not do

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _cpu_count() -> int:
    return os.cpu_count() or 1


SERVE_OPTIONS: tuple[Option, ...] = (
    Option("--url", "FASTFIB_URL", url_list, (DEFAULT_URL,), kind="list", metavar="URL",
           help="broker URL; for the nodes of a cluster, repeat it or give several separated by spaces or commas, "
                "as the variable takes them (a worker that loses its node fails over to the next)",
           shown_default=DEFAULT_URL),
    Option("--queue", "FASTFIB_QUEUE", non_empty, DEFAULT_QUEUE, help="the service queue"),
    Option("--workers", "FASTFIB_WORKERS", positive_int, _cpu_count, metavar="N",
           help="worker processes", shown_default="the CPU count"),
    Option("--prefetch", "FASTFIB_PREFETCH", positive_int, DEFAULT_PREFETCH, metavar="N",
           help="unacknowledged requests each worker may hold (basic.qos prefetch_count)"),
    Option("--max-n", "FASTFIB_MAX_N", non_negative_int, DEFAULT_MAX_N, metavar="N",
           help="the largest n served; larger n get an out_of_range error"),
    Option("--max-reply-bytes", "FASTFIB_MAX_REPLY_BYTES", positive_int, DEFAULT_MAX_REPLY_BYTES, metavar="BYTES",
           help="the largest reply body sent; a request whose F(n) would be larger gets out_of_range before it is "
                "computed. Keep it at or below the broker's max_message_size (RabbitMQ 4.x: 16 MiB, 3.x: 128 MiB)",
           shown_default="16777216 (16 MiB)"),
    Option("--cache-bytes", "FASTFIB_CACHE_BYTES", non_negative_int, DEFAULT_CACHE_BYTES, metavar="BYTES",
           help="byte budget of each worker's LRU cache of large replies; 0 turns it off"),
    Option("--inline-max-n", "FASTFIB_INLINE_MAX_N", non_negative_int, DEFAULT_INLINE_MAX_N, metavar="N",
           help="n up to this are computed on the I/O thread, larger n on the compute thread"),
    Option("--kernel-threads", "FASTFIB_KERNEL_THREADS", positive_int, 1, metavar="K",
           help="threads for one large F(n) (2 uses a second core; see docs/kernel.md). For latency with fewer "
                "workers than cores; at full load, more workers beat more threads per worker"),
    Option("--log-level", "FASTFIB_LOG_LEVEL", choice(*LOG_LEVELS, fold=str.upper), "INFO",
           metavar="{" + ",".join(LOG_LEVELS) + "}", help="log level"),
    Option("--log-format", "FASTFIB_LOG_FORMAT", choice(*LOG_FORMATS), "text", metavar="{text,json}",
           help="text: human-readable lines; json: one JSON object per line"),
    Option("--metrics-port", "FASTFIB_METRICS_PORT", port, None, metavar="PORT",
           help="serve Prometheus metrics (/metrics) and a health check (/healthz) on this port; 0 picks a free "
                "port (logged). Needs prometheus_client, the [metrics] extra (pip install prometheus_client)", shown_default="off"),
    Option("--metrics-host", "FASTFIB_METRICS_HOST", non_empty, DEFAULT_METRICS_HOST, metavar="HOST",
           help="address the metrics endpoint listens on"),
    Option("--queue-type", "FASTFIB_QUEUE_TYPE", choice(*QUEUE_TYPES), "quorum",
           metavar="{" + ",".join(QUEUE_TYPES) + "}",
           help="how a missing queue is declared: quorum (durable, replicated; the current RabbitMQ tutorial's) or "
                "classic. An existing queue is served as it is, whatever its kind"),
    Option("--queue-durable", "FASTFIB_QUEUE_DURABLE", boolean, True, kind="bool",
           help="declare a durable queue; --queue-type classic --no-queue-durable is the seed tutorial's transient "
                "queue (RabbitMQ 4.3 refuses it by default). Quorum queues are always durable"),
    Option("--dead-letter-exchange", "FASTFIB_DEAD_LETTER_EXCHANGE", non_empty, None, metavar="EXCHANGE",
           help="declare the queue with this dead-letter exchange (x-dead-letter-exchange); declaring the "
                "exchange and binding a queue to it is the deployment's job", shown_default="none"),
    Option("--dead-letter-routing-key", "FASTFIB_DEAD_LETTER_ROUTING_KEY", non_empty, None, metavar="KEY",
           help="routing key for dead-lettered requests (x-dead-letter-routing-key)",
           shown_default="the request's own"),
    Option("--wire", "FASTFIB_WIRE", choice(*WIRES), "fast", metavar="{" + ",".join(WIRES) + "}",
           help="fast: the worker decodes its deliveries and encodes its replies itself (falls back to pika, "
                "with a warning, if the installed pika fails the startup self-check); pika: pika's public API "
                "only (docs/server.md)"),
    Option("--delivery-limit", "FASTFIB_DELIVERY_LIMIT", positive_int, None, metavar="N",
           help="quorum queues: a request returned to the queue more than N times is dead-lettered (or "
                "dropped without a dead-letter exchange)", shown_default="none"),
)


def add_arguments(parser: argparse.ArgumentParser, options: tuple[Option, ...]) -> None:
    """Add a flag for each option, its help naming the default and the variable.

    The flags default to None: :func:`resolve` fills in the environment or the default afterwards.
    """
    for opt in options:
        shown = opt.shown_default if opt.shown_default is not None else str(opt.default)
        text = f"{opt.help} (default: {shown}; env {opt.env})".replace("%", "%%")
        if opt.kind == "bool":
            parser.add_argument(opt.flag, dest=opt.dest, action=argparse.BooleanOptionalAction, default=None,
                                help=text)
        elif opt.kind == "list":
            parser.add_argument(opt.flag, dest=opt.dest, action="append", type=opt.parse, default=None,
                                metavar=opt.metavar, help=text)
        else:
            parser.add_argument(opt.flag, dest=opt.dest, type=opt.parse, default=None, metavar=opt.metavar,
                                help=text)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fastfib serve`` (:data:`SERVE_OPTIONS`)."""
    add_arguments(parser, SERVE_OPTIONS)


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None,
            options: tuple[Option, ...] = SERVE_OPTIONS) -> dict[str, Any]:
    """The value of each option: the flag if given, else its variable, else its default.

    Raises :class:`ConfigError` naming the variable when one does not parse.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for opt in options:
        value = getattr(args, opt.dest, None)
        if value is None:
            raw = environ.get(opt.env, "")
            if raw.strip():
                parse = url_list if opt.kind == "list" else opt.parse
                try:
                    value = parse(raw)
                except (argparse.ArgumentTypeError, ValueError) as exc:
                    shown = mask_url(raw) if opt.kind == "list" else raw
                    raise ConfigError(f"environment variable {opt.env}={shown!r}: {exc}") from None
        if value is None:
            value = opt.default() if callable(opt.default) else opt.default
        if opt.kind == "list":  # each --url may hold several URLs: one flat tuple
            value = tuple(u for item in value for u in ([item] if isinstance(item, str) else item))
        values[opt.dest] = value
    return values


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``fastfib serve`` runs with, once flags, environment and defaults are merged."""

    worker: WorkerConfig
    workers: int
    metrics_port: int | None
    metrics_host: str


def serve_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServeSettings:
    """Merge and check the settings; raises :class:`ConfigError` on a bad or inconsistent one."""
    from . import MAX_N

    v = resolve(args, environ)
    if v["max_n"] > MAX_N:
        raise ConfigError(f"--max-n {v['max_n']} is above the kernel's limit {MAX_N}")
    if not v["queue_durable"] and v["queue_type"] == "quorum":
        raise ConfigError("--no-queue-durable (FASTFIB_QUEUE_DURABLE) needs --queue-type classic: a quorum queue is "
                          "always durable (the seed tutorial's transient queue is --queue-type classic "
                          "--no-queue-durable)")
    if v["max_n"] > MAX_SERVED_N:
        raise ConfigError(f"--max-n {v['max_n']} is above {MAX_SERVED_N}, the largest n whose decimal reply fits "
                          "RabbitMQ's default message size limit (128 MiB)")
    if v["prefetch"] > MAX_PREFETCH:
        raise ConfigError(f"--prefetch {v['prefetch']} is above {MAX_PREFETCH}, the most basic.qos can carry")
    if v["inline_max_n"] > MAX_INLINE_MAX_N:
        raise ConfigError(f"--inline-max-n {v['inline_max_n']} is above {MAX_INLINE_MAX_N}: n that large would "
                          "block the worker's I/O thread (no other request, no heartbeat) for too long")
    if v["delivery_limit"] is not None and v["queue_type"] != "quorum":
        raise ConfigError("--delivery-limit (FASTFIB_DELIVERY_LIMIT) needs --queue-type quorum")
    if v["dead_letter_routing_key"] is not None and v["dead_letter_exchange"] is None:
        raise ConfigError("--dead-letter-routing-key needs --dead-letter-exchange")
    import pika

    for url in v["url"]:
        try:
            pika.URLParameters(url)
        except Exception as exc:
            raise ConfigError(f"bad broker URL {mask_url(url)}: {exc}") from None
    worker = WorkerConfig(
        urls=v["url"],
        queue=v["queue"],
        prefetch=v["prefetch"],
        max_n=v["max_n"],
        max_reply_bytes=v["max_reply_bytes"],
        cache_bytes=v["cache_bytes"],
        inline_max_n=v["inline_max_n"],
        kernel_threads=v["kernel_threads"],
        log_level=v["log_level"],
        log_format=v["log_format"],
        queue_durable=v["queue_durable"],
        queue_type=v["queue_type"],
        dead_letter_exchange=v["dead_letter_exchange"],
        dead_letter_routing_key=v["dead_letter_routing_key"],
        delivery_limit=v["delivery_limit"],
        metrics=v["metrics_port"] is not None,
        wire=v["wire"],
        pool_workers=v["workers"],
    )
    return ServeSettings(worker=worker, workers=v["workers"], metrics_port=v["metrics_port"],
                         metrics_host=v["metrics_host"])
