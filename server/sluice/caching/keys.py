"""The response cache's key: a BLAKE2b digest (256 bits) over everything that decides an
answer, each field length-prefixed so that no two different requests write the same
stream of bytes:

* the version that answers, as loaded (model, version, backend, and its folder's files:
  a version reloaded from changed files never reads the answers of the old ones);
* the requested outputs, in order;
* every input, in name order: name, datatype, shape and contents in their wire encoding
  (typed contents are encoded as raw ones would be, so either way of sending the same
  tensor finds the same answer);
* every request parameter except those that only bound the call (``timeout``,
  ``priority``).

A greedy generation's key (``generation_key``) covers the version the same way, the prompt
and every sampling parameter.

The digest is the whole key: the store compares all of its 32 bytes, and each entry also
names its model and version, checked again on a hit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sluice.domain import GenerationRequest, InferRequest, InputTensor
from sluice.repository import ModelSpec
from sluice.tensors import decode_checked
from sluice_client.tensors import to_raw

DIGEST_BYTES = 32
MAX_IDENTITY_FILES = 10_000
"""Files of a version's folder the key names (a folder with more: the first, by path)."""
IGNORED_PARAMETERS = frozenset({"timeout", "priority"})
"""Request parameters that bound the call (its deadline, its place in a queue) and never
change the answer."""


@dataclass(frozen=True, slots=True)
class CacheKey:
    digest: bytes
    model: str
    version: str


def version_identity(spec: ModelSpec, *, content: bool = False) -> bytes:
    """The loaded version as the key names it: model, version, backend, a generation
    model's dtype (its tokens differ from one type to another), and every file of its
    folder by relative path and either size and modification time, or (``content``, for
    keys that replicas share) a digest of its bytes. Computed once per loaded version
    (``content`` reads every file: in a worker thread)."""
    parts = [spec.name, spec.version, spec.backend, spec.backend_rung]
    if spec.dtype:  # (a tensor model's key is what it was)
        parts.append(f"dtype {spec.dtype}")
    folder = spec.path.parent if spec.path.is_file() else spec.path
    try:
        files = sorted(path for path in folder.rglob("*") if path.is_file())
    except OSError:
        files = []
    for path in files[:MAX_IDENTITY_FILES]:
        parts.append(str(path.relative_to(folder)))
        try:
            parts.append(_file_digest(path) if content else _file_stamp(path))
        except OSError:
            parts.append("?")
    return b"".join(_framed(_text(part)) for part in parts)


def _file_stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _file_digest(path: Path) -> str:
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, lambda: hashlib.blake2b(digest_size=DIGEST_BYTES))
    return digest.hexdigest()


def request_key(
    request: InferRequest, *, spec: ModelSpec, identity: bytes, wanted: Sequence[str]
) -> CacheKey:
    """The key of a request that ``check_inputs`` accepted for ``spec``'s version."""
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"sluice-cache-v1")
    digest.update(_framed(identity))
    digest.update(_count(len(wanted)))
    for name in wanted:
        digest.update(_framed(_text(name)))
    inputs = sorted(request.inputs, key=lambda tensor: tensor.name)
    digest.update(_count(len(inputs)))
    for tensor in inputs:
        digest.update(_framed(_text(tensor.name)))
        digest.update(_framed(_text(tensor.datatype)))
        digest.update(_count(len(tensor.shape)))
        for dim in tensor.shape:
            digest.update(dim.to_bytes(8, "little", signed=True))
        contents = _contents(request, tensor)
        digest.update(_count(memoryview(contents).nbytes))
        digest.update(contents)
    parameters = sorted(
        (key, value) for key, value in request.parameters.items() if key not in IGNORED_PARAMETERS
    )
    digest.update(_count(len(parameters)))
    for key, value in parameters:
        digest.update(_framed(_text(key)))
        digest.update(_framed(_text(_typed(value))))
    return CacheKey(digest.digest(), spec.name, spec.version)


def generation_key(request: GenerationRequest, *, spec: ModelSpec, identity: bytes) -> CacheKey:
    """The key of a generation on ``spec``'s version: the prompt and every sampling
    parameter (each by name, typed), so no two different requests share it."""
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"sluice-gen-v1")
    digest.update(_framed(identity))
    digest.update(_framed(_text(request.prompt)))
    params = request.params
    names = sorted(field.name for field in fields(params))
    digest.update(_count(len(names)))
    for name in names:
        digest.update(_framed(_text(name)))
        digest.update(_framed(_text(_typed(getattr(params, name)))))
    return CacheKey(digest.digest(), spec.name, spec.version)


def _contents(request: InferRequest, tensor: InputTensor) -> bytes:
    if tensor.raw is not None:
        return tensor.raw
    one = InferRequest(model=request.model, inputs=[tensor])
    return to_raw(decode_checked(one)[tensor.name], tensor.datatype)


def _typed(value: Any) -> str:
    return f"{type(value).__name__}:{value!r}"


def _text(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def _count(value: int) -> bytes:
    return value.to_bytes(8, "little")


def _framed(data: bytes) -> bytes:
    return _count(len(data)) + data
