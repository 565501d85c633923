from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_UNAVAILABLE: _ClassVar[ModelState]

class BreakerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BREAKER_STATE_UNSPECIFIED: _ClassVar[BreakerState]
    BREAKER_STATE_CLOSED: _ClassVar[BreakerState]
    BREAKER_STATE_HALF_OPEN: _ClassVar[BreakerState]
    BREAKER_STATE_OPEN: _ClassVar[BreakerState]
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_UNAVAILABLE: ModelState
BREAKER_STATE_UNSPECIFIED: BreakerState
BREAKER_STATE_CLOSED: BreakerState
BREAKER_STATE_HALF_OPEN: BreakerState
BREAKER_STATE_OPEN: BreakerState

class GetCapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCapabilitiesResponse(_message.Message):
    __slots__ = ("python_version", "torch_version", "torch_cuda_version", "onnxruntime_version", "tensorrt_version", "onnxruntime_providers", "cuda_available", "cuda_devices", "torch_compile_available")
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_CUDA_VERSION_FIELD_NUMBER: _ClassVar[int]
    ONNXRUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORRT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ONNXRUNTIME_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    CUDA_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    CUDA_DEVICES_FIELD_NUMBER: _ClassVar[int]
    TORCH_COMPILE_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    python_version: str
    torch_version: str
    torch_cuda_version: str
    onnxruntime_version: str
    tensorrt_version: str
    onnxruntime_providers: _containers.RepeatedScalarFieldContainer[str]
    cuda_available: bool
    cuda_devices: _containers.RepeatedScalarFieldContainer[str]
    torch_compile_available: bool
    def __init__(self, python_version: _Optional[str] = ..., torch_version: _Optional[str] = ..., torch_cuda_version: _Optional[str] = ..., onnxruntime_version: _Optional[str] = ..., tensorrt_version: _Optional[str] = ..., onnxruntime_providers: _Optional[_Iterable[str]] = ..., cuda_available: bool = ..., cuda_devices: _Optional[_Iterable[str]] = ..., torch_compile_available: bool = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersionStatus(_message.Message):
    __slots__ = ("name", "version", "state", "reason", "backend", "backend_rung", "backend_reason", "device", "breaker_state", "fallbacks", "serving", "latency_guardrail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    BACKEND_RUNG_FIELD_NUMBER: _ClassVar[int]
    BACKEND_REASON_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BREAKER_STATE_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    LATENCY_GUARDRAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    state: ModelState
    reason: str
    backend: str
    backend_rung: str
    backend_reason: str
    device: str
    breaker_state: BreakerState
    fallbacks: _containers.RepeatedScalarFieldContainer[str]
    serving: bool
    latency_guardrail: LatencyGuardrailStatus
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ..., backend: _Optional[str] = ..., backend_rung: _Optional[str] = ..., backend_reason: _Optional[str] = ..., device: _Optional[str] = ..., breaker_state: _Optional[_Union[BreakerState, str]] = ..., fallbacks: _Optional[_Iterable[str]] = ..., serving: bool = ..., latency_guardrail: _Optional[_Union[LatencyGuardrailStatus, _Mapping]] = ...) -> None: ...

class LatencyGuardrailStatus(_message.Message):
    __slots__ = ("guardrail_ms", "tripped", "p95_ms", "samples", "slow_calls")
    GUARDRAIL_MS_FIELD_NUMBER: _ClassVar[int]
    TRIPPED_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SLOW_CALLS_FIELD_NUMBER: _ClassVar[int]
    guardrail_ms: float
    tripped: bool
    p95_ms: float
    samples: int
    slow_calls: int
    def __init__(self, guardrail_ms: _Optional[float] = ..., tripped: bool = ..., p95_ms: _Optional[float] = ..., samples: _Optional[int] = ..., slow_calls: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelVersionStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelVersionStatus, _Mapping]]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model_name", "version", "reason")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: str
    reason: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model_name", "versions", "serving_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    versions: _containers.RepeatedScalarFieldContainer[str]
    serving_version: str
    def __init__(self, model_name: _Optional[str] = ..., versions: _Optional[_Iterable[str]] = ..., serving_version: _Optional[str] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model_name", "version", "reason")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: str
    reason: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PromoteModelRequest(_message.Message):
    __slots__ = ("model_name", "version", "reason")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: str
    reason: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PromoteModelResponse(_message.Message):
    __slots__ = ("model_name", "from_version", "to_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    from_version: str
    to_version: str
    def __init__(self, model_name: _Optional[str] = ..., from_version: _Optional[str] = ..., to_version: _Optional[str] = ...) -> None: ...

class RollbackModelRequest(_message.Message):
    __slots__ = ("model_name", "reason")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    reason: str
    def __init__(self, model_name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RollbackModelResponse(_message.Message):
    __slots__ = ("model_name", "from_version", "to_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    from_version: str
    to_version: str
    def __init__(self, model_name: _Optional[str] = ..., from_version: _Optional[str] = ..., to_version: _Optional[str] = ...) -> None: ...

class GetModelHistoryRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class HistoryEntry(_message.Message):
    __slots__ = ("time", "action", "from_version", "to_version", "who", "reason")
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    WHO_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    time: str
    action: str
    from_version: str
    to_version: str
    who: str
    reason: str
    def __init__(self, time: _Optional[str] = ..., action: _Optional[str] = ..., from_version: _Optional[str] = ..., to_version: _Optional[str] = ..., who: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetModelHistoryResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[HistoryEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[HistoryEntry, _Mapping]]] = ...) -> None: ...

class RescanRepositoryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RescanRepositoryResponse(_message.Message):
    __slots__ = ("loaded", "failed")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    loaded: _containers.RepeatedScalarFieldContainer[str]
    failed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, loaded: _Optional[_Iterable[str]] = ..., failed: _Optional[_Iterable[str]] = ...) -> None: ...

class GetShadowReportRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class ShadowReport(_message.Message):
    __slots__ = ("model_name", "shadow_target", "sample_fraction", "mirrored", "compared", "failed", "skipped", "max_abs_diff", "max_rel_diff", "exact_match_rate", "token_agreement")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    SHADOW_TARGET_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MIRRORED_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    MAX_REL_DIFF_FIELD_NUMBER: _ClassVar[int]
    EXACT_MATCH_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    shadow_target: str
    sample_fraction: float
    mirrored: int
    compared: int
    failed: int
    skipped: int
    max_abs_diff: float
    max_rel_diff: float
    exact_match_rate: float
    token_agreement: float
    def __init__(self, model_name: _Optional[str] = ..., shadow_target: _Optional[str] = ..., sample_fraction: _Optional[float] = ..., mirrored: _Optional[int] = ..., compared: _Optional[int] = ..., failed: _Optional[int] = ..., skipped: _Optional[int] = ..., max_abs_diff: _Optional[float] = ..., max_rel_diff: _Optional[float] = ..., exact_match_rate: _Optional[float] = ..., token_agreement: _Optional[float] = ...) -> None: ...

class GetShadowReportResponse(_message.Message):
    __slots__ = ("enabled", "reports")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    reports: _containers.RepeatedCompositeFieldContainer[ShadowReport]
    def __init__(self, enabled: bool = ..., reports: _Optional[_Iterable[_Union[ShadowReport, _Mapping]]] = ...) -> None: ...

class SetShadowingRequest(_message.Message):
    __slots__ = ("enabled", "reason")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    reason: str
    def __init__(self, enabled: bool = ..., reason: _Optional[str] = ...) -> None: ...

class SetShadowingResponse(_message.Message):
    __slots__ = ("enabled",)
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    def __init__(self, enabled: bool = ...) -> None: ...
