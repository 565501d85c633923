"""``sluice serve --workers 1`` against ``--workers 2`` on the benchmark MLP, interleaved.

Both servers run at once on the same repository (batch-1 requests, dynamic batching up to
64 rows, no queue delay, as in bench/run.py); perf_analyzer measures each concurrency on
one, then the other, for ``--rounds`` rounds, so machine noise hits both alike. The table
gives the median of the rounds per server and concurrency, and the ratio 2 / 1.

    python bench/workers.py                 # 3 rounds at c = 1, 8, 32 (about 5 minutes)
    python bench/workers.py --quick         # 1 round, short windows (a smoke run)
    python bench/workers.py --event-loops asyncio uvloop   # one setting apart: the loop
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import run as core  # bench/run.py: model, repository, servers, perf_analyzer

from sluice.eventloop import EventLoopChoice


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.5 s windows, one round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; quick 1)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--workers", type=int, default=2, help="the second server's workers")
    parser.add_argument(
        "--event-loops",
        nargs=2,
        choices=get_args(EventLoopChoice),
        metavar=("FIRST", "SECOND"),
        help="compare two event loops (setting event_loop), both servers with --workers",
    )
    parser.add_argument(
        "--stability",
        type=int,
        default=None,
        metavar="PCT",
        help="perf_analyzer -s (default: the profile's; raise it on a busy machine)",
    )
    parser.add_argument("--perf-analyzer", default=None, metavar="PATH")
    parser.add_argument("--json", type=Path, default=None, help="also write the runs here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    profile = core.QUICK if args.quick else core.FULL
    rounds = args.rounds or (1 if args.quick else 3)
    pa = core.find_perf_analyzer(args.perf_analyzer)
    names = servers_compared(args.workers, args.event_loops)
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {n: {} for n in names}
    with tempfile.TemporaryDirectory(prefix="sluice-bench-workers-") as tmp:
        work = Path(tmp)
        model_file = work / "mlp.onnx"
        core.build_model(model_file)
        repository = core.make_repository(work / "repo", model_file, "onnx", max_batch_size=64)
        servers = {
            name: core.sluice_server(name, repository, work, env) for name, env in names.items()
        }
        try:
            for server in servers.values():
                server.start()
                server.wait_ready()
            for round_ in range(rounds):
                for c in args.concurrency:
                    for name, server in servers.items():  # A, B for each point
                        cpu0, stats0 = cpu_s(server.pid), core.model_statistics(server.address)
                        out = core.run_perf_analyzer(
                            pa,
                            server.address,
                            c,
                            profile,
                            work,
                            f"{name}-r{round_}",
                            stability_pct=args.stability,
                        )
                        out["cpu_us_per_inference"] = cpu_per_inference(
                            cpu0, cpu_s(server.pid), stats0, core.model_statistics(server.address)
                        )
                        runs[name].setdefault(c, []).append(out)
                        core.note(f"round {round_} {name} c={c}: {out.get('throughput')}")
        finally:
            for server in servers.values():
                server.stop()
    print(table(runs, args.concurrency, rounds))
    if args.json is not None:
        args.json.write_text(json.dumps(runs, indent=2, default=str))
    return 0


def servers_compared(workers: int, loops: Sequence[str] | None) -> dict[str, dict[str, str]]:
    """The two servers, by name: their settings (environment) differ in one thing only."""
    if loops:
        first, second = loops
        if first == second:
            raise SystemExit("--event-loops: name two different loops")
        return {loop: {"SLUICE_WORKERS": str(workers), "SLUICE_EVENT_LOOP": loop} for loop in loops}
    second = {"SLUICE_WORKERS": str(workers)}
    return {"workers-1": {"SLUICE_WORKERS": "1"}, f"workers-{workers}": second}


def cpu_s(pid: int | None) -> dict[str, float]:
    """CPU seconds of the server process (the engine) and of its children (transports)."""
    if pid is None:
        return {}
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return {
        "engine": core._proc_cpu_s(pid) or 0.0,
        "transports": sum(core._proc_cpu_s(int(k)) or 0.0 for k in kids),
    }


def cpu_per_inference(
    before: dict[str, float],
    after: dict[str, float],
    stats0: dict[str, int],
    stats1: dict[str, int],
) -> dict[str, float]:
    """Microseconds of CPU per inference over a perf_analyzer run (warm-up included), by
    process kind; a transport restarted in between would skew its share."""
    count = stats1["inference_count"] - stats0["inference_count"]
    if count <= 0 or not before:
        return {}
    return {kind: (after[kind] - before[kind]) / count * 1e6 for kind in before}


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _cpu(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Median CPU microseconds per inference, by process kind, over the runs."""
    kinds = {k for r in rows for k in r.get("cpu_us_per_inference", {})}
    return {
        k: statistics.median(
            r["cpu_us_per_inference"][k] for r in rows if k in r.get("cpu_us_per_inference", {})
        )
        for k in kinds
    }


def _processes(cpu: dict[str, float]) -> str:
    """``engine + transports`` microseconds (the engine alone for one process)."""
    engine, transports = cpu.get("engine", 0.0), cpu.get("transports", 0.0)
    return f"{engine:.0f} + {transports:.0f}" if transports else f"{engine:.0f}"


def table(runs: dict[str, dict[int, list[dict[str, Any]]]], cs: Sequence[int], rounds: int) -> str:
    base, other = list(runs)
    lines = [
        f"medians of {rounds} interleaved round(s); throughput in inferences/s, p50 in us",
        "",
        f"| c | {base} inf/s | {other} inf/s | ratio (each round) | {base} p50 | {other} p50 "
        f"| stable runs | CPU us/inference, engine + transports: {base} | {other} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cs:
        a, b = _median(runs[base][c], "throughput"), _median(runs[other][c], "throughput")
        pa, pb = _median(runs[base][c], "p50_us"), _median(runs[other][c], "p50_us")
        ratio = f"{b / a:.2f}" if a and b else "n/a"
        pairs = zip(runs[base][c], runs[other][c], strict=False)
        each = [
            f"{y['throughput'] / x['throughput']:.2f}"
            for x, y in pairs
            if x.get("throughput") and y.get("throughput")
        ]
        stable = "/".join(
            str(sum(r.get("throughput") is not None for r in runs[n][c])) for n in (base, other)
        )
        cpu_a, cpu_b = _cpu(runs[base][c]), _cpu(runs[other][c])
        lines.append(
            f"| {c} | {a or 0:.0f} | {b or 0:.0f} | {ratio} ({', '.join(each)}) "
            f"| {pa or 0:.0f} | {pb or 0:.0f} | {stable} | {_processes(cpu_a)} "
            f"| {_processes(cpu_b)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
