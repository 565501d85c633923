"""The benchmark's own parts that need neither the peers, perf_analyzer nor the network:
the second model, the peers lookup when they are absent, the plots, the no-math server
with several tensors and the answer check against it, the dynamic_grpc request generator."""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from sluice_api.inference import grpc_service_pb2 as pb
from tests.conftest import REPO_ROOT
from tests.procfs import children

BENCH_DIR = REPO_ROOT / "bench"


def _load(name: str) -> ModuleType:
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    module = sys.modules.get(f"bench_{name}")
    if module is None:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_run() -> ModuleType:
    return _load("run")


@pytest.fixture(scope="module")
def conv_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(_load("conv_model").build(tmp_path_factory.mktemp("conv") / "conv.onnx"))


def _result(runs: dict[str, list[dict[str, Any]]], second: dict[str, Any] | None) -> dict[str, Any]:
    result: dict[str, Any] = {
        "timestamp": "20260101T000000Z",
        "model": {"name": "mlp"},
        "runs": runs,
        "notes": [],
    }
    if second is not None:
        result["second_model"] = second
    return result


def _row(server: str, c: int, throughput: float, p50_us: float, p99_us: float) -> dict[str, Any]:
    return {
        "server": server,
        "concurrency": c,
        "throughput": throughput,
        "p50_us": p50_us,
        "p90_us": p99_us,
        "p99_us": p99_us,
    }


RUNS = {
    "null": [_row("null", 1, 1500, 600, 1900), _row("null", 8, 2500, 3000, 6000)],
    "batched": [_row("batched", 1, 900, 1000, 2500), _row("batched", 8, 1800, 4000, 9000)],
    "pytriton": [
        _row("pytriton", 1, 450, 2000, 4000),
        {"server": "pytriton", "concurrency": 8, "error": "perf_analyzer failed"},
    ],
}


# -- the second model -------------------------------------------------------------------


def test_conv_model_runs_in_onnxruntime_with_the_declared_shapes(conv_file: Path) -> None:
    conv_model = _load("conv_model")
    session = ort.InferenceSession(str(conv_file), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape[1:]) for i in session.get_inputs()] == [
        (name, list(dims)) for name, dims in conv_model.INPUTS
    ]
    rng = np.random.default_rng(3)
    image = rng.standard_normal((5, 3, 32, 32), dtype=np.float32)
    features = rng.standard_normal((5, 8), dtype=np.float32)
    (scores,) = session.run(None, {"image": image, "features": features})
    assert scores.shape == (5, 10)
    np.testing.assert_allclose(scores, conv_model.reference(image, features), rtol=1e-4, atol=1e-4)
    # Each row depends only on its own inputs: batching does not change the answer.
    (first,) = session.run(None, {"image": image[:1], "features": features[:1]})
    np.testing.assert_allclose(first, scores[:1], rtol=1e-5, atol=1e-5)


def test_conv_spec_matches_the_model(bench_run: ModuleType) -> None:
    spec = bench_run.conv_spec()
    assert spec.name == "conv"
    assert spec.inputs == (("image", (3, 32, 32)), ("features", (8,)))
    assert spec.to_json()["outputs"] == [["scores", "FP32", [-1, 10]]]


# -- the peers, absent ----------------------------------------------------------------------


def test_missing_peers_folder_is_a_note(tmp_path: Path) -> None:
    found = _load("peers").locate(tmp_path / "no-such-folder")
    assert isinstance(found, str)
    assert "no peers folder" in found and "skipped" in found


def test_peers_folder_without_venv_says_to_run_setup(tmp_path: Path) -> None:
    found = _load("peers").locate(tmp_path, tmp_path / "no-venv")
    assert isinstance(found, str)
    assert "setup.sh" in found and "skipped" in found


