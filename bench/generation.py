#!/usr/bin/env python3
"""Token generation benchmark: Sluice serving a causal LM over sluice.v1 Generate.

For each model (the bundled ``tiny_llama``, and a random-initialised Llama of 8 layers, 512
wide, written to a temporary repository), a Sluice server runs in a subprocess and this
process drives it with grpc.aio: ``c`` concurrent streams (c = 1, 4, 16, 32), each running
generations back to back for a fixed number of requests. Reported per concurrency:

* aggregate tokens/s (tokens received / wall time of the run),
* time to first token (TTFT) p50 / p99: request sent -> first chunk received,
* time per output token (TPOT) p50 / p99: (last chunk - first chunk) / (tokens - 1),
* where the CPU goes, in us per token received (from ``/proc``): the server's event loop
  (its main thread), its busiest other thread (the generation engine's: forward passes,
  sampling, detokenizing), its other threads together, and this process (the client);
  and how busy the whole machine was (a machine far from busy with the engine thread on
  CPU most of a step's time says the engine thread is the limit, not the cores).

Prompts rotate through a fixed list; sampling at temperature 0.8 with a per-request seed;
output lengths spread evenly over 32..96 tokens (mean 64).

Targets (CPU): aggregate tokens/s at 16 streams >= 6x the single-stream figure; TTFT p50 at
16 streams <= 3x the single-stream TTFT. Client and server share the machine's cores.

    python bench/generation.py                  # both models, about five minutes
    python bench/generation.py --quick          # tiny model, fewer requests
    python bench/generation.py --device cuda    # the same on a GPU (SLUICE_EXECUTOR__USE_CUDA)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import run as core  # bench/run.py: /proc readers shared by the benchmarks

from sluice.machine import default_workers

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = REPO_ROOT / "server" / "sluice" / "example_models" / "tiny_llama" / "1"
RESULTS = REPO_ROOT / "bench" / "results"
LISTENING = re.compile(r"gRPC listening on [^:]+:(?P<port>\d+)")
CPU_COLUMNS = ("event loop", "engine thread", "other server threads", "transports", "client")

PROMPTS = [
    "Once upon a time",
    "One day, a girl named Sue went to the park with her mom and",
    "The sun was warm and the birds",
    "She had a red ball. She",
    "Tom and his dog",
    "In a small house near the woods there lived",
]

LARGE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "eos_token_id": 0,
}


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_large_model(repository: Path) -> str:
    """A random Llama (8 layers, 512 wide) with the bundled model's tokenizer."""
    import torch
    from safetensors.torch import save_file

    from sluice.generation.causal_lm import build_module
    from sluice.generation.config import parse_config

    folder = repository / "llama_8x512" / "1"
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(TINY / name, folder / name)
    vocab = json.loads((TINY / "config.json").read_text())["vocab_size"]
    config_json = {**LARGE_CONFIG, "vocab_size": vocab}
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    config = parse_config(config_json, where=folder / "config.json")
    torch.manual_seed(0)
    module = build_module(config, device=torch.device("cpu"))
    tensors = {}
    for key, value in module.state_dict().items():
        scale = 1.0 if key.endswith("norm.weight") else 0.02
        base = torch.ones_like(value) if scale == 1.0 else torch.randn_like(value) * scale
        tensors[key] = base.contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    return "llama_8x512"


