"""The inference protos: buf lint, stub drift, and wire compatibility with tritonclient.

tritonclient ships its own generated copy of the inference protos. Loading it next to ours
in one process clashes in protobuf's descriptor pool (same message names), so everything
tritonclient does here runs in a subprocess and messages cross the boundary as hex bytes.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import descriptor_pb2
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from sluice_api.inference import grpc_service_pb2, model_config_pb2
from tests import toolchains

REPO_ROOT = Path(__file__).resolve().parent.parent
BUF_PREFIX = REPO_ROOT / ".cache" / "buf"
BUF = BUF_PREFIX / "node_modules" / ".bin" / "buf"
BUF_PACKAGE = "@bufbuild/buf@1.75.0"
SUBPROCESS_TIMEOUT_S = 300


def _run(command: list[str], *, cwd: Path = REPO_ROOT, stdin: str = "") -> str:
    proc = subprocess.run(
        command,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"{command} exited {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def _as_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


# --- buf ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def buf() -> Path:
    """The buf binary, installed from npm into .cache/buf (git-ignored) if missing."""
    toolchains.require("node")
    if not BUF.exists():
        npm = shutil.which("npm")
        assert npm is not None
        _run([npm, "install", "--prefix", str(BUF_PREFIX), BUF_PACKAGE])
    return BUF


def test_buf_lint_passes(buf: Path) -> None:
    _run([str(buf), "lint"])


def test_buf_exemptions_only_cover_protos_inference(buf: Path, tmp_path: Path) -> None:
    """A proto outside protos/inference still gets every rule buf.yaml waives for it."""
    config = yaml.safe_load((REPO_ROOT / "buf.yaml").read_text())
    exempted = config["lint"]["ignore_only"]
    assert all(paths == ["protos/inference"] for paths in exempted.values()), exempted
    shutil.copy(REPO_ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(REPO_ROOT / "protos", tmp_path / "protos")
    probe = tmp_path / "protos" / "probe" / "probe.proto"
    probe.parent.mkdir()
    probe.write_text(
        textwrap.dedent(
            """\
            syntax = "proto3";

            package probe;

            // Zero value without the enum prefix and _UNSPECIFIED.
            enum Color {
              RED = 0;
            }

            // Two RPCs share a request type that is not named after either.
            service ProbeService {
              // First.
              rpc First(Shared) returns (FirstResponse);
              // Second.
              rpc Second(Shared) returns (SecondResponse);
            }

            // Shared request.
            message Shared {
              Color color = 1;
            }

            // First response.
            message FirstResponse {}

            // Second response.
            message SecondResponse {}
            """
        )
    )
    proc = subprocess.run(
        [str(buf), "lint", "--error-format=json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )
    findings = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert {f["path"] for f in findings} == {"protos/probe/probe.proto"}, proc.stdout
    assert {f["type"] for f in findings} >= set(exempted), proc.stdout


# --- generated stubs ------------------------------------------------------------------


def test_generated_python_stubs_are_up_to_date() -> None:
    """The Python stubs need only grpcio-tools; tests/clients/test_codegen.py checks all."""
    _run([sys.executable, str(REPO_ROOT / "scripts" / "gen_protos.py"), "--check", "--python"])


def test_descriptor_file_names_match_import_paths() -> None:
    """grpcurl resolves imports through reflection by these exact file names."""
    assert grpc_service_pb2.DESCRIPTOR.name == "inference/grpc_service.proto"
    assert model_config_pb2.DESCRIPTOR.name == "inference/model_config.proto"
    assert [d.name for d in grpc_service_pb2.DESCRIPTOR.dependencies] == [
        "inference/model_config.proto"
    ]


def test_service_methods() -> None:
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    unary = (False, False)
    assert methods == {
        "ServerLive": unary,
        "ServerReady": unary,
        "ModelReady": unary,
        "ServerMetadata": unary,
        "ModelMetadata": unary,
        "ModelInfer": unary,
        "ModelStreamInfer": (True, True),
        "ModelConfig": unary,
        "ModelStatistics": unary,
        "RepositoryIndex": unary,
        "RepositoryModelLoad": unary,
        "RepositoryModelUnload": unary,
    }


# --- wire compatibility with tritonclient ---------------------------------------------

# Runs in a subprocess with tritonclient's generated protos. Modes:
#   encode       print {name: {"hex": ..., "dict": ...}} for messages tritonclient builds
#   decode       read [[type name, hex], ...] on stdin, print what tritonclient parses
#   descriptors  print tritonclient's FileDescriptorProtos as hex
TRITON_SIDE = textwrap.dedent(
    """\
    import json
    import sys

    import numpy as np
    from google.protobuf import descriptor_pb2
    from google.protobuf.json_format import MessageToDict
    from tritonclient.grpc import InferResult, model_config_pb2 as mc, service_pb2 as svc
    from tritonclient.utils import serialize_byte_tensor


    def as_dict(message):
        return MessageToDict(message, preserving_proto_field_name=True)


    def raw_request():
        req = svc.ModelInferRequest(model_name="m", model_version="2", id="req-1")
        req.parameters["sequence_start"].bool_param = True
        req.parameters["sequence_id"].int64_param = -7
        req.parameters["mode"].string_param = "greedy"
        req.parameters["temperature"].double_param = 0.25
        req.parameters["priority"].uint64_param = 2**64 - 1
        fp32 = req.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 2])
        fp32.parameters["binary_data_size"].int64_param = 16
        req.inputs.add(name="TEXT", datatype="BYTES", shape=[2])
        out = req.outputs.add(name="OUTPUT0")
        out.parameters["binary_data"].bool_param = True
        req.raw_input_contents.append(np.arange(4, dtype="<f4").tobytes())
        text = np.array([b"hi", b"\\xff\\x00"], dtype=np.object_)
        req.raw_input_contents.append(serialize_byte_tensor(text).item())
        return req


    def typed_request():
        req = svc.ModelInferRequest(model_name="m")
        columns = [
            ("B", "BOOL", "bool_contents", [True, False]),
            ("I", "INT32", "int_contents", [-1, 2]),
            ("L", "INT64", "int64_contents", [-(2**40), 3]),
            ("U", "UINT32", "uint_contents", [4000000000, 1]),
            ("UL", "UINT64", "uint64_contents", [2**64 - 1, 0]),
            ("F", "FP32", "fp32_contents", [0.5, -1.5]),
            ("D", "FP64", "fp64_contents", [1e300, -0.1]),
            ("S", "BYTES", "bytes_contents", [b"a", b""]),
        ]
        for name, datatype, field, values in columns:
            tensor = req.inputs.add(name=name, datatype=datatype, shape=[2])
            getattr(tensor.contents, field).extend(values)
        return req


    def model_config():
        cfg = mc.ModelConfig(name="m", platform="onnxruntime_onnx", max_batch_size=8)
        cfg.backend = "onnxruntime"
        cfg.version_policy.latest.num_versions = 2
        inp = cfg.input.add(name="INPUT0", data_type=mc.TYPE_FP32, dims=[3, -1])
        inp.format = mc.ModelInput.FORMAT_NCHW
        inp.optional = True
        inp.reshape.shape.extend([3, -1])
        cfg.output.add(name="OUTPUT0", data_type=mc.TYPE_STRING, dims=[-1])
        batching = cfg.dynamic_batching
        batching.preferred_batch_size.extend([4, 8])
        batching.max_queue_delay_microseconds = 500
        batching.preserve_ordering = True
        batching.priority_levels = 2
        batching.default_priority_level = 1
        batching.default_queue_policy.timeout_action = mc.ModelQueuePolicy.DELAY
        batching.default_queue_policy.max_queue_size = 64
        batching.priority_queue_policy[1].default_timeout_microseconds = 1000
        batching.priority_queue_policy[1].allow_timeout_override = True
        cfg.instance_group.add(name="g", kind=mc.ModelInstanceGroup.KIND_CPU, count=2)
        cfg.model_transaction_policy.decoupled = True
        cfg.response_cache.enable = True
        cfg.parameters["k"].string_value = "v"
        cfg.metric_tags["team"] = "serving"
        cfg.optimization.input_pinned_memory.enable = True
        warmup = cfg.model_warmup.add(name="w", batch_size=1)
        warmup.inputs["INPUT0"].data_type = mc.TYPE_FP32
        warmup.inputs["INPUT0"].dims.extend([3, 4])
        warmup.inputs["INPUT0"].random_data = True
        return cfg


    def encode():
        built = {"raw": raw_request(), "typed": typed_request(), "config": model_config()}
        return {
            name: {"hex": msg.SerializeToString().hex(), "dict": as_dict(msg)}
            for name, msg in built.items()
        }


    def decode(items):
        decoded = []
        for type_name, data in items:
            message = getattr(svc, type_name).FromString(bytes.fromhex(data))
            entry = {"dict": as_dict(message)}
            if type_name == "ModelInferResponse":
                result = InferResult(message)
                entry["fp32"] = result.as_numpy("OUTPUT0").tolist()
                entry["text"] = [b.hex() for b in result.as_numpy("TEXT").tolist()]
            decoded.append(entry)
        return decoded


    def descriptors():
        files = []
        for module in (mc, svc):
            proto = descriptor_pb2.FileDescriptorProto()
            module.DESCRIPTOR.CopyToProto(proto)
            files.append(proto.SerializeToString().hex())
        return files


    mode = sys.argv[1]
    if mode == "encode":
        result = encode()
    elif mode == "decode":
        result = decode(json.load(sys.stdin))
    else:
        result = descriptors()
    json.dump(result, sys.stdout)
    """
)


# find_spec only locates tritonclient; nothing of it is loaded into this process.
needs_tritonclient = pytest.mark.toolchain("tritonclient")


def _triton_side(mode: str, payload: object = None) -> Any:
    stdout = _run([sys.executable, "-c", TRITON_SIDE, mode], stdin=json.dumps(payload))
    return json.loads(stdout)


@pytest.fixture(scope="module")
def from_tritonclient() -> dict[str, dict[str, Any]]:
    """Messages built and serialized by tritonclient's classes."""
    encoded: dict[str, dict[str, Any]] = _triton_side("encode")
    return encoded


