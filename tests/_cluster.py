"""A local 3-node RabbitMQ cluster for the tests: a thin wrapper of scripts/cluster.sh.

The cluster's data lives in a directory of its own, ``$TMPDIR/fastfib-cluster-test``
(not the one of `make cluster-up`). :meth:`Cluster.down` stops every node by
its pid file, so a failed test leaves nothing running; and :meth:`Cluster.up`
first stops what a killed test run may have left there.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cluster.sh"
AMQP_PORTS = (5681, 5682, 5683)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Cluster:
    """``scripts/cluster.sh`` with a data directory of its own."""

    def __init__(self) -> None:
        self.dir = str(Path(tempfile.gettempdir()) / "fastfib-cluster-test")
        self.env = {**os.environ, "FASTFIB_CLUSTER_DIR": self.dir}
        self.urls: list[str] = []

    def run(self, *args: str, timeout: float = 180, check: bool = True) -> str:
        proc = subprocess.run([str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"scripts/cluster.sh {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
        return proc.stdout

    def up(self) -> list[str]:
        self.down()  # what a test run killed before its teardown may have left
        busy = [p for p in AMQP_PORTS if port_open(p)]
        if busy:
            raise AssertionError(f"ports {busy} are in use (a cluster from `make cluster-up`? stop it with "
                                 "`scripts/cluster.sh down`)")
        self.urls = self.run("up").split()
        return self.urls

    def down(self) -> None:
        self.run("down", check=False)

    def node_of(self, endpoint: str) -> int:
        """The node index (1..3) listening on ``host:port``."""
        return AMQP_PORTS.index(int(endpoint.rpartition(":")[2])) + 1

    def ctl(self, node: int, *args: str, timeout: float = 60) -> str:
        return self.run("ctl", str(node), *args, timeout=timeout)

    def kill(self, node: int) -> None:
        self.run("kill", str(node))

    def start(self, node: int) -> None:
        self.run("start", str(node))

    def queue_row(self, queue: str, ask: int) -> list[str]:
        """``name leader members online`` of the quorum queue, as node ``ask`` sees it."""
        for line in self.ctl(ask, "list_queues", "name", "leader", "online", "-q").splitlines():
            fields = line.split("\t")
            if fields and fields[0] == queue:
                return fields
        raise AssertionError(f"queue {queue!r} not listed by node {ask}")

    def leader(self, queue: str, ask: int = 1) -> int:
        """The node index of the quorum queue's leader."""
        name = self.queue_row(queue, ask)[1]  # ff-cI@localhost
        return int(name.split("@")[0][-1])

    def wait_all_online(self, queue: str, ask: int, timeout: float = 60) -> None:
        """Until the quorum queue has its 3 members online again."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.queue_row(queue, ask)[2].count("@") == 3:
                    return
            except AssertionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"queue {queue!r} does not have 3 members online after {timeout} s")
            time.sleep(0.5)
