"""Drive a Sluice server with Triton's own Python client, unchanged (tritonclient 2.41).

Run as a subprocess (tritonclient's generated protos clash with ``sluice_api`` in one
process): ``python tritonclient_checks.py --url HOST:PORT CHECK [CHECK ...]``. Each check
asserts inside and prints one JSON line ``{"check": NAME, "ok": true, ...}``; the first
failure prints its traceback to stderr and exits with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

DEFAULT_MODELS = Path(__file__).resolve().parents[2] / "server" / "sluice" / "example_models"
TENSOR_MODELS = ("mlp", "passthrough", "simple")
MODELS = (*TENSOR_MODELS, "tiny_llama")
INVALID_ARGUMENT = "StatusCode.INVALID_ARGUMENT"
NOT_FOUND = "StatusCode.NOT_FOUND"
EXTENSIONS = {"statistics", "model_repository", "model_configuration"}
# model_config.proto DataType names <-> metadata datatype strings.
CONFIG_DATATYPE = {
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
    "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16",
    "TYPE_FP32": "FP32",
    "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES",
    "TYPE_BF16": "BF16",
}
NUMPY = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}

Check = Callable[[argparse.Namespace], dict[str, Any]]
CHECKS: dict[str, Check] = {}


def check(fn: Check) -> Check:
    CHECKS[fn.__name__] = fn
    return fn


# -- helpers -------------------------------------------------------------------------------


def tls(args: argparse.Namespace) -> dict[str, Any]:
    """tritonclient's own TLS arguments (PEM file paths) from --ca-file / --cert-file /
    --key-file; plaintext without them."""
    if args.ca_file is None:
        return {}
    return {
        "ssl": True,
        "root_certificates": args.ca_file,
        "private_key": args.key_file,
        "certificate_chain": args.cert_file,
    }


def client(args: argparse.Namespace) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(args.url, **tls(args))


def expect_error(status: str, fn: Callable[..., Any], *a: Any, **kw: Any) -> str:
    """Call ``fn`` and return the message of the InferenceServerException it must raise."""
    try:
        fn(*a, **kw)
    except InferenceServerException as exc:
        assert exc.status() == status, f"expected {status}, got {exc.status()}: {exc.message()}"
        assert exc.message(), "error without a message"
        return str(exc.message())
    raise AssertionError(f"{getattr(fn, '__name__', fn)}{a} did not fail with {status}")


def simple_inputs(
    a: np.ndarray, b: np.ndarray, module: Any = grpcclient
) -> list[grpcclient.InferInput]:
    inputs = []
    for name, value in (("INPUT0", a), ("INPUT1", b)):
        tensor = module.InferInput(name, list(value.shape), "INT32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def random_pair(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    a = rng.integers(-1000, 1000, size=(rows, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, size=(rows, 16), dtype=np.int32)
    return a, b


def passthrough_data(rng: np.random.Generator, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """One array per passthrough input, including the extreme values of every type."""
    data: dict[str, np.ndarray] = {}
    size = shape[0] * shape[1]
    for name, dtype in NUMPY.items():
        if name == "BOOL":
            arr = rng.integers(0, 2, size=shape).astype(np.bool_)
        elif name.startswith("FP"):
            arr = rng.standard_normal(shape).astype(dtype)
            info = np.finfo(dtype)
            arr.flat[: min(size, 4)] = [info.max, info.min, info.tiny, -0.0][: min(size, 4)]
        else:
            info = np.iinfo(dtype)
            arr = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
            arr.flat[: min(size, 2)] = [info.min, info.max][: min(size, 2)]
        data[name] = arr
    # ONNX string tensors hold UTF-8 text: arbitrary lengths, empty, NUL and non-ASCII.
    words = [
        b"",
        b"a",
        "\u00fcn\u00efc\u00f8d\u00e9 \u2713".encode(),
        b"nul\x00inside",
        b"x" * 1000,
        b'{"json": [1, 2]}',
    ]
    data["BYTES"] = np.array(
        [words[i % len(words)] for i in range(size)], dtype=np.object_
    ).reshape(shape)
    return data


def passthrough_inputs(data: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    inputs = []
    for name, arr in data.items():
        tensor = grpcclient.InferInput(name, list(arr.shape), name)
        tensor.set_data_from_numpy(arr)
        inputs.append(tensor)
    return inputs


def assert_identical(name: str, got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    if want.dtype == np.object_:
        assert got.dtype == np.object_, f"{name}: dtype {got.dtype}"
        assert got.ravel().tolist() == want.ravel().tolist(), f"{name}: BYTES differ"
    else:
        assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
        # Bit-exact (NaN-safe, -0.0-aware) comparison.
        assert got.tobytes() == want.tobytes(), f"{name}: values differ"


# -- checks --------------------------------------------------------------------------------


@check
def liveness(args: argparse.Namespace) -> dict[str, Any]:
    c = client(args)
    assert c.is_server_live() is True
    assert c.is_server_ready() is True
    for model in MODELS:
        assert c.is_model_ready(model) is True, model
    assert c.is_model_ready("mlp", "2") is True
    assert c.is_model_ready("mlp", "1") is False  # on disk, but the policy serves only 2
    assert c.is_model_ready("simple", "7") is False
    # Triton answers ready=false for a model it does not know (no error status).
    try:
        unknown = c.is_model_ready("no_such_model")
    except InferenceServerException as exc:
        assert exc.status() == NOT_FOUND, exc
        unknown = "NOT_FOUND"
    else:
        assert unknown is False
    return {"unknown_model": unknown}


@check
def server_metadata(args: argparse.Namespace) -> dict[str, Any]:
    meta = client(args).get_server_metadata(as_json=True)
    assert meta["name"], meta
    assert meta["version"], meta
    missing = EXTENSIONS - set(meta.get("extensions", []))
    assert not missing, f"extensions lack {missing}: {meta}"
    return {"metadata": meta}


@check
def model_metadata(args: argparse.Namespace) -> dict[str, Any]:
    c = client(args)
    out = {}
    for model in TENSOR_MODELS:
        meta = c.get_model_metadata(model, as_json=True)
        assert meta["name"] == model
        assert meta["versions"], meta
        assert meta["platform"], meta
        for tensor in meta["inputs"] + meta["outputs"]:
            shape = [int(d) for d in tensor["shape"]]
            assert shape[0] == -1, f"{model}.{tensor['name']}: batch dim missing in {shape}"
        out[model] = meta
    simple = out["simple"]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in simple["inputs"]] == [
        ("INPUT0", "INT32", [-1, 16]),
        ("INPUT1", "INT32", [-1, 16]),
    ], simple
    assert [t["name"] for t in simple["outputs"]] == ["OUTPUT0", "OUTPUT1"]
    mlp = out["mlp"]
    assert "2" in mlp["versions"], mlp
    assert [(t["name"], t["datatype"]) for t in mlp["outputs"]] == [
        ("logits", "FP32"),
        ("probabilities", "FP32"),
    ], mlp
    assert c.get_model_metadata("mlp", "2", as_json=True)["name"] == "mlp"
    # The typed (non-JSON) form works too.
    assert c.get_model_metadata("simple").inputs[0].shape == [-1, 16]
    expect_error(NOT_FOUND, c.get_model_metadata, "no_such_model")
    expect_error(NOT_FOUND, c.get_model_metadata, "simple", "7")
    # The generation model: Triton's generation tensors, no batch dimension.
    llm = c.get_model_metadata("tiny_llama", as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in llm["outputs"]] == [
        ("text_output", "BYTES", ["1"])
    ], llm
    assert {"text_input", "max_tokens", "stream"} <= {t["name"] for t in llm["inputs"]}, llm
    return {"versions": {m: out[m]["versions"] for m in TENSOR_MODELS}}


@check
def model_config(args: argparse.Namespace) -> dict[str, Any]:
    c = client(args)
    out = {}
    for model in TENSOR_MODELS:
        config = c.get_model_config(model, as_json=True)["config"]
        meta = c.get_model_metadata(model, as_json=True)
        assert config["name"] == model, config
        assert int(config["max_batch_size"]) > 0, config
        assert "dynamic_batching" in config, config
        for kind, meta_kind in (("input", "inputs"), ("output", "outputs")):
            got = [
                (t["name"], CONFIG_DATATYPE[t["data_type"]], [-1] + [int(d) for d in t["dims"]])
                for t in config[kind]
            ]
            want = [
                (t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta[meta_kind]
            ]
            assert got == want, f"{model} {kind}: config {got} != metadata {want}"
        out[model] = config
    assert int(out["mlp"]["max_batch_size"]) == 32  # from mlp/config.yaml
    typed = c.get_model_config("simple").config
    assert typed.HasField("dynamic_batching")
    assert not typed.model_transaction_policy.decoupled
    expect_error(NOT_FOUND, c.get_model_config, "no_such_model")
    llm = c.get_model_config("tiny_llama").config
    assert llm.model_transaction_policy.decoupled, llm
    assert llm.max_batch_size == 0, llm
    assert {i.name for i in llm.input if not i.optional} == {"text_input"}, llm
    return {"max_batch_size": {m: int(out[m]["max_batch_size"]) for m in TENSOR_MODELS}}


@check
def infer_simple(args: argparse.Namespace) -> dict[str, Any]:
    c = client(args)
    rng = np.random.default_rng(1)
    for rows in (1, 4, 32):
        a, b = random_pair(rng, rows)
        result = c.infer("simple", simple_inputs(a, b), request_id=f"simple-{rows}")
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        response = result.get_response()
        assert response.id == f"simple-{rows}", response.id
        assert response.model_name == "simple"
        assert response.model_version == "1"
    # Only the requested output comes back.
    a, b = random_pair(rng, 2)
    result = c.infer(
        "simple", simple_inputs(a, b), outputs=[grpcclient.InferRequestedOutput("OUTPUT1")]
    )
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT1"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None
    # Parameters of every InferParameter kind (priority goes as uint64), a client-side
    # deadline, request headers and gzip compression are all accepted.
    result = c.infer(
        "simple",
        simple_inputs(a, b),
        model_version="1",
        priority=1,
        timeout=10_000_000,
        client_timeout=30.0,
        headers={"x-test-header": "yes"},
        compression_algorithm="gzip",
        parameters={"flag": True, "count": 3, "note": "text"},  # 2.41 has no float
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    # The classic Triton example: 0..15 and all ones.
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    result = c.infer("simple", simple_inputs(a, b))
    assert result.as_numpy("OUTPUT0").tolist() == [list(range(1, 17))]
    assert result.as_numpy("OUTPUT1").tolist() == [list(range(-1, 15))]
    return {}


@check
def infer_mlp(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(Path(args.models) / "mlp" / "2" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    c = client(args)
    rng = np.random.default_rng(2)
    worst = 0.0
    for rows in (1, 3, 32):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        tensor = grpcclient.InferInput("input", [rows, 64], "FP32")
        tensor.set_data_from_numpy(x)
        result = c.infer("mlp", [tensor])
        assert result.get_response().model_version == "2"
        expected = dict(zip(names, session.run(names, {"input": x}), strict=True))
        for name in ("logits", "probabilities"):
            got = result.as_numpy(name)
            assert got.dtype == np.float32 and got.shape == (rows, 10), (name, got.shape)
            np.testing.assert_allclose(got, expected[name], rtol=1e-5, atol=1e-5)
            worst = max(worst, float(np.max(np.abs(got - expected[name]))))
    return {"max_abs_diff": worst}


@check
def infer_passthrough(args: argparse.Namespace) -> dict[str, Any]:
    c = client(args)
    rng = np.random.default_rng(3)
    for shape in ((1, 1), (2, 3), (4, 17), (2, 0)):
        data = passthrough_data(rng, shape)
        result = c.infer("passthrough", passthrough_inputs(data))
        for name, want in data.items():
            assert_identical(name, result.as_numpy(f"{name}_OUT"), want)
        assert {o.datatype for o in result.get_response().outputs} == set(data)
    # FP16 corner values go through bit for bit.
    data = passthrough_data(rng, (1, 6))
    data["FP16"] = np.array([[np.inf, -np.inf, 65504, 6e-8, -0.0, 1 / 3]], dtype=np.float16)
    result = c.infer("passthrough", passthrough_inputs(data))
    assert_identical("FP16", result.as_numpy("FP16_OUT"), data["FP16"])
    return {"datatypes": sorted(data)}


@check
def big_tensor(args: argparse.Namespace) -> dict[str, Any]:
    """Above gRPC's 4 MiB default receive limit: the server must raise its limits."""
    c = client(args)
    rng = np.random.default_rng(4)
    data = passthrough_data(rng, (1, 2))
    data["UINT8"] = rng.integers(0, 256, size=(1, 6 * 1024 * 1024), dtype=np.uint8)
    result = c.infer("passthrough", passthrough_inputs(data))
    assert_identical("UINT8", result.as_numpy("UINT8_OUT"), data["UINT8"])
    return {"bytes": int(data["UINT8"].nbytes)}


