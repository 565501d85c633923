"""One settings tree for the whole server, built once in ``main`` and passed down.

Sources, strongest first: command-line flags, ``SLUICE_*`` environment variables (nested
sections with ``__``, e.g. ``SLUICE_ADMISSION__MAX_INFLIGHT_REQUESTS``), the YAML file given
by ``--config`` / ``SLUICE_CONFIG``, then the defaults below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from sluice.eventloop import EventLoopChoice

LogFormat = Literal["auto", "json", "text"]
"""``json``: one JSON object per line; ``text``: plain lines for a person; ``auto``: text
at a terminal, else JSON (``sluice.logs.configure``)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class DeadlineSettings(_Section):
    default_deadline_s: float = Field(30.0, gt=0)
    """Budget given to a call whose client set no deadline."""
    max_deadline_s: float = Field(300.0, gt=0)
    """Longest budget any call gets, whatever the client asked for."""


class AdmissionSettings(_Section):
    max_inflight_requests: int = Field(1024, ge=1)
    """Calls admitted at once across the server; more are shed with UNAVAILABLE + pushback."""
    tenant_max_inflight_requests: int = Field(0, ge=0)
    """Calls one tenant may have in flight (0: no per-tenant quota)."""
    max_inflight_bytes: int | None = Field(None, ge=1)
    """Bytes in flight across the server: every admitted request as received plus its
    reply's size (known from the model's output shapes before it runs). None: 1/16 of the
    memory the process may use (the machine's, or its container's limit), at least 64 MiB.
    A call that does not fit now is shed with UNAVAILABLE + pushback; one larger than the
    whole budget gets RESOURCE_EXHAUSTED."""
    tenant_max_inflight_bytes: int = Field(0, ge=0)
    """Bytes one tenant may have in flight (0: no per-tenant byte quota)."""
    max_inflight_tokens: int = Field(262_144, ge=1)
    """Generation tokens in flight across the server: each generation's prompt tokens plus
    its ``max_new_tokens``, from the moment its prompt is tokenized until it ends."""
    tenant_max_inflight_tokens: int = Field(0, ge=0)
    """Generation tokens one tenant may have in flight (0: no per-tenant token quota)."""
    tenant_metadata_key: str = "x-sluice-tenant"
    """Request metadata key naming the caller's tenant."""
    pushback_ms: int = Field(50, ge=0)
    """Back-off suggested to shed callers in ``grpc-retry-pushback-ms``."""


class BreakerSettings(_Section):
    fail_max: int = Field(5, ge=1)
    """Consecutive backend failures that open a breaker."""
    reset_timeout_s: float = Field(30.0, gt=0)
    """Time an open breaker waits before letting trial calls through (half-open)."""
    success_threshold: int = Field(1, ge=1)
    """Successful trial calls that close a half-open breaker."""
    half_open_max_calls: int = Field(1, ge=1)
    """Trial calls a half-open breaker lets through at once; more fail fast."""
    state_file: Path | None = None
    """JSON file that keeps breaker state across restarts (None: state is not persisted)."""
    redis_url: str | None = None
    """Redis URL (``redis://host:6379/0``) where replicas share breaker state instead of a
    state file (needs the ``redis`` package; the reset timeout then follows the wall clock)."""
    redis_timeout_s: float = Field(2.0, gt=0)
    """With ``redis_url``: longest one Redis command may take (a Redis that cannot be reached
    in time leaves a breaker closed for that call, and is logged)."""


class BatchingSettings(_Section):
    max_batch_size: int = Field(32, ge=1)
    """Largest batch for auto-configured models with a dynamic batch dimension."""
    max_queue_delay_us: int = Field(0, ge=0)
    """Longest wait to grow a batch once a request is queued; 0 batches whatever queued
    up while the executor was busy, which adds no latency when idle."""
    max_queue_size: int = Field(1024, ge=1)
    """Requests that may wait in one model version's queue before new ones are shed."""


