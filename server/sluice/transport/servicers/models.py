"""sluice.v1.ModelService: what the machine offers and what each model version runs on."""

from __future__ import annotations

from typing import Any

import grpc

from sluice import callctx
from sluice.errors import InvalidInputError
from sluice.registry import READY, IndexEntry, ModelRegistry
from sluice.routing.guardrail import Guardrails, GuardrailView
from sluice.routing.walk import label
from sluice.shadow import Shadower, ShadowReport
from sluice_api.sluice.v1 import model_service_pb2 as pb
from sluice_api.sluice.v1 import model_service_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]

_PEER_PREFIXES = ("ipv4:", "ipv6:", "unix:")

_BREAKER_STATES = {
    "closed": pb.BREAKER_STATE_CLOSED,
    "half-open": pb.BREAKER_STATE_HALF_OPEN,
    "open": pb.BREAKER_STATE_OPEN,
}


def _status(row: IndexEntry, fallbacks: list[str]) -> pb.ModelVersionStatus:
    status = pb.ModelVersionStatus(
        name=row.name,
        version=row.version,
        state=pb.MODEL_STATE_READY if row.state == READY else pb.MODEL_STATE_UNAVAILABLE,
        reason=row.reason,
        fallbacks=fallbacks,
        serving=row.serving,
    )
    if row.spec is not None:
        spec = row.spec
        status.backend = spec.backend
        status.backend_rung = spec.backend_rung
        status.backend_reason = spec.backend_reason
        status.device = spec.device
        status.breaker_state = _BREAKER_STATES.get(row.breaker_state, pb.BREAKER_STATE_UNSPECIFIED)
    return status


def _guardrail(view: GuardrailView) -> pb.LatencyGuardrailStatus:
    return pb.LatencyGuardrailStatus(
        guardrail_ms=view.guardrail_ms,
        tripped=view.tripped,
        p95_ms=view.p95_ms,
        samples=view.samples,
        slow_calls=view.slow_calls,
    )


def _shadow_report(report: ShadowReport) -> pb.ShadowReport:
    return pb.ShadowReport(
        model_name=report.model,
        shadow_target=report.target,
        sample_fraction=report.fraction,
        mirrored=report.mirrored,
        compared=report.compared,
        failed=report.failed,
        skipped=report.skipped,
        max_abs_diff=report.max_abs_diff,
        max_rel_diff=report.max_rel_diff,
        exact_match_rate=report.exact_match_rate,
        token_agreement=report.token_agreement,
    )


def _who(recorded: str) -> str:
    """The caller as the history shows it: histories written before callers were recorded
    by identity hold loopback peer addresses, shown as the local caller they were."""
    return callctx.LOCAL_CALLER if recorded.startswith(_PEER_PREFIXES) else recorded


