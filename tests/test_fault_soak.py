"""Soak: 100000 mixed calls with the cache off; the workers' memory stays flat (issue 6, part 5).

The mix: small n (computed on the I/O thread), medium n above the inline
threshold (compute thread, where the kernel releases the GIL), both formats,
and about a tenth errors of every kind a request can cause (not a number,
negative, above the maximum, unsupported ``accept``). Every reply is checked
against the oracle. The resident set size of each worker is sampled with
psutil after a 10000-call warm-up and after each following block of 10000:
one leaked ``mpz_t`` or reply buffer per request, on any path, would add tens
of MB over 90000 calls; the bound is 40 MB. The kernel alone has its own leak
test (tests/test_kernel_leaks.py, millions of calls).
"""

from __future__ import annotations

import random
import time

import pytest
from _fault_helpers import Pool, RpcClient, check_replies, delete_queue, rss_mb, run_requests, unique

pytestmark = [pytest.mark.broker, pytest.mark.slow]

CALLS = 100_000
BLOCK = 10_000
MAX_N = 100_000
GROWTH_LIMIT_MB = 40.0  # the bound
#: Measured growth here is 0.0 MB; 10 MB over ~45000 requests per worker would be a leak of ~230 bytes
#: per request, which the issue's 40 MB bound alone would let through (a 600-byte leak shows as +33 MB).
TIGHT_LIMIT_MB = 10.0

_ACCEPT = ({"accept": "text/plain"}, {"accept": "application/octet-stream"}, None)
_ERRORS = (
    (b"abc", None), (b"1e3", None), (b"", None), (b"\xd9\xa1\xd9\xa2", None),  # invalid_argument
    (b"-5", None), (b"%d" % (MAX_N + 1), {"accept": "application/octet-stream"}),  # out_of_range
    (b"12", {"accept": "application/xml"}),  # unsupported_format
)


def _request(rng: random.Random) -> tuple[bytes, dict | None]:
    roll = rng.random()
    if roll < 0.10:
        return rng.choice(_ERRORS)
    if roll < 0.16:  # medium: the compute thread (above the 20000 inline threshold), both formats
        return b"%d" % rng.randrange(20_001, 60_000), rng.choice(_ACCEPT)
    return b"%d" % rng.randrange(0, 1500), rng.choice(_ACCEPT)


@pytest.mark.timeout(600)
def test_soak_100000_mixed_calls_cache_off_rss_flat(broker_url):
    queue = unique("soak")
    rng = random.Random(5)
    samples: list[dict[int, float]] = []
    try:
        with Pool(queue, "--cache-bytes", "0", "--max-n", str(MAX_N), workers=2) as pool, RpcClient(queue) as client:
            pool.wait_ready()
            workers = sorted(pool.worker_pids())
            started = time.monotonic()
            for block in range(CALLS // BLOCK):
                sent = run_requests(client, [_request(rng) for _ in range(BLOCK)], window=64, timeout=300)
                assert check_replies(client, sent, MAX_N) == 0, "duplicate replies without any fault"
                client.replies.clear()  # keep the client's own memory flat
                samples.append(rss_mb(workers))
                if block == 0:
                    warm = time.monotonic()
            elapsed = time.monotonic() - started
            assert sorted(pool.worker_pids()) == workers, "a worker was restarted during the soak"
            assert "Traceback" not in pool.text() and "internal error" not in pool.text()
    finally:
        delete_queue(queue)
    baseline, final = samples[0], samples[-1]
    growth = {pid: final[pid] - baseline[pid] for pid in workers}
    peak = {pid: max(s[pid] for s in samples) - baseline[pid] for pid in workers}
    rate = (CALLS - BLOCK) / (time.monotonic() - warm) if elapsed else 0
    print(f"\nsoak: {CALLS} calls in {elapsed:.1f} s ({rate:.0f}/s after warm-up), cache off; worker RSS after "
          f"warm-up {', '.join(f'{baseline[p]:.1f}' for p in workers)} MB, growth to the end "
          f"{', '.join(f'{growth[p]:+.1f}' for p in workers)} MB (peak {', '.join(f'{peak[p]:+.1f}' for p in workers)} MB)")
    for pid in workers:
        assert growth[pid] < GROWTH_LIMIT_MB, f"worker {pid} grew by {growth[pid]:.1f} MB over {CALLS - BLOCK} calls"
        assert growth[pid] < TIGHT_LIMIT_MB, f"worker {pid} grew by {growth[pid]:.1f} MB: a leak per request?"