def test_venv_without_the_peers_skips_both_with_a_note_not_an_error(
    bench_run: ModuleType, tmp_path: Path
) -> None:
    # A Python that has neither pytriton nor mlserver installed (this one).
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    for module in ("pytriton", "mlserver"):
        if importlib.util.find_spec(module) is not None:
            pytest.skip(f"{module} is installed in the test environment")
    result: dict[str, Any] = {"notes": [], "errors": []}
    args = argparse.Namespace(peers=str(tmp_path))
    monkey = pytest.MonkeyPatch()
    monkey.setenv("PEERS_VENV", str(venv))
    try:
        assert bench_run.find_peers(args, result) is None
    finally:
        monkey.undo()
    assert result["errors"] == []
    assert [n.split(":")[0] for n in result["notes"]] == ["pytriton skipped", "mlserver skipped"]


def test_markdown_shows_the_skip_notes(bench_run: ModuleType) -> None:
    result = _result(RUNS, None)
    result["notes"] = ["no peers folder at /x: PyTriton and MLServer rows skipped"]
    lines = bench_run._md_notes(result)
    assert "- no peers folder at /x: PyTriton and MLServer rows skipped" in lines


# -- plots ------------------------------------------------------------------------------------


def test_plot_writes_one_png_per_model(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (the bench extra) is not installed")
    second = {"model": {"name": "conv"}, "runs": {"null": RUNS["null"], "batched": RUNS["batched"]}}
    written = _load("plots").plot_result(_result(RUNS, second), tmp_path, "run")
    assert written == [tmp_path / "run-mlp.png", tmp_path / "run-conv.png"]
    for path in written:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert width > 400 and height > 200


def test_plot_skips_a_model_without_numbers(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (the bench extra) is not installed")
    failed = {"null": [{"server": "null", "concurrency": 1, "error": "x"}]}
    assert _load("plots").plot_result(_result(failed, None), tmp_path, "run") == []
    assert list(tmp_path.iterdir()) == []


def test_without_matplotlib_the_run_notes_that_plots_were_skipped(
    bench_run: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = _result(RUNS, None)
    assert bench_run.write_plots(result, tmp_path, "run") == []
    assert result["notes"] == [
        "plots skipped: matplotlib is not installed (pip install -e '.[bench]')"
    ]
    assert list(tmp_path.iterdir()) == []


# -- the no-math server with several tensors, and the answer check ---------------------------


def test_null_server_serves_the_conv_shapes_and_the_check_catches_wrong_answers(
    bench_run: ModuleType, conv_file: Path, tmp_path: Path
) -> None:
    import grpc

    spec = bench_run.conv_spec(conv_file)
    with bench_run.running(bench_run.null_server(tmp_path, spec)) as server:
        # On the loop Sluice serves on by default, so the ceiling is measured alike.
        assert "event loop: uvloop" in server.log_path.read_text()
        with grpc.insecure_channel(server.address) as channel:
            meta = bench_run._stub(channel).ModelMetadata(pb.ModelMetadataRequest(name="conv"))
        assert [(t.name, list(t.shape)) for t in meta.inputs] == [
            ("image", [-1, 3, 32, 32]),
            ("features", [-1, 8]),
        ]
        assert [(t.name, list(t.shape)) for t in meta.outputs] == [("scores", [-1, 10])]
        # It answers zeros of the right shape, which is not what the model computes.
        check = bench_run.check_outputs(server.address, spec, max_rows=64)
    assert check["ok"] is False
    assert check["rows_3"]["max_abs_err"] > 0


# -- dynamic_grpc requests -----------------------------------------------------------------


def test_request_generator_writes_framed_requests_for_every_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    infer_requests = _load("infer_requests")
    buffer = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(buffer))
    args = ["--model", "conv", "--input", "image:3x32x32", "--input", "features:8"]
    assert infer_requests.main([*args, "--output", "scores", "--count", "2"]) == 0
    data = buffer.getvalue()
    messages = []
    while data:
        size = int.from_bytes(data[:4], sys.byteorder)
        messages.append(pb.ModelInferRequest.FromString(data[4 : 4 + size]))
        data = data[4 + size :]
    assert len(messages) == 2
    for message in messages:
        assert message.model_name == "conv"
        assert [(t.name, list(t.shape)) for t in message.inputs] == [
            ("image", [1, 3, 32, 32]),
            ("features", [1, 8]),
        ]
        assert [len(raw) for raw in message.raw_input_contents] == [3 * 32 * 32 * 4, 8 * 4]
        assert [o.name for o in message.outputs] == ["scores"]
    assert messages[0].raw_input_contents[0] != messages[1].raw_input_contents[0]


def test_dynamic_grpc_input_names_the_generator_for_the_model(
    bench_run: ModuleType, tmp_path: Path
) -> None:
    import json

    path = bench_run.dynamic_grpc_input(bench_run.conv_spec(), tmp_path)
    generator = json.loads(path.read_text())["data"][0]["message_generator"]
    assert "infer_requests.py --model conv --input image:3x32x32 --input features:8" in generator
    assert generator.endswith("--output scores")


def test_profile_attributes_each_loop_sample_to_the_stage_of_its_deepest_own_frame(
    tmp_path: Path,
) -> None:
    """py-spy's raw output (``--threads --full-filenames``): only the loop thread counts;
    frames above the callback (the loop, start-up code) never decide the stage; a shared
    helper (metrics) counts for the stage that called it."""
    profile = _load("profile_path")
    srv = "/repo/server/sluice"
    loop = (
        "<module> (/repo/server/sluice/__main__.py:4)"
        ";run_forever (/py/asyncio/base_events.py:607);"
        "BaseEventLoop._run_once (/py/asyncio/base_events.py:1922);"
        "Handle._run (/py/asyncio/events.py:80)"
    )
    raw = tmp_path / "samples.raw"
    raw.write_text(
        "\n".join(
            [
                f"thread (7): MainThread;{loop} 5",  # grpc's own callbacks
                f"thread (7): MainThread;{loop};behavior ({srv}/transport/interceptors/_wrap.py:9)"
                f";Observed.__aexit__ ({srv}/transport/interceptors/telemetry.py:3)"
                f";MetricWrapperBase.labels (/py/prometheus_client/metrics.py:1) 3",
                f"thread (7): MainThread;{loop};behavior ({srv}/transport/interceptors/_wrap.py:9)"
                f";Router.infer ({srv}/routing/router.py:5)"
                f";DataPlane.infer ({srv}/dataplane/plane.py:2)"
                f";BatchMetrics.inflight ({srv}/metrics.py:8) 2",
                f"thread (7): MainThread;{loop};_wait (/py/asyncio/tasks.py:3)"
                f";DynamicBatcher._execute ({srv}/batching/dynamic.py:1) 4",
                f"thread (7): MainThread;{loop}"
                f";decode_message ({srv}/transport/interceptors/_wrap.py:4) 1",
                f"thread (8): sluice-mlp-0;_serve ({srv}/executors/_threads.py:2) 50",
                f"thread (7): MainThread;{loop};EpollSelector.select (/py/selectors.py:468) 9",
            ]
        )
        + "\n"
    )
    samples = profile.read_samples(raw, 7)
    assert samples["total"] == 24 and samples["idle"] == 9
    assert dict(samples["stages"]) == {
        "grpc": 5,
        "interceptors": 3,
        "routing": 2,
        "batcher": 4,
        "decode/encode": 1,
    }
    assert samples["inclusive"]["Router.infer (router.py)"] == 2


def test_profile_finds_the_callbacks_of_uvloop_below_the_runner(tmp_path: Path) -> None:
    """uvloop runs callbacks from C: no ``Handle._run`` frame; a callback's frames are those
    below ``asyncio.Runner``'s (a transport) or ``app.run``'s (the server), and the frames
    that start the loop decide nothing."""
    profile = _load("profile_path")
    srv = "/repo/server/sluice"
    loop = (
        f"<module> ({srv}/__main__.py:4);main ({srv}/cli.py:90)"
        ";Runner.run (/py/asyncio/runners.py:118)"
    )
    raw = tmp_path / "samples.raw"
    raw.write_text(
        "\n".join(
            [
                f"thread (7): MainThread;{loop} 2",  # the loop's own work, from C
                f"thread (7): MainThread;<module> ({srv}/__main__.py:4)"
                f";run ({srv}/app.py:270);DataPlane.infer ({srv}/dataplane/plane.py:2) 1",
                f"thread (7): MainThread;{loop};_EngineConnection._run"
                f" ({srv}/workers/lane_engine.py:3);Router.infer ({srv}/routing/router.py:5) 3",
                f"thread (7): MainThread;{loop}"
                f";DynamicBatcher._execute ({srv}/batching/dynamic.py:1) 4",
            ]
        )
        + "\n"
    )
    samples = profile.read_samples(raw, 7)
    assert dict(samples["stages"]) == {"grpc": 2, "routing": 4, "batcher": 4}
    assert samples["inclusive"]["Router.infer (router.py)"] == 3
    assert "main (cli.py)" not in samples["inclusive"]


def test_profile_counts_the_cpu_of_the_server_its_children_and_their_threads() -> None:
    """``cpu_by_thread``: a server process's own threads, and its children's (the transports)
    summed, from /proc, so a row says what a request costs in every process."""
    profile = _load("profile_path")
    busy_child = (
        "import threading, time\n"
        "def spin():\n"
        "    t = time.thread_time()\n"
        "    while time.thread_time() - t < 0.3: pass\n"
        "    time.sleep(30)\n"
        "threading.Thread(target=spin).start()\n"
        "time.sleep(30)\n"
    )
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            f"subprocess.Popen([sys.executable, '-c', {busy_child!r}])\n"
            "time.sleep(30)\n",
        ]
    )
    try:
        deadline = time.monotonic() + 20
        spent: dict[str, float] = {}
        while time.monotonic() < deadline:
            spent = profile.cpu_by_thread(parent.pid)
            if spent.get("transports: python threads", 0.0) >= 0.25:
                break
            time.sleep(0.1)
        assert spent.get("transports: python threads", 0.0) >= 0.25, spent
        assert "server: loop" in spent and "transports: loop" in spent, spent
        assert not any(name.startswith("perf_analyzer") for name in spent), spent
    finally:
        for pid in children(parent.pid):
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()


