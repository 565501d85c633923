#!/usr/bin/env python3
"""Sluice benchmark: compute ceiling, transport ceiling, and Sluice with / without batching.

One run measures, on this machine, for the benchmark MLP (FP32 ``input`` [batch, 256] ->
4 x 1024 ReLU -> ``output`` [batch, 16]):

  (a) ``ort``          onnxruntime in-process at batch 1..64: samples/s and ms per run;
      ``torch``        the same for the model.pt2 and model.pt files below, in-process
                       under torch.inference_mode;
  (b) ``null``         bench/null_server.py (grpc.aio, no math) under perf_analyzer;
  (c) ``batched``      Sluice (onnxruntime), max_batch_size 64, max_queue_delay_us 0;
      ``workers-2``    the same with ``--workers 2`` (two transport processes, one engine);
  (d) ``unbatched``    Sluice (onnxruntime), max_batch_size 1;
  (e) ``torch-export`` Sluice serving model.pt2 (torch.export, dynamic batch), batched as (c);
  (f) ``torchscript``  Sluice serving model.pt (TorchScript), batched as (c);
  (g) ``pytriton``     PyTriton (bench/pytriton_server.py) and
  (h) ``mlserver``     MLServer (bench/mlserver_runtime.py, perf_analyzer's dynamic_grpc mode),
                       both from the peers' venv (``--peers DIR``; skipped with a note when
                       it is missing);

(b) to (h) under perf_analyzer at concurrency 1, 8, 32 and 128 (one sample per request);
(b), (c), ``workers-2``, (g) and (h) again on a second model, the two-input convolution ``conv`` of
bench/conv_model.py. The PyTorch files carry exactly the ONNX file's weights
(bench/torch_mlp.py) and are checked against onnxruntime before anything is measured.
Then the runner checks the targets and writes ``bench/results/<timestamp>.json``, one PNG
plot per model beside it (matplotlib, the ``bench`` extra) and a markdown report on stdout
(progress goes to stderr). Client and server share the machine's cores: nothing is pinned.

    python bench/run.py --quick     # smoke run, about a minute, noisy numbers
    python bench/run.py             # the full measurement, run on a quiet machine
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as dt
import functools
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_OUT_DIR = BENCH_DIR / "results"

MODEL = "mlp"
INPUT_NAME, INPUT_DIM = "input", 256
OUTPUT_NAME, OUTPUT_DIM = "output", 16
ORT_BATCHES = (1, 2, 4, 8, 16, 32, 64)
CONCURRENCIES = (1, 8, 32, 128)  # the full run; --quick leaves out 128
QUICK_CONCURRENCIES = (1, 8, 32)
PEERS = ("pytriton", "mlserver")
SERVERS = ("null", "batched", "workers-2", "unbatched", "torch-export", "torchscript", *PEERS)
TORCH_SERVERS = ("torch-export", "torchscript")
SLUICE_SERVERS = ("batched", "workers-2", "unbatched", *TORCH_SERVERS)
# The servers measured on the second model (bench/conv_model.py).
CONV_SERVERS = ("null", "batched", "workers-2", *PEERS)
SERVER_TITLES = {
    "null": "transport ceiling (grpc.aio, no math)",
    "batched": "Sluice, onnxruntime, dynamic batching (max_batch_size 64, delay 0), workers 1",
    "workers-2": "Sluice as batched, --workers 2 (two transport processes, one engine)",
    "unbatched": "Sluice, onnxruntime, max_batch_size 1",
    "torch-export": "Sluice, torch.export model.pt2, dynamic batching (64, delay 0)",
    "torchscript": "Sluice, TorchScript model.pt, dynamic batching (64, delay 0)",
    "pytriton": "PyTriton (Triton C++ gRPC, onnxruntime in Python; batching 64, delay 100 us)",
    "mlserver": "MLServer, dynamic_grpc (onnxruntime; adaptive batching 64, 1 ms)",
}
# What each Sluice server's repository holds: (model file kind, max_batch_size).
SERVER_MODELS = {
    "batched": ("onnx", 64),
    "workers-2": ("onnx", 64),
    "unbatched": ("onnx", 1),
    "torch-export": ("pt2", 64),
    "torchscript": ("pt", 64),
}
# Settings a Sluice server runs with beyond its repository.
# ``workers`` is pinned: unset, it is chosen from the machine (2 on two cores, where the
# ``workers-2`` rows are the default).
SERVER_ENV = {
    "workers-2": {"SLUICE_WORKERS": "2"},
    **{name: {"SLUICE_WORKERS": "1"} for name in ("batched", "unbatched", *TORCH_SERVERS)},
}
MODEL_FILENAMES = {"onnx": "model.onnx", "pt2": "model.pt2", "pt": "model.pt"}
# The in-process runtimes of part (a): key in the JSON -> label in the report.
INPROCESS_TITLES = {
    "onnxruntime": "onnxruntime",
    "torch.export": "torch, model.pt2 (torch.export)",
    "torchscript": "torch, model.pt (TorchScript)",
}
LISTENING = re.compile(r"gRPC listening on (?P<host>[^\s:]+|\[[^\]]+\]):(?P<port>\d+)")

# Targets: (id, description).
TARGET_TRANSPORT = 0.75  # Sluice batched c=32 throughput / transport ceiling c=32
TARGET_BATCHING = 3.0  # Sluice batched c=32 / unbatched c=32
TARGET_P50_MS = 1.0  # Sluice batched c=1 p50


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A served model: its name, FP32 tensors (dims after the batch one) and ONNX file."""

    name: str
    inputs: tuple[tuple[str, tuple[int, ...]], ...]
    outputs: tuple[tuple[str, tuple[int, ...]], ...]
    layers: str
    file: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": [[n, "FP32", [-1, *d]] for n, d in self.inputs],
            "outputs": [[n, "FP32", [-1, *d]] for n, d in self.outputs],
            "layers": self.layers,
        }


MLP_SPEC = ModelSpec(
    MODEL,
    ((INPUT_NAME, (INPUT_DIM,)),),
    ((OUTPUT_NAME, (OUTPUT_DIM,)),),
    "256 -> 4 x 1024 ReLU -> 16",
)


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    interval_ms: int  # perf_analyzer -p
    stability_pct: int  # perf_analyzer -s
    max_trials: int  # perf_analyzer -r
    warmup_requests: int  # perf_analyzer --warmup-request-count
    ort_seconds: float  # timed seconds per batch size, in-process (onnxruntime and torch)
    ort_warmup_runs: int


