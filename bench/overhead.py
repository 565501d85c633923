"""What observability costs on the core benchmark: tracing (on, every call sampled) and
Prometheus metrics, next to the same server with tracing off and the code before them.

Servers, all on the benchmark MLP with dynamic batching (row (c) of ``bench/run.py``),
measured with perf_analyzer at the given concurrencies, in interleaved rounds so that drift
on a shared machine hits every variant alike:

* ``base``: the committed tree (``git archive HEAD``), when it has no ``sluice.tracing``;
* ``off``: this tree, tracing off (the default);
* ``on``: this tree, tracing on, ``OTEL_TRACES_SAMPLER=always_on``, exporting over OTLP to
  a collector in this process that receives and counts the spans.

Metrics cannot be switched off (every server has them), so their cost is timed in-process:
the metric updates one ModelInfer call makes, per call, next to the server CPU time one
call costs in the ``off`` run.

    python bench/overhead.py [--quick] [--concurrency 1 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import timeit
from concurrent import futures
from pathlib import Path
from typing import Any

import run as core  # bench/run.py: model, repository, servers, perf_analyzer

VARIANTS = ("base", "off", "on")


class SpanSink:
    """An OTLP trace receiver that counts what it gets (a stand-in for a collector)."""

    def __init__(self) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import (
            trace_service_pb2,
            trace_service_pb2_grpc,
        )

        self.spans = 0
        sink = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                sink.spans += sum(
                    len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans
                )
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


def committed_tree(work: Path) -> Path | None:
    """The committed server code, or None when it already has tracing (nothing to compare)."""
    target = work / "base"
    target.mkdir()
    archive = subprocess.run(
        ["git", "archive", "HEAD", "server", "clients/python"],
        cwd=core.REPO_ROOT,
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    if (target / "server" / "sluice" / "tracing.py").exists():
        return None
    return target


def server_for(variant: str, repo: Path, work: Path, base: Path | None, sink_port: int) -> Any:
    env: dict[str, str] = {"SLUICE_WORKERS": "1"}  # row (c) of bench/run.py: one process
    if variant == "on":
        env.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{sink_port}",
            OTEL_EXPORTER_OTLP_INSECURE="true",
            OTEL_TRACES_SAMPLER="always_on",
        )
    server = core.sluice_server(variant, repo, work, env)
    if variant == "base" and base is not None:
        server.env["PYTHONPATH"] = os.pathsep.join(
            [str(base / "server"), str(base / "clients" / "python")]
        )
    return server


def metrics_cost_us() -> dict[str, float]:
    """Microseconds of metric updates per ModelInfer call, timed in-process."""
    from sluice.metrics import Metrics
    from sluice.stats import BatchRun, ModelStats

    metrics = Metrics()
    batch = metrics.batch_observer("mlp", "1", stats=ModelStats())
    run = BatchRun(
        rows=(1,) * 8, queue_s=(0.0001,) * 8, input_s=0.0, infer_s=0.001, output_s=0.0, size=8
    )
    requests = metrics.requests
    seconds = metrics.request_seconds

    def one_call() -> None:
        requests.labels("ModelInfer", "mlp", "OK").inc()
        seconds.labels("ModelInfer", "mlp").observe(0.001)
        metrics.inflight.set(3)
        batch.queue_depth(1)
        batch.inflight(1)
        batch.queue_depth(0)
        batch.inflight(-1)
        metrics.inflight.set(2)

    def one_batch() -> None:
        batch.batch_done(run)

    n = 20000
    per_call = min(timeit.repeat(one_call, number=n, repeat=5)) / n * 1e6
    per_batch = min(timeit.repeat(one_batch, number=n, repeat=5)) / n * 1e6
    return {"per_call_us": per_call, "per_batch_of_8_us": per_batch}


def summarize(rows: dict[str, list[dict[str, Any]]], c: int) -> dict[str, Any]:
    def values(variant: str, key: str) -> list[float]:
        return [
            r[key]
            for r in rows.get(variant, [])
            if r["concurrency"] == c and "error" not in r and r.get(key) is not None
        ]

    out: dict[str, Any] = {"concurrency": c}
    for variant in VARIANTS:
        tput = values(variant, "throughput")
        if tput:
            out[variant] = {
                "throughput": statistics.median(tput),
                "p50_us": statistics.median(values(variant, "p50_us")),
                "server_cores": statistics.median(values(variant, "server_cores") or [0.0]),
                "runs": tput,
            }
    for variant, against in (("on", "off"), ("off", "base")):
        if variant in out and against in out:
            loss = 1 - out[variant]["throughput"] / out[against]["throughput"]
            out[f"{variant}_vs_{against}_loss_pct"] = round(100 * loss, 1)
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short perf_analyzer windows")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per variant")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--perf-analyzer", help="perf_analyzer binary")
    p.add_argument("--out", type=Path, help="write the JSON result here")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    profile = core.QUICK if args.quick else core.Profile("overhead", 2000, 15, 6, 200, 0.0, 0)
    pa = core.find_perf_analyzer(args.perf_analyzer)
    work = Path(tempfile.mkdtemp(prefix="sluice-overhead-"))
    sink = SpanSink()
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    try:
        model = work / "mlp_bench.onnx"
        core.build_model(model)
        repo = core.make_repository(work / "repo", model, "onnx", max_batch_size=64)
        base = committed_tree(work) if "base" in args.variants else None
        variants = [v for v in args.variants if v != "base" or base is not None]
        for round_no in range(args.rounds):
            for variant in variants:
                core.note(f"round {round_no + 1}: {variant}")
                server = server_for(variant, repo, work, base, sink.port)
                with core.running(server):
                    rows[variant] += core.measure(
                        variant, server, pa, profile, args.concurrency, work, sluice=True
                    )
        result = {
            "environment": core.environment(),
            "profile": profile.name,
            "spans_received": sink.spans,
            "metrics": metrics_cost_us(),
            "summary": [summarize(rows, c) for c in args.concurrency],
            "rows": rows,
        }
    finally:
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps({k: result[k] for k in ("spans_received", "metrics", "summary")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