def _stats(c: grpcclient.InferenceServerClient, model: str) -> dict[str, Any]:
    stats = c.get_inference_statistics(model, as_json=True)["model_stats"]
    assert len(stats) == 1, stats
    return dict(stats[0])


def _count(entry: dict[str, Any], *path: str) -> int:
    value: Any = entry
    for key in path:
        value = value.get(key, {}) if isinstance(value, dict) else {}
    return int(value) if not isinstance(value, dict) else 0


@check
def statistics(args: argparse.Namespace) -> dict[str, Any]:
    c = client(args)
    before = _stats(c, "simple")
    rng = np.random.default_rng(5)
    requests, rows = 6, 0
    for k in range(requests):
        a, b = random_pair(rng, k % 3 + 1)
        rows += a.shape[0]
        c.infer("simple", simple_inputs(a, b))
    after = _stats(c, "simple")
    assert after["name"] == "simple"
    assert after["version"] == "1" and int(after["version"]) == 1, (
        after
    )  # perf_analyzer stoll()s it
    grew = {
        key: _count(after, *path) - _count(before, *path)
        for key, path in {
            "inference_count": ("inference_count",),
            "execution_count": ("execution_count",),
            "success": ("inference_stats", "success", "count"),
            "queue": ("inference_stats", "queue", "count"),
            "compute_infer": ("inference_stats", "compute_infer", "count"),
        }.items()
    }
    assert grew["inference_count"] == rows, grew
    assert 1 <= grew["execution_count"] <= requests, grew
    assert grew["success"] == requests, grew
    assert grew["queue"] == requests, grew
    assert grew["compute_infer"] == requests, grew
    assert _count(after, "inference_stats", "queue", "ns") > 0, after
    assert int(after["last_inference"]) >= int(before.get("last_inference", 0))
    # No name: every loaded model, each with a numeric version.
    everything = c.get_inference_statistics(as_json=True)["model_stats"]
    assert {s["name"] for s in everything} == set(MODELS), everything
    assert all(s["version"].isdigit() for s in everything), everything
    mlp = c.get_inference_statistics("mlp", "2", as_json=True)["model_stats"]
    assert [(s["name"], s["version"]) for s in mlp] == [("mlp", "2")]
    expect_error(NOT_FOUND, c.get_inference_statistics, "no_such_model")
    return {"grew": grew}