def test_workers_bench_compares_two_servers_one_setting_apart() -> None:
    """bench/workers.py: workers 1 against N, or two event loops with the same workers; the
    table gives medians, the ratio and each round's ratio, and each server's CPU."""
    workers = _load("workers")
    assert workers.servers_compared(2, None) == {
        "workers-1": {"SLUICE_WORKERS": "1"},
        "workers-2": {"SLUICE_WORKERS": "2"},
    }
    loops = workers.servers_compared(3, ["asyncio", "uvloop"])
    assert loops == {
        "asyncio": {"SLUICE_WORKERS": "3", "SLUICE_EVENT_LOOP": "asyncio"},
        "uvloop": {"SLUICE_WORKERS": "3", "SLUICE_EVENT_LOOP": "uvloop"},
    }
    with pytest.raises(SystemExit):
        workers.servers_compared(2, ["uvloop", "uvloop"])

    def run(throughput: float, engine: float, transports: float) -> dict[str, object]:
        cpu = {"engine": engine, "transports": transports}
        return {"throughput": throughput, "p50_us": 1000.0, "cpu_us_per_inference": cpu}

    runs = {
        "asyncio": {32: [run(1000, 400, 300), run(1200, 420, 310)]},
        "uvloop": {32: [run(1100, 350, 250), run(1500, 360, 260)]},
    }
    row = workers.table(runs, [32], 2).splitlines()[-1]
    assert row.startswith("| 32 | 1100 | 1300 | 1.18 (1.10, 1.25) |"), row
    assert row.endswith("| 2/2 | 410 + 305 | 355 + 255 |"), row


