#!/usr/bin/env python3
"""Sluice from another checkout against this one, on the core benchmark, interleaved.

Both serve the benchmark MLP with dynamic batching (row (c) of ``bench/run.py``) and are
measured with perf_analyzer at the given concurrencies, in alternating rounds (before,
after, before, after, ...), so that drift on a shared machine hits both alike. Prints
the median throughput and p50 of each and their ratio (after / before).

    git archive REV server clients/python | tar -x -C /tmp/before
    python bench/compare_trees.py --tree /tmp/before [--concurrency 1 8 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import run as core  # bench/run.py: model, repository, servers, perf_analyzer

VARIANTS = ("before", "after")


def server_for(
    variant: str, repo: Path, work: Path, tree: Path, workers: int = 1
) -> core.ServerProcess:
    server = core.sluice_server(variant, repo, work, {"SLUICE_WORKERS": str(workers)})
    if variant == "before":
        server.env["PYTHONPATH"] = os.pathsep.join(
            [str(tree / "server"), str(tree / "clients" / "python")]
        )
    return server


def summary(rows: dict[str, list[dict[str, Any]]], c: int) -> dict[str, Any]:
    out: dict[str, Any] = {"concurrency": c}
    for variant in VARIANTS:
        ok = [r for r in rows[variant] if r["concurrency"] == c and "error" not in r]
        if ok:
            out[variant] = {
                "throughput": statistics.median(r["throughput"] for r in ok),
                "p50_us": statistics.median(r["p50_us"] for r in ok),
                "runs": [round(r["throughput"], 1) for r in ok],
            }
    if all(v in out for v in VARIANTS):
        out["throughput_ratio"] = round(out["after"]["throughput"] / out["before"]["throughput"], 3)
        out["p50_ratio"] = round(out["after"]["p50_us"] / out["before"]["p50_us"], 3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, required=True, help="the 'before' checkout")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per variant")
    p.add_argument("--quick", action="store_true", help="short perf_analyzer windows")
    p.add_argument(
        "--workers", type=int, default=1, help="SLUICE_WORKERS of both (1: row (c) of run.py)"
    )
    p.add_argument("--perf-analyzer", help="perf_analyzer binary")
    p.add_argument("--out", type=Path, help="write the JSON result here")
    args = p.parse_args()
    # Wide stability bounds: on a shared machine perf_analyzer rarely finds 3 windows within
    # 15% of each other, and a row it gives up on has no number at all.
    profile = core.QUICK if args.quick else core.Profile("compare", 3000, 40, 8, 200, 0.0, 0)
    signal.signal(signal.SIGTERM, core._raise_on_sigterm)  # stop the servers on the way out
    pa = core.find_perf_analyzer(args.perf_analyzer)
    work = Path(tempfile.mkdtemp(prefix="sluice-compare-"))
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    try:
        model = work / "mlp_bench.onnx"
        core.build_model(model)
        repo = core.make_repository(work / "repo", model, "onnx", max_batch_size=64)
        for round_no in range(args.rounds):
            for variant in VARIANTS if round_no % 2 == 0 else VARIANTS[::-1]:
                core.note(f"round {round_no + 1}: {variant}")
                server = server_for(variant, repo, work, args.tree.resolve(), args.workers)
                with core.running(server):
                    rows[variant] += core.measure(
                        variant, server, pa, profile, args.concurrency, work, sluice=True
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "environment": core.environment(),
        "tree": str(args.tree),
        "summary": [summary(rows, c) for c in args.concurrency],
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