@contextlib.contextmanager
def server(
    repository: Path,
    device: str,
    log_path: Path,
    *,
    dtype: str = "float32",
    workers: int | None = None,
) -> Iterator[tuple[str, int]]:
    """A ``sluice serve`` subprocess: its address and the engine's pid. ``workers`` None:
    ``SLUICE_WORKERS`` when set, else as ``sluice serve`` chooses from the machine
    (docs/workers.md)."""
    env = dict(os.environ)
    env.update(
        SLUICE_DRAIN_GRACE_S="2",
        SLUICE_LOG_LEVEL="INFO",
        SLUICE_EXECUTOR__USE_CUDA="true" if device == "cuda" else "false",
        SLUICE_GENERATION__DTYPE=dtype,
        SLUICE_PROBE__INTERVAL_S="0",
        PYTHONUNBUFFERED="1",
    )
    if workers is not None:
        env["SLUICE_WORKERS"] = str(workers)
    command = [sys.executable, "-m", "sluice", "serve", "--model-repository", str(repository)]
    command += ["--grpc-port", "0", "--metrics-port", "0"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        started = time.monotonic()
        while port is None:
            if proc.poll() is not None or time.monotonic() - started > 180:
                raise RuntimeError(f"server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
            if "ready:" in (text := log_path.read_text()):
                match = LISTENING.search(text)
                port = int(match.group("port")) if match else None
        yield f"127.0.0.1:{port}", proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class Run:
    model: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    cpu_us_per_token: dict[str, float] | None = None
    machine_busy_pct: float | None = None
    steady_tokens_per_s: float | None = None
    """Tokens/s while every stream ran: from the start to the moment the first stream found
    no request left (``tokens_per_s`` also counts the tail, when fewer streams run)."""
    steady_s: float | None = None
    """How long every stream ran."""


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process ``pid``, by thread id."""
    threads = {
        int(task.name): core.stat_cpu_s(task / "stat")
        for task in Path(f"/proc/{pid}/task").iterdir()
    }
    return {tid: seconds for tid, seconds in threads.items() if seconds is not None}


def children_cpu_s(pid: int) -> float:
    """CPU seconds of the child processes of ``pid`` (the transports, with ``--workers``
    above 1)."""
    children = {
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    }
    seconds = (core.stat_cpu_s(Path(f"/proc/{child}/stat")) for child in children)
    return sum(s for s in seconds if s is not None)


def cpu_split(
    pid: int,
    before: dict[int, float],
    after: dict[int, float],
    client_s: float,
    tokens: int,
    transports_s: float = 0.0,
) -> dict[str, float]:
    """us of CPU per token: the server's main thread (the event loop), its busiest other
    thread over the run (the generation engine's), its other threads, the transport
    processes (``transports_s``), and the client."""
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    loop = used.pop(pid, 0.0)
    engine = max(used.values(), default=0.0)
    per_token = 1e6 / max(tokens, 1)
    return {
        "event loop": round(loop * per_token),
        "engine thread": round(engine * per_token),
        "other server threads": round((sum(used.values()) - engine) * per_token),
        "transports": round(transports_s * per_token),
        "client": round(client_s * per_token),
    }


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def output_length(index: int, mean: int) -> int:
    """Requests ask for between half and one and a half times ``mean`` tokens (spread
    evenly, deterministic). Identical lengths would make every stream finish on the same
    step and all rejoin at once, a lock-step no real traffic has."""
    low = mean // 2
    return low + (index * 37) % (mean + 1)


def steady_rate(arrivals: list[tuple[float, int]], started: float, until: float) -> float:
    """Tokens per second that arrived (``(time, tokens)`` pairs) from ``started`` to ``until``."""
    if until <= started:
        return 0.0
    return sum(count for at, count in arrivals if started <= at <= until) / (until - started)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(
    address: str,
    model: str,
    *,
    concurrency: int,
    requests: int,
    max_new_tokens: int,
    server_pid: int | None = None,
) -> Run:
    """One run; with ``server_pid``, also where the CPU went while it ran (after the
    warm-up: ``cpu_us_per_token``, ``machine_busy_pct``)."""
    from sluice_api.sluice.v1 import generation_service_pb2 as gen
    from sluice_api.sluice.v1 import generation_service_pb2_grpc as gen_grpc

    ttft: list[float] = []
    tpot: list[float] = []
    tokens = 0
    counter = iter(range(requests))
    arrivals: list[tuple[float, int]] = []  # at most one per token received
    first_done: float | None = None

    async with grpc.aio.insecure_channel(address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)

        async def worker() -> None:
            nonlocal tokens, first_done
            for index in counter:
                request = gen.GenerateRequest(
                    model_name=model,
                    prompt=PROMPTS[index % len(PROMPTS)],
                    parameters=gen.SamplingParameters(
                        max_new_tokens=output_length(index, max_new_tokens),
                        temperature=0.8,
                        seed=index,
                    ),
                )
                sent = time.perf_counter()
                first = last = 0.0
                count = 0
                async for response in stub.Generate(request):
                    last = time.perf_counter()
                    first = first or last
                    count += len(response.token_ids)
                    arrivals.append((last, len(response.token_ids)))
                tokens += count
                ttft.append(first - sent)
                if count > 1:
                    tpot.append((last - first) / (count - 1))
            first_done = first_done or time.perf_counter()  # from now on, fewer streams

        # Warm up (first calls pay for lazy initialisation), then measure.
        await stub.Generate(
            gen.GenerateRequest(model_name=model, prompt="Hi", parameters=gen.SamplingParameters())
        ).read()
        threads0 = thread_cpu_s(server_pid) if server_pid is not None else {}
        children0 = children_cpu_s(server_pid) if server_pid is not None else 0.0
        ticks0, client0 = core._cpu_times(), _self_cpu_s()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        assert first_done is not None
        steady = steady_rate(arrivals, started, first_done)
        cpu, busy = None, None
        if server_pid is not None:
            cpu = cpu_split(
                server_pid,
                threads0,
                thread_cpu_s(server_pid),
                _self_cpu_s() - client0,
                tokens,
                children_cpu_s(server_pid) - children0,
            )
            busy = core.machine_busy_pct(ticks0, core._cpu_times())
    return Run(
        model=model,
        concurrency=concurrency,
        requests=requests,
        tokens=tokens,
        seconds=round(seconds, 3),
        tokens_per_s=round(tokens / seconds, 1),
        ttft_p50_ms=round(percentile(ttft, 0.5) * 1000, 2),
        ttft_p99_ms=round(percentile(ttft, 0.99) * 1000, 2),
        tpot_p50_ms=round(percentile(tpot, 0.5) * 1000, 2),
        tpot_p99_ms=round(percentile(tpot, 0.99) * 1000, 2),
        cpu_us_per_token=cpu,
        machine_busy_pct=busy,
        steady_tokens_per_s=round(steady, 1),
        steady_s=round(first_done - started, 3),
    )


def verdict(runs: list[Run]) -> list[str]:
    lines = []
    by = {(r.model, r.concurrency): r for r in runs}
    for model in dict.fromkeys(r.model for r in runs):
        one, sixteen = by.get((model, 1)), by.get((model, 16))
        if one is None or sixteen is None:
            continue
        speedup = sixteen.tokens_per_s / one.tokens_per_s
        ttft = sixteen.ttft_p50_ms / one.ttft_p50_ms
        steady = ""
        if sixteen.steady_tokens_per_s and one.steady_tokens_per_s:
            ratio = sixteen.steady_tokens_per_s / one.steady_tokens_per_s
            steady = (
                f" ({ratio:.2f}x while all 16 streamed, {sixteen.steady_s} of "
                f"{sixteen.seconds} s: {'met' if ratio >= 6 else 'MISSED'})"
            )
        lines.append(
            f"- {model}: tokens/s at 16 streams = {speedup:.2f}x single stream (target >= 6x: "
            f"{'met' if speedup >= 6 else 'MISSED'}){steady}; TTFT p50 at 16 = {ttft:.2f}x "
            f"single (target <= 3x: {'met' if ttft <= 3 else 'MISSED'})"
        )
    return lines


def report(runs: list[Run]) -> str:
    header = (
        "| model | streams | requests | tokens/s | tokens/s while all streamed | TTFT p50 ms "
        "| TTFT p99 ms | TPOT p50 ms | TPOT p99 ms |\n|---|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {r.model} | {r.concurrency} | {r.requests} | {r.tokens_per_s} "
        f"| {r.steady_tokens_per_s} | {r.ttft_p50_ms} "
        f"| {r.ttft_p99_ms} | {r.tpot_p50_ms} | {r.tpot_p99_ms} |"
        for r in runs
    ]
    cpu_header = (
        "| model | streams | us CPU per token: event loop | engine thread | other server "
        "threads | transports | client | machine busy % |\n|---|---|---|---|---|---|---|---|"
    )
    cpu_rows = [
        f"| {r.model} | {r.concurrency} | "
        + " | ".join(str(r.cpu_us_per_token.get(k, "")) for k in CPU_COLUMNS)
        + f" | {r.machine_busy_pct} |"
        for r in runs
        if r.cpu_us_per_token
    ]
    cpu = [cpu_header, *cpu_rows, ""] if cpu_rows else []
    return "\n".join([header, *rows, "", *cpu, *verdict(runs)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, fewer requests")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="the server's generation.dtype (weights and key/value cache)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="the server's --workers (default: SLUICE_WORKERS when set, else as `sluice "
        "serve` chooses from the machine; the runs published before 2026-12-07 night used 1)",
    )
    args = parser.parse_args()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="sluice-genbench-") as tmp:
        repository = Path(tmp) / "models"
        shutil.copytree(TINY.parent, repository / "tiny_llama")
        models = ["tiny_llama"] if args.quick else ["tiny_llama", write_large_model(repository)]
        log_path = Path(tmp) / "server.log"
        with server(repository, args.device, log_path, dtype=args.dtype, workers=args.workers) as (
            address,
            pid,
        ):
            for model in models:
                for concurrency in (1, 4, 16, 32):
                    requests = max(8, concurrency * (2 if args.quick else 4))
                    note(f"{model}: {concurrency} streams, {requests} requests")
                    run = asyncio.run(
                        measure(
                            address,
                            model,
                            concurrency=concurrency,
                            requests=requests,
                            max_new_tokens=args.max_new_tokens,
                            server_pid=pid,
                        )
                    )
                    note(f"  {run}")
                    runs.append(run)
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"generation-{stamp}.json"
    meta = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "device": args.device,
        "dtype": args.dtype,
        "workers": args.workers or int(os.environ.get("SLUICE_WORKERS") or default_workers()),
    }
    out.write_text(json.dumps({"meta": meta, "runs": [asdict(r) for r in runs]}, indent=2))
    print(report(runs))
    note(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
