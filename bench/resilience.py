"""Cost of the resilience path per call: routing (fallback chain, breaker checks, retry
budget, expected-service-time bookkeeping) plus the breaker around the executor call.

In process, no gRPC: the same request on the example ``simple`` ONNX model is served N times
through ``InferenceService.infer`` directly and through ``Router.infer``; the difference per
call is what the resilience layer costs. The breaker's own cost (``calling()`` around a
no-op) is measured on its own.

    python bench/resilience.py [--calls 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np

from sluice.app import EXAMPLE_REPOSITORY
from sluice.breaker import BackendBreaker
from sluice.domain import InferRequest, InferResult, InputTensor
from sluice.metrics import Metrics
from sluice.routing import Router
from sluice.service import InferenceService
from sluice.settings import BreakerSettings, Settings

ONES = np.ones((1, 16), dtype=np.int32).tobytes()


def request() -> InferRequest:
    return InferRequest(
        model="simple",
        inputs=[
            InputTensor(name=n, datatype="INT32", shape=(1, 16), raw=ONES)
            for n in ("INPUT0", "INPUT1")
        ],
    )


async def per_call_us(call: object, calls: int) -> float:
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            await call()  # type: ignore[operator]
        rounds.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(rounds)


class _InstantService:
    """Answers at once: what remains of router.infer is the resilience bookkeeping."""

    def __init__(self, result: InferResult) -> None:
        self._result = result

    def fallbacks(self, name: str) -> tuple[()]:
        return ()

    def ensure_can_serve(self, name: str, version: str = "") -> None:
        return None

    async def infer(self, request: InferRequest, *, deadline: float | None) -> InferResult:
        return self._result


def breaker_us(calls: int) -> float:
    breaker = BackendBreaker("bench", BreakerSettings(), clock=time.monotonic)
    started = time.perf_counter()
    for _ in range(calls):
        with breaker.calling():
            pass
    return (time.perf_counter() - started) / calls * 1e6


async def main(calls: int) -> None:
    settings = Settings(metrics_port=None)
    metrics = Metrics()
    service = InferenceService(settings, repository=EXAMPLE_REPOSITORY, metrics=metrics)
    await service.load("simple")
    router = Router(service, settings, metrics=metrics, clock=time.monotonic)
    deadline = time.monotonic() + 3600

    async def direct() -> None:
        await service.infer(request(), deadline=deadline)

    async def routed() -> None:
        await router.infer(request(), deadline=deadline)

    await per_call_us(direct, 200)
    base = await per_call_us(direct, calls)
    with_router = await per_call_us(routed, calls)
    instant = InferResult(model="simple", version="1", id="", outputs=[], backend="onnxruntime")
    bare = Router(_InstantService(instant), settings, metrics=metrics, clock=time.monotonic)  # type: ignore[arg-type]

    async def bookkeeping() -> None:
        instant.parameters.clear()
        await bare.infer(request(), deadline=deadline)

    routing_only = await per_call_us(bookkeeping, calls)
    breaker = breaker_us(calls * 10)
    await service.close()
    print("| path | µs per call |\n|---|---:|")
    print(f"| service.infer (validation, batcher, ONNX Runtime, breaker) | {base:.1f} |")
    print(f"| router.infer (the same, through the resilience layer) | {with_router:.1f} |")
    print(f"| resilience routing overhead (difference, noisy) | {with_router - base:.1f} |")
    print(f"| router bookkeeping alone (instant backend) | {routing_only:.1f} |")
    print(f"| breaker.calling() around a no-op | {breaker:.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    asyncio.run(main(parser.parse_args().calls))