FULL = Profile("full", 3000, 15, 8, 200, 3.0, 50)
QUICK = Profile("quick", 500, 50, 3, 50, 0.3, 5)


def note(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# -- system probes ---------------------------------------------------------------------


def _cpu_times() -> dict[str, int]:
    """Aggregate jiffies from /proc/stat (empty where there is no /proc)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return {}
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return {name: int(value) for name, value in zip(names, first[1:], strict=False)}


def stat_cpu_s(stat: Path) -> float | None:
    """utime + stime in seconds from a ``/proc`` stat file (a process's or, under
    ``task/``, a thread's); None once it is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process in seconds."""
    return stat_cpu_s(Path(f"/proc/{pid}/stat"))


def machine_busy_pct(before: dict[str, int], after: dict[str, int]) -> float | None:
    """Share of the machine's CPU time that was not idle between two ``_cpu_times``."""
    total = sum(after.values()) - sum(before.values())
    if not before or not after or total <= 0:
        return None
    idle = (after["idle"] + after.get("iowait", 0)) - (before["idle"] + before.get("iowait", 0))
    return round(100 * (1 - idle / total), 1)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclasses.dataclass
class CpuWindow:
    """CPU use over a span: the server's, the finished children's (perf_analyzer), steal."""

    server_pid: int | None
    wall0: float = 0.0
    server0: float | None = None
    children0: float = 0.0
    stat0: dict[str, int] = dataclasses.field(default_factory=dict)

    def __enter__(self) -> CpuWindow:
        self.wall0 = time.monotonic()
        self.server0 = _proc_cpu_s(self.server_pid) if self.server_pid else None
        self.children0 = _children_cpu_s()
        self.stat0 = _cpu_times()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def result(self) -> dict[str, Any]:
        wall = time.monotonic() - self.wall0
        out: dict[str, Any] = {"wall_s": round(wall, 2)}
        if self.server_pid and self.server0 is not None:
            now = _proc_cpu_s(self.server_pid)
            if now is not None:
                out["server_cores"] = round((now - self.server0) / wall, 2)
        out["client_cores"] = round((_children_cpu_s() - self.children0) / wall, 2)
        stat1 = _cpu_times()
        busy = machine_busy_pct(self.stat0, stat1)
        if busy is not None:
            total = sum(stat1.values()) - sum(self.stat0.values())
            out["machine_busy_pct"] = busy
            out["steal_pct"] = round(
                100 * (stat1.get("steal", 0) - self.stat0.get("steal", 0)) / total, 1
            )
        return out


def environment() -> dict[str, Any]:
    import grpc
    import onnxruntime as ort

    env: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "grpcio": grpc.__version__,
        "loadavg_start": list(os.getloadavg()),
    }
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # torch not imported
        env["torch"] = importlib.metadata.version("torch")
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu_model"] = line.split(":", 1)[1].strip()
                break
    git = ["git", "-C", str(REPO_ROOT)]
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        env["git_commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        env["git_dirty"] = bool(
            subprocess.run(
                [*git, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    return env


# -- the model and the repositories ------------------------------------------------------


def build_model(path: Path) -> None:
    script = REPO_ROOT / "scripts" / "build_example_models.py"
    subprocess.run(
        [sys.executable, str(script), "--bench-only", "--bench-mlp", str(path)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def model_config(kind: str, max_batch_size: int) -> str:
    """The config.yaml of the served ``mlp``. The PyTorch files force the pytorch backend,
    and TorchScript, whose file names no tensors, lists them (batch dimension implied)."""
    text = ""
    if kind in ("pt2", "pt"):
        text += "backend: pytorch\n"
    text += (
        f"max_batch_size: {max_batch_size}\n"
        "dynamic_batching:\n"
        "  max_queue_delay_us: 0\n"
        "  preferred_batch_sizes: []\n"
        "instance_count: 1\n"
    )
    if kind == "pt":
        text += (
            "inputs:\n"
            f"  - {{name: {INPUT_NAME}, datatype: FP32, dims: [{INPUT_DIM}]}}\n"
            "outputs:\n"
            f"  - {{name: {OUTPUT_NAME}, datatype: FP32, dims: [{OUTPUT_DIM}]}}\n"
        )
    return text


def make_repository(
    root: Path, model_file: Path, kind: str, *, max_batch_size: int, model: str = MODEL
) -> Path:
    """``root/<model>/1/model.<kind>`` (a hard link or copy) and ``root/<model>/config.yaml``."""
    version_dir = root / model / "1"
    version_dir.mkdir(parents=True)
    target = version_dir / MODEL_FILENAMES[kind]
    try:
        os.link(model_file, target)
    except OSError:
        shutil.copyfile(model_file, target)
    (root / model / "config.yaml").write_text(model_config(kind, max_batch_size))
    return root


# -- (a) in-process: onnxruntime and torch ---------------------------------------------------


def time_batches(
    label: str, run: Callable[[np.ndarray], Any], profile: Profile
) -> list[dict[str, Any]]:
    """``run(x)`` timed for x of each of ORT_BATCHES rows: samples/s and ms per run."""
    rng = np.random.default_rng(0)
    rows = []
    for batch in ORT_BATCHES:
        x = rng.standard_normal((batch, INPUT_DIM), dtype=np.float32)
        for _ in range(profile.ort_warmup_runs):
            run(x)
        times: list[float] = []
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            run(x)
            t1 = time.perf_counter()
            times.append(t1 - t0)
            if t1 - start >= profile.ort_seconds and len(times) >= 10:
                break
        elapsed = time.perf_counter() - start
        row = {
            "batch": batch,
            "runs": len(times),
            "samples_per_s": round(batch * len(times) / elapsed, 1),
            "ms_per_run_mean": round(1e3 * elapsed / len(times), 4),
            "ms_per_run_p50": round(1e3 * statistics.median(times), 4),
        }
        rows.append(row)
        note(
            f"{label} batch {batch}: {row['samples_per_s']:.0f} samples/s, "
            f"{row['ms_per_run_p50']:.3f} ms/run (p50)"
        )
    return rows


def _ort_run(session: Any, x: np.ndarray) -> Any:
    return session.run([OUTPUT_NAME], {INPUT_NAME: x})


def bench_ort(model_file: Path, profile: Profile) -> list[dict[str, Any]]:
    import onnxruntime as ort

    # Default session options, like Sluice's executor with executor.intra_op_threads 0.
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    try:
        return time_batches("ort", functools.partial(_ort_run, session), profile)
    finally:
        del session
        gc.collect()


def _torch_mlp() -> Any:
    """bench/torch_mlp.py (imported late: it imports torch, which takes seconds)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    import torch_mlp

    return torch_mlp


def bench_torch(files: dict[str, Path], profile: Profile) -> dict[str, list[dict[str, Any]]]:
    """model.pt2 and model.pt loaded as Sluice loads them on the CPU, each batch run under
    torch.inference_mode with numpy in and out (as the executor does); default threads."""
    torch_mlp = _torch_mlp()
    out: dict[str, list[dict[str, Any]]] = {}
    loaders = {"torch.export": torch_mlp.load_exported, "torchscript": torch_mlp.load_torchscript}
    for runtime, kind in (("torch.export", "pt2"), ("torchscript", "pt")):
        module = loaders[runtime](files[kind])
        try:
            out[runtime] = time_batches(runtime, torch_mlp.runner(module, OUTPUT_NAME), profile)
        finally:
            del module
            gc.collect()
    return out


def build_torch_models(model_file: Path, work: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """model.pt2 and model.pt from the ONNX file's weights, checked against onnxruntime."""
    torch_mlp = _torch_mlp()
    files = {"pt2": work / "mlp_bench.pt2", "pt": work / "mlp_bench.pt"}
    check = torch_mlp.build(model_file, files["pt2"], files["pt"], INPUT_DIM)
    return files, check


def ort_reference(model_file: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of the ONNX file for ``feed``, in the model's output order."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    try:
        return [np.asarray(y) for y in session.run(None, feed)]
    finally:
        del session
        gc.collect()


def _bench_module(name: str) -> Any:
    """A module of bench/ (conv_model, plots, ...), importable however run.py was started."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module(name)


def conv_spec(file: Path | None = None) -> ModelSpec:
    conv_model = _bench_module("conv_model")
    return ModelSpec(
        conv_model.NAME,
        tuple((n, tuple(d)) for n, d in conv_model.INPUTS),
        tuple((n, tuple(d)) for n, d in conv_model.OUTPUTS),
        "image 3x32x32 -> 2 x Conv 3x3/2 (16, 32) ReLU -> avg pool; concat features 8 -> Gemm 10",
        file,
    )


def _stub(channel: Any) -> Any:
    from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc

    return pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


# -- server processes ------------------------------------------------------------------------


class ServerProcess:
    """A server subprocess whose stderr/stdout go to a log; the port comes from the log."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log_path: Path,
        env: dict[str, str],
        *,
        model: str = MODEL,
        port: int | None = None,
        cwd: Path = REPO_ROOT,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self.env = env
        self.model = model
        self.cwd = cwd
        self.proc: subprocess.Popen[str] | None = None
        # A server that logs no port (MLServer) is started on a port chosen beforehand.
        self.port: int | None = port
        self._port_found = threading.Event()
        if port is not None:
            self._port_found.set()
        self._tail: deque[str] = deque(maxlen=60)
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def tail(self, lines: int = 30) -> str:
        return "".join(list(self._tail)[-lines:])

    def start(self) -> None:
        note(f"starting {self.name}: {' '.join(self.cmd)}")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=self.cwd,
            env=self.env,
            text=True,
            bufsize=1,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, name=f"log-{self.name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.log_path.open("w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self._tail.append(line)
                if self.port is None and (m := LISTENING.search(line)):
                    self.port = int(m.group("port"))
                    self._port_found.set()

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """The logged port, then ModelReady(model) true (Sluice logs the port before loading)."""
        import grpc

        from sluice_api.inference import grpc_service_pb2 as pb

        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while not self._port_found.wait(0.1):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before listening:\n"
                    + self.tail()
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} logged no 'gRPC listening on' line:\n{self.tail()}"
                )
        with grpc.insecure_channel(self.address) as channel:
            stub = _stub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                    )
                with contextlib.suppress(grpc.RpcError):
                    if stub.ModelReady(pb.ModelReadyRequest(name=self.model), timeout=2).ready:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: model {self.model} not ready:\n{self.tail()}")
                time.sleep(0.1)
        note(f"{self.name} ready on {self.address} (pid {self.pid})")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait, SIGKILL as a last resort; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                note(f"{self.name} ignored SIGTERM for {timeout_s:.0f}s: killing it")
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        note(f"{self.name} stopped (exit {self.proc.returncode})")
        return self.proc.returncode


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    try:
        server.start()
        server.wait_ready()
        yield server
    finally:
        server.stop()


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO_ROOT / "server"), str(REPO_ROOT / "clients" / "python")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    # Shut down quickly once the load generator is gone; keep INFO for the port line.
    env["SLUICE_DRAIN_GRACE_S"] = "2"
    env["SLUICE_LOG_LEVEL"] = "INFO"
    env.update(extra or {})
    return env


def _dims(dims: Sequence[int]) -> str:
    return "x".join(map(str, dims))


def null_server(log_dir: Path, spec: ModelSpec = MLP_SPEC) -> ServerProcess:
    cmd = [sys.executable, str(BENCH_DIR / "null_server.py"), "--port", "0", "--model", spec.name]
    for name, dims in spec.inputs:
        cmd += ["--input", f"{name}:{_dims(dims)}"]
    for name, dims in spec.outputs:
        cmd += ["--output", f"{name}:{_dims(dims)}"]
    return ServerProcess(
        "null", cmd, log_dir / f"null-{spec.name}.log", server_env(), model=spec.name
    )


def sluice_server(
    name: str,
    repository: Path,
    log_dir: Path,
    extra_env: dict[str, str],
    *,
    model: str = MODEL,
) -> ServerProcess:
    cmd = [
        sys.executable,
        "-m",
        "sluice",
        "serve",
        "--model-repository",
        str(repository),
        "--grpc-port",
        "0",
        "--metrics-port",
        "0",
    ]
    return ServerProcess(
        name, cmd, log_dir / f"{name}-{model}.log", server_env(extra_env), model=model
    )


# -- gRPC probes against Sluice -------------------------------------------------------------


def model_statistics(address: str, model: str = MODEL) -> dict[str, int]:
    """Totals over the model's versions: samples, executor runs, queue / infer time."""
    import grpc

    from sluice_api.inference import grpc_service_pb2 as pb

    with grpc.insecure_channel(address) as channel:
        reply = _stub(channel).ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    totals = {
        "inference_count": 0,
        "execution_count": 0,
        "success_count": 0,
        "queue_ns": 0,
        "queue_count": 0,
        "compute_infer_ns": 0,
    }
    for stats in reply.model_stats:
        totals["inference_count"] += stats.inference_count
        totals["execution_count"] += stats.execution_count
        totals["success_count"] += stats.inference_stats.success.count
        totals["queue_ns"] += stats.inference_stats.queue.ns
        totals["queue_count"] += stats.inference_stats.queue.count
        # compute_infer is added per request (its batch's time): per-batch sums are exact.
        totals["compute_infer_ns"] += sum(b.compute_infer.ns for b in stats.batch_stats)
    return totals


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    d = {key: after[key] - before[key] for key in before}
    out: dict[str, Any] = {
        "inference_count": d["inference_count"],
        "execution_count": d["execution_count"],
    }
    if d["execution_count"] > 0:
        out["avg_batch"] = round(d["inference_count"] / d["execution_count"], 2)
        out["infer_us_per_execution"] = round(d["compute_infer_ns"] / d["execution_count"] / 1e3, 1)
    if d["queue_count"] > 0:
        out["queue_us_avg"] = round(d["queue_ns"] / d["queue_count"] / 1e3, 1)
    return out


def _reply_outputs(reply: Any) -> dict[str, np.ndarray]:
    """FP32 outputs of a ModelInferResponse by name, raw bytes or typed contents
    (MLServer answers with ``contents``)."""
    out = {}
    for i, tensor in enumerate(reply.outputs):
        if len(reply.raw_output_contents) > i:
            data = np.frombuffer(reply.raw_output_contents[i], np.float32)
        else:
            data = np.asarray(tensor.contents.fp32_contents, np.float32)
        out[tensor.name] = data.reshape(tuple(tensor.shape))
    return out


def check_outputs(address: str, spec: ModelSpec, *, max_rows: int) -> dict[str, Any]:
    """Requests of 1 and (batching allowing) 3 rows, compared with onnxruntime in-process
    running ``spec.file``."""
    import grpc

    from sluice_api.inference import grpc_service_pb2 as pb

    assert spec.file is not None
    rng = np.random.default_rng(1)
    results: dict[str, Any] = {}
    for rows in (1, 3) if max_rows >= 3 else (1,):
        feed = {
            name: rng.standard_normal((rows, *dims), dtype=np.float32) for name, dims in spec.inputs
        }
        request = pb.ModelInferRequest(
            model_name=spec.name,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name=name, datatype="FP32", shape=list(x.shape)
                )
                for name, x in feed.items()
            ],
            outputs=[
                pb.ModelInferRequest.InferRequestedOutputTensor(name=name)
                for name, _ in spec.outputs
            ],
            raw_input_contents=[x.tobytes() for x in feed.values()],
        )
        with grpc.insecure_channel(address) as channel:
            try:
                reply = _stub(channel).ModelInfer(request, timeout=10)
            except grpc.RpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
                results[f"rows_{rows}"] = {"ok": False, "error": error}
                continue
        got = _reply_outputs(reply)
        want = dict(zip((n for n, _ in spec.outputs), ort_reference(spec.file, feed), strict=True))
        missing = sorted(set(want) - set(got))
        if missing:
            results[f"rows_{rows}"] = {"ok": False, "error": f"outputs missing: {missing}"}
            continue
        err = max(float(np.max(np.abs(got[n].reshape(w.shape) - w))) for n, w in want.items())
        results[f"rows_{rows}"] = {
            "ok": all(
                got[n].size == w.size and np.allclose(got[n].reshape(w.shape), w, 1e-4, 1e-4)
                for n, w in want.items()
            ),
            "max_abs_err": err,
        }
    results["ok"] = all(r["ok"] for r in results.values() if isinstance(r, dict))
    return results


# -- perf_analyzer ------------------------------------------------------------------------


def find_perf_analyzer(given: str | None) -> str:
    if given:
        return given
    script = REPO_ROOT / "scripts" / "get_perf_analyzer.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{script} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return lines[-1].strip()


def perf_analyzer_version(pa: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([pa, "--version"], capture_output=True, text=True, timeout=30)
        for line in (out.stdout + out.stderr).splitlines():
            if "Version" in line:
                return line.strip()
    return None


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def parse_pa_csv(path: Path) -> dict[str, Any]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise RuntimeError(f"{path} holds no rows")
    row = rows[0]

    def us(name: str) -> float | None:
        return _number(row.get(name))

    return {
        "throughput": _number(row.get("Inferences/Second")),
        "p50_us": us("p50 latency"),
        "p90_us": us("p90 latency"),
        "p95_us": us("p95 latency"),
        "p99_us": us("p99 latency"),
        "avg_us": us("Avg latency"),
        "csv": {
            key: _number(value) if _number(value) is not None else value
            for key, value in row.items()
            if key
        },
    }


def dynamic_grpc_input(spec: ModelSpec, work: Path) -> Path:
    """perf_analyzer's ``--input-data`` for ``--service-kind=dynamic_grpc``: a JSON file
    naming bench/infer_requests.py as the message generator for ``spec``."""
    args = [sys.executable, str(BENCH_DIR / "infer_requests.py"), "--model", spec.name]
    for name, dims in spec.inputs:
        args += ["--input", f"{name}:{_dims(dims)}"]
    for name, _ in spec.outputs:
        args += ["--output", name]
    path = work / f"dynamic-grpc-{spec.name}.json"
    path.write_text(json.dumps({"data": [{"message_generator": " ".join(args)}]}))
    return path


def pa_target_args(address: str, model: str, dynamic_input: Path | None) -> list[str]:
    """perf_analyzer's server and protocol arguments: triton mode (the default: metadata,
    config, then ModelInfer with random data) or, with ``dynamic_input``, ``dynamic_grpc``
    (pre-serialized ModelInfer requests only, for servers without ModelConfig)."""
    if dynamic_input is None:
        return ["-i", "grpc", "-u", address, "-m", model, "-b", "1"]
    return [
        "--service-kind=dynamic_grpc",
        "-u",
        address,
        "-m",
        model,
        "--grpc-method",
        "inference.GRPCInferenceService/ModelInfer",
        "--input-data",
        str(dynamic_input),
    ]


def run_perf_analyzer(
    pa: str,
    address: str,
    concurrency: int,
    profile: Profile,
    work: Path,
    tag: str,
    *,
    model: str = MODEL,
    dynamic_input: Path | None = None,
    stability_pct: int | None = None,
    max_trials: int | None = None,
) -> dict[str, Any]:
    csv_path = work / f"pa-{tag}-c{concurrency}.csv"
    csv_path.unlink(missing_ok=True)
    cmd = [
        pa,
        *pa_target_args(address, model, dynamic_input),
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "-p",
        str(profile.interval_ms),
        "-s",
        str(stability_pct or profile.stability_pct),
        "-r",
        str(max_trials or profile.max_trials),
        "--warmup-request-count",
        str(profile.warmup_requests),
        "-f",
        str(csv_path),
    ]
    # Worst case: warm-up, max_trials windows (each may overrun), plus start-up.
    timeout = 60 + (max_trials or profile.max_trials) * profile.interval_ms / 1e3 * 3
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    out: dict[str, Any] = {"command": " ".join(cmd[1:]), "returncode": done.returncode}
    if done.returncode == 0 and csv_path.is_file():
        out.update(parse_pa_csv(csv_path))
    else:
        out["error"] = (done.stdout + done.stderr).strip()[-1500:]
        out["unstable"] = "stable measurement" in out["error"]
    return out


def measure(
    name: str,
    server: ServerProcess,
    pa: str,
    profile: Profile,
    concurrencies: Sequence[int],
    work: Path,
    *,
    sluice: bool,
    dynamic_input: Path | None = None,
) -> list[dict[str, Any]]:
    rows = []
    model = server.model
    tag = f"{name}-{model}"
    for c in concurrencies:
        before = model_statistics(server.address, model) if sluice else None
        with CpuWindow(server.pid) as cpu:
            result = run_perf_analyzer(
                pa,
                server.address,
                c,
                profile,
                work,
                tag,
                model=model,
                dynamic_input=dynamic_input,
            )
            if result.get("unstable"):
                # A noisy 2-core machine: retry once with twice the tolerance and twice the
                # windows, and say so in the report.
                relaxed = 2 * profile.stability_pct
                trials = 2 * profile.max_trials
                note(
                    f"{name} c={c}: no stable measurement at ±{profile.stability_pct}%; "
                    f"retrying at ±{relaxed}% with up to {trials} windows"
                )
                first_error = result["error"]
                result = run_perf_analyzer(
                    pa,
                    server.address,
                    c,
                    profile,
                    work,
                    tag,
                    model=model,
                    dynamic_input=dynamic_input,
                    stability_pct=relaxed,
                    max_trials=trials,
                )
                result["stability_relaxed_to_pct"] = relaxed
                result["first_attempt_error"] = first_error[-300:]
        row: dict[str, Any] = {
            "server": name,
            "model": model,
            "concurrency": c,
            **result,
            **cpu.result(),
        }
        if dynamic_input is not None:
            row["pa_mode"] = "dynamic_grpc"
        if sluice and before is not None:
            with contextlib.suppress(Exception):
                row["server_stats"] = stats_delta(before, model_statistics(server.address, model))
        if server.proc is not None and server.proc.poll() is not None:
            row["error"] = f"{name} died (exit {server.proc.returncode}):\n{server.tail()}"
        rows.append(row)
        if "error" in row:
            note(f"{tag} c={c}: FAILED: {row['error'].splitlines()[-1] if row['error'] else ''}")
        else:
            batch = row.get("server_stats", {}).get("avg_batch")
            note(
                f"{tag} c={c}: {row['throughput']:.0f} infer/s, p50 {row['p50_us']:.0f} us"
                + (f", avg batch {batch}" if batch is not None else "")
                + f", server {row.get('server_cores', '?')} cores,"
                f" client {row.get('client_cores', '?')} cores"
            )
    return rows


# -- targets and the report -------------------------------------------------------------


def _find(runs: dict[str, list[dict[str, Any]]], server: str, c: int) -> dict[str, Any] | None:
    for row in runs.get(server, []):
        if row["concurrency"] == c and "error" not in row:
            return row
    return None


def _target(
    tid: str, text: str, value: float | None, threshold: float, *, higher: bool, unit: str
) -> dict[str, Any]:
    if value is None:
        verdict = "N/A"
    else:
        ok = value >= threshold if higher else value < threshold
        verdict = "PASS" if ok else "MISS"
    return {
        "id": tid,
        "target": text,
        "value": value,
        "threshold": threshold,
        "comparison": ">=" if higher else "<",
        "unit": unit,
        "verdict": verdict,
    }


def evaluate_targets(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    b32, n32 = _find(runs, "batched", 32), _find(runs, "null", 32)
    u32, b1 = _find(runs, "unbatched", 32), _find(runs, "batched", 1)
    return [
        _target(
            "transport_ratio",
            "c=32: Sluice batched >= 75% of the transport ceiling",
            round(b32["throughput"] / n32["throughput"], 3) if b32 and n32 else None,
            TARGET_TRANSPORT,
            higher=True,
            unit="x",
        ),
        _target(
            "batching_gain",
            "c=32: Sluice batched >= 3x Sluice unbatched",
            round(b32["throughput"] / u32["throughput"], 3) if b32 and u32 else None,
            TARGET_BATCHING,
            higher=True,
            unit="x",
        ),
        _target(
            "c1_p50",
            "c=1: Sluice batched p50 < 1.0 ms",
            round(b1["p50_us"] / 1e3, 3) if b1 and b1.get("p50_us") is not None else None,
            TARGET_P50_MS,
            higher=False,
            unit="ms",
        ),
    ]


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int) and not isinstance(value, bool):
        return f"{value:,.{digits}f}"
    return str(value)


def _md_header(result: dict[str, Any]) -> list[str]:
    env = result["environment"]
    lines = [
        f"## Sluice benchmark, {result['timestamp']} ({result['profile']['name']} run)",
        "",
        f"{env.get('cpu_count')} CPUs ({env.get('cpu_model', '?')}), onnxruntime "
        f"{env.get('onnxruntime')}, torch {env.get('torch', '-')}, grpcio {env.get('grpcio')}, "
        f"{result.get('perf_analyzer_version') or 'perf_analyzer ?'}; load average "
        f"{env['loadavg_start'][0]:.2f} at start. perf_analyzer and the servers share the "
        "cores (nothing is pinned).",
    ]
    if result.get("sluice_env"):
        lines += [
            "",
            "Sluice environment: "
            + ", ".join(f"`{k}={v}`" for k, v in sorted(result["sluice_env"].items())),
        ]
    return lines


def _md_inprocess(result: dict[str, Any]) -> list[str]:
    tables = {"onnxruntime": result["ort"], **result.get("torch", {})}
    tables = {runtime: rows for runtime, rows in tables.items() if rows}
    if not tables:
        return []
    lines = [
        "",
        "### (a) in-process (compute ceiling): onnxruntime, torch",
        "",
        "| runtime | batch | samples/s | ms per run (mean) | ms per run (p50) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {INPROCESS_TITLES.get(runtime, runtime)} | {r['batch']} | "
        f"{_fmt(r['samples_per_s'])} | {r['ms_per_run_mean']:.3f} | {r['ms_per_run_p50']:.3f} |"
        for runtime, rows in tables.items()
        for r in rows
    ]
    check = result.get("torch_check")
    if check:
        worst = max(v["max_abs_err"] for v in check.values() if isinstance(v, dict))
        lines += [
            "",
            f"The PyTorch files hold the ONNX file's weights; largest difference from "
            f"onnxruntime at batch {', '.join(map(str, check['batches']))}: {worst:.1e} "
            f"(tolerance {check['tolerance']:g}).",
        ]
    return lines


def _md_run_row(name: str, row: dict[str, Any]) -> str:
    title = SERVER_TITLES[name]
    if "error" in row:
        text = row["error"].strip()
        err = text.splitlines()[-1][:80] if text else "error"
        return f"| {title} | {row['concurrency']} | - | - | - | - | - | - | - | FAILED: {err} |"
    ms = [row[k] / 1e3 if row.get(k) is not None else None for k in ("p50_us", "p90_us", "p99_us")]
    batch = row.get("server_stats", {}).get("avg_batch")
    notes = []
    if row.get("pa_mode") == "dynamic_grpc":
        notes.append("dynamic_grpc")
    if "stability_relaxed_to_pct" in row:
        notes.append(f"stable only within {row['stability_relaxed_to_pct']}%")
    if row.get("steal_pct"):
        notes.append(f"steal {row['steal_pct']}%")
    return (
        f"| {title} | {row['concurrency']} | {_fmt(row['throughput'])} | "
        + " | ".join(_fmt(v, 2) for v in ms)
        + f" | {_fmt(batch, 2) if name in SLUICE_SERVERS else 'n/a'} | "
        f"{_fmt(row.get('server_cores'), 2)} | {_fmt(row.get('client_cores'), 2)} | "
        f"{'; '.join(notes)} |"
    )


def _md_runs(
    runs: dict[str, list[dict[str, Any]]],
    title: str = "### (b)-(f) and peers: served through perf_analyzer (gRPC, 1 sample per request)",
) -> list[str]:
    if not runs:
        return []
    lines = [
        "",
        title,
        "",
        "| server | c | infer/s | p50 ms | p90 ms | p99 ms | avg batch | server cores "
        "| client cores | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [_md_run_row(name, row) for name in SERVERS for row in runs.get(name, [])]
    return lines


def _md_breakdown(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    rows = [r for name in SLUICE_SERVERS for r in runs.get(name, []) if "error" not in r]
    if not rows:
        return []
    lines = [
        "",
        "Where a Sluice request's time goes: perf_analyzer's averages in µs per request "
        "(*outside* = network, gRPC, interceptors and event loop: everything but the model's "
        "queue and compute); the last two columns come from ModelStatistics.",
        "",
        "| server | c | outside | queue | compute in | compute infer | compute out "
        "| avg batch | infer µs per run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        col, stats = row.get("csv", {}), row.get("server_stats", {})
        cells = [
            col.get(k)
            for k in (
                "Network+Server Send/Recv",
                "Server Queue",
                "Server Compute Input",
                "Server Compute Infer",
                "Server Compute Output",
            )
        ]
        lines.append(
            f"| {row['server']} | {row['concurrency']} | "
            + " | ".join(_fmt(v) for v in cells)
            + f" | {_fmt(stats.get('avg_batch'), 2)}"
            + f" | {_fmt(stats.get('infer_us_per_execution'))} |"
        )
    return lines


def _md_targets(result: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "### Targets",
        "",
        "| target | value | threshold | verdict |",
        "|---|---:|---:|---|",
    ]
    for t in result["targets"]:
        value = f"{_fmt(t['value'], 3)} {t['unit']}" if t["value"] is not None else "-"
        lines.append(
            f"| {t['target']} | {value} | {t['comparison']} {t['threshold']} "
            f"{t['unit']} | **{t['verdict']}** |"
        )
    for name, check in result.get("correctness", {}).items():
        if not check.get("ok"):
            lines += ["", f"WARNING: Sluice ({name}) outputs differ from onnxruntime: {check}"]
    torch_check = result.get("torch_check")
    if torch_check and not torch_check.get("ok"):
        lines += ["", f"WARNING: the PyTorch files differ from onnxruntime: {torch_check}"]
    if result["errors"]:
        lines += ["", "### Errors", ""]
        lines += [f"- {e.strip().splitlines()[0][:300]}" for e in result["errors"] if e.strip()]
    return lines


def _md_second_model(result: dict[str, Any]) -> list[str]:
    section = result.get("second_model")
    if not section:
        return []
    model = section["model"]
    tensors = ", ".join(f"{n} {t} {d}" for n, t, d in model["inputs"])
    outputs = ", ".join(f"{n} {t} {d}" for n, t, d in model["outputs"])
    lines = _md_runs(
        section["runs"],
        f"### Second model `{model['name']}` ({tensors} -> {outputs}: {model['layers']})",
    )
    for name, check in section.get("correctness", {}).items():
        if not check.get("ok"):
            lines += ["", f"WARNING: {name} outputs on {model['name']} differ: {check}"]
    return lines


def _md_peer_ratios(result: dict[str, Any]) -> list[str]:
    """Sluice batched / PyTriton and / the no-math server, per concurrency and model."""
    sections = [(MODEL, result["runs"])]
    if result.get("second_model"):
        sections.append((result["second_model"]["model"]["name"], result["second_model"]["runs"]))
    lines = []
    for model, runs in sections:
        for c in sorted({r["concurrency"] for r in runs.get("batched", [])}):
            b, t, n = _find(runs, "batched", c), _find(runs, "pytriton", c), _find(runs, "null", c)
            if b is None or (t is None and n is None):
                continue
            pyt = f"{b['throughput'] / t['throughput']:.2f} x" if t else "-"
            null = f"{b['throughput'] / n['throughput']:.2f} x" if n else "-"
            lines.append(f"| {model} | {c} | {pyt} | {null} |")
    if not lines:
        return []
    return [
        "",
        "Sluice (batched) throughput as a ratio of PyTriton's and of the no-math server's:",
        "",
        "| model | c | / PyTriton | / no-math grpc.aio |",
        "|---|---:|---:|---:|",
        *lines,
    ]


def _md_notes(result: dict[str, Any]) -> list[str]:
    lines = []
    if result.get("notes"):
        lines += ["", "### Notes", ""] + [f"- {n}" for n in result["notes"]]
    if result.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in result["plots"])]
    return lines


def markdown(result: dict[str, Any]) -> str:
    lines = [
        *_md_header(result),
        *_md_inprocess(result),
        *_md_runs(result["runs"]),
        *_md_breakdown(result["runs"]),
        *_md_second_model(result),
        *_md_breakdown(result.get("second_model", {}).get("runs", {})),
        *_md_peer_ratios(result),
        *_md_targets(result),
        *_md_notes(result),
        "",
        f"Raw results: `{result.get('results_file', '?')}`; the run took "
        f"{result['duration_s']:.0f} s.",
    ]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 0.5 s windows, 50%% stability, 3 windows, short ORT loops",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=None,
        metavar="C",
        help="perf_analyzer concurrencies (default: 1 8 32 128; with --quick 1 8 32)",
    )
    parser.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=("ort", "torch", *SERVERS, "conv"),
        help="parts to leave out (torch: the in-process torch rows of part (a); conv: the "
        "second model)",
    )
    parser.add_argument(
        "--peers",
        metavar="DIR",
        help="the peers harness folder whose setup.sh made the PyTriton / MLServer venv "
        "(default: $SLUICE_PEERS, else ../shared/peers); missing: the peer rows are skipped",
    )
    parser.add_argument(
        "--no-plots", action="store_true", help="write no PNG plots (they need matplotlib)"
    )
    parser.add_argument(
        "--perf-analyzer",
        metavar="PATH",
        default=os.environ.get("PERF_ANALYZER"),
        help="perf_analyzer (default: $PERF_ANALYZER, else what "
        "scripts/get_perf_analyzer.sh prints)",
    )
    parser.add_argument(
        "--measurement-interval", type=int, metavar="MS", help="override perf_analyzer -p"
    )
    parser.add_argument(
        "--sluice-env",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the Sluice servers, e.g. "
        "SLUICE_EXECUTOR__INTRA_OP_THREADS=1 (recorded in the JSON)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help=f"where the JSON goes (default: {DEFAULT_OUT_DIR})",
    )
    parser.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep the temporary folder (model, repositories, server logs, CSVs)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a target is missed (default: non-zero only on errors)",
    )
    args = parser.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = list(QUICK_CONCURRENCIES if args.quick else CONCURRENCIES)
    args.extra_env = {}
    for item in args.sluice_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--sluice-env takes KEY=VALUE, not {item!r}")
        args.extra_env[key] = value
    return args


