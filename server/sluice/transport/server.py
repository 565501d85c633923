"""The gRPC server factory: interceptors, servicers, health, reflection, and the drain."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sluice.admission import AdmissionController
from sluice.caching import ResponseCache
from sluice.clock import Clock
from sluice.core import build_core
from sluice.metrics import Metrics
from sluice.prober import HealthProber
from sluice.registry import ModelRegistry
from sluice.routing.remote import Remotes
from sluice.settings import Settings
from sluice.shadow import Shadower
from sluice.tracing import Tracing
from sluice.transport import interceptors, reflection
from sluice.transport.health import HealthServicer
from sluice.transport.interceptors.auth import AdminAccess
from sluice.transport.outbound import OutboundChannels
from sluice.transport.servicers.generation import GenerationServicer
from sluice.transport.servicers.inference import InferenceServicer
from sluice.transport.servicers.models import ModelServicer
from sluice.transport.tls import CertificateFiles
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from sluice_api.sluice.v1 import generation_service_pb2 as gen_pb
from sluice_api.sluice.v1 import generation_service_pb2_grpc as gen_pb_grpc
from sluice_api.sluice.v1 import model_service_pb2 as models_pb
from sluice_api.sluice.v1 import model_service_pb2_grpc as models_pb_grpc
from sluice_client.names import model_health_service

log = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MODEL_SERVICE = models_pb.DESCRIPTOR.services_by_name["ModelService"].full_name
GENERATION_SERVICE = gen_pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


def _status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )


def _bind_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (``[::1]:8001``)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class Front(Protocol):
    """Processes that serve the public port in front of this server (``sluice.workers``)."""

    def begin_stop(self, grace_s: float) -> None:
        """Stop taking calls; calls in flight get ``grace_s``."""
        ...

    async def wait_stopped(self, limit_s: float) -> None: ...


@dataclass(eq=False)
class SluiceServer:
    """A started server: its bound port, and the steps of an orderly shutdown."""

    grpc_server: grpc.aio.Server
    port: int
    registry: ModelRegistry
    health: HealthServicer
    admission: AdmissionController
    servicer: InferenceServicer
    prober: HealthProber
    shadow: Shadower
    health_server: HealthPort | None = None
    """The plaintext health-only port (``health_port``), when there is one."""
    remotes: Remotes | None = None
    """Remote candidates: their connections close after the last call."""
    cache: ResponseCache | None = None
    """The response cache, closed once calls have finished (its shared store's client)."""
    front: Front | None = None
    """The transport processes in front of this server (``--workers`` above 1): they stop
    after the calls they forwarded finished, before this server's transport closes."""
    methods: MethodTable | None = None
    """Each method's intercepted handler, for calls that reach the server outside grpc."""

    async def mark_started(self) -> None:
        """After the start-up load: overall health follows whether anything can serve."""
        for name in ("", INFERENCE_SERVICE):
            await self.health.set(name, _status(self.registry.ready))
        self.prober.start()

    async def drain(
        self, grace_s: float, quiet_s: float = 0.0, unload_s: float = 5.0, *, notice_s: float = 0.0
    ) -> None:
        """NOT_SERVING first, refuse new calls and streams, let in-flight ones finish (open
        streams stop reading and end with UNAVAILABLE), end health watches, then unload.

        For the first ``notice_s`` of the grace, health already says NOT_SERVING but new
        calls are still served: clients that watch health (client-side health checking,
        load balancers) move their calls elsewhere before any is refused.

        Calls still running when ``grace_s`` ends are stopped with UNAVAILABLE. Closing the
        transport and unloading get at most ``unload_s`` more: a backend still busy then
        (hung) is abandoned, so the drain never takes longer than ``grace_s + unload_s``.
        """
        log.info("draining: health NOT_SERVING, refusing new calls, %.1fs grace", grace_s)
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + grace_s
        await self.prober.stop()
        await self.health.enter_graceful_shutdown()
        if notice_s > 0:
            await asyncio.sleep(min(notice_s, grace_s))
        self.admission.begin_drain(give_up_at)
        self.servicer.draining = True
        # While admitted calls and open streams finish, and until callers stop arriving, new
        # calls get a clean UNAVAILABLE from admission; only then does the transport close
        # (GOAWAY), after the health watchers (which never finish by themselves) are ended.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(give_up_at):
                await self.admission.wait_quiet(quiet_s)
        self.health.end_watches()
        # Calls cut at the grace's end are writing their UNAVAILABLE: give them a moment.
        closing_s = min(_CLOSE_S, unload_s)
        closed_by = give_up_at + closing_s
        if self.front is not None:
            # The transports first. Their calls reach the engine by the lane, not this port:
            # a call the quiet wait does not count (an admin call) may still run in them,
            # within the grace. And they relay this port's request streams: a stream's last
            # replies and status may still wait here for the transport to read them (its
            # window full, behind a slow caller); closing this port first would cut such a
            # stream with INTERNAL instead of the UNAVAILABLE it ended with.
            self.front.begin_stop(max(closed_by - loop.time(), 0.0))
            # (and a moment more to exit, once their own calls are stopped at that time)
            await self.front.wait_stopped(max(closed_by - loop.time(), 0.0) + closing_s)
        await self.grpc_server.stop(max(closed_by - loop.time(), 0.0))
        if self.health_server is not None:
            await self.health_server.server.stop(0)
        log.info("calls and streams finished; unloading models")
        try:
            async with asyncio.timeout(max(unload_s - closing_s, 0.0)):
                await self.shadow.close()
                if self.remotes is not None:
                    await self.remotes.close()
                if self.cache is not None:
                    await self.cache.close()
                await self.registry.close()
        except TimeoutError:
            log.warning(
                "unloading took longer than its %.1fs allowance (a backend still busy?); "
                "abandoning what is left",
                unload_s,
            )
        log.info("drained")


_CLOSE_S = 1.0
"""After the grace, how long calls stopped with UNAVAILABLE get to finish writing it."""


async def create_server(
    settings: Settings,
    registry: ModelRegistry,
    *,
    metrics: Metrics,
    clock: Clock,
    tracing: Tracing | None = None,
    listen: str | None = None,
) -> SluiceServer:
    """Build, bind and start the server; models load afterwards (health NOT_SERVING).

    ``listen``: a private address (``unix:<path>``) to serve in plaintext instead of the
    gRPC port, for the transport processes in front of it (``sluice.workers``).

    Raises ConfigError when the TLS files do not load."""
    tracing = tracing or Tracing.off()
    # Loaded here behind transport processes too (which serve them): files that do not load
    # are the same clear error, before any process starts, however many workers there are.
    certificates = CertificateFiles(settings.tls) if settings.tls.enabled else None
    if listen is not None:
        certificates = None
    admin = AdminAccess.from_settings(settings)
    core = build_core(
        settings,
        registry,
        metrics=metrics,
        clock=clock,
        tracing=tracing,
        remote=OutboundChannels(settings),
    )
    admission, router, shadow, policy = core.admission, core.router, core.shadow, core.policy
    chain = interceptors.build(
        registry=registry,
        policy=policy,
        admission=admission,
        metrics=metrics,
        clock=clock,
        tracing=tracing,
        admin=admin,
    )
    server = grpc.aio.server(
        interceptors=chain, options=server_options(settings, private=listen is not None)
    )
    methods = MethodTable(server, chain)
    servicer = InferenceServicer(
        registry, router=router, settings=settings, policy=policy, admission=admission
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, methods)  # type: ignore[no-untyped-call]
    models_pb_grpc.add_ModelServiceServicer_to_server(  # type: ignore[no-untyped-call]
        ModelServicer(
            registry,
            shadow=shadow,
            guardrails=router.guardrails,
            max_reason_chars=settings.admin.max_reason_chars,
        ),
        methods,
    )
    gen_pb_grpc.add_GenerationServiceServicer_to_server(  # type: ignore[no-untyped-call]
        GenerationServicer(
            router=router,
            plane=core.plane,
            settings=settings,
            policy=policy,
            admission=admission,
        ),
        methods,
    )
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, methods)
    reflection.enable(
        server, (INFERENCE_SERVICE, MODEL_SERVICE, GENERATION_SERVICE, health.SERVICE_NAME)
    )
    for name in ("", INFERENCE_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def on_readiness(model: str, ready: bool) -> None:
        await health_servicer.set(model_health_service(model), _status(ready))
        if registry.started:  # before that, mark_started decides
            for name in ("", INFERENCE_SERVICE):
                await health_servicer.set(name, _status(registry.ready))

    registry.add_readiness_listener(on_readiness)
    address = listen or _bind_address(settings.host, settings.grpc_port)
    if certificates is None:
        port = server.add_insecure_port(address)
    else:  # TLS only: no plaintext port
        port = server.add_secure_port(address, certificates.credentials())
    await server.start()
    health_port = None
    if settings.health_port is not None:
        try:
            health_port = await start_health_port(
                settings.host, settings.health_port, health_servicer
            )
        except BaseException:
            await server.stop(0)
            raise
    transport = "plaintext" if certificates is None else certificates.describe()
    if listen is not None:
        log.info("engine listening on %s (the transport processes forward to it)", listen)
    else:
        log.info("gRPC listening on %s:%d (%s)", settings.host, port, transport)
    log.info("admin plane: %s", admin.describe())
    prober = HealthProber(registry, settings.probe, clock, remotes=router.remotes)
    return SluiceServer(
        server,
        port,
        registry,
        health_servicer,
        admission,
        servicer,
        prober,
        shadow,
        health_port,
        remotes=router.remotes,
        cache=core.cache,
        methods=methods,
    )


class MethodTable:
    """Each method's handler as a call gets it: the servicer's handler wrapped by the
    interceptors. The servicers are added here (it passes them on to the grpc server), so
    calls that reach the server outside grpc (the engine lane, ``sluice.workers.lane``)
    run exactly the handler chain grpc's own calls run."""

    def __init__(
        self, server: grpc.aio.Server, chain: Sequence[grpc.aio.ServerInterceptor]
    ) -> None:
        self._server = server
        self._chain = tuple(chain)
        self._generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)
        self._generic.extend(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._server.add_registered_method_handlers(service, handlers)

    async def handler(self, method: str) -> grpc.RpcMethodHandler[Any, Any] | None:
        """``method``'s intercepted handler (None: no such method). The chain's wrapping
        depends on the method alone, so a caller may keep what this returns."""

        async def servicers(
            details: grpc.HandlerCallDetails,
        ) -> grpc.RpcMethodHandler[Any, Any] | None:
            for generic in self._generic:
                found = generic.service(details)
                if found is not None:
                    return found
            return None

        continuation: Any = servicers
        for interceptor in reversed(self._chain):
            continuation = functools.partial(interceptor.intercept_service, continuation)
        found: grpc.RpcMethodHandler[Any, Any] | None = await continuation(_Details(method))
        return found


@dataclass(frozen=True, slots=True)
class _Details(grpc.HandlerCallDetails):
    method: str
    invocation_metadata: tuple[tuple[str, str | bytes], ...] = ()


def server_options(settings: Settings, *, private: bool = False) -> list[tuple[str, int]]:
    """The gRPC server's channel options: message limits and connection ageing (not on a
    ``private`` socket: the transport processes' connections are not to be spread)."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # A second server on a busy port must fail, not silently share it.
        ("grpc.so_reuseport", 0),
    ]
    if private:
        # On the transports' socket, bandwidth-delay probing only grows each stream's
        # receive window (to megabytes): a relayed stream whose reader has stopped (its
        # window full) would still pull that much more into the engine. The default window
        # (64 KiB) is plenty over a Unix socket.
        options += [("grpc.http2.bdp_probe", 0)]
    if settings.max_connection_age_s is not None and not private:
        options += [
            ("grpc.max_connection_age_ms", round(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", round(settings.max_connection_age_grace_s * 1000)),
        ]
    return options


@dataclass(frozen=True, slots=True)
class HealthPort:
    server: grpc.aio.Server
    port: int


async def start_health_port(host: str, port: int, servicer: HealthServicer) -> HealthPort:
    """A plaintext port serving only ``servicer`` (grpc.health.v1): for the kubelet's gRPC
    probes, which cannot speak TLS. It answers what the main port's health answers."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = server.add_insecure_port(_bind_address(host, port))
    await server.start()
    log.info("health checks (plaintext, grpc.health.v1 only) on %s:%d", host, bound)
    return HealthPort(server, bound)
