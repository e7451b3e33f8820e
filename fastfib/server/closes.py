"""What a failed connection attempt, or a channel or connection close, means for the worker."""

from __future__ import annotations

import pika.exceptions


def describe(error: BaseException) -> str:
    """A one-line account of a pika error, unwrapping pika's wrappers down to the root cause."""
    for _ in range(5):
        inner = getattr(error, "exceptions", None)  # AMQPConnectionWorkflowFailed
        if inner:
            error = inner[-1]
        elif isinstance(getattr(error, "exception", None), BaseException):  # AMQPConnectorPhaseErrorBase
            error = error.exception
        elif len(error.args) == 1 and isinstance(error.args[0], BaseException):
            error = error.args[0]
        else:
            break
    text = str(error) or ""
    name = type(error).__name__
    return f"{name}: {text}" if text and text != name else name


def fatal_reason(error: BaseException) -> str | None:
    """Why ``error`` is not worth retrying ("credentials refused", "permission refused"), or None."""
    if isinstance(error, (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError)):
        return "credentials refused"
    if isinstance(error, pika.exceptions.ProbableAccessDeniedError):
        return "access to the virtual host refused"
    code = getattr(error, "reply_code", None)
    if isinstance(error, pika.exceptions.ConnectionClosedByBroker):
        if code == 403:
            return "credentials or permission refused"
        if code == 530:  # NOT_ALLOWED: for example no access to the vhost
            return "access refused"
    if isinstance(error, pika.exceptions.ChannelClosedByBroker) and code == 403:
        return "permission refused"
    return None