class ModelServicer(pb_grpc.ModelServiceServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        *,
        shadow: Shadower,
        guardrails: Guardrails,
        max_reason_chars: int,
    ) -> None:
        self._registry = registry
        self._shadow = shadow
        self._guardrails = guardrails
        self._max_reason_chars = max_reason_chars

    def _reason(self, request: Any) -> str:
        """The admin call's ``reason``, bounded before it reaches a log or the history."""
        reason: str = request.reason
        if len(reason) > self._max_reason_chars:
            raise InvalidInputError(
                f"reason has {len(reason)} characters; at most {self._max_reason_chars} are "
                "recorded (admin.max_reason_chars)"
            )
        return reason

    async def GetCapabilities(
        self, request: pb.GetCapabilitiesRequest, context: Context
    ) -> pb.GetCapabilitiesResponse:
        caps = self._registry.capabilities
        return pb.GetCapabilitiesResponse(
            python_version=caps.python,
            torch_version=caps.torch or "",
            torch_cuda_version=caps.torch_cuda or "",
            onnxruntime_version=caps.onnxruntime or "",
            tensorrt_version=caps.tensorrt or "",
            onnxruntime_providers=caps.ort_providers,
            cuda_available=caps.cuda_available,
            cuda_devices=caps.cuda_devices,
            torch_compile_available=caps.torch_compile,
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        rows = []
        for row in self._registry.index():
            fallbacks = [  # model[/version][@backend], or host:port/model[/version]
                label(f if f.model else f.model_copy(update={"model": row.name}))
                for f in self._registry.fallbacks(row.name)
            ]
            status = _status(row, fallbacks)
            guardrail = self._guardrail_view(row)
            if guardrail is not None:
                status.latency_guardrail.CopyFrom(_guardrail(guardrail))
            rows.append(status)
        return pb.ListModelsResponse(models=rows)

    def _guardrail_view(self, row: IndexEntry) -> GuardrailView | None:
        """A loaded version's latency guardrail, when its model has one."""
        guardrail_ms = self._registry.latency_guardrail_ms(row.name)
        if guardrail_ms is None or row.spec is None:
            return None
        guard = self._guardrails.get(guardrail_ms, row.name, row.version, row.spec.backend)
        return None if guard is None else guard.view()

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: Context
    ) -> pb.LoadModelResponse:
        who, name, reason = callctx.caller.get(), request.model_name, self._reason(request)
        if request.version:
            await self._registry.load_version(name, request.version, who=who, reason=reason)
        else:
            await self._registry.load(name, who=who, reason=reason)
        rows = [row for row in self._registry.index() if row.name == name and row.spec]
        return pb.LoadModelResponse(
            model_name=name,
            versions=[row.version for row in rows],
            serving_version=next((row.version for row in rows if row.serving), ""),
        )

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: Context
    ) -> pb.UnloadModelResponse:
        who, name, reason = callctx.caller.get(), request.model_name, self._reason(request)
        if request.version:
            await self._registry.unload_version(name, request.version, who=who, reason=reason)
        else:
            await self._registry.unload(name, who=who, reason=reason)
        return pb.UnloadModelResponse()

    async def PromoteModel(
        self, request: pb.PromoteModelRequest, context: Context
    ) -> pb.PromoteModelResponse:
        before, after = await self._registry.promote(
            request.model_name,
            request.version,
            who=callctx.caller.get(),
            reason=self._reason(request),
        )
        return pb.PromoteModelResponse(
            model_name=request.model_name, from_version=before, to_version=after
        )

    async def RollbackModel(
        self, request: pb.RollbackModelRequest, context: Context
    ) -> pb.RollbackModelResponse:
        before, after = await self._registry.rollback(
            request.model_name, who=callctx.caller.get(), reason=self._reason(request)
        )
        return pb.RollbackModelResponse(
            model_name=request.model_name, from_version=before, to_version=after
        )

    async def GetModelHistory(
        self, request: pb.GetModelHistoryRequest, context: Context
    ) -> pb.GetModelHistoryResponse:
        changes = self._registry.history(request.model_name)
        return pb.GetModelHistoryResponse(
            entries=[
                pb.HistoryEntry(
                    time=c.time,
                    action=c.action,
                    from_version=c.from_version,
                    to_version=c.to_version,
                    who=_who(c.who),
                    reason=c.reason,
                )
                for c in changes
            ]
        )

    async def RescanRepository(
        self, request: pb.RescanRepositoryRequest, context: Context
    ) -> pb.RescanRepositoryResponse:
        loaded, failed = await self._registry.rescan(who=callctx.caller.get())
        return pb.RescanRepositoryResponse(loaded=loaded, failed=failed)

    async def GetShadowReport(
        self, request: pb.GetShadowReportRequest, context: Context
    ) -> pb.GetShadowReportResponse:
        reports = self._shadow.reports(request.model_name)
        return pb.GetShadowReportResponse(
            enabled=self._shadow.enabled, reports=[_shadow_report(r) for r in reports]
        )

    async def SetShadowing(
        self, request: pb.SetShadowingRequest, context: Context
    ) -> pb.SetShadowingResponse:
        enabled = self._shadow.set_enabled(request.enabled, reason=self._reason(request))
        return pb.SetShadowingResponse(enabled=enabled)
