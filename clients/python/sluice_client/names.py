"""Names the server and its clients agree on (metadata keys, health service names)."""

from __future__ import annotations

#: Trailing metadata key carrying the call's request id (also quoted in error messages).
REQUEST_ID_KEY = "x-request-id"
#: Trailing metadata key of gRFC A6 server pushback, in milliseconds.
PUSHBACK_KEY = "grpc-retry-pushback-ms"
#: Trailing metadata: which ``model/version/backend`` answered, and whether it was a fallback.
SERVED_BY_KEY = "x-sluice-served-by"
FALLBACK_KEY = "x-sluice-fallback"
#: Trailing metadata: the remote server (``host:port``) that answered, when one did.
ENDPOINT_KEY = "x-sluice-endpoint"
#: Trailing metadata on an answer the model did not compute now: ``sluice-cache: hit`` (from
#: the response cache) and ``sluice-degraded: cache|static`` (from its degraded tier).
CACHE_KEY = "sluice-cache"
DEGRADED_KEY = "sluice-degraded"
#: grpc.health.v1 service name prefix for one model's readiness.
MODEL_HEALTH_PREFIX = "sluice.model."


def model_health_service(model: str) -> str:
    return MODEL_HEALTH_PREFIX + model


#: grpc.health.v1 service name that is SERVING from start to exit, whatever the models and
#: the drain say: the process is alive (a liveness probe's question, and nothing more).
LIVENESS_SERVICE = "sluice.liveness"
