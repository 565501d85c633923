"""The values that cross the seam between the transport and the core.

The transport turns protobuf into these, hands them to the core (``Router``: infer,
generate, count tokens; ``ModelRegistry``: the control plane) and turns what comes back
into protobuf. They are plain values: no protobuf, no grpc, nothing that could not be sent
to another process (tensors are numpy arrays or the bytes they arrived in). ``Call`` carries
the facts of the call a request came in on; the request id and the trace context travel in
task-local context (``callctx``, OpenTelemetry's context) inside one process.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy.typing as npt

from sluice.errors import InvalidInputError

# -- tensors ----------------------------------------------------------------------------


@dataclass(slots=True)
class InputTensor:
    """One input as it arrived: raw bytes or typed values, with its claimed type and shape."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | None = None
    values: Sequence[Any] | None = None


@dataclass(slots=True)
class InferRequest:
    model: str
    version: str = ""
    id: str = ""
    inputs: list[InputTensor] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    #: A specific backend of the model (a fallback to another backend); empty: the primary.
    backend: str = ""


@dataclass(frozen=True, slots=True)
class OutputTensor:
    name: str
    datatype: str
    array: npt.NDArray[Any]


@dataclass(frozen=True, slots=True)
class Routing:
    """How the router came by an answer (the transport shows it as response parameters
    and trailing metadata)."""

    attempts: int
    """Attempts the call made, this one included."""
    fallback: bool
    """A fallback answered, not the first candidate of the chain."""
    cached: bool = False
    """The response cache answered (the model ran nothing)."""
    degraded: str = ""
    """Every candidate failed or was open and the model's degraded tier answered:
    ``cache`` or ``static`` ("" for a real answer)."""


@dataclass(slots=True)
class InferResult:
    model: str
    version: str
    id: str
    outputs: list[OutputTensor]
    backend: str = ""
    #: Set by the router: attempts and whether a fallback answered.
    routing: Routing | None = None
    #: The remote server (``host:port``) that answered; empty: this one.
    endpoint: str = ""

    @property
    def served_by(self) -> str:
        """``model/version/backend``: the version that answered."""
        return f"{self.model}/{self.version}/{self.backend}"


# -- generation -------------------------------------------------------------------------

MAX_SEED = 2**63 - 1
MAX_STOP_SEQUENCES = 16
"""Stop sequences one request may give (each is matched against the text at every token)."""
MAX_STOP_SEQUENCE_CHARS = 256
MAX_STOP_TOKEN_IDS = 256


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingParams:
    """One request's generation parameters; invalid values raise ``InvalidInputError``."""

    max_new_tokens: int = 16
    """Most tokens to generate; the prompt and these must fit the model's context."""
    temperature: float = 0.0
    """0 picks the most likely token (greedy); higher values flatten the distribution."""
    top_k: int = 0
    """Draw only among the k most likely tokens; 0 turns this off."""
    top_p: float = 1.0
    """Draw only among the most likely tokens whose probabilities reach this sum."""
    repetition_penalty: float = 1.0
    """Above 1, tokens of the prompt and the output so far become less likely."""
    seed: int | None = None
    """Makes the draws repeatable; None draws a fresh seed."""
    stop_token_ids: tuple[int, ...] = ()
    """End the generation on these tokens (besides the model's end-of-sequence tokens)."""
    stop_sequences: tuple[str, ...] = ()
    """End the generation when the text contains one of these; it is not returned."""

    def __post_init__(self) -> None:
        problems = [
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, ">= 0"),
            ("top_k", self.top_k >= 0, ">= 0 (0 turns it off)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            (
                "repetition_penalty",
                math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
                "> 0 (1 turns it off)",
            ),
            ("seed", self.seed is None or 0 <= self.seed <= MAX_SEED, f"in [0, {MAX_SEED}]"),
            ("stop_token_ids", all(t >= 0 for t in self.stop_token_ids), "token ids (>= 0)"),
            ("stop_sequences", all(self.stop_sequences), "non-empty strings"),
            (
                "stop_sequences",
                len(self.stop_sequences) <= MAX_STOP_SEQUENCES
                and all(len(stop) <= MAX_STOP_SEQUENCE_CHARS for stop in self.stop_sequences),
                f"at most {MAX_STOP_SEQUENCES} strings of at most {MAX_STOP_SEQUENCE_CHARS} "
                "characters",
            ),
            (
                "stop_token_ids",
                len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
                f"at most {MAX_STOP_TOKEN_IDS} token ids",
            ),
        ]
        for field_name, valid, expected in problems:
            if not valid:
                got = repr(getattr(self, field_name))
                got = got if len(got) <= 80 else f"{got[:80]}... ({len(got)} characters)"
                raise InvalidInputError(f"{field_name} must be {expected}, got {got}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    model: str
    prompt: str
    params: SamplingParams
    version: str = ""
    id: str = ""
    #: A specific backend of the model (a fallback to another backend); empty: the primary.
    backend: str = ""


class FinishReason(enum.Enum):
    STOP = "stop"
    """An end-of-sequence token, a stop token or a stop sequence."""
    LENGTH = "length"
    """``max_new_tokens`` reached."""
    CANCELLED = "cancelled"
    """The caller cancelled the generation."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """What one generated token adds to a request's output."""

    text: str
    """Newly complete text: empty while a character or a possible stop sequence is
    incomplete; never a stop sequence or a stop token's text."""
    token_id: int
    """The token (a stop token included: it was generated and counts as usage); ``NO_TOKEN``
    for text no token of this server made (a degraded answer's)."""
    finish_reason: FinishReason | None = None


NO_TOKEN = -1
"""A chunk's ``token_id`` when no token made its text."""


@dataclass(frozen=True, slots=True)
class TokenCount:
    """A prompt counted exactly as the model sees it, and how much the model can hold."""

    tokens: int
    max_context: int


# -- the call ---------------------------------------------------------------------------


class Budget(Protocol):
    """What the core may ask of a call's admission while serving it: room for the work it
    turns out to need (decoded tensors, the reply, a generation's tokens) before that work
    starts. ``admission.Ticket`` is one; ``need`` raises when the room is not there."""

    def need(self, *, work_bytes: int = 0, tokens: int = 0) -> None: ...


@dataclass(frozen=True, slots=True)
class Call:
    """The facts of the call a request came in on, as the core needs them."""

    deadline: float | None = None
    """When the call's budget runs out, on the service clock (None: no deadline)."""
    ticket: Budget | None = None
    """The call's admission ticket, grown by the core before the work starts (None: the
    work is not weighed, e.g. a shadow mirror)."""
    priority: int = 0
    """The request's priority level (1 is the most urgent; 0: the default level)."""