class LevelQueuePolicy(_Section):
    """The queue policy of one priority level (Triton's ``priority_queue_policy``)."""

    max_queue_size: int | None = Field(None, ge=0)
    """Requests of this level that may wait in one model version's queue; more are shed
    with UNAVAILABLE + pushback (None: only the queue's own ``max_queue_size`` bounds it)."""
    default_timeout_ms: float | None = Field(None, gt=0)
    """Longest a request of this level waits in a queue before it fails with
    DEADLINE_EXCEEDED (None: its call's deadline alone); the call's deadline still wins
    when it is sooner."""


class PrioritySettings(_Section):
    """Urgency classes: a request's priority level (1 is the most urgent) from Triton's
    ``priority`` request parameter or the ``x-sluice-priority`` metadata (a level or a
    class name). Queues take the most urgent first; admission sheds the least urgent first."""

    levels: int = Field(3, ge=1, le=64)
    """Priority levels; 1 is the highest."""
    default_level: int = Field(2, ge=1)
    """Level of a request that names none (or names 0, as Triton's ``priority`` does)."""
    classes: dict[str, int] = {"interactive": 1, "background": 2, "batch": 3}
    """Class names callers may send in ``x-sluice-priority`` instead of a level number."""
    max_age_ms: float = Field(1000.0, gt=0)
    """A request that has waited this long is taken as if it had the highest level, so
    lower levels never starve."""
    admission_reserve_per_level: float = Field(0.1, ge=0, lt=1)
    """Share of the in-flight request limit (``admission.max_inflight_requests``) each level
    below ``default_level`` leaves to the levels above it: level k may fill at most
    ``1 - max(0, k - default_level) * reserve`` of it (at least one call), so under overload
    the lowest levels are shed first; the default level and those above it may fill it all."""
    queue_policies: dict[int, LevelQueuePolicy] = {}
    """Per level: its own queue bound and queue timeout (levels not named: none of their own)."""
    metadata_key: str = "x-sluice-priority"
    """Request metadata key naming the call's level or class."""

    @model_validator(mode="after")
    def _levels_exist(self) -> PrioritySettings:
        named = {"default_level": self.default_level}
        named.update({f"classes.{name}": level for name, level in self.classes.items()})
        named.update({f"queue_policies.{level}": level for level in self.queue_policies})
        for where, level in named.items():
            if not 1 <= level <= self.levels:
                raise ValueError(f"priority.{where} is {level}: levels run from 1 to {self.levels}")
        if 1 - (self.levels - self.default_level) * self.admission_reserve_per_level <= 0:
            raise ValueError(
                "priority.admission_reserve_per_level times (levels - default_level) must stay "
                "below 1, or "
                "the lowest level could never be admitted"
            )
        return self


class ExecutorSettings(_Section):
    torch_threads: int = Field(0, ge=0)
    """Threads PyTorch uses inside an operator, for the whole process (0: one fewer than the
    CPU cores, at least 1, so the gRPC event loop keeps a core of its own)."""
    intra_op_threads: int = Field(0, ge=0)
    """Threads one ONNX Runtime session uses inside an operator (0: the runtime's choice)."""
    allow_spinning: bool = False
    """Let idle ONNX Runtime threads spin; off, they sleep and leave the cores to the
    event loop (spinning costs a core per thread on small hosts)."""
    max_batch_execution_s: float = Field(60.0, gt=0)
    """Longest one batch may run before it counts as a backend fault (a hung backend); a
    batch whose callers all have deadlines gets at most until the last of them."""
    providers: list[str] | None = None
    """ONNX Runtime execution providers in order of preference (None: best installed)."""
    use_cuda: bool = True
    """Use CUDA devices when the machine has them; false keeps every backend on the CPU."""


class RetrySettings(_Section):
    max_attempts: int = Field(3, ge=1)
    """Attempts per call, the first included, not counting its fallbacks (each candidate of
    the chain is tried once before any is retried; the chain's length bounds those)."""
    initial_backoff_ms: float = Field(5.0, ge=0)
    """Upper bound of the first retry's random (full jitter) back-off."""
    max_backoff_ms: float = Field(200.0, ge=0)
    """Cap of the exponential back-off."""
    budget_ratio: float = Field(0.2, ge=0, le=1)
    """Retries allowed as a fraction of the calls to the same name seen in the window (a
    retry budget). A fallback that answers costs nothing; one that fails too is charged."""
    budget_min_retries: int = Field(3, ge=0)
    """Retries always allowed per window, so a quiet server can still retry."""
    budget_window_s: float = Field(10.0, gt=0)
    """Length of the window the retry budget counts over."""
    attempt_share: float = Field(0.5, gt=0, le=1)
    """Share of the remaining deadline one attempt may use while other candidates remain."""


