"""A transport process: the public gRPC port, every call forwarded to the engine.

Started by the engine (``topology``) as ``python -m sluice.workers.transport <config>``, a
fresh interpreter. It binds ``host:port`` with ``SO_REUSEPORT`` (the first transport binds
the configured port, possibly 0; the others bind the port it got), terminates TLS there, and
forwards each call as raw bytes: unary calls through a ``forward.UnaryForwarder``, calls
with one request and streamed responses (``Generate``, health ``Watch``) through the engine
lane (``LaneClient.stream``), the other shapes through ``forward.relay_stream``. The
caller's metadata, deadline and cancellation go to the engine; the engine's status, details
and metadata come back unchanged. Its only additions are the caller's identity
(``identity``) and, when tracing is on, a ``sluice.transport`` span the engine's server span
is a child of.

Control is over pipes: it writes ``port <n>`` on stdout once it listens, and stops when its
stdin says ``stop <grace_s>`` (finishing the calls in flight within the grace) or closes
(the engine is gone: stop at once). SIGTERM and SIGINT are left to the engine, which drains
first; the kernel kills this process if the engine dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from sluice import logs
from sluice.errors import ConfigError
from sluice.eventloop import EventLoopChoice, loop_factory, loop_name
from sluice.settings import LogFormat, TLSSettings, TracingSettings
from sluice.tracing import UNTRACED, Tracing, outgoing_context
from sluice.transport import identity
from sluice.transport.tls import CertificateFiles
from sluice.workers import forward
from sluice.workers.frames import Reply
from sluice.workers.lane_client import LaneClient
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.sluice.v1 import generation_service_pb2 as gen_pb
from sluice_api.sluice.v1 import model_service_pb2 as models_pb

log = logging.getLogger("sluice.workers.transport")

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """What a transport process needs, sent as JSON on its command line (no secrets: the
    admin token is checked by the engine)."""

    index: int
    engine: str
    """The engine's address (``unix:<path>``): calls that stream requests."""
    lane: str
    """The engine lane's socket path: the other calls."""
    lane_shared_min_bytes: int
    lane_max_backlog_bytes: int
    lane_max_metadata_bytes: int
    lane_stream_window_bytes: int
    host: str
    port: int
    parent_pid: int
    max_message_bytes: int
    max_connection_age_s: float | None = None
    max_connection_age_grace_s: float = 30.0
    tls: dict[str, Any] = field(default_factory=dict)
    tracing: dict[str, Any] = field(default_factory=dict)
    log_level: str = "INFO"
    log_format: LogFormat = "auto"
    event_loop: EventLoopChoice = "auto"

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> TransportConfig:
        return cls(**json.loads(text))


_AT_THE_DEADLINE_S = 0.005
"""A stream cancelled with less than this left was cancelled by its deadline (grpc gives no
reason): the engine ends it at the same deadline, and records it as such."""

_REFLECTION = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
"""The reflection services' methods: relayed to the engine, which serves them."""


UNARY = "unary"
RESPONSES = "responses"
"""One request, a stream of responses."""
STREAMS = "streams"
"""A stream of requests (and any responses)."""


def _methods() -> dict[str, str]:
    """Every method of the services Sluice serves, and its shape."""
    files = (pb.DESCRIPTOR, gen_pb.DESCRIPTOR, models_pb.DESCRIPTOR, health_pb2.DESCRIPTOR)
    return {
        f"/{service.full_name}/{method.name}": (
            STREAMS if method.client_streaming else RESPONSES if method.server_streaming else UNARY
        )
        for file in files
        for service in file.services_by_name.values()
        for method in service.methods
    }


