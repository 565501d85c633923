"""Urgency classes under overload: do interactive calls keep their latency while batch-class
calls at 4x the server's capacity absorb the shedding, and does the server stay busy?

A real ``sluice serve`` process (port 0) serves the example ``simple`` model with a fixed
service time (``faults: {mode: slow}``: each batch of one row takes ``--service-ms``, on
``--instances`` instances), so its capacity is known and the measurement does not depend on
how fast this machine's cores are. Three bounded phases (each ``--seconds`` long, every call
with a deadline):

1. **unloaded**: interactive calls (``priority`` parameter 1) alone, at ``--interactive-rate``
   calls/s (open loop);
2. **maximum**: closed-loop callers at the default level saturate the server; its goodput
   (calls answered per second) is the maximum;
3. **loaded**: the same interactive calls, beside batch-class calls (``x-sluice-priority:
   batch``) sent open loop at ``--overload`` (4) times the maximum.

``--same-level`` is the control: the same load with every call at the default level.

Reported: interactive p50 / p99 unloaded and loaded (goal: loaded p99 within 2x), the batch
calls' outcomes and shed share, and the loaded goodput next to the maximum (goal: >= 90%).

    python bench/priority.py [--seconds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from sluice.app import EXAMPLE_REPOSITORY
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc

LISTENING = re.compile(r"gRPC listening on [\d.]+:(\d+)")
READY = "ready: serving"
ONES = np.ones((1, 16), dtype=np.int32).tobytes()
CALL_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    started: float
    ended: float
    code: grpc.StatusCode

    @property
    def latency_s(self) -> float:
        return self.ended - self.started


def request(priority: int | None = None) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(
        model_name="simple",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name=name, datatype="INT32", shape=[1, 16])
            for name in ("INPUT0", "INPUT1")
        ],
        raw_input_contents=[ONES, ONES],
    )
    if priority is not None:
        message.parameters["priority"].uint64_param = priority
    return message


def repository(root: Path, *, service_ms: float, instances: int) -> Path:
    shutil.copytree(EXAMPLE_REPOSITORY / "simple", root / "simple")
    (root / "simple" / "config.yaml").write_text(
        "max_batch_size: 1\n"
        f"instance_count: {instances}\n"
        "dynamic_batching: {max_queue_delay_us: 0}\n"
        f"faults: {{mode: slow, delay_ms: {service_ms}}}\n"
    )
    return root


def settings(path: Path, *, batch_queue: int, max_inflight: int) -> Path:
    path.write_text(
        f"admission: {{max_inflight_requests: {max_inflight}}}\n"
        "probe: {interval_s: 0}\n"
        "priority:\n"
        f"  queue_policies: {{3: {{max_queue_size: {batch_queue}}}}}\n"
    )
    return path


@contextlib.asynccontextmanager
async def server(repo: Path, config: Path) -> AsyncIterator[str]:
    """A ``sluice serve`` process on a free port; its address."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "sluice", "serve", "--grpc-port", "0", "--metrics-port", "0"),
        *("--model-repository", str(repo), "--config", str(config)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={"SLUICE_WORKERS": "1", **os.environ, "SLUICE_LOG_FORMAT": "text"},
    )
    assert proc.stderr is not None
    drain: asyncio.Task[None] | None = None
    try:
        port = line = ""
        async with asyncio.timeout(120):  # listening comes first, then the model loads
            while not port or READY not in line:
                line = (await proc.stderr.readline()).decode(errors="replace")
                if not line:
                    raise RuntimeError(f"the server exited ({await proc.wait()})")
                if found := LISTENING.search(line):
                    port = found.group(1)
        drain = asyncio.create_task(_discard(proc.stderr))
        yield f"127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if drain is not None:
            drain.cancel()


async def _discard(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def call(
    stub: pb_grpc.GRPCInferenceServiceStub,
    kind: str,
    message: pb.ModelInferRequest,
    metadata: tuple[tuple[str, str], ...] = (),
) -> Outcome:
    started = time.perf_counter()
    try:
        await stub.ModelInfer(message, timeout=CALL_TIMEOUT_S, metadata=metadata)
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
    return Outcome(kind, started, time.perf_counter(), code)


async def open_loop(
    stub: pb_grpc.GRPCInferenceServiceStub,
    kind: str,
    rate: float,
    seconds: float,
    message: pb.ModelInferRequest,
    metadata: tuple[tuple[str, str], ...] = (),
) -> list[Outcome]:
    """``rate`` calls per second for ``seconds`` (at most rate * seconds calls), whatever
    the answers do."""
    count = int(rate * seconds)
    start = time.perf_counter()
    tasks = []
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(call(stub, kind, message, metadata)))
    return list(await asyncio.gather(*tasks))


async def closed_loop(
    stub: pb_grpc.GRPCInferenceServiceStub, callers: int, seconds: float
) -> list[Outcome]:
    end = time.perf_counter() + seconds
    message = request()

    async def caller() -> list[Outcome]:
        done = []
        while time.perf_counter() < end:
            done.append(await call(stub, "max", message))
        return done

    results = await asyncio.gather(*(caller() for _ in range(callers)))
    return [outcome for outcomes in results for outcome in outcomes]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def goodput(outcomes: list[Outcome], start: float, seconds: float) -> float:
    """Calls answered OK per second inside the window."""
    ok = [o for o in outcomes if o.code == grpc.StatusCode.OK and o.ended <= start + seconds]
    return len(ok) / seconds