def test_generation_bench_splits_cpu_per_token_by_thread_and_machine_busy() -> None:
    """bench/generation.py: the server's main thread is the event loop, its busiest other
    thread the engine's; /proc is read for real (this process's threads)."""
    generation = _load("generation")
    pid = os.getpid()
    before = {pid: 1.0, pid + 1: 2.0, pid + 2: 0.5}
    after = {pid: 1.2, pid + 1: 2.6, pid + 2: 0.6, pid + 3: 0.1}  # a thread started meanwhile
    split = generation.cpu_split(pid, before, after, client_s=0.05, tokens=1000, transports_s=0.3)
    assert split == {
        "event loop": 200,
        "engine thread": 600,
        "other server threads": 200,
        "transports": 300,
        "client": 50,
    }
    before = {"user": 10, "nice": 0, "system": 10, "idle": 70, "iowait": 10}
    after = {"user": 40, "nice": 0, "system": 20, "idle": 100, "iowait": 20}
    assert generation.core.machine_busy_pct(before, after) == 50.0
    assert generation.core.machine_busy_pct(before, before) is None
    threads = generation.thread_cpu_s(pid)
    assert pid in threads and all(seconds >= 0 for seconds in threads.values())
    run = generation.Run("m", 16, 32, 2000, 1.0, 2000.0, 10.0, 20.0, 4.0, 5.0, split, 40.0)
    text = generation.report([run])
    assert "| m | 16 | 200 | 600 | 200 | 300 | 50 | 40.0 |" in text
    # The transports are the server's child processes: one started here is counted.
    busy = "sum(range(3_000_000)); input()"
    with subprocess.Popen([sys.executable, "-c", busy], stdin=subprocess.PIPE) as child:
        try:
            deadline = time.monotonic() + 30
            while generation.children_cpu_s(pid) < 0.01 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert generation.children_cpu_s(pid) >= 0.01
        finally:
            child.kill()