class RemoteTLS(_Section):
    """TLS to a remote candidate's endpoint."""

    ca_file: Path | None = None
    """PEM bundle of the CAs that may sign the endpoint's certificate (None: the system's)."""
    cert_file: Path | None = None
    """PEM client certificate chain, for an endpoint that requires mTLS."""
    key_file: Path | None = None
    """PEM private key of ``cert_file`` (unencrypted)."""
    server_name: str = ""
    """Name the endpoint's certificate must carry, when not the endpoint's host."""

    @model_validator(mode="after")
    def _pair(self) -> RemoteTLS:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together: set both or neither")
        return self


_MAX_ENDPOINT_CHARS = 255


class FallbackTarget(_Section):
    """One candidate of a fallback chain: a model of this server, or of another server
    (``endpoint``) reached over the Open Inference Protocol gRPC API."""

    model: str = ""
    """Empty: the model whose chain this is (with ``backend``: another backend of it)."""
    version: str = ""
    """Empty: the model's serving version."""
    backend: str = ""
    """A backend or ladder rung (``pytorch``, ``onnxruntime-cpu``...); empty: the ladder's pick."""
    quality: float = Field(1.0, ge=0, le=1)
    """How good its answers are next to the primary's (1: as good), for operators and logs."""
    endpoint: str = Field("", max_length=_MAX_ENDPOINT_CHARS)
    """``host:port`` of another Open Inference Protocol server (another Sluice, Triton...)
    that serves ``model`` (empty: this server)."""
    tls: RemoteTLS | None = None
    """With ``endpoint``: speak TLS to it (None: plaintext)."""

    @model_validator(mode="after")
    def _remote_complete(self) -> FallbackTarget:
        if not self.endpoint:
            if self.tls is not None:
                raise ValueError("tls is for a remote candidate: it needs endpoint")
            return self
        host, _, port = self.endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"endpoint must be host:port, got {self.endpoint!r}")
        if not self.model:
            raise ValueError(f"the remote candidate at {self.endpoint} needs the model it serves")
        if self.backend:
            raise ValueError("backend names a backend of this server; a remote candidate has none")
        return self


class GuardrailSettings(_Section):
    """The latency guardrail of models whose config sets ``latency_guardrail_ms``: a version
    whose recent p95 latency is above it is tripped, and calls prefer the next candidate of
    the chain until its p95 falls below ``recovery_ratio`` of it."""

    window_calls: int = Field(200, ge=1)
    """Latest calls per version whose latencies make its recent p95."""
    window_s: float = Field(30.0, gt=0)
    """Latencies older than this leave the window."""
    min_samples: int = Field(20, ge=1)
    """Calls the window must hold before a version is tripped or recovers."""
    recovery_ratio: float = Field(0.8, gt=0, le=1)
    """A tripped version recovers when its p95 falls below this share of the guardrail."""
    probe_interval_s: float = Field(1.0, gt=0)
    """While a version is tripped and another candidate can serve, one call per interval
    still goes to it, so its p95 keeps being measured and it can recover."""

    @model_validator(mode="after")
    def _probes_can_judge(self) -> GuardrailSettings:
        if self.window_s / self.probe_interval_s < self.min_samples:
            raise ValueError(
                "guardrail: window_s / probe_interval_s must be at least min_samples, or the "
                "probe calls alone could never judge a tripped version recovered"
            )
        if self.window_calls < self.min_samples:
            raise ValueError("guardrail: window_calls must be at least min_samples")
        return self


class RemoteSettings(_Section):
    """Calls to remote candidates (fallbacks or alias entries with an ``endpoint``): one
    pooled connection per endpoint, opened at the first call, closed at shutdown."""

    max_inflight_per_endpoint: int = Field(64, ge=1)
    """Calls one remote endpoint may have in flight from this server; a call over it passes
    that candidate over (UNAVAILABLE, the next candidate takes it)."""
    max_reply_bytes: int = Field(64 * 1024 * 1024, ge=4096)
    """Largest reply accepted from a remote endpoint; a larger one fails that attempt."""