@check
def cache_hit(args: argparse.Namespace) -> dict[str, Any]:
    """``simple`` with its response cache on: the second identical call is a hit that
    Triton's statistics fields show (cache_hit / cache_miss), and ran nothing."""
    c = client(args)
    before = _stats(c, "simple")
    a, b = random_pair(np.random.default_rng(9), 2)
    first = c.infer("simple", simple_inputs(a, b))
    second = c.infer("simple", simple_inputs(a, b))
    np.testing.assert_array_equal(second.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(second.as_numpy("OUTPUT1"), first.as_numpy("OUTPUT1"))
    assert second.get_response().parameters["sluice_cache_hit"].bool_param
    after = _stats(c, "simple")
    grew = {
        key: _count(after, *path) - _count(before, *path)
        for key, path in {
            "execution_count": ("execution_count",),
            "success": ("inference_stats", "success", "count"),
            "cache_hit": ("inference_stats", "cache_hit", "count"),
            "cache_miss": ("inference_stats", "cache_miss", "count"),
        }.items()
    }
    assert grew == {"execution_count": 1, "success": 2, "cache_hit": 1, "cache_miss": 1}, grew
    return {"grew": grew}


@check
def repository_index(args: argparse.Namespace) -> dict[str, Any]:
    index = client(args).get_model_repository_index(as_json=True)["models"]
    rows = {(m["name"], m.get("version", ""), m.get("state", "")) for m in index}
    assert {("mlp", "2", "READY"), ("passthrough", "1", "READY"), ("simple", "1", "READY")} <= rows
    return {"index": index}


@check
def load_unload(args: argparse.Namespace) -> dict[str, Any]:
    """Needs a server on a private copy of the example repository."""
    c = client(args)
    x = np.zeros((1, 64), dtype=np.float32)
    tensor = grpcclient.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(x)
    assert c.is_model_ready("mlp")
    c.unload_model("mlp")
    assert c.is_model_ready("mlp") is False
    states = {
        m["name"]: m.get("state") for m in c.get_model_repository_index(as_json=True)["models"]
    }
    assert states["mlp"] == "UNAVAILABLE", states
    assert states["simple"] == "READY", states
    try:
        c.infer("mlp", [tensor])
    except InferenceServerException as exc:
        assert exc.status() in (NOT_FOUND, "StatusCode.UNAVAILABLE"), exc
        unloaded_error = exc.status()
    else:
        raise AssertionError("inference on an unloaded model succeeded")
    assert c.is_model_ready("simple")  # the others keep serving
    c.load_model("mlp")
    assert c.is_model_ready("mlp") is True
    assert c.infer("mlp", [tensor]).as_numpy("logits").shape == (1, 10)
    # Loading again is a reload and keeps the model serving.
    c.load_model("simple")
    assert c.is_model_ready("simple") is True
    load_error = expect_error(NOT_FOUND, c.load_model, "no_such_model")
    # Config overrides and inline model files are not supported: refused, never ignored.
    unimplemented = "StatusCode.UNIMPLEMENTED"
    expect_error(unimplemented, c.load_model, "simple", config='{"max_batch_size": 4}')
    expect_error(
        unimplemented,
        c.load_model,
        "simple",
        config="{}",
        files={"file:1/model.onnx": b"not a model"},
    )
    assert c.is_model_ready("simple") is True
    assert c.get_model_config("simple").config.max_batch_size == 32
    try:
        c.unload_model("no_such_model")
    except InferenceServerException as exc:
        unload_error = exc.status()
    else:
        unload_error = "OK"
    return {
        "unloaded_infer": unloaded_error,
        "load_unknown": load_error,
        "unload_unknown": unload_error,
    }


@check
def bad_input(args: argparse.Namespace) -> dict[str, Any]:
    c = client(args)
    ok = np.zeros((1, 16), dtype=np.int32)
    messages = {
        "wrong_dim": expect_error(
            INVALID_ARGUMENT,
            c.infer,
            "simple",
            simple_inputs(np.zeros((1, 15), np.int32), np.zeros((1, 15), np.int32)),
        ),
        "too_big_batch": expect_error(
            INVALID_ARGUMENT,
            c.infer,
            "simple",
            simple_inputs(np.zeros((33, 16), np.int32), np.zeros((33, 16), np.int32)),
        ),
        "missing_input": expect_error(
            INVALID_ARGUMENT, c.infer, "simple", simple_inputs(ok, ok)[:1]
        ),
        "unknown_output": expect_error(
            INVALID_ARGUMENT,
            c.infer,
            "simple",
            simple_inputs(ok, ok),
            outputs=[grpcclient.InferRequestedOutput("NOPE")],
        ),
        "unknown_model": expect_error(NOT_FOUND, c.infer, "no_such_model", simple_inputs(ok, ok)),
        "unknown_version": expect_error(
            NOT_FOUND, c.infer, "simple", simple_inputs(ok, ok), model_version="9"
        ),
    }
    wrong_type = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    wrong_type.set_data_from_numpy(np.zeros((1, 16), np.float32))
    messages["wrong_datatype"] = expect_error(
        INVALID_ARGUMENT, c.infer, "simple", [wrong_type, simple_inputs(ok, ok)[1]]
    )
    short = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    short.set_data_from_numpy(ok)
    short._raw_content = short._raw_content[:-4]  # a raw buffer one element short
    messages["short_raw"] = expect_error(
        INVALID_ARGUMENT, c.infer, "simple", [short, simple_inputs(ok, ok)[1]]
    )
    # The server still serves after all of that.
    assert c.infer("simple", simple_inputs(ok, ok)).as_numpy("OUTPUT0").shape == (1, 16)
    return {"messages": messages}


@check
def priority(args: argparse.Namespace) -> dict[str, Any]:
    """``priority=`` (Triton's request parameter): every level is served, and a level the
    server does not have is INVALID_ARGUMENT naming the valid ones."""
    c = client(args)
    a, b = random_pair(np.random.default_rng(3), 2)
    for level in (0, 1, 2, 3):
        result = c.infer("simple", simple_inputs(a, b), priority=level)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    result = c.infer("simple", simple_inputs(a, b), headers={"x-sluice-priority": "batch"})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    message = expect_error(INVALID_ARGUMENT, c.infer, "simple", simple_inputs(a, b), priority=9)
    assert "priority levels run from 1 (highest) to 3" in message, message
    return {"message": message}


@check
def stream(args: argparse.Namespace) -> dict[str, Any]:
    """Many requests pipelined on one ModelStreamInfer stream, with errors in between."""
    c = client(args)
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    c.start_stream(callback=lambda result, error: got.put((result, error)))
    rng = np.random.default_rng(6)
    sent: list[tuple[str, Any]] = []  # (request id, expected (a+b, a-b) or "error")
    bad = np.zeros((1, 15), dtype=np.int32)
    for k in range(60):
        rid = f"req-{k:03d}"
        if k in (20, 41):  # bad input mid-stream
            c.async_stream_infer("simple", simple_inputs(bad, bad), request_id=rid)
            sent.append((rid, "error"))
        elif k == 30:  # unknown model mid-stream
            ok = np.zeros((1, 16), np.int32)
            c.async_stream_infer("no_such_model", simple_inputs(ok, ok), request_id=rid)
            sent.append((rid, "error"))
        else:
            a, b = random_pair(rng, k % 4 + 1)
            c.async_stream_infer(
                "simple",
                simple_inputs(a, b),
                request_id=rid,
                enable_empty_final_response=k % 2 == 0,
            )
            sent.append((rid, (a + b, a - b)))
    c.stop_stream()  # closes the request side and waits for every response
    responses = []
    while not got.empty():
        responses.append(got.get_nowait())
    assert len(responses) == len(sent), f"{len(responses)} responses for {len(sent)} requests"
    errors = []
    for position, ((rid, want), (result, error)) in enumerate(zip(sent, responses, strict=True)):
        # Triton answers a non-decoupled model's requests in the order they were sent.
        if want == "error":
            assert error is not None and result is None, (
                f"position {position} ({rid}) should be an error, got response "
                f"{result.get_response().id!r}: responses must come in request order"
            )
            assert isinstance(error, InferenceServerException)
            errors.append(error.message())
            continue
        assert error is None, (
            f"position {position} ({rid}) got the error {error}: responses must come in "
            "request order"
        )
        response = result.get_response()
        assert response.id == rid, f"position {position}: id {response.id!r}, sent {rid!r}"
        final = response.parameters["triton_final_response"]
        assert final.WhichOneof("parameter_choice") == "bool_param" and final.bool_param, rid
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), want[0])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), want[1])
    assert "no_such_model" in errors[1], errors
    # A second stream on the same client works after the first one ended.
    c.start_stream(callback=lambda result, error: got.put((result, error)))
    a, b = random_pair(rng, 1)
    c.async_stream_infer("simple", simple_inputs(a, b), request_id="again")
    result, error = got.get(timeout=30)
    assert error is None and result.get_response().id == "again"
    c.stop_stream()
    return {"responses": len(responses), "errors": errors}


