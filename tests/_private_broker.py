"""A private RabbitMQ node for tests that must change broker settings (issue 14).

The shared test broker must never be reconfigured, so tests that need, say, a
lower ``max_message_size`` start a node of their own from the installed
``rabbitmq-server``: its own node name, AMQP and distribution ports (default
5691 / 25691, ``FASTFIB_PRIVATE_BROKER_PORT`` moves both), data, logs and
``rabbitmq.conf`` in a temp dir, no plugins. :func:`private_broker` is a
context manager: the node is stopped (``rabbitmqctl stop``, then SIGKILL of
its process group) whatever happened. A missing ``rabbitmq-server`` FAILS.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PORT = int(os.environ.get("FASTFIB_PRIVATE_BROKER_PORT", "5691"))


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def private_broker(config: str, port: int = PORT, name: str = "ff-compat-test") -> Iterator[str]:
    """Run a node with ``config`` (rabbitmq.conf text); yields its AMQP URL (guest/guest)."""
    server = shutil.which("rabbitmq-server") or "/usr/sbin/rabbitmq-server"
    if not Path(server).exists():
        raise AssertionError("rabbitmq-server is not installed: the private-broker tests need it")
    if _answers(port):
        raise AssertionError(f"port {port} is taken: stop whatever listens there or set FASTFIB_PRIVATE_BROKER_PORT")
    base = Path(tempfile.mkdtemp(prefix="fastfib-broker-"))
    (base / "mnesia").mkdir()
    (base / "log").mkdir()
    (base / "rabbitmq.conf").write_text(config + "\nloopback_users = none\n")
    (base / "enabled_plugins").write_text("")
    if os.geteuid() == 0:  # the server script drops to the rabbitmq user: it must own its dirs
        try:
            user = pwd.getpwnam("rabbitmq")
            for path in [base, *base.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)
        except KeyError:
            pass
    node = f"{name}@localhost"
    env = {**os.environ, "RABBITMQ_NODENAME": node, "RABBITMQ_NODE_PORT": str(port),
           "RABBITMQ_DIST_PORT": str(port + 20000), "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
           "RABBITMQ_LOG_BASE": str(base / "log"), "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
           "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
           "RABBITMQ_PID_FILE": str(base / "pid")}
    out = open(base / "server.out", "wb")
    proc = subprocess.Popen([server], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the private node did not start:\n{(base / 'server.out').read_text()[-3000:]}")
            time.sleep(0.2)
        yield f"amqp://guest:guest@127.0.0.1:{port}/%2F"
    finally:
        subprocess.run(["rabbitmqctl", "-n", node, "stop"], env=env, capture_output=True, timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        out.close()
        shutil.rmtree(base, ignore_errors=True)