def peer_server(name: str, spec: ModelSpec, work: Path, peers: Any) -> ServerProcess:
    """PyTriton or MLServer serving ``spec.file`` from the peers' Python environment."""
    assert spec.file is not None
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    log = work / f"{name}-{spec.name}.log"
    peers_mod = _bench_module("peers")
    if name == "pytriton":
        libdir = peers.libdir()
        if libdir:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p
            )
        cmd = [
            str(peers.python),
            str(BENCH_DIR / "pytriton_server.py"),
            "--model-path",
            str(spec.file),
            "--model-name",
            spec.name,
            "--grpc-port",
            str(peers_mod.free_port()),
            "--http-port",
            str(peers_mod.free_port()),
        ]
        return ServerProcess(name, cmd, log, env, model=spec.name)
    port = peers_mod.free_port()
    repo = peers_mod.mlserver_repository(
        work / f"mlserver-{spec.name}",
        spec.name,
        spec.file,
        grpc_port=port,
        http_port=peers_mod.free_port(),
        metrics_port=peers_mod.free_port(),
    )
    cmd = [str(peers.mlserver), "start", "."]
    return ServerProcess(name, cmd, log, env, model=spec.name, port=port, cwd=repo)


def bench_server(
    name: str,
    spec: ModelSpec,
    models: dict[str, Path],
    work: Path,
    pa: str,
    profile: Profile,
    args: argparse.Namespace,
    result: dict[str, Any],
    section: dict[str, Any],
    peers: Any = None,
) -> None:
    """Start one server, check its answers, measure every concurrency, stop it.

    ``models`` maps a file kind (onnx, pt2, pt) to the file; answers are always checked
    against onnxruntime running ``spec.file``. Rows go to ``section["runs"][name]``,
    errors to ``result["errors"]``."""
    note(f"{name} on {spec.name}: {SERVER_TITLES[name]}")
    max_batch = 64
    dynamic_input = None
    if name == "null":
        server = null_server(work, spec)
    elif name in PEERS:
        server = peer_server(name, spec, work, peers)
        if name == "mlserver":
            dynamic_input = dynamic_grpc_input(spec, work)
    else:
        kind, max_batch = SERVER_MODELS[name]
        repo = make_repository(
            work / f"repo-{name}-{spec.name}",
            models[kind],
            kind,
            max_batch_size=max_batch,
            model=spec.name,
        )
        env = {**args.extra_env, **SERVER_ENV.get(name, {})}
        server = sluice_server(name, repo, work, env, model=spec.name)
    label = name if spec.name == MODEL else f"{name} ({spec.name})"
    try:
        with running(server):
            if name != "null":
                section["correctness"][name] = check_outputs(
                    server.address, spec, max_rows=max_batch
                )
            section["runs"][name] = measure(
                name,
                server,
                pa,
                profile,
                args.concurrency,
                work,
                sluice=name in SLUICE_SERVERS,
                dynamic_input=dynamic_input,
            )
    except Exception as exc:  # one server failing must not stop the others
        result["errors"].append(f"{label}: {type(exc).__name__}: {exc}")
        note(result["errors"][-1])
    for row in section["runs"].get(name, []):
        if "error" in row:
            result["errors"].append(f"{label} c={row['concurrency']}: {row['error']}")