@needs_tritonclient
def test_infer_request_with_raw_contents_from_tritonclient(
    from_tritonclient: dict[str, dict[str, Any]],
) -> None:
    sent = from_tritonclient["raw"]
    req = grpc_service_pb2.ModelInferRequest.FromString(bytes.fromhex(sent["hex"]))
    assert _as_dict(req) == sent["dict"]
    kinds = {key: p.WhichOneof("parameter_choice") for key, p in req.parameters.items()}
    assert kinds == {
        "sequence_start": "bool_param",
        "sequence_id": "int64_param",
        "mode": "string_param",
        "temperature": "double_param",
        "priority": "uint64_param",
    }
    assert req.parameters["priority"].uint64_param == 2**64 - 1
    assert req.parameters["temperature"].double_param == 0.25
    assert [(t.name, t.datatype, list(t.shape)) for t in req.inputs] == [
        ("INPUT0", "FP32", [2, 2]),
        ("TEXT", "BYTES", [2]),
    ]
    assert req.inputs[0].parameters["binary_data_size"].int64_param == 16
    assert req.outputs[0].parameters["binary_data"].bool_param is True
    assert list(req.raw_input_contents) == [
        struct.pack("<4f", 0.0, 1.0, 2.0, 3.0),
        struct.pack("<I", 2) + b"hi" + struct.pack("<I", 2) + b"\xff\x00",
    ]