class ProbeSettings(_Section):
    interval_s: float = Field(10.0, ge=0)
    """Time between health probes of every loaded model version (0: no probing)."""
    timeout_s: float = Field(5.0, gt=0)
    """A probe that takes longer fails."""


class ShadowSettings(_Section):
    """Shadow traffic: sampled calls mirrored to the shadow target a model's config names."""

    enabled: bool = True
    """Mirror sampled calls; false is the kill switch (``SetShadowing`` flips it at run time)."""
    max_concurrency: int = Field(4, ge=1)
    """Mirrors in flight per shadowed model; a sampled call over it is skipped and counted."""
    budget_s: float = Field(5.0, gt=0)
    """Longest one mirror may take; a slower shadow counts as failed."""
    seed: int | None = None
    """Seed for the sampling draw (None: a fresh random sequence)."""


class StreamSettings(_Section):
    max_pending_requests: int = Field(256, ge=1)
    """Requests one ModelStreamInfer stream may have in flight before reading pauses."""
    max_pending_bytes: int = Field(64 * 1024 * 1024, ge=1)
    """Bytes of requests one ModelStreamInfer stream may hold (read and not yet answered,
    with their replies until written) before reading pauses; a single request larger than
    this still runs when it is the only one."""


class CacheSettings(_Section):
    """The response cache: answers of the models whose config asks for it
    (``response_cache`` or ``degraded.from_cache``), kept in this process's memory and
    dropped least recently used first."""

    max_bytes: int = Field(64 * 1024 * 1024, ge=0)
    """Bytes every cached answer together may take: their tensors plus a fixed cost per
    entry (0 turns the cache off, for every model)."""
    max_entry_bytes: int = Field(4 * 1024 * 1024, ge=1)
    """Largest answer that is kept; a larger one is served and not cached."""
    redis_url: str | None = None
    """Redis URL (``redis://host:6379/0``) where replicas share cached answers, behind each
    one's own ``max_bytes`` (needs the ``redis`` package; Redis's own ``maxmemory`` bounds
    what it keeps)."""
    redis_timeout_s: float = Field(0.1, gt=0)
    """With ``redis_url``: longest one Redis command may take; a slower one is a miss."""
    redis_ttl_s: float = Field(3600.0, gt=0)
    """With ``redis_url``: how long a shared answer lives in Redis."""


GenerationDtype = Literal["float32", "bfloat16", "float16"]
"""What a generation model's weights and key/value cache are stored and computed in."""


class GenerationSettings(_Section):
    """Continuous batching of token generation (per model version)."""

    max_running_sequences: int = Field(32, ge=1)
    """Sequences decoding together; more wait for one to finish."""
    max_tokens_in_flight: int = Field(65536, ge=1)
    """Prompt plus ``max_new_tokens`` summed over the running sequences (bounds the key/value
    cache); a sequence that would pass it waits. One sequence alone always runs."""
    max_waiting_requests: int = Field(256, ge=0)
    """Generations that may wait to start; more are shed with UNAVAILABLE + pushback."""
    max_buffered_chunks: int = Field(32, ge=1)
    """Chunks a stream may hold unread; a slower reader pauses its sequence (it keeps its
    cache and resumes when the reader catches up) so nothing buffers without bound."""
    default_max_new_tokens: int = Field(16, ge=1)
    """``max_new_tokens`` of a request that leaves it at 0."""
    dtype: GenerationDtype = "float32"
    """Weights and key/value cache type (a model's config.yaml may set its own:
    ``generation: {dtype: ...}``). Half types halve memory. On a CPU with bfloat16
    instructions (AVX512-BF16, AMX), ``bfloat16`` generated a 23-million-parameter model
    faster than float32 (1.4x to 1.7x at 16 streams) and a 0.5-million one about half as
    fast (bench/README.md, "Token generation"). Tokens differ from float32's where
    rounding tips a choice."""


class TracingSettings(_Section):
    """OpenTelemetry tracing. Where spans go (endpoint, headers, TLS), the service name and
    the sampler come from the standard ``OTEL_*`` environment variables."""

    enabled: bool | None = None
    """Export spans over OTLP (None: when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set); ``OTEL_SDK_DISABLED=true`` always wins."""
    flush_timeout_s: float = Field(5.0, ge=0)
    """At shutdown, the longest wait for queued spans to reach the collector."""