@check
def stream_unordered_arrival(args: argparse.Namespace) -> dict[str, Any]:
    """Requests of very different cost on one stream: every id is answered exactly once."""
    c = client(args)
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    c.start_stream(callback=lambda result, error: got.put((result, error)))
    rng = np.random.default_rng(7)
    ids = []
    for k in range(30):
        rid = f"mixed-{k}"
        ids.append(rid)
        if k % 3 == 0:
            data = passthrough_data(rng, (1, 4000))
            c.async_stream_infer("passthrough", passthrough_inputs(data), request_id=rid)
        elif k % 3 == 1:
            x = rng.standard_normal((k % 7 + 1, 64)).astype(np.float32)
            tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            c.async_stream_infer("mlp", [tensor], request_id=rid)
        else:
            a, b = random_pair(rng, 1)
            c.async_stream_infer("simple", simple_inputs(a, b), request_id=rid)
    c.stop_stream()
    answered = []
    while not got.empty():
        result, error = got.get_nowait()
        assert error is None, error
        answered.append(result.get_response().id)
    assert sorted(answered) == sorted(ids), answered
    return {"order": answered}


@check
def aio(args: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(_aio(args))


async def _aio(args: argparse.Namespace) -> dict[str, Any]:
    c = aioclient.InferenceServerClient(args.url, **tls(args))
    try:
        assert await c.is_server_live() is True
        assert await c.is_model_ready("simple") is True
        meta = await c.get_model_metadata("simple", as_json=True)
        assert [int(d) for d in meta["inputs"][0]["shape"]] == [-1, 16]
        rng = np.random.default_rng(8)
        a, b = random_pair(rng, 3)
        result = await c.infer("simple", simple_inputs(a, b, aioclient), request_id="aio-1")
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        assert result.get_response().id == "aio-1"
        # Concurrent unary calls on one channel.
        pairs = [random_pair(rng, 1) for _ in range(16)]
        results = await asyncio.gather(
            *(c.infer("simple", simple_inputs(x, y, aioclient)) for x, y in pairs)
        )
        for (x, y), r in zip(pairs, results, strict=True):
            np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), x - y)
        try:
            await c.infer("simple", simple_inputs(a[:, :8], b[:, :8], aioclient))
        except InferenceServerException as exc:
            assert exc.status() == INVALID_ARGUMENT, exc
        else:
            raise AssertionError("bad input accepted")

        expected: dict[str, Any] = {}

        async def requests() -> AsyncIterator[dict[str, Any]]:
            for k in range(12):
                rid = f"aio-s{k}"
                if k == 5:
                    x = y = np.zeros((1, 3), np.int32)
                    expected[rid] = None
                else:
                    x, y = random_pair(rng, 2)
                    expected[rid] = x + y
                yield {
                    "model_name": "simple",
                    "inputs": simple_inputs(x, y, aioclient),
                    "request_id": rid,
                }

        seen, errors = [], []
        async for result, error in c.stream_infer(requests(), stream_timeout=60):
            if error is not None:
                errors.append(str(error))
                continue
            response = result.get_response()
            assert response.parameters["triton_final_response"].bool_param
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected[response.id])
            seen.append(response.id)
            if len(seen) + len(errors) == len(expected):
                break
        assert sorted(seen) == sorted(r for r, v in expected.items() if v is not None), seen
        assert len(errors) == 1, errors
        return {"stream_ids": seen, "errors": errors}
    finally:
        await c.close()


