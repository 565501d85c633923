"""What each RPC is, in one table: every decision the interceptors make by method reads it.

A method not listed is a plain call (nothing admitted, no admin credential, traced); health
and reflection are operational: they answer under overload and while draining, untraced,
with only the hooks that every call needs (telemetry, errors, decoding).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Rpc:
    admitted: bool = False
    """Runs a model (or its tokenizer): admitted and weighed as a whole. Request streams
    (ModelStreamInfer, GenerateStream) admit each request they carry instead."""
    inference: bool = False
    """Its request names a model (``model_name``, ``model_version``) whose candidates'
    breakers are checked before anything is queued."""
    admin: bool = False
    """Changes what is served: needs an admin credential."""
    traced: bool = True
    """Gets a server span (when tracing is on)."""
    operational: bool = False
    """Health and reflection: never shed, refused or cut off by a drain."""
    prompts: bool = False
    """Its request messages (each one, on a stream) carry a prompt, and little else that may
    be long: one larger than the longest prompt any generation model takes is refused
    before it is decoded."""


PLAIN = Rpc()
_INFERENCE = Rpc(admitted=True, inference=True)
_ADMIN = Rpc(admin=True)
_OPERATIONAL = Rpc(traced=False, operational=True)
_GENERATE = Rpc(admitted=True, inference=True, prompts=True)

_INFERENCE_SERVICE = "/inference.GRPCInferenceService/"
_MODEL_SERVICE = "/sluice.v1.ModelService/"
_GENERATION_SERVICE = "/sluice.v1.GenerationService/"

RPCS: dict[str, Rpc] = {
    # inference.GRPCInferenceService
    f"{_INFERENCE_SERVICE}ServerLive": PLAIN,
    f"{_INFERENCE_SERVICE}ServerReady": PLAIN,
    f"{_INFERENCE_SERVICE}ModelReady": PLAIN,
    f"{_INFERENCE_SERVICE}ServerMetadata": PLAIN,
    f"{_INFERENCE_SERVICE}ModelMetadata": PLAIN,
    f"{_INFERENCE_SERVICE}ModelInfer": _INFERENCE,
    f"{_INFERENCE_SERVICE}ModelStreamInfer": PLAIN,
    f"{_INFERENCE_SERVICE}ModelConfig": PLAIN,
    f"{_INFERENCE_SERVICE}ModelStatistics": PLAIN,
    f"{_INFERENCE_SERVICE}RepositoryIndex": PLAIN,
    f"{_INFERENCE_SERVICE}RepositoryModelLoad": _ADMIN,
    f"{_INFERENCE_SERVICE}RepositoryModelUnload": _ADMIN,
    # sluice.v1.GenerationService
    f"{_GENERATION_SERVICE}Generate": _GENERATE,
    f"{_GENERATION_SERVICE}GenerateStream": Rpc(prompts=True),
    f"{_GENERATION_SERVICE}CountTokens": Rpc(admitted=True, prompts=True),
    # sluice.v1.ModelService
    f"{_MODEL_SERVICE}GetCapabilities": PLAIN,
    f"{_MODEL_SERVICE}ListModels": PLAIN,
    f"{_MODEL_SERVICE}LoadModel": _ADMIN,
    f"{_MODEL_SERVICE}UnloadModel": _ADMIN,
    f"{_MODEL_SERVICE}PromoteModel": _ADMIN,
    f"{_MODEL_SERVICE}RollbackModel": _ADMIN,
    f"{_MODEL_SERVICE}GetModelHistory": PLAIN,
    f"{_MODEL_SERVICE}RescanRepository": _ADMIN,
    f"{_MODEL_SERVICE}GetShadowReport": PLAIN,
    f"{_MODEL_SERVICE}SetShadowing": _ADMIN,
}
"""Every method of Sluice's own services and the inference protocol, by full name."""

OPERATIONAL_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Every method of these services is operational."""


def rpc(method: str) -> Rpc:
    """What ``method`` (``/package.Service/Method``) is."""
    found = RPCS.get(method)
    if found is not None:
        return found
    return _OPERATIONAL if method.startswith(OPERATIONAL_SERVICES) else PLAIN