@needs_tritonclient
def test_infer_request_with_typed_contents_from_tritonclient(
    from_tritonclient: dict[str, dict[str, Any]],
) -> None:
    sent = from_tritonclient["typed"]
    req = grpc_service_pb2.ModelInferRequest.FromString(bytes.fromhex(sent["hex"]))
    assert _as_dict(req) == sent["dict"]
    contents = {t.name: t.contents for t in req.inputs}
    assert list(contents["UL"].uint64_contents) == [2**64 - 1, 0]
    assert list(contents["L"].int64_contents) == [-(2**40), 3]
    assert list(contents["D"].fp64_contents) == [1e300, -0.1]
    assert list(contents["S"].bytes_contents) == [b"a", b""]


@needs_tritonclient
def test_model_config_from_tritonclient(from_tritonclient: dict[str, dict[str, Any]]) -> None:
    sent = from_tritonclient["config"]
    cfg = model_config_pb2.ModelConfig.FromString(bytes.fromhex(sent["hex"]))
    assert _as_dict(cfg) == sent["dict"]
    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    batching = cfg.dynamic_batching
    assert list(batching.preferred_batch_size) == [4, 8]
    assert batching.max_queue_delay_microseconds == 500
    assert batching.default_queue_policy.timeout_action == model_config_pb2.ModelQueuePolicy.DELAY
    assert batching.priority_queue_policy[1].default_timeout_microseconds == 1000
    assert cfg.input[0].data_type == model_config_pb2.TYPE_FP32
    assert cfg.input[0].format == model_config_pb2.ModelInput.FORMAT_NCHW
    assert cfg.output[0].data_type == model_config_pb2.TYPE_STRING
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert cfg.model_transaction_policy.decoupled is True


def _infer_response() -> grpc_service_pb2.ModelInferResponse:
    response = grpc_service_pb2.ModelInferResponse(model_name="m", model_version="1", id="req-1")
    response.parameters["triton_final_response"].bool_param = True
    response.outputs.add(name="OUTPUT0", datatype="FP32", shape=[2, 2])
    response.outputs.add(name="TEXT", datatype="BYTES", shape=[2])
    response.raw_output_contents.append(struct.pack("<4f", 0.5, 1.5, 2.5, 3.5))
    response.raw_output_contents.append(struct.pack("<I", 3) + b"abc" + struct.pack("<I", 0))
    return response