def generation_inputs(prompt: str, max_tokens: int, stream: bool) -> list[grpcclient.InferInput]:
    """The tensors Triton's generation tools send."""
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    tokens = grpcclient.InferInput("max_tokens", [1], "INT32")
    tokens.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
    flag = grpcclient.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([stream], dtype=bool))
    return [text, tokens, flag]


@check
def stream_generation(args: argparse.Namespace) -> dict[str, Any]:
    """A decoupled generation model: one response per chunk, the last flagged final (on
    its last chunk, or on an extra empty response when the client asks for one)."""
    c = client(args)
    prompt = "Once upon a time"
    whole = c.infer("tiny_llama", generation_inputs(prompt, 12, False))
    expected = whole.as_numpy("text_output")[0].decode()
    assert expected, "the unary call returned text"
    texts = {}
    for empty_final in (False, True):
        got: queue.Queue[tuple[Any, Any]] = queue.Queue()
        c.start_stream(callback=lambda result, error, got=got: got.put((result, error)))
        c.async_stream_infer(
            "tiny_llama",
            generation_inputs(prompt, 12, True),
            request_id=f"gen-{empty_final}",
            enable_empty_final_response=empty_final,
        )
        parts: list[str] = []
        while True:
            result, error = got.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            assert response.id == f"gen-{empty_final}"
            if response.outputs:
                parts.append(result.as_numpy("text_output")[0].decode())
            if response.parameters["triton_final_response"].bool_param:
                break
        c.stop_stream()
        assert len(parts) == 12, parts
        assert "".join(parts) == expected, (parts, expected)
        texts[str(empty_final)] = "".join(parts)
    return {"text": expected, "streams": texts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="host:port of the gRPC server")
    parser.add_argument(
        "--models",
        default=str(DEFAULT_MODELS),
        help="the example model repository (for the onnxruntime reference)",
    )
    parser.add_argument("--ca-file", help="TLS: the CA that signed the server's certificate")
    parser.add_argument("--cert-file", help="mTLS: the client certificate")
    parser.add_argument("--key-file", help="mTLS: the client certificate's key")
    parser.add_argument("checks", nargs="+", choices=sorted(CHECKS))
    args = parser.parse_args()
    for name in args.checks:
        started = time.perf_counter()
        try:
            details = CHECKS[name](args)
        except Exception:
            traceback.print_exc()
            print(json.dumps({"check": name, "ok": False}), flush=True)
            return 1
        details = {
            "check": name,
            "ok": True,
            "seconds": round(time.perf_counter() - started, 3),
            **details,
        }
        print(json.dumps(details, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
