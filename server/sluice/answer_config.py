"""The sections of a model's config for answers it gives without running:
``response_cache`` (repeated calls answered from the server's response cache) and
``degraded`` (what it answers when every candidate of its chain failed or is open), and
the check of a static answer against the model's outputs once they are known."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from sluice.errors import ConfigError
from sluice.tensors import Array, IOSpec
from sluice_client.tensors import DATATYPES, element_count


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


def known_datatype(value: str) -> str:
    if value not in DATATYPES:
        raise ValueError(f"unknown datatype '{value}'; use one of {sorted(DATATYPES)}")
    return value


class ResponseCacheConfig(_Strict):
    enabled: bool = False
    """Answer a call whose inputs, requested outputs and parameters were answered before by
    the same version from the server's response cache (``cache`` settings), without
    running it."""
    generations: bool = False
    """A generation model: keep its greedy generations (temperature 0: the same request
    always makes the same tokens) and replay them to the same request."""


def check_response_cache(config: ResponseCacheConfig, *, where: Path, generates: bool) -> None:
    """``ConfigError`` when ``generations`` is asked of a tensor model."""
    if config.generations and not generates:
        raise ConfigError(
            f"{where}: field 'response_cache.generations': only a generation model's "
            "generations are cached; a tensor model's answers need 'enabled' alone"
        )


class DegradedOutput(_Strict):
    """One output of the static answer."""

    name: str
    datatype: str
    """Open Inference Protocol datatype; the model's output has the same."""
    shape: list[int]
    """The answer to a one-row request (a batching model's first dimension is 1; a call
    with more rows gets it once per row)."""
    data: list[Any]
    """The elements, row-major (BYTES: strings)."""

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        return known_datatype(value)

    @model_validator(mode="after")
    def _data_fits_shape(self) -> DegradedOutput:
        if any(dim < 0 for dim in self.shape):
            raise ValueError(f"output '{self.name}': shape {self.shape} has a negative size")
        count = element_count(self.shape)
        if len(self.data) != count:
            raise ValueError(
                f"output '{self.name}': shape {self.shape} holds {count} elements, data has "
                f"{len(self.data)}"
            )
        try:
            static_array(self.datatype, self.shape, self.data)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"output '{self.name}': data is not {self.datatype}: {exc}") from exc
        return self


class DegradedConfig(_Strict):
    """What the model answers when every candidate of its chain failed or is open (always
    marked as degraded in the response)."""

    from_cache: bool = False
    """First, a cached answer of the same request: successful answers (a generation
    model's greedy generations) are kept in the response cache even when ``response_cache``
    is off (then read only here)."""
    outputs: list[DegradedOutput] = []
    """Then this static answer (tensor models): every output of the model, once each."""
    text: str | None = None
    """The static answer of a generation model: sent as one chunk of text, never tokens."""

    @field_validator("outputs")
    @classmethod
    def _once_each(cls, outputs: list[DegradedOutput]) -> list[DegradedOutput]:
        names = [output.name for output in outputs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"output(s) {', '.join(repeated)} given more than once")
        return outputs

    @model_validator(mode="after")
    def _one_kind(self) -> DegradedConfig:
        if self.outputs and self.text is not None:
            raise ValueError(
                "give 'outputs' (a tensor model's answer) or 'text' (a generation model's), "
                "not both"
            )
        return self

    @functools.cached_property
    def arrays(self) -> dict[str, Array]:
        """The static answer's tensors, read-only, for a one-row request."""
        return {
            output.name: static_array(output.datatype, output.shape, output.data)
            for output in self.outputs
        }


def static_array(datatype: str, shape: list[int], data: list[Any]) -> Array:
    """A configured tensor as a read-only array of ``datatype``."""
    if datatype == "BYTES":
        array = np.empty(len(data), dtype=object)
        array[:] = [v.encode() if isinstance(v, str) else bytes(v) for v in data]
    else:
        if not all(isinstance(v, int | float) for v in data):
            raise TypeError("numbers expected")
        integral = datatype != "BOOL" and DATATYPES[datatype].numpy.kind in "iub"
        if integral and not all(float(v).is_integer() for v in data):
            raise TypeError("whole numbers expected")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an out-of-range integer is an error, not a wrap
            array = np.array(data, dtype=DATATYPES[datatype].numpy)
    array = array.reshape(shape)
    array.flags.writeable = False
    return array


def check_degraded(
    degraded: DegradedConfig | None, io: IOSpec, *, where: Path, generates: bool = False
) -> None:
    """``ConfigError`` when the static degraded answer does not fit the model: ``text`` is
    a generation model's answer, ``outputs`` a tensor model's, fitting its outputs."""
    if degraded is None:
        return
    if generates and degraded.outputs:
        raise ConfigError(
            f"{where}: field 'degraded.outputs': this is a generation model; give its static "
            "answer as 'degraded.text'"
        )
    if not generates and degraded.text is not None:
        raise ConfigError(
            f"{where}: field 'degraded.text': only a generation model answers with text; "
            "give a tensor model's static answer as 'degraded.outputs'"
        )
    if not degraded.outputs:
        return
    specs = {spec.name: spec for spec in io.outputs}
    for index, output in enumerate(degraded.outputs):
        field = f"degraded.outputs.{index}"
        spec = specs.get(output.name)
        if spec is None:
            raise ConfigError(
                f"{where}: field '{field}.name': the model has no output '{output.name}' "
                f"(it has {', '.join(specs)})"
            )
        if output.datatype != spec.datatype:
            raise ConfigError(
                f"{where}: field '{field}.datatype': {output.datatype} but the model's output "
                f"'{output.name}' is {spec.datatype}"
            )
        expected = (1, *spec.dims) if io.batched else spec.dims
        fits = len(output.shape) == len(expected) and all(
            want in (-1, got) for got, want in zip(output.shape, expected, strict=True)
        )
        if not fits:
            shown = [1, *spec.dims] if io.batched else list(spec.dims)
            raise ConfigError(
                f"{where}: field '{field}.shape': {output.shape} does not fit the model's output "
                f"'{output.name}' of shape {shown} (-1 = any size"
                f"{'; the first dimension is the one row' if io.batched else ''})"
            )
    given = {output.name for output in degraded.outputs}
    missing = sorted(set(specs) - given)
    if missing:
        raise ConfigError(
            f"{where}: field 'degraded.outputs': the static answer lacks the model's "
            f"output(s) {', '.join(missing)}"
        )
