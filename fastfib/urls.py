"""Broker URL lists: parse them, mask their passwords, name the host:port each one reaches.

A cluster is given to fastfib as several AMQP URLs, one per node: a list, or
one string with the URLs separated by spaces or commas (the form of
``FASTFIB_URL``; a comma inside a URL must then be written ``%2C``). This
module is pure string handling: it imports no pika.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from .logs import mask_secrets, mask_url
from .protocol import DEFAULT_URL

__all__ = ["URL_ENV", "split_urls", "client_urls", "endpoint", "describe_failures", "describe_error", "masked"]

#: The environment variable that holds the broker URL(s) of the CLI and the clients.
URL_ENV = "FASTFIB_URL"

_DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}


def split_urls(value: str | Iterable[str]) -> list[str]:
    """The URLs of ``value``: one string separated by spaces or commas, or an iterable of such strings.

    Raises ``ValueError`` when there is none, ``TypeError`` for anything but
    strings.
    """
    if isinstance(value, bytes):
        raise TypeError("url must be a str or a list of str, not bytes")
    items = [value] if isinstance(value, str) else list(value)
    urls: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"url must be a str or a list of str, not a list holding {type(item).__name__}")
        urls.extend(item.replace(",", " ").split())
    if not urls:
        raise ValueError("no broker URL given")
    return urls


def client_urls(url: str | Iterable[str] | None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The URLs a client connects to: ``url``, else ``$FASTFIB_URL``, else the default URL."""
    if url is None:
        environ = os.environ if environ is None else environ
        url = environ.get(URL_ENV, "").strip() or DEFAULT_URL
    return split_urls(url)


def endpoint(url: str) -> str:
    """``host:port`` of an AMQP URL (the default port of its scheme when it names none)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    host = parts.hostname or "localhost"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    if port is None:
        port = _DEFAULT_PORTS.get(parts.scheme.lower(), 5672)
    return f"{host}:{port}"


def describe_failures(failures: Iterable[tuple[str, BaseException]]) -> str:
    """``host:port (why), host:port (why)`` for the connection attempts that failed, passwords masked."""
    return "; ".join(f"{endpoint(url)} ({describe_error(exc)})" for url, exc in failures)


def describe_error(exc: BaseException) -> str:
    """The innermost cause of a pika connection error, e.g. ``ConnectionRefusedError: [Errno 111] ...``.

    pika wraps the socket error in its own exceptions without chaining them:
    as the first argument, as ``.exception`` or as the last of ``.exceptions``.
    """
    for _ in range(8):
        inner = getattr(exc, "exception", None)
        if not isinstance(inner, BaseException):
            several = getattr(exc, "exceptions", None)
            inner = several[-1] if several else None
        if not isinstance(inner, BaseException) and exc.args and isinstance(exc.args[0], BaseException):
            inner = exc.args[0]
        if not isinstance(inner, BaseException):
            break
        exc = inner
    text = str(exc) or repr(exc)
    return mask_secrets(f"{type(exc).__name__}: {text}")


def masked(urls: Iterable[str]) -> str:
    """The URLs, passwords masked, separated by spaces: fit for a message."""
    return " ".join(mask_url(u) for u in urls)
