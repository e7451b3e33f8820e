"""The asyncio client cell: fastfib's AsyncFibonacciRpcClient against aio-pika's RPC client.

A load process (:mod:`bench.load`) runs it for cells with ``api: "aio"``. The
aio-pika side is the RPC client as aio-pika's documentation writes it
(RabbitMQ tutorial six, "Remote procedure call", aio-pika version): an
exclusive callback queue consumed with ``no_ack``, one future per correlation
id, ``default_exchange.publish`` of a ``Message`` whose body is ``str(n)``.

Both sides make the same calls with the same driver: ``calls`` calls of
``client.call(n)``, at most ``inflight`` in flight (an ``asyncio.Semaphore``),
after a short unmeasured warm-up; one side after the other, the order
alternating from one repeat to the next. Each side's time and CPU time
(``time.process_time``: this process, all threads) cover its own calls only.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import gmpy2

WARMUP_CALLS = 200


class AioPikaRpcClient:
    """aio-pika's documented RPC client (tutorial six), with the URL and queue as arguments."""

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = queue
        self.futures: dict[str, asyncio.Future] = {}

    async def connect(self) -> AioPikaRpcClient:
        import aio_pika

        self.connection = await aio_pika.connect(self.url)
        self.channel = await self.connection.channel()
        self.callback_queue = await self.channel.declare_queue(exclusive=True)
        await self.callback_queue.consume(self.on_response, no_ack=True)
        return self

    async def on_response(self, message) -> None:
        if message.correlation_id is None:
            return
        future = self.futures.pop(message.correlation_id)
        future.set_result(message.body)

    async def call(self, n: int) -> int:
        import aio_pika

        correlation_id = str(uuid.uuid4())
        future = asyncio.get_running_loop().create_future()
        self.futures[correlation_id] = future
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                str(n).encode(),
                content_type="text/plain",
                correlation_id=correlation_id,
                reply_to=self.callback_queue.name,
            ),
            routing_key=self.queue,
        )
        return int(await future)

    async def close(self) -> None:
        await self.connection.close()


async def _drive(call, n: int, calls: int, inflight: int, want: int, timeout: float) -> None:
    gate = asyncio.Semaphore(inflight)

    async def one() -> None:
        async with gate:
            value = await call(n)
        if value != want:
            raise ValueError(f"WRONG value for n={n}: {value}")

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(calls))), timeout)


async def _side(call, n: int, calls: int, inflight: int, timeout: float) -> dict:
    want = int(gmpy2.fib(n))
    await _drive(call, n, WARMUP_CALLS, inflight, want, timeout)
    t_start, cpu0, t0 = time.time(), time.process_time(), time.perf_counter()
    await _drive(call, n, calls, inflight, want, timeout)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {
        "ok": True, "count": calls, "verified": calls + WARMUP_CALLS, "stray": 0,
        "t_start": t_start, "t_end": time.time(), "elapsed": elapsed, "busy_s": elapsed,
        "throughput": calls / elapsed, "hist": None, "min_count_reached": True,
        "side_cpu_s": cpu, "inflight": inflight,
    }


async def _pair(url: str, queue: str, n: int, calls: int, inflight: int, fastfib_first: bool, timeout: float) -> dict:
    from fastfib.aio import AsyncFibonacciRpcClient

    ours = AsyncFibonacciRpcClient(url, queue=queue, timeout=timeout, format="decimal")
    theirs = AioPikaRpcClient(url, queue)
    await ours.connect()
    await theirs.connect()
    try:
        results = {}
        for side in (("fastfib", "aio-pika") if fastfib_first else ("aio-pika", "fastfib")):
            call = ours.call if side == "fastfib" else theirs.call
            results[side] = await _side(call, n, calls, inflight, timeout)
    finally:
        await ours.close()
        await theirs.close()
    return results


def run_aio_cell(url: str, cell: dict, n: int) -> dict:
    """One repeat of the asyncio cell: fastfib's result, with aio-pika's as ``"baseline"``."""
    calls = int(cell.get("calls", 4000))
    inflight = int(cell.get("inflight", 64))
    timeout = float(cell.get("lost_timeout", 30.0))
    fastfib_first = int(cell.get("repeat", 0)) % 2 == 0
    try:
        sides = asyncio.run(_pair(url, cell["queue"], n, calls, inflight, fastfib_first, timeout))
    except (asyncio.TimeoutError, TimeoutError):
        return {"ok": False, "error": f"LOST replies: {calls} calls not done within {timeout:g} s"}
    except ValueError as exc:
        return {"ok": False, "error": str(exc)}
    result = sides["fastfib"]
    result["baseline"] = sides["aio-pika"]
    result["pair_verified"] = result["baseline"]["pair_verified"] = result["verified"] + result["baseline"]["verified"]
    result["fastfib_first"] = fastfib_first
    return result
