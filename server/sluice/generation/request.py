"""A generation request as the core sees it (protocol-neutral)."""

from __future__ import annotations

from dataclasses import dataclass

from sluice.generation.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    model: str
    prompt: str
    params: SamplingParams
    version: str = ""
    id: str = ""