class Proxy(grpc.GenericRpcHandler):
    """Forwards every method: unary ones as ``Reply``s, those with one request and streamed
    responses over ``responses`` (when given: else relayed like the rest), the rest as
    relayed streams."""

    def __init__(
        self,
        *,
        unary: forward.UnaryForwarder,
        streams: forward.GrpcForwarder,
        index: int,
        tracing: Tracing,
        responses: LaneClient | None = None,
    ) -> None:
        self._unary_hop = unary
        self._streams = streams
        self._responses = responses
        self._index = index
        self._tracing = tracing
        self._methods = _methods()
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is not None:
            return handler
        shape = self._methods.get(method)
        if shape is None and not method.startswith(_REFLECTION):
            return None  # no service has it: grpc answers UNIMPLEMENTED, as the engine would
        if shape == UNARY:
            handler = grpc.unary_unary_rpc_method_handler(self._unary(method))
        elif shape == RESPONSES and self._responses is not None:
            handler = grpc.unary_stream_rpc_method_handler(
                self._responses_of(method, self._responses)
            )
        else:  # a stream, or reflection (its descriptors are the engine's)
            handler = grpc.stream_stream_rpc_method_handler(self._stream(method))
        self._handlers[method] = handler  # known names only: callers cannot grow the table
        return handler

    def _metadata(
        self, context: Context, peer: str, auth: Mapping[str, Iterable[bytes]]
    ) -> list[identity.Metadatum]:
        """What the engine gets as the call's metadata (``peer`` and ``auth``: the caller's
        address and auth context, read once per call by the caller: each is a C call)."""
        forwarded = identity.outgoing(
            context.invocation_metadata() or (),
            peer=peer,
            names=identity.certificate_names(auth),
            transport=self._index,
        )
        if self._tracing.enabled:  # our span is the parent of the engine's
            forwarded = [(k, v) for k, v in forwarded if k not in ("traceparent", "tracestate")]
            forwarded.extend(outgoing_context().items())
        return forwarded

    def _caller(self, context: Context) -> tuple[list[identity.Metadatum], dict[str, Any]]:
        """A lane call's metadata, and who called (``peer`` and ``auth``: the caller's
        address and its auth context's properties, one entry per value)."""
        peer, auth = context.peer(), context.auth_context()
        flat = [(k, v) for k, vs in auth.items() for v in vs]
        return self._metadata(context, peer, auth), {"peer": peer, "auth": flat}

    def _span(self, method: str, context: Context) -> Any:
        if not self._tracing.enabled or method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return UNTRACED
        return self._tracing.server_span(
            "/sluice.transport" + method,
            context.invocation_metadata() or (),
            {"sluice.transport": self._index},
        )

    def _unary(self, method: str) -> Callable[[bytes, Context], Any]:
        unary = self._unary_hop.unary

        async def behavior(request: bytes, context: Context) -> bytes:
            with self._span(method, context):
                metadata, caller = self._caller(context)
                reply = await unary(method, request, metadata, context.time_remaining(), **caller)
            # An error reply is given by raising (abort): grpc keeps that exception, whose
            # frames would keep the request's bytes until the cyclic garbage collector ran
            # (twelve refused 20 MB calls held 250 MB here).
            del request
            return await forward.answer_unary(reply, context)

        return behavior

    def _responses_of(self, method: str, lane: LaneClient) -> Callable[[bytes, Context], Any]:
        async def behavior(request: bytes, context: Context) -> None:
            with self._span(method, context):
                metadata, caller = self._caller(context)
                stream = await lane.stream(
                    method, request, metadata, context.time_remaining(), **caller
                )
                del request
                try:
                    while not isinstance(item := await stream.next(), Reply):
                        if isinstance(item, bytes):
                            await context.write(item)
                            stream.taken(len(item))
                        else:
                            await context.send_initial_metadata(item)
                finally:
                    # The caller went away (the task is cancelled, or a write failed): the
                    # engine's call ends with it. At the deadline the engine ends it itself,
                    # as DEADLINE_EXCEEDED (as for unary calls; its deadline is this one
                    # plus the hop). After the status, this only forgets it.
                    left = context.time_remaining()
                    stream.cancel(tell_engine=left is None or left > _AT_THE_DEADLINE_S)
            await forward.answer_stream(item, context)

        return behavior

    def _stream(self, method: str) -> Callable[[Any, Context], Any]:
        multicallable = self._streams.stream(method)

        async def behavior(incoming: Any, context: Context) -> None:
            with self._span(method, context):
                metadata = self._metadata(context, context.peer(), context.auth_context())
                await forward.relay_stream(multicallable, incoming, context, metadata)

        return behavior


def _options(config: TransportConfig) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 1),  # every transport binds the same port
    ]
    if config.max_connection_age_s is not None:
        options += [
            ("grpc.max_connection_age_ms", round(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", round(config.max_connection_age_grace_s * 1000)),
        ]
    return options


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def serve(config: TransportConfig) -> int:
    tracing = Tracing.from_environment(TracingSettings(**config.tracing))
    forwarder = forward.GrpcForwarder(config.engine, max_message_bytes=config.max_message_bytes)
    lane = LaneClient(
        config.lane,
        max_reply_bytes=config.max_message_bytes + config.lane_max_metadata_bytes,
        max_backlog_bytes=config.lane_max_backlog_bytes,
        shared_min_bytes=config.lane_shared_min_bytes,
        stream_window_bytes=config.lane_stream_window_bytes,
    )
    server = grpc.aio.server(options=_options(config))
    proxy = Proxy(
        unary=lane, streams=forwarder, index=config.index, tracing=tracing, responses=lane
    )
    server.add_generic_rpc_handlers((proxy,))
    tls = TLSSettings(**config.tls)
    address = _address(config.host, config.port)
    if tls.enabled:
        port = server.add_secure_port(address, CertificateFiles(tls).credentials())
    else:
        port = server.add_insecure_port(address)
    await server.start()
    print(f"port {port}", flush=True)
    # The engine reads only that line: anything written to stdout later (a stray print, a
    # library's message) goes to the log instead, never into a pipe nobody drains, where
    # it would block this process once the pipe is full.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    log.info(
        "transport %d serving %s:%d (%s)",
        config.index,
        config.host,
        port,
        loop_name(asyncio.get_running_loop()),
    )
    grace_s = await _wait_for_stop()
    await server.stop(grace_s)
    await lane.close()
    await forwarder.close()
    await tracing.shutdown()
    return 0


async def _wait_for_stop() -> float:
    """Read stdin until ``stop <grace_s>`` (that grace) or its end (no grace)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command, _, value = line.decode().strip().partition(" ")
        if command == "stop":
            return float(value or 0)
    return 0.0


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when the engine dies (Linux), and stop now if it
    already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the closed stdin still stops us
        pass
    if os.getppid() != parent_pid:
        sys.exit(0)


def main(argv: Iterable[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    config = TransportConfig.from_json(args[0])
    _die_with_parent(config.parent_pid)
    for signum in (signal.SIGTERM, signal.SIGINT):  # the engine drains, then stops us
        signal.signal(signum, signal.SIG_IGN)
    logs.configure(config.log_level, config.log_format)
    try:
        factory = loop_factory(config.event_loop)
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(serve(config))
    except ConfigError as exc:  # e.g. certificate files changed since the engine read them
        log.error("transport %d cannot start: %s", config.index, exc)
        return 1
    except (OSError, RuntimeError) as exc:
        log.error(
            "transport %d cannot listen on %s:%d: %s", config.index, config.host, config.port, exc
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