def test_generation_bench_counts_the_tokens_while_every_stream_ran_apart_from_the_tail() -> None:
    """bench/generation.py: besides tokens/s over the whole run, the rate from the start to
    the moment the first stream had no request left (after it, fewer streams run), and
    the 16 / 1 verdict on both."""
    generation = _load("generation")
    arrivals = [(10.0, 1), (10.5, 4), (11.0, 2), (11.0001, 8), (12.0, 5)]
    assert generation.steady_rate(arrivals, 10.0, 11.0) == 7.0  # 1 + 4 + 2 over 1 s
    assert generation.steady_rate(arrivals, 10.0, 12.0) == 10.0
    assert generation.steady_rate(arrivals, 11.0, 11.0) == 0.0

    def run(streams: int, tokens_per_s: float, steady: float, ttft: float) -> object:
        return generation.Run(
            "m",
            streams,
            64,
            1000,
            10.0,
            tokens_per_s,
            ttft,
            1.0,
            1.0,
            1.0,
            steady_tokens_per_s=steady,
            steady_s=7.5,
        )

    lines = generation.verdict([run(1, 100.0, 100.0, 10.0), run(16, 550.0, 640.0, 31.0)])
    assert lines == [
        "- m: tokens/s at 16 streams = 5.50x single stream (target >= 6x: MISSED) (6.40x while"
        " all 16 streamed, 7.5 of 10.0 s: met); TTFT p50 at 16 = 3.10x single (target <= 3x:"
        " MISSED)"
    ]
    assert "| m | 16 | 64 | 550.0 | 640.0 | 31.0 |" in generation.report(
        [run(16, 550.0, 640.0, 31.0)]
    )


def test_sampling_bench_times_two_trees_in_one_run_and_tables_the_ratio() -> None:
    """bench/sampling.py: another checkout's sampler loads beside this tree's (here, this
    tree again), both are timed for every vocabulary and row count, and the table shows
    each median and the first over the second."""
    bench = _load("sampling")
    other = bench.load_sampler(REPO_ROOT)
    assert other is not bench.sampling and other.sample_many is not bench.sampling.sample_many
    results = bench.measure({"before": other, "this tree": bench.sampling}, [50], [1, 3], 2)
    assert sorted(results) == [
        (name, 50, rows) for name in ("before", "this tree") for rows in (1, 3)
    ]
    assert all(len(times) == 2 and min(times) > 0 for times in results.values())
    made = {("before", 50, 1): [30.0, 50.0], ("after", 50, 1): [20.0, 20.0]}
    assert bench.table(made, ["before", "after"], [50], [1]).splitlines() == [
        "| vocabulary | sequences | before us per step | after us per step | before / after |",
        "|---|---|---|---|---|",
        "| 50 | 1 | 40 | 20 | 2.0x |",
    ]