class LifecycleSettings(_Section):
    """Versions, promote / rollback and their history."""

    state_dir: Path | None = None
    """Where each model's serving pointer and history live (None: ``.sluice/`` inside the
    model repository when one is configured; the bundled examples keep them in memory)."""
    unload_timeout_s: float = Field(30.0, ge=0)
    """Longest an unload waits for the version's in-flight calls before releasing it."""
    warm_up_timeout_s: float = Field(60.0, gt=0)
    """A newly loaded version must answer a real test inference within this to serve."""
    redis_url: str | None = None
    """Redis URL (``redis://host:6379/0``) where replicas share each model's serving pointer
    and history instead of ``state_dir`` (needs the ``redis`` package). A change made on one
    replica reaches the others within ``sync_interval_s``; a replica that starts later
    serves what the shared pointer names."""
    sync_interval_s: float = Field(0.5, gt=0)
    """With ``redis_url``: how often each replica reads the shared serving pointers (the
    bound on how long a promote or rollback made on another replica takes to apply here,
    plus loading the version when it is not loaded here yet)."""
    redis_timeout_s: float = Field(2.0, gt=0)
    """With ``redis_url``: longest one Redis command may take; a change that cannot be
    recorded in time fails (UNAVAILABLE) and changes nothing."""
    replace_failed_serving_version: bool = False
    """When the version the serving pointer names cannot be loaded (its folder is gone or it
    fails to load): True promotes the highest loaded version in its place (a promote by
    ``sluice`` in the history, with the reason); False leaves the pointer alone, and calls
    that name no version fail with UNAVAILABLE until it loads or another is promoted."""

    @model_validator(mode="after")
    def _one_store(self) -> LifecycleSettings:
        if self.redis_url is not None and self.state_dir is not None:
            raise ValueError(
                "lifecycle.state_dir and lifecycle.redis_url exclude each other: with Redis the "
                "serving pointers and histories live there"
            )
        return self


