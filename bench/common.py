"""What the harness, the report and the plots share: paths, row names, the order of rows.

A leaf module (it imports nothing from bench), so that bench/ has no import cycle.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URL = os.environ.get("FASTFIB_URL", "amqp://guest:guest@localhost:5672/%2F")

#: The two rows of a client cell: FibonacciRpcClient, and the bare pika loop doing the same
#: round trip, interleaved with it in the same load process (bench.load).
CLIENT_ROW = "fastfib-client"
CLIENT_BASELINE_ROW = "pika-same-round-trip"
#: The two rows of the asyncio cell (bench.aio_load), measured one after the other in one process.
AIO_ROW = "fastfib-aio"
AIO_BASELINE_ROW = "aio-pika-rpc"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _cell_order(row: dict):
    order = {"fixed": 0, "hot": 1, "distinct": 2}
    return (order[row["workload"]], row["n"] or 0, row["format"], row["mode"])


def _server_order(row: dict):
    kinds = {"echo": 0, "naive": 1, "gmpy2": 2, "fastfib": 3}
    return (row["api"] != "pika", kinds.get(row["server_kind"], 9), row["workers"] or 0, not row.get("cache", True))


def grouped_rows(rows: list[dict]):
    """[(cell label, [rows...]), ...] in grid order."""
    groups: dict[str, list[dict]] = {}
    # the client rows join the bare-pika rows of the same cell: that is their comparison
    for r in sorted(rows, key=lambda r: (_cell_order(r), _server_order(r))):
        groups.setdefault(r["cell_label"], []).append(r)
    return list(groups.items())