def find_peers(args: argparse.Namespace, result: dict[str, Any]) -> Any:
    """The peers' environment, or None with a note in ``result["notes"]`` saying why the
    peer rows are skipped (never an error: the peers are optional)."""
    peers_mod = _bench_module("peers")
    folder = Path(args.peers) if args.peers else peers_mod.default_folder(REPO_ROOT)
    found = peers_mod.locate(folder)
    if isinstance(found, str):
        result["notes"].append(found)
        note(found)
        return None
    result["peers"] = {"folder": str(found.folder), "python": str(found.python)}
    for peer, why in found.missing.items():
        result["notes"].append(f"{peer} skipped: {why}")
        note(result["notes"][-1])
    return found if found.available else None


def prepare_torch(
    model_file: Path, work: Path, models: dict[str, Path], result: dict[str, Any]
) -> bool:
    """Build model.pt2 and model.pt into ``models``; False (and an error) when torch is
    missing, the export fails, or a file computes something else than onnxruntime."""
    note("exporting the benchmark MLP to model.pt2 (torch.export) and model.pt (TorchScript)")
    try:
        files, check = build_torch_models(model_file, work)
    except Exception as exc:  # reported; the torch parts are skipped, the others run
        result["errors"].append(f"torch models: {type(exc).__name__}: {exc}")
        note(result["errors"][-1])
        return False
    result["torch_check"] = check
    import torch  # imported by now; the in-process rows use its default thread count

    result["environment"]["torch_intra_op_threads"] = torch.get_num_threads()
    errors = {k: v["max_abs_err"] for k, v in check.items() if isinstance(v, dict)}
    note(f"torch vs onnxruntime, max |difference|: {errors}")
    if not check["ok"]:
        result["errors"].append(
            f"torch models differ from onnxruntime by more than {check['tolerance']}: {errors}"
        )
        note(result["errors"][-1])
        return False
    models.update(files)
    return True


