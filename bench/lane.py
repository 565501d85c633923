"""What one ModelInfer call costs the engine, by the way it reaches it: the engine lane
(``sluice.workers.lane``), grpc over a Unix socket (the first forwarder of ``--workers``),
or grpc over TCP (no workers: clients call the engine's own port).

One engine process serves all three at once, every one through the same handler chain
(the interceptors, then the servicer): its grpc port (TCP), a second grpc server on a Unix
socket serving the chain's handlers, and a ``LaneServer``. Client processes keep
``--concurrency`` batch-1 ModelInfer calls on the example ``mlp`` in flight through one
variant at a time, in interleaved rounds (lane, unix, tcp, lane, ...), and the engine's
CPU time over each window is divided by the calls it answered:

* ``loop_us``: CPU of the engine's event-loop thread per call (``time.thread_time``);
* ``process_us``: CPU of the whole engine process per call (grpc's own threads and the
  model's compute included);
* ``calls/s``: what the clients got (noisy on a shared machine; the CPU columns are not).

    python bench/lane.py [--seconds 5] [--rounds 3] [--clients 2] [--concurrency 32]
                         [--method infer|live]

``--method live`` times ServerLive instead: the same interceptors with no model behind
them, so what is left is the cost of the way in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("lane", "unix", "tcp")
INFER = "/inference.GRPCInferenceService/ModelInfer"
LIVE = "/inference.GRPCInferenceService/ServerLive"
METHODS = {"infer": (INFER, "ModelInfer", "mlp"), "live": (LIVE, "ServerLive", "")}
"""``--method``: the call, and its ``sluice_requests_total`` labels (method, model)."""
METADATA = (("x-sluice-tenant", "bench"),)


def request_for(method: str) -> bytes:
    if method == LIVE:
        return b""  # an empty ServerLiveRequest
    import numpy as np

    from sluice_api.inference import grpc_service_pb2 as pb

    x = np.random.default_rng(0).standard_normal((1, 64), dtype=np.float32)
    return pb.ModelInferRequest(
        model_name="mlp",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 64])
        ],
        raw_input_contents=[x.tobytes()],
    ).SerializeToString()


# The engine.


async def engine(folder: Path, method: str) -> None:
    """Serve the example models three ways; answer ``stats`` lines on stdin with CPU times."""
    import grpc

    from sluice.app import EXAMPLE_REPOSITORY
    from sluice.metrics import Metrics
    from sluice.registry import ModelRegistry
    from sluice.settings import Settings
    from sluice.transport.server import create_server
    from sluice.workers.lane import LaneServer

    settings = Settings.model_validate(
        {"grpc_port": 0, "metrics_port": None, "model_repository": EXAMPLE_REPOSITORY}
    )
    metrics = Metrics()
    registry = ModelRegistry(
        settings, repository=EXAMPLE_REPOSITORY, metrics=metrics, clock=time.monotonic
    )
    server = await create_server(settings, registry, metrics=metrics, clock=time.monotonic)
    await registry.load_all()
    await server.mark_started()
    assert server.methods is not None
    lane = LaneServer(
        server.methods, max_message_bytes=settings.max_message_bytes, registry=metrics.registry
    )
    await lane.start(folder / "lane.sock")
    unix = grpc.aio.server()
    path, short, model = METHODS[method]
    handler = await server.methods.handler(path)
    assert handler is not None
    unix.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {short: handler}),)
    )
    unix.add_insecure_port(f"unix:{folder / 'grpc.sock'}")
    await unix.start()
    print(json.dumps({"port": server.port}), flush=True)
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip() == b"stats":
            answered = metrics.registry.get_sample_value(
                "sluice_requests_total", {"method": short, "model": model, "code": "OK"}
            )
            answered = answered or 0.0
            stats = {"loop": time.thread_time(), "process": time.process_time(), "calls": answered}
            print(json.dumps(stats), flush=True)
    await lane.close()
    await unix.stop(0)
    await server.drain(0)


# The clients.


async def client(variant: str, target: str, method: str, concurrency: int, seconds: float) -> None:
    """Keep ``concurrency`` calls in flight for ``seconds``; print how many succeeded."""
    import grpc

    from sluice.workers.lane import LaneClient

    request = request_for(method)
    done = 0
    failed = 0
    if variant == "lane":
        lane = LaneClient(target)

        async def call() -> bool:
            reply = await lane.unary(method, request, METADATA, 30)
            return reply.code is grpc.StatusCode.OK

    else:
        channel = grpc.aio.insecure_channel(target)
        stub = channel.unary_unary(method)

        async def call() -> bool:
            try:
                await stub(request, metadata=METADATA, timeout=30)
            except grpc.aio.AioRpcError:
                return False
            return True

    await call()  # connected before the window opens
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done, failed
        while time.monotonic() < stop_at:
            if await call():
                done += 1
            else:
                failed += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    print(json.dumps({"done": done, "failed": failed}), flush=True)


# The driver.


def targets(folder: Path, port: int) -> dict[str, str]:
    return {
        "lane": str(folder / "lane.sock"),
        "unix": f"unix:{folder / 'grpc.sock'}",
        "tcp": f"127.0.0.1:{port}",
    }


def stats(proc: subprocess.Popen[str]) -> dict[str, float]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("stats\n")
    proc.stdin.flush()
    answer: dict[str, float] = json.loads(proc.stdout.readline())
    return answer


def window(
    engine_proc: subprocess.Popen[str], variant: str, target: str, args: argparse.Namespace
) -> dict[str, float]:
    per_client = max(args.concurrency // args.clients, 1)
    before = stats(engine_proc)
    clients = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "client",
                variant,
                target,
                METHODS[args.method][0],
                str(per_client),
                str(args.seconds),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(args.clients)
    ]
    results = [json.loads(proc.communicate()[0]) for proc in clients]
    after = stats(engine_proc)
    calls = after["calls"] - before["calls"]
    return {
        "loop_us": (after["loop"] - before["loop"]) / calls * 1e6,
        "process_us": (after["process"] - before["process"]) / calls * 1e6,
        "calls_per_s": sum(r["done"] for r in results) / args.seconds,
        "failed": sum(r["failed"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight, in all")
    parser.add_argument(
        "--method",
        choices=sorted(METHODS),
        default="infer",
        help="infer: ModelInfer on mlp; live: ServerLive (the handler chain without a model)",
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="lane-bench-"))
    engine_proc = subprocess.Popen(
        [sys.executable, __file__, "engine", str(folder), args.method],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert engine_proc.stdout is not None
        port = json.loads(engine_proc.stdout.readline())["port"]
        where = targets(folder, port)
        runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
        for round_ in range(args.rounds):
            for variant in VARIANTS[round_ % 3 :] + VARIANTS[: round_ % 3]:
                result = window(engine_proc, variant, where[variant], args)
                runs[variant].append(result)
                print(f"round {round_} {variant}: {json.dumps(result)}", file=sys.stderr)
        report(runs, args)
    finally:
        if engine_proc.stdin is not None:
            engine_proc.stdin.close()
        engine_proc.wait(timeout=30)


def report(runs: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    what = "ModelInfer (mlp, batch 1)" if args.method == "infer" else "ServerLive"
    print(
        f"{what}, c={args.concurrency} over {args.clients} client processes, "
        f"{args.rounds} interleaved rounds of {args.seconds:g}s; medians"
    )
    print("| path | engine loop CPU us/call | engine process CPU us/call | calls/s |")
    print("|---|---:|---:|---:|")
    lane_loop = statistics.median(r["loop_us"] for r in runs["lane"])
    for variant, results in runs.items():
        loop = statistics.median(r["loop_us"] for r in results)
        process = statistics.median(r["process_us"] for r in results)
        rate = statistics.median(r["calls_per_s"] for r in results)
        failed = sum(r["failed"] for r in results)
        note = f" ({failed:g} failed)" if failed else ""
        print(
            f"| {variant} | {loop:.0f} ({loop / lane_loop:.2f}x lane) | {process:.0f} | "
            f"{rate:.0f}{note} |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "engine":
        asyncio.run(engine(Path(sys.argv[2]), sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "client":
        variant, target, method, concurrency, seconds = sys.argv[2:7]
        asyncio.run(client(variant, target, method, int(concurrency), float(seconds)))
    else:
        main()
