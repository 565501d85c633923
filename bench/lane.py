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
                         [--method infer|live|echo|ingest] [--bytes 4194304]

``--method live`` times ServerLive instead: the same interceptors with no model behind
them, so what is left is the cost of the way in. ``--method echo`` sends ``--bytes`` each
way through a bare handler that parses its request, ``--method ingest`` sends them in
and gets an empty reply (lane, lane-socket and unix: ``lane-socket`` keeps large
requests off shared memory): what a large message costs on its way in and out.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

VARIANTS = ("lane", "unix", "tcp")
INFER = "/inference.GRPCInferenceService/ModelInfer"
LIVE = "/inference.GRPCInferenceService/ServerLive"
ECHO = "/bench.Lane/Echo"
INGEST = "/bench.Lane/Ingest"
LARGE = ("echo", "ingest")
"""Methods of the bare handler: --bytes in, the same back (echo) or nothing (ingest)."""
METHODS = {
    "infer": (INFER, "ModelInfer", "mlp"),
    "live": (LIVE, "ServerLive", ""),
    "echo": (ECHO, "Echo", ""),
    "ingest": (INGEST, "Ingest", ""),
}
"""``--method``: the call, and its ``sluice_requests_total`` labels (method, model)."""
LARGE_MESSAGE_BYTES = 256 * 1024 * 1024
METADATA = (("x-sluice-tenant", "bench"),)


def request_for(method: str, size: int) -> bytes:
    import numpy as np

    from sluice_api.inference import grpc_service_pb2 as pb

    if method == LIVE:
        return b""  # an empty ServerLiveRequest
    if method in (ECHO, INGEST):
        return pb.ModelInferRequest(
            model_name="echo", raw_input_contents=[b"\x01" * size]
        ).SerializeToString()

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
        server.methods, max_message_bytes=settings.max_message_bytes, metrics=metrics.lane
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
    await answer_stats(
        lambda: (
            metrics.registry.get_sample_value(
                "sluice_requests_total", {"method": short, "model": model, "code": "OK"}
            )
            or 0.0
        )
    )
    await lane.close()
    await unix.stop(0)
    await server.drain(0)


async def echo_engine(folder: Path) -> None:
    """A handler that parses its request (as the decoding hook does) and answers it back,
    with no interceptors: what large messages cost on their way in and out, alone."""
    import grpc

    from sluice.transport.server import MethodTable
    from sluice.workers.lane import LaneServer
    from sluice_api.inference import grpc_service_pb2 as pb

    answered = 0

    async def echo(request: bytes, context: Any) -> bytes:
        nonlocal answered
        pb.ModelInferRequest.FromString(request)
        answered += 1
        return bytes(request)

    async def ingest(request: bytes, context: Any) -> bytes:
        nonlocal answered
        pb.ModelInferRequest.FromString(request)
        answered += 1
        return b""

    options = [
        ("grpc.max_receive_message_length", LARGE_MESSAGE_BYTES),
        ("grpc.max_send_message_length", LARGE_MESSAGE_BYTES),
    ]
    unix = grpc.aio.server(options=options)
    methods = MethodTable(unix, ())
    methods.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Lane",
                {
                    "Echo": grpc.unary_unary_rpc_method_handler(echo),
                    "Ingest": grpc.unary_unary_rpc_method_handler(ingest),
                },
            ),
        )
    )
    lane = LaneServer(methods, max_message_bytes=LARGE_MESSAGE_BYTES)
    await lane.start(folder / "lane.sock")
    unix.add_insecure_port(f"unix:{folder / 'grpc.sock'}")
    await unix.start()
    print(json.dumps({"port": 0}), flush=True)
    await answer_stats(lambda: float(answered))
    await lane.close()
    await unix.stop(0)


async def answer_stats(answered: Callable[[], float]) -> None:
    """Answer each ``stats`` line on stdin with the loop thread's and the process's CPU
    time and the calls answered so far, until stdin closes."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip() == b"stats":
            stats = {
                "loop": time.thread_time(),
                "process": time.process_time(),
                "calls": answered(),
            }
            print(json.dumps(stats), flush=True)


# The clients.


async def client(
    variant: str, target: str, method: str, size: int, concurrency: int, seconds: float
) -> None:
    """Keep ``concurrency`` calls in flight for ``seconds``; print how many succeeded."""
    import grpc

    from sluice.workers.lane import LaneClient

    request = request_for(method, size)
    done = 0
    failed = 0
    if variant.startswith("lane"):
        # lane-socket: large requests through the socket, not shared memory
        lane = (
            LaneClient(target, shared_min_bytes=0)
            if variant == "lane-socket"
            else LaneClient(target)
        )

        async def call() -> bool:
            reply = await lane.unary(method, request, METADATA, 30)
            return reply.code is grpc.StatusCode.OK

    else:
        channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", LARGE_MESSAGE_BYTES),
                ("grpc.max_send_message_length", LARGE_MESSAGE_BYTES),
            ],
        )
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
        "lane-socket": str(folder / "lane.sock"),
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
    engine_proc: subprocess.Popen[str],
    variant: str,
    target: str,
    args: argparse.Namespace,
    *,
    seconds: float | None = None,
) -> dict[str, float]:
    seconds = args.seconds if seconds is None else seconds
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
                str(args.bytes),
                str(per_client),
                str(seconds),
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
        "calls_per_s": sum(r["done"] for r in results) / seconds,
        "failed": sum(r["failed"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds per path, not counted")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight, in all")
    parser.add_argument(
        "--method",
        choices=sorted(METHODS),
        default="infer",
        help="infer: ModelInfer on mlp; live: ServerLive (the handler chain without a model); "
        "echo: --bytes each way through a bare handler; ingest: --bytes in, an empty reply "
        "(echo and ingest: lane, lane-socket and unix)",
    )
    parser.add_argument("--bytes", type=int, default=4 * 1024 * 1024, help="echo's message size")
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
        variants = ("lane", "lane-socket", "unix") if args.method in LARGE else VARIANTS
        runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in variants}
        for variant in variants:  # warm-up, not counted: first calls, lazy imports, caches
            window(engine_proc, variant, where[variant], args, seconds=args.warmup)
        for round_ in range(args.rounds):
            turn = round_ % len(variants)
            for variant in variants[turn:] + variants[:turn]:
                result = window(engine_proc, variant, where[variant], args)
                runs[variant].append(result)
                print(f"round {round_} {variant}: {json.dumps(result)}", file=sys.stderr)
        report(runs, args)
    finally:
        if engine_proc.stdin is not None:
            engine_proc.stdin.close()
        engine_proc.wait(timeout=30)


def report(runs: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    what = {
        "infer": "ModelInfer (mlp, batch 1)",
        "live": "ServerLive",
        "echo": f"Echo of {args.bytes} bytes",
        "ingest": f"Ingest of {args.bytes} bytes (empty reply)",
    }[args.method]
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
        if sys.argv[3] in LARGE:
            asyncio.run(echo_engine(Path(sys.argv[2])))
        else:
            asyncio.run(engine(Path(sys.argv[2]), sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "client":
        variant, target, method, size, concurrency, seconds = sys.argv[2:8]
        asyncio.run(client(variant, target, method, int(size), int(concurrency), float(seconds)))
    else:
        main()