class TLSSettings(_Section):
    """TLS on the gRPC port. With a certificate configured the port speaks TLS only (no
    plaintext port is open); the files are read again when they change, so a rotated
    certificate serves new connections without a restart."""

    cert_file: Path | None = None
    """PEM certificate chain the server presents (None: plaintext gRPC)."""
    key_file: Path | None = None
    """PEM private key of ``cert_file`` (unencrypted)."""
    client_ca_file: Path | None = None
    """PEM bundle of the CAs whose client certificates are accepted (mTLS); goes with
    ``require_client_cert`` (grpc's Python server either requires and verifies client
    certificates or does not ask for them)."""
    require_client_cert: bool = False
    """Refuse connections without a client certificate signed by ``client_ca_file``."""

    @model_validator(mode="after")
    def _complete(self) -> TLSSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together: set both or neither")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("tls.client_ca_file needs tls.cert_file and tls.key_file")
        if self.client_ca_file is not None and not self.require_client_cert:
            raise ValueError(
                "tls.client_ca_file is set but tls.require_client_cert is false: grpc's Python "
                "server cannot ask for optional client certificates; set "
                "tls.require_client_cert (mTLS) or leave tls.client_ca_file out"
            )
        if self.require_client_cert and self.client_ca_file is None:
            raise ValueError("tls.require_client_cert needs tls.client_ca_file")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class AdminSettings(_Section):
    """Who may change what is served (load, unload, promote, rollback, rescan, shadowing).

    Admin calls need the token or a client certificate named in ``identities``; with
    neither configured they are served only when the server listens on loopback alone.
    """

    token: SecretStr | None = None
    """The admin credential, sent as ``authorization: Bearer <token>`` (never empty)."""
    name: str = Field("admin", min_length=1, max_length=200)
    """Who the history records for calls carrying the token."""
    identities: list[str] = []
    """Client-certificate identities (subject CN or a subject alternative name) that may
    make admin calls; needs mTLS (``tls.client_ca_file`` and ``tls.require_client_cert``)."""
    max_reason_chars: int = Field(1000, ge=1)
    """Longest ``reason`` an admin call may record in a model's history (longer:
    INVALID_ARGUMENT)."""

    @field_validator("token")
    @classmethod
    def _not_empty(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and not token.get_secret_value().strip():
            raise ValueError(
                "admin.token is empty: set a real token, or leave it unset (admin calls are "
                "then served only when the server listens on loopback alone)"
            )
        return token

    @field_validator("identities")
    @classmethod
    def _named(cls, identities: list[str]) -> list[str]:
        if any(not identity.strip() for identity in identities):
            raise ValueError("admin.identities holds an empty name")
        return identities


class LaneSettings(BaseModel):
    """The engine lane between the transport workers and the engine."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_calls_per_connection: int = Field(4096, ge=1)
    """Unary calls one transport connection may have running in the engine at once; more
    are refused with RESOURCE_EXHAUSTED (admission sheds long before this in normal use)."""
    max_streams_per_connection: int = Field(4096, ge=1)
    """Calls with streamed responses (``Generate``, health ``Watch``) one transport
    connection may have running in the engine at once, counted apart from the unary calls
    (a watch never ends, and they must not take the unary calls' room); more are refused
    with RESOURCE_EXHAUSTED."""
    max_metadata_bytes: int = Field(64 * 1024, ge=1024)
    """Bytes a call frame may carry beyond its message (method, metadata, identity); with
    the server's ``max_message_bytes``, the largest frame the engine reads."""
    deadline_grace_s: float = Field(0.1, ge=0.0)
    """How long after a call's deadline the engine cancels a call still running (its
    deadline hook normally ends it first, with DEADLINE_EXCEEDED and a message that says
    which budget ran out; this stops handlers that have no such hook)."""
    shared_min_bytes: int = Field(1024 * 1024, ge=0)
    """Requests this large or larger cross in shared memory (``/dev/shm``) instead of the
    socket, sparing the engine's event loop the copy through it (0: never)."""
    max_backlog_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024)
    """Reply bytes waiting for a connection's peer to read them beyond which the engine
    reads no more calls from it (until half have gone); the client likewise stops sending
    calls while this many call bytes wait."""
    stream_window_bytes: int = Field(64 * 1024, ge=1024, le=64 * 1024 * 1024)
    """Response bytes of one call with streamed responses (``Generate``) the engine sends
    beyond what its transport has handed on to the caller's grpc stream (each message
    counted with its 9-byte frame head): a caller that stops reading holds at most this
    much (plus one message) in its transport, on top of what grpc's own flow control to
    the caller takes in, and then its generation waits."""


class Settings(BaseSettings):
    """Root of the configuration."""

    model_config = SettingsConfigDict(
        env_prefix="SLUICE_",
        env_nested_delimiter="__",
        extra="forbid",
        use_attribute_docstrings=True,
        frozen=True,
    )

    host: str = "127.0.0.1"
    """Address the gRPC and metrics servers bind."""
    grpc_port: int = Field(8001, ge=0, le=65535)
    """gRPC port (0: any free port)."""
    metrics_port: int | None = Field(8002, ge=0, le=65535)
    """Prometheus metrics port (0: any free port; null: no metrics endpoint)."""
    model_repository: Path | None = None
    """Model repository directory (None: the example repository shipped with Sluice)."""
    max_message_bytes: int = Field(256 * 1024 * 1024, ge=4096)
    """Largest gRPC message accepted or sent."""
    drain_grace_s: float = Field(30.0, ge=0)
    """Time in-flight calls get to finish after SIGTERM before they are cancelled."""
    drain_unload_s: float = Field(5.0, ge=0)
    """After the drain grace: the longest closing the transport and unloading the models
    may take; a backend still busy then (hung) is abandoned and the process exits, so
    SIGTERM to exit takes at most ``drain_grace_s + drain_unload_s`` (plus the tracing
    flush, when tracing is on)."""
    max_connection_age_s: float | None = Field(None, gt=0)
    """Close client connections after about this long (GOAWAY, with grpc's own +/-10%
    jitter), so clients behind a load balancer reconnect and spread over new replicas
    (HTTP/2 connections are long-lived). None: connections are never aged."""
    max_connection_age_grace_s: float = Field(30.0, ge=0)
    """After a connection is aged out, how long its calls in flight get to finish before
    the connection is closed."""
    health_port: int | None = Field(None, ge=0, le=65535)
    """A second, plaintext port that serves only grpc.health.v1, for probes that cannot speak
    TLS (the kubelet's gRPC probes) when the gRPC port does (0: any free port; None: none)."""
    drain_notice_s: float = Field(0.5, ge=0)
    """The first part of the drain grace: health already says NOT_SERVING but new calls are
    still served, so clients that watch health (client-side health checking, a load
    balancer) stop sending before any call is refused. Counted in ``drain_grace_s``."""
    drain_quiet_s: float = Field(0.2, ge=0)
    """After in-flight calls finish, how long no new call must arrive before the transport
    closes (calls arriving meanwhile are refused with UNAVAILABLE, which clients retry)."""
    workers: int | None = Field(None, ge=1, le=64)
    """Transport processes serving the gRPC port in front of the one engine process that
    runs the models (1: a single process serves everything). Above 1, each transport
    terminates gRPC (and TLS) and forwards every call to the engine over a private Unix
    socket; see docs/workers.md. None (the default): chosen from the machine when the
    server starts, ``sluice.machine.default_workers``: 1 on one usable core, else one per
    usable core (the CPUs the process may run on, or its container's CPU quota if lower),
    at most 4. ``auto`` means the same, so the environment or a flag can ask for the
    machine's choice over a number in the settings file."""
    lane: LaneSettings = LaneSettings()
    """The unary path from the transport processes to the engine (``workers`` above 1)."""
    event_loop: EventLoopChoice = "auto"
    """The event loop of the server's processes (the engine and every transport): auto,
    uvloop where it is installed, else asyncio's; uvloop, refused at start without it;
    asyncio, the standard one (``sluice.eventloop``)."""
    log_level: str = "INFO"
    """Log level name."""
    log_format: LogFormat = "auto"
    """``json``: one JSON object per line (timestamp, level, request and trace ids, model,
    version, backend, outcome); ``text``: plain lines for a person; ``auto``: text when
    stderr is a terminal, else JSON."""
    force_backend: str | None = None
    """Backend or ladder rung every model uses unless its config names one (e.g. torch-cpu)."""

    deadline: DeadlineSettings = DeadlineSettings()
    admission: AdmissionSettings = AdmissionSettings()
    breaker: BreakerSettings = BreakerSettings()
    batching: BatchingSettings = BatchingSettings()
    executor: ExecutorSettings = ExecutorSettings()
    stream: StreamSettings = StreamSettings()
    tracing: TracingSettings = TracingSettings()
    generation: GenerationSettings = GenerationSettings()
    lifecycle: LifecycleSettings = LifecycleSettings()
    admin: AdminSettings = AdminSettings()
    tls: TLSSettings = TLSSettings()
    required_models: list[str] = []
    """Models that must all be able to infer for the server to be ready (empty: any one)."""
    retry: RetrySettings = RetrySettings()
    cache: CacheSettings = CacheSettings()
    probe: ProbeSettings = ProbeSettings()
    guardrail: GuardrailSettings = GuardrailSettings()
    remote: RemoteSettings = RemoteSettings()
    shadow: ShadowSettings = ShadowSettings()
    priority: PrioritySettings = PrioritySettings()
    aliases: dict[str, list[FallbackTarget]] = {}
    """Names clients may call that route to an ordered chain of models (first = primary)."""

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, workers: object) -> object:
        if isinstance(workers, str) and workers.strip().lower() == "auto":
            return None
        return workers

    @model_validator(mode="after")
    def _identities_need_mtls(self) -> Settings:
        if self.admin.identities and not self.tls.require_client_cert:
            raise ValueError(
                "admin.identities needs client certificates: set tls.client_ca_file and "
                "tls.require_client_cert"
            )
        return self


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings: ``overrides`` (flags) > environment > ``config_file`` > defaults."""

    class _FromSources(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources = [init_settings, env_settings]
            if config_file is not None:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
            return tuple(sources)

    given = {key: value for key, value in overrides.items() if value is not None}
    return Settings.model_validate(_FromSources(**given).model_dump())
