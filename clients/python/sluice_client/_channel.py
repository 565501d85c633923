"""Channels shared by the sync and asyncio clients: TLS, message limits and retries."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import grpc

#: Where ``sluice serve`` listens by default.
DEFAULT_TARGET = "127.0.0.1:8001"
#: The server's default ``max_message_bytes``; tensors of a few hundred MiB fit.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
INFERENCE_SERVICE = "inference.GRPCInferenceService"
MODEL_SERVICE = "sluice.v1.ModelService"
GENERATION_SERVICE = "sluice.v1.GenerationService"
#: Services whose calls are retried on UNAVAILABLE (a streamed generation only before its
#: first chunk arrives: gRPC never replays a stream the caller has started reading).
RETRIED_SERVICES = (INFERENCE_SERVICE, MODEL_SERVICE, GENERATION_SERVICE)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How gRPC itself retries calls that end UNAVAILABLE (health checks excepted).

    The retries run inside the call's deadline, and the C-core waits for the server's
    ``grpc-retry-pushback-ms`` when one is sent (a negative one stops retrying). Throttling
    stops retries on a channel while most calls fail, so an overloaded server is not
    hammered. Requests larger than the channel's per-call retry buffer (256 KiB by default)
    are sent once.
    """

    max_attempts: int = 4
    """Attempts in all, the first one included (gRPC clamps this to 5)."""
    initial_backoff_s: float = 0.1
    """Upper bound of the random wait before the first retry."""
    max_backoff_s: float = 2.0
    """Largest upper bound of the random wait between attempts."""
    backoff_multiplier: float = 2.0
    """Growth of the wait bound per attempt."""
    throttle_max_tokens: int = 100
    """Retry-throttling tokens; each failed call costs one, retries stop at half (room for
    a burst of failures as large as a busy client's concurrency, e.g. the calls a replica
    held when it died, while a lasting outage still stops retries)."""
    throttle_token_ratio: float = 0.1
    """Tokens each successful call gives back."""


def service_config(retry: RetryPolicy, *, load_balancing: str | None = None) -> str:
    """The gRPC service config (JSON) that retries Sluice's services on UNAVAILABLE.

    ``load_balancing="round_robin"``, for a target that resolves to several replicas (a
    headless Service, ``ipv4:a:8001,b:8001``), spreads calls over every replica and leaves
    out those whose grpc.health.v1 status is not SERVING (a draining replica at once)."""
    config: dict[str, Any] = {
        "methodConfig": [
            {
                "name": [{"service": service} for service in RETRIED_SERVICES],
                "retryPolicy": {
                    "maxAttempts": retry.max_attempts,
                    "initialBackoff": f"{retry.initial_backoff_s}s",
                    "maxBackoff": f"{retry.max_backoff_s}s",
                    "backoffMultiplier": retry.backoff_multiplier,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        "retryThrottling": {
            "maxTokens": retry.throttle_max_tokens,
            "tokenRatio": retry.throttle_token_ratio,
        },
    }
    if load_balancing is not None:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
        config["healthCheckConfig"] = {"serviceName": ""}
    return json.dumps(config)


def channel_options(
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    retry: RetryPolicy | None = None,
    load_balancing: str | None = None,
) -> list[tuple[str, Any]]:
    """The client's channel options, for channels you build yourself (TLS, or several
    replicas: ``load_balancing="round_robin"``, see ``service_config``):
    ``grpc.secure_channel(target, credentials, options=channel_options())``."""
    config = service_config(retry or RetryPolicy(), load_balancing=load_balancing)
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", config),
    ]


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """TLS for the channels the client opens; ``TLSConfig()`` verifies the server against
    the system's CAs. The files are PEM and read when the client opens its channel."""

    ca_file: str | os.PathLike[str] | None = None
    """CA bundle that signed the server's certificate (None: the system's CAs)."""
    cert_file: str | os.PathLike[str] | None = None
    """Client certificate chain, for servers that require one (mTLS)."""
    key_file: str | os.PathLike[str] | None = None
    """The client certificate's unencrypted private key."""
    server_name: str | None = None
    """Name the server's certificate must carry, and the call authority, when it differs
    from the target's host (e.g. connecting by IP address or through a tunnel)."""

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLSConfig: cert_file and key_file go together")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | os.PathLike[str] | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )

    def options(self) -> list[tuple[str, Any]]:
        if not self.server_name:
            return []
        return [
            ("grpc.ssl_target_name_override", self.server_name),
            ("grpc.default_authority", self.server_name),
        ]


def open_channel(
    target: str,
    *,
    tls: TLSConfig | None,
    max_message_bytes: int,
    retry: RetryPolicy | None,
    aio: bool,
) -> Any:
    """The channel a client opens for ``target``: plaintext, or TLS with ``tls``."""
    options = channel_options(max_message_bytes=max_message_bytes, retry=retry)
    grpc_module: Any = grpc.aio if aio else grpc
    if tls is None:
        return grpc_module.insecure_channel(target, options=options)
    return grpc_module.secure_channel(target, tls.credentials(), options=options + tls.options())
