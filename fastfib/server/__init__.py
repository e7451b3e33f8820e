"""The worker process of ``fastfib serve``, split by responsibility.

- :mod:`.settings`     what a worker runs with (:class:`~.settings.WorkerConfig`, defaults, bounds); no pika
- :mod:`.lifecycle`    connect, channel, declare, consume, reconnect, stop (:class:`~.lifecycle.Worker`)
- :mod:`.dispatch`     the request policy: reply_to, deadline, parse, inline or offload, cache, coalescing
- :mod:`.compute`      the compute thread and its jobs
- :mod:`.acks`         acknowledgement batching
- :mod:`.reply_guard`  the Direct Reply-to guard
- :mod:`.closes`       what a channel or connection close means
- :mod:`.stats`        the worker's counters and a rate-limited logger

The AMQP codec of the hot path is :mod:`fastfib.wire`; every use of pika's
private API is in :mod:`fastfib.pika_seam`. Importing this package imports
nothing of pika: :mod:`fastfib.config` reads :mod:`.settings` alone.
"""
