"""Cost of the resilience path per call: routing (fallback chain, breaker checks, retry
budget, expected-service-time bookkeeping) plus the breaker around the executor call.

In process, no gRPC: the same request on the example ``simple`` ONNX model is served N times
through ``DataPlane.infer`` directly and through ``Router.infer``; the difference per
call is what the resilience layer costs. The breaker's own cost (``calling()`` around a
no-op) is measured on its own.

    python bench/resilience.py [--calls 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from types import SimpleNamespace

import numpy as np

from sluice.app import EXAMPLE_REPOSITORY
from sluice.breaker import BackendBreaker
from sluice.dataplane import DataPlane
from sluice.domain import Call, InferRequest, InferResult, InputTensor
from sluice.metrics import Metrics
from sluice.registry import ModelRegistry
from sluice.routing import Router
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


class _InstantTable:
    """One model, no fallbacks, a closed breaker."""

    def __init__(self) -> None:
        breaker = BackendBreaker("bench", BreakerSettings(), clock=time.monotonic)
        self._model = SimpleNamespace(breaker=breaker)

    def fallbacks(self, name: str) -> tuple[()]:
        return ()

    def has_model(self, name: str) -> bool:
        return True

    def get(self, name: str, version: str = "", *, backend: str = "") -> object:
        return self._model


class _InstantPlane:
    """Answers at once: what remains of router.infer is the resilience bookkeeping."""

    def __init__(self, result: InferResult) -> None:
        self._result = result

    async def infer(self, request: InferRequest, call: Call) -> InferResult:
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
    registry = ModelRegistry(settings, repository=EXAMPLE_REPOSITORY, metrics=metrics)
    await registry.load("simple")
    plane = DataPlane(registry, settings, metrics=metrics, clock=time.monotonic)
    router = Router(registry, plane, settings, metrics=metrics, clock=time.monotonic)
    call = Call(deadline=time.monotonic() + 3600)

    async def direct() -> None:
        await plane.infer(request(), call)

    async def routed() -> None:
        await router.infer(request(), call)

    await per_call_us(direct, 200)
    base = await per_call_us(direct, calls)
    with_router = await per_call_us(routed, calls)
    instant = InferResult(model="simple", version="1", id="", outputs=[], backend="onnxruntime")
    bare = Router(
        _InstantTable(),  # type: ignore[arg-type]
        _InstantPlane(instant),  # type: ignore[arg-type]
        settings,
        metrics=metrics,
        clock=time.monotonic,
    )

    async def bookkeeping() -> None:
        instant.routing = None
        await bare.infer(request(), call)

    routing_only = await per_call_us(bookkeeping, calls)
    breaker = breaker_us(calls * 10)
    await registry.close()
    print("| path | µs per call |\n|---|---:|")
    print(f"| data plane infer (validation, batcher, ONNX Runtime, breaker) | {base:.1f} |")
    print(f"| router.infer (the same, through the resilience layer) | {with_router:.1f} |")
    print(f"| resilience routing overhead (difference, noisy) | {with_router - base:.1f} |")
    print(f"| router bookkeeping alone (instant backend) | {routing_only:.1f} |")
    print(f"| breaker.calling() around a no-op | {breaker:.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    asyncio.run(main(parser.parse_args().calls))
