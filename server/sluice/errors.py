"""Sluice's own exception tree. The transport maps it to gRPC status codes in one table.

    SluiceError
    ├── InvalidInputError        bad tensors, shapes, parameters       INVALID_ARGUMENT
    │   └── ContextOverflowError  prompt + max_new_tokens > the context
    │       └── PromptTooLongError  more prompt bytes than the context holds
    ├── ModelNotFoundError       unknown model or version              NOT_FOUND
    ├── UnsupportedError         feature the model or server lacks     UNIMPLEMENTED
    ├── ConfigError              a model's config.yaml or files        FAILED_PRECONDITION
    ├── PermissionDeniedError    admin call without the credential    PERMISSION_DENIED
    ├── QuotaExceededError       a caller's quota is used up           RESOURCE_EXHAUSTED
    ├── RequestTooLargeError     larger than a whole budget or limit   RESOURCE_EXHAUSTED
    ├── DeadlineExceededError    the call's budget ran out             DEADLINE_EXCEEDED
    ├── RequestCancelledError    the caller went away                  CANCELLED
    └── UnavailableError         retry later or elsewhere              UNAVAILABLE
        ├── ModelNotReadyError   loading, unloading or unhealthy
        ├── OverloadedError      queue or in-flight limit; carries pushback
        ├── BreakerOpenError     the backend's circuit breaker is open
        ├── ExecutorError        the backend failed running a batch (a backend fault)
        │   └── ExecutorDeadError  the backend cannot run anything any more
        └── DrainingError        the server is shutting down

Only backend faults (ExecutorError) count against a circuit breaker; only ExecutorDeadError
turns health NOT_SERVING.
"""

from __future__ import annotations


class SluiceError(Exception):
    """Base of every error Sluice reports to a caller."""

    #: Errors worth retrying (later, or on another replica) set this.
    transient: bool = False

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms


class InvalidInputError(SluiceError):
    """The request itself is wrong; retrying it unchanged cannot help."""


class ContextOverflowError(InvalidInputError):
    """A generation whose prompt and ``max_new_tokens`` cannot fit the model's context (a
    fallback with a larger context may take it). ``need`` says what did not fit."""

    def __init__(self, *, model: str, prompt_tokens: int, max_new_tokens: int, max_context: int):
        super().__init__(
            f"model '{model}': the prompt has {prompt_tokens} tokens and max_new_tokens is "
            f"{max_new_tokens}: {prompt_tokens + max_new_tokens} tokens do not fit its context "
            f"of {max_context}; shorten the prompt, lower max_new_tokens or use a model with a "
            "larger context"
        )
        self.need = f"the prompt ({prompt_tokens} tokens) and max_new_tokens ({max_new_tokens})"
        self.max_context = max_context


class PromptTooLongError(ContextOverflowError):
    """A prompt with more bytes than the model's context could hold whatever its tokens,
    refused before it is tokenized."""

    def __init__(self, *, model: str, prompt_bytes: int, max_prompt_bytes: int, max_context: int):
        InvalidInputError.__init__(
            self,
            f"model '{model}': the prompt has {prompt_bytes} bytes; its context of "
            f"{max_context} tokens can hold at most {max_prompt_bytes} bytes of text; shorten "
            "the prompt or use a model with a larger context",
        )
        self.need = f"the prompt ({prompt_bytes} bytes)"
        self.max_context = max_context


class ModelNotFoundError(SluiceError):
    """No such model, or no such version of it."""


class UnsupportedError(SluiceError):
    """The operation exists in the protocol but this model or server does not offer it."""


class ConfigError(SluiceError):
    """A model's configuration or files are invalid; names the file and field."""


class PermissionDeniedError(SluiceError):
    """The caller lacks the credential this operation needs."""


class QuotaExceededError(SluiceError):
    """A quota (per tenant or per model) is used up."""

    def __init__(self, message: str, *, subject: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message, retry_after_ms=retry_after_ms)
        self.subject = subject


class RequestTooLargeError(SluiceError):
    """The call is larger than a whole budget (bytes or tokens in flight) or its reply
    larger than the largest message: it can never run, so retrying cannot help."""


class DeadlineExceededError(SluiceError):
    """The call's deadline passed before its work finished."""


class RequestCancelledError(SluiceError):
    """The caller cancelled or disconnected."""


class UnavailableError(SluiceError):
    """The server cannot serve this now; the same call may succeed later or elsewhere."""

    transient = True


class ModelNotReadyError(UnavailableError):
    """The model exists but cannot infer right now."""


class OverloadedError(UnavailableError):
    """A queue or in-flight limit is reached; carries how long to back off."""


class BreakerOpenError(UnavailableError):
    """The backend's circuit breaker is open: failing fast instead of queueing."""


class ExecutorError(UnavailableError):
    """The backend failed while running a batch; counts against its breaker."""


class ExecutorDeadError(ExecutorError):
    """The backend can no longer run anything; turns the model's health NOT_SERVING."""


class DrainingError(UnavailableError):
    """The server is draining for shutdown and takes no new work."""
