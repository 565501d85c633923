"""A small OTLP trace collector for tests: opentelemetry-proto's TraceService on a real
grpc.aio server (127.0.0.1, port 0), keeping every span it receives."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2


def _value(any_value: common_pb2.AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


@dataclass(frozen=True)
class Received:
    """One span as it arrived over the wire."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace id, span id)
    status_code: int
    service_name: str
    start_ns: int
    end_ns: int


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, *, fail_with: grpc.StatusCode | None = None) -> None:
        self.spans: list[Received] = []
        self.requests = 0
        self._fail_with = fail_with
        self._arrived = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> Collector:
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests += 1
        if self._fail_with is not None:
            await context.abort(self._fail_with, "the test collector refuses spans")
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        Received(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            links=[(ln.trace_id.hex(), ln.span_id.hex()) for ln in span.links],
                            status_code=span.status.code,
                            service_name=str(resource.get("service.name", "")),
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                        )
                    )
        self._arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def wait_for(self, ready: Callable[[list[Received]], bool]) -> list[Received]:
        """Wait until the spans received satisfy ``ready`` (bounded by the test's timeout)."""
        async with asyncio.timeout(30):
            while not ready(self.spans):
                self._arrived.clear()
                await self._arrived.wait()
        return self.spans

    def named(self, name: str) -> list[Received]:
        return [s for s in self.spans if s.name == name]

    def by_id(self) -> dict[str, Received]:
        return {s.span_id: s for s in self.spans}