def torch_parts(
    model_file: Path,
    work: Path,
    models: dict[str, Path],
    profile: Profile,
    skip: set[str],
    result: dict[str, Any],
) -> set[str]:
    """Build the PyTorch files and time them in-process (unless skipped); returns the parts
    that must be skipped because the files could not be made or checked."""
    if not prepare_torch(model_file, work, models, result):
        return {"torch", *TORCH_SERVERS}
    if "torch" not in skip:
        note("(a) torch in-process")
        result["torch"] = bench_torch(models, profile)
    return set()


def bench_second_model(
    servers: Sequence[str],
    work: Path,
    pa: str,
    profile: Profile,
    args: argparse.Namespace,
    result: dict[str, Any],
    peers: Any,
) -> None:
    """The two-input convolution of bench/conv_model.py, on ``servers``, into
    ``result["second_model"]``."""
    conv_file = _bench_module("conv_model").build(work / "conv_bench.onnx")
    conv = conv_spec(conv_file)
    section = result["second_model"] = {"model": conv.to_json(), "runs": {}, "correctness": {}}
    for name in servers:
        bench_server(
            name, conv, {"onnx": conv_file}, work, pa, profile, args, result, section, peers
        )


def run_benchmark(args: argparse.Namespace, profile: Profile, result: dict[str, Any]) -> None:
    work = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    try:
        model_file = work / "mlp_bench.onnx"
        note(f"building the benchmark MLP in {work}")
        build_model(model_file)
        mlp = dataclasses.replace(MLP_SPEC, file=model_file)
        models = {"onnx": model_file}
        if "ort" not in args.skip:
            note("(a) onnxruntime in-process")
            result["ort"] = bench_ort(model_file, profile)
        skip = set(args.skip)
        if not {"torch", *TORCH_SERVERS} <= skip:
            skip |= torch_parts(model_file, work, models, profile, skip, result)
        peers = None
        if not set(PEERS) <= skip:
            peers = find_peers(args, result)
            skip |= {p for p in PEERS if peers is None or p not in peers.available}
        servers = [s for s in SERVERS if s not in skip]
        conv_servers = [s for s in CONV_SERVERS if s not in skip] if "conv" not in skip else []
        if not servers and not conv_servers:
            return
        try:
            pa = find_perf_analyzer(args.perf_analyzer)
        except Exception as exc:  # reported; the served parts are skipped
            result["errors"].append(f"no perf_analyzer: {exc}")
            note(result["errors"][-1])
            return
        result["perf_analyzer"] = pa
        result["perf_analyzer_version"] = perf_analyzer_version(pa)
        for name in servers:
            bench_server(name, mlp, models, work, pa, profile, args, result, result, peers)
        if conv_servers:
            bench_second_model(conv_servers, work, pa, profile, args, result, peers)
    finally:
        if args.keep_workdir:
            note(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def write_plots(result: dict[str, Any], out_dir: Path, stem: str) -> list[str]:
    """One PNG per model next to the JSON (bench/plots.py); without matplotlib, a note."""
    plots = _bench_module("plots")
    try:
        written = plots.plot_result(result, out_dir, stem)
    except plots.PlottingUnavailable as exc:
        result["notes"].append(f"plots skipped: {exc}")
        note(result["notes"][-1])
        return []
    names = []
    for path in written:
        note(f"wrote {path}")
        try:
            names.append(str(path.resolve().relative_to(REPO_ROOT)))
        except ValueError:
            names.append(str(path))
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    profile = QUICK if args.quick else FULL
    if args.measurement_interval:
        profile = dataclasses.replace(profile, interval_ms=args.measurement_interval)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    started = time.monotonic()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    result: dict[str, Any] = {
        "schema": 1,
        "timestamp": stamp,
        "profile": dataclasses.asdict(profile),
        "concurrencies": args.concurrency,
        "sluice_env": args.extra_env,
        "model": {
            "name": MODEL,
            "input": [INPUT_NAME, "FP32", [-1, INPUT_DIM]],
            "output": [OUTPUT_NAME, "FP32", [-1, OUTPUT_DIM]],
            "layers": MLP_SPEC.layers,
        },
        "environment": environment(),
        "ort": [],
        "torch": {},
        "runs": {},
        "correctness": {},
        "notes": [],
        "errors": [],
    }
    if result["environment"]["loadavg_start"][0] > 0.5:
        note(
            f"load average is {result['environment']['loadavg_start'][0]:.2f}: "
            "the machine is not quiet, numbers will be noisy"
        )

    run_benchmark(args, profile, result)

    result["targets"] = evaluate_targets(result["runs"])
    result["environment"]["loadavg_end"] = list(os.getloadavg())
    result["duration_s"] = round(time.monotonic() - started, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_file = args.out_dir / f"{stamp}{'-quick' if args.quick else ''}.json"
    try:
        result["results_file"] = str(out_file.resolve().relative_to(REPO_ROOT))
    except ValueError:
        result["results_file"] = str(out_file)
    if not args.no_plots:
        result["plots"] = write_plots(result, args.out_dir, out_file.stem)
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result), flush=True)
    note(f"wrote {out_file}")
    if result["errors"]:
        return 2
    if args.check and any(t["verdict"] != "PASS" for t in result["targets"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