def latencies_ms(outcomes: list[Outcome], kind: str) -> dict[str, float]:
    """Latencies of the calls of ``kind`` that were answered (the shed ones are counted)."""
    ok = [o for o in outcomes if o.kind == kind and o.code == grpc.StatusCode.OK]
    values = [o.latency_s * 1000 for o in ok]
    failed = sorted({o.code.name for o in outcomes if o.kind == kind} - {"OK"})
    return {
        "calls": len([o for o in outcomes if o.kind == kind]),
        "ok": len(ok),
        "failed_codes": failed,
        "p50_ms": percentile(values, 0.5),
        "p99_ms": percentile(values, 0.99),
    }


async def measure(args: argparse.Namespace, address: str) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await asyncio.gather(*(call(stub, "warm", request()) for _ in range(args.instances)))
        interactive = request(priority=None if args.same_level else 1)
        batch_class = () if args.same_level else (("x-sluice-priority", "batch"),)
        unloaded = await open_loop(
            stub, "interactive", args.interactive_rate, args.seconds, interactive
        )
        started = time.perf_counter()
        saturated = await closed_loop(stub, args.instances * 4, args.seconds)
        maximum = goodput(saturated, started, args.seconds)
        started = time.perf_counter()
        loaded_parts = await asyncio.gather(
            open_loop(stub, "interactive", args.interactive_rate, args.seconds, interactive),
            open_loop(
                stub,
                "batch",
                args.overload * maximum,
                args.seconds,
                request(),
                batch_class,
            ),
        )
    loaded = [outcome for part in loaded_parts for outcome in part]
    batch = [o for o in loaded if o.kind == "batch"]
    codes: dict[str, int] = {}
    for outcome in batch:
        codes[outcome.code.name] = codes.get(outcome.code.name, 0) + 1
    before = latencies_ms(unloaded, "interactive")
    after = latencies_ms(loaded, "interactive")
    return {
        "same_level": args.same_level,
        "service_ms": args.service_ms,
        "instances": args.instances,
        "capacity_calls_per_s": args.instances * 1000 / args.service_ms,
        "seconds": args.seconds,
        "interactive_rate": args.interactive_rate,
        "batch_rate": args.overload * maximum,
        "interactive_unloaded": before,
        "interactive_loaded": after,
        "p99_ratio": after["p99_ms"] / before["p99_ms"] if before["p99_ms"] else None,
        "batch_codes": codes,
        "batch_shed_share": codes.get("UNAVAILABLE", 0) / len(batch) if batch else 0.0,
        "max_goodput": maximum,
        "loaded_goodput": goodput(loaded, started, args.seconds),
        "loadavg": os.getloadavg(),
    }


def report(result: dict[str, Any]) -> str:
    before, after = result["interactive_unloaded"], result["interactive_loaded"]
    ratio = result["loaded_goodput"] / result["max_goodput"] if result["max_goodput"] else 0
    lines = [
        f"service {result['service_ms']} ms x {result['instances']} instances "
        f"(capacity {result['capacity_calls_per_s']:.0f} calls/s), {result['seconds']} s phases"
        + (", control: every call at the default level" if result["same_level"] else ""),
        "| interactive | calls | answered | p50 ms | p99 ms (answered calls) |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {row['calls']} | {row['ok']} {row['failed_codes'] or ''} | "
            f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} |"
            for name, row in (("unloaded", before), ("loaded", after))
        ),
        f"interactive p99 loaded / unloaded: {result['p99_ratio']:.2f} (goal <= 2)",
        f"batch calls at {result['batch_rate']:.0f}/s: {result['batch_codes']}, "
        f"shed share {result['batch_shed_share']:.0%}",
        f"goodput loaded {result['loaded_goodput']:.1f}/s vs maximum "
        f"{result['max_goodput']:.1f}/s: {ratio:.0%} (goal >= 90%)",
        f"load average during the run: {result['loadavg']}",
    ]
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    p.add_argument("--service-ms", type=float, default=200.0, help="one batch's service time")
    p.add_argument("--instances", type=int, default=8, help="batches run at once")
    p.add_argument("--interactive-rate", type=float, default=10.0, help="interactive calls/s")
    p.add_argument("--overload", type=float, default=4.0, help="batch load / maximum goodput")
    p.add_argument("--batch-queue", type=int, default=8, help="batch-class queue bound")
    p.add_argument("--max-inflight", type=int, default=64, help="admission request limit")
    p.add_argument(
        "--same-level",
        action="store_true",
        help="control run: every call at the default level (no urgency classes)",
    )
    p.add_argument("--json", type=Path, help="also write the result here")
    return p.parse_args()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repo = repository(root / "models", service_ms=args.service_ms, instances=args.instances)
        config = settings(
            root / "sluice.yaml", batch_queue=args.batch_queue, max_inflight=args.max_inflight
        )
        async with server(repo, config) as address:
            return await measure(args, address)


def main() -> int:
    args = parse()
    result = asyncio.run(run(args))
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
