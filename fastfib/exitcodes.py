"""Every exit code of the ``fastfib`` commands, in one place.

``fastfib serve`` (the pool and each worker process), ``fastfib call`` and
``fastfib health`` exit with these; argparse itself exits 2 on bad arguments.
"""

from __future__ import annotations

EXIT_OK = 0
#: Something failed: a worker crashed, the pool had to kill workers, a health check failed.
EXIT_FAILURE = 1
#: Bad arguments or settings (argparse's own code), or a missing optional dependency they need.
EXIT_USAGE = 2
#: ``fastfib call``: the server answered with an error (or an undecodable reply).
EXIT_REMOTE_ERROR = 3
#: ``fastfib call``: no answer (timeout, unroutable request, unreachable broker).
EXIT_TIMEOUT = 4
#: Credentials refused, or permissions (vhost access, queue configure/read, publish) refused.
EXIT_ACCESS_REFUSED = 77  # sysexits.h EX_NOPERM
#: The broker refused to declare the queue as configured (e.g. RabbitMQ 4.3 denies transient
#: non-exclusive queues): a configuration problem, not retried.
EXIT_CONFIG = 78  # sysexits.h EX_CONFIG

#: ``fastfib health``.
EXIT_HEALTHY = EXIT_OK
EXIT_UNHEALTHY = EXIT_FAILURE