def _statistics_response() -> grpc_service_pb2.ModelStatisticsResponse:
    stats = grpc_service_pb2.ModelStatistics(
        name="m",
        version="1",
        last_inference=1_700_000_000_000,
        inference_count=10,
        execution_count=4,
    )
    durations = grpc_service_pb2.InferStatistics.DESCRIPTOR.fields_by_name
    for number, field in enumerate(durations, start=1):
        getattr(stats.inference_stats, field).CopyFrom(
            grpc_service_pb2.StatisticDuration(count=number, ns=number * 1000)
        )
    batch = stats.batch_stats.add(batch_size=4)
    batch.compute_infer.count = 4
    batch.compute_infer.ns = 9000
    stats.memory_usage.add(type="CPU", id=0, byte_size=1 << 20)
    return grpc_service_pb2.ModelStatisticsResponse(model_stats=[stats])


def _metadata_response() -> grpc_service_pb2.ModelMetadataResponse:
    tensor = grpc_service_pb2.ModelMetadataResponse.TensorMetadata
    return grpc_service_pb2.ModelMetadataResponse(
        name="m",
        versions=["1", "2"],
        platform="onnxruntime_onnx",
        inputs=[tensor(name="INPUT0", datatype="FP32", shape=[-1, 3])],
        outputs=[tensor(name="TEXT", datatype="BYTES", shape=[-1])],
    )


@needs_tritonclient
def test_responses_parse_in_tritonclient() -> None:
    sent: list[Message] = [
        _infer_response(),
        grpc_service_pb2.ModelStreamInferResponse(infer_response=_infer_response()),
        grpc_service_pb2.ModelStreamInferResponse(error_message="model failed"),
        _statistics_response(),
        _metadata_response(),
    ]
    payload = [[m.DESCRIPTOR.name, m.SerializeToString().hex()] for m in sent]
    received = _triton_side("decode", payload)
    assert [entry["dict"] for entry in received] == [_as_dict(m) for m in sent]
    assert received[0]["fp32"] == [[0.5, 1.5], [2.5, 3.5]]
    assert received[0]["text"] == [b"abc".hex(), b"".hex()]


def _fields_by_message(files: list[descriptor_pb2.FileDescriptorProto]) -> dict[str, Any]:
    """Full name -> {field name: (number, type, label, type name)}, and enum values."""
    table: dict[str, Any] = {}

    def walk(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        table[name] = {
            f.name: (f.number, f.type, f.label, f.type_name.rsplit(".", 1)[-1])
            for f in message.field
        }
        for enum in message.enum_type:
            table[f"{name}.{enum.name}"] = {v.name: v.number for v in enum.value}
        for nested in message.nested_type:
            walk(name, nested)

    for file in files:
        for enum in file.enum_type:
            table[f"{file.package}.{enum.name}"] = {v.name: v.number for v in enum.value}
        for message in file.message_type:
            walk(file.package, message)
    return table


#: Fields tritonclient names differently: (message, their name) -> our name. Wire-identical
#: (same number and type, checked below); ours keeps its published name because renaming a
#: field breaks JSON and generated-code users (`buf breaking`). Sluice serves no ensembles.
RENAMED_UPSTREAM = {
    ("inference.ModelEnsembling", "max_inflight_requests"): "max_inflight_responses",
}


@needs_tritonclient
def test_field_numbers_match_tritonclient() -> None:
    """Every message, field and enum value both sides define agrees on number and type.

    Fields newer than the installed tritonclient exist only on our side; messages for
    the RPCs we leave out (shared memory, tracing, logging) exist only on theirs.
    """
    theirs = _fields_by_message(
        [
            descriptor_pb2.FileDescriptorProto.FromString(bytes.fromhex(data))
            for data in _triton_side("descriptors")
        ]
    )
    ours_files = []
    for module in (model_config_pb2, grpc_service_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        ours_files.append(proto)
    ours = _fields_by_message(ours_files)
    assert "inference.ModelConfig" in theirs
    mismatches = [
        (scope, name, spec, theirs[scope][name])
        for scope, entries in ours.items()
        if scope in theirs
        for name, spec in entries.items()
        if name in theirs[scope] and theirs[scope][name] != spec
    ]
    assert mismatches == []
    renamed = [
        (scope, name, ours[scope].get(our_name), theirs[scope][name])
        for (scope, name), our_name in RENAMED_UPSTREAM.items()
        if name in theirs.get(scope, {})
    ]
    assert all(spec == their_spec for _, _, spec, their_spec in renamed), renamed
    missing = [
        (scope, name)
        for scope, entries in theirs.items()
        if scope in ours
        for name in entries
        if name not in ours[scope] and (scope, name) not in RENAMED_UPSTREAM
    ]
    assert missing == []
