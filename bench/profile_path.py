#!/usr/bin/env python3
"""Where the event loop's time goes, per ModelInfer request, stage by stage.

Serves the benchmark MLP (dynamic batching, as row (c) of ``bench/run.py``) and the no-math
server (``bench/null_server.py``), loads each with perf_analyzer (batch-1 requests) at the
given concurrencies, and samples the server's main thread (the asyncio loop) with py-spy
while the load runs. Every sample is put in one stage, by the deepest frame of Sluice's own
code on its stack (frames of shared helpers such as ``metrics`` or ``policy`` count for the
stage that called them):

* ``grpc``: no Sluice frame (grpc.aio's own callbacks, asyncio; all the no-math server does);
* ``interceptors``: the hooks of ``transport/interceptors`` and the wrapper around them;
* ``decode/encode``: parsing the request and serializing the reply (grpc does both in its
  own code for the no-math server, so there they count as ``grpc``);
* ``conversion``: the servicer, protobuf <-> tensors (``transport/convert``, ``tensors``);
* ``routing``: the data plane, router, answers, candidates, guardrail, caches;
* ``batcher``: ``batching/``;
* ``hand-off``: handing a batch to the executor thread and taking its results back.

Microseconds per request: the loop thread's CPU time while py-spy sampled (from
``/proc/<pid>/task/<pid>/stat``) divided by the requests served meanwhile (Sluice's
ModelStatistics over the same seconds; for the no-math server, perf_analyzer's throughput x
the sampled seconds), spread over the stages by their share of the samples
(py-spy ``--gil``: the loop thread while it holds the GIL, so waiting in ``select`` or for
the GIL is left out). ``share`` is Sluice's loop time minus the no-math server's at the
same concurrency.

    python bench/profile_path.py [--concurrency 1 32] [--seconds 8] [--rounds N] [--out F]

``--servers null tree sluice --tree DIR`` adds Sluice served from another checkout's
``server`` and ``clients/python`` (e.g. ``git archive REV server clients/python | tar -x -C
DIR`` of an earlier commit), to compare before and after in one run; ``--rounds N``
interleaves the servers N times and keeps each one's least loop time per request.
Needs py-spy (``pip install py-spy``) and permission to read the server's memory (ptrace).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import run as core  # bench/run.py: model, repository, servers, perf_analyzer

STAGES = (
    "grpc",
    "interceptors",
    "decode/encode",
    "conversion",
    "routing",
    "batcher",
    "hand-off",
    "other",
)

# (path fragment under sluice/, stage), first match wins; None: a shared helper, whose
# caller decides the stage.
STAGE_OF_PATH: tuple[tuple[str, str | None], ...] = (
    ("transport/interceptors/decode.py", "decode/encode"),
    ("transport/interceptors/", "interceptors"),
    ("transport/limits.py", "decode/encode"),
    ("transport/servicers/", "conversion"),
    ("transport/convert.py", "conversion"),
    ("transport/status.py", "interceptors"),
    ("tensors.py", "conversion"),
    ("dataplane/", "routing"),
    ("routing/", "routing"),
    ("caching/", "routing"),
    ("shadow.py", "routing"),
    ("batching/", "batcher"),
    ("executors/", "hand-off"),
    ("threads.py", "hand-off"),
    ("", None),
)
DECODE_FUNCTIONS = ("decode_message", "decode_off_loop", "encode_off_loop", "CallInfo.decode")
IDLE_LEAVES = ("EpollSelector.select (", "PollSelector.select (", "SelectSelector.select (")
CALLBACK = "Handle._run ("
"""The frame that runs one event-loop callback on asyncio's own loop: frames above it are
the loop itself (and the server's start-up code that called ``asyncio.run``)."""
LOOP_ENTRIES = (("Runner.run", "/asyncio/runners.py"), ("run", "/sluice/app.py"))
"""The frames that call ``run_until_complete`` (``asyncio.Runner``: a transport; ``app.run``:
the server). uvloop runs its callbacks from C, with no Python frame between: on that loop a
callback's frames are those below the last of these."""


def frame_parts(frame: str) -> tuple[str, str]:
    """``func (path:line)`` -> (func, path)."""
    func, _, where = frame.partition(" (")
    return func, where.rsplit(":", 1)[0]


def _enters_loop(func: str, path: str) -> bool:
    return any(func == name and path.endswith(end) for name, end in LOOP_ENTRIES)


def callback_frames(stack: list[str]) -> list[str]:
    """The frames of the event-loop callback a sample is in (none: the loop itself)."""
    starts = [i for i, frame in enumerate(stack) if frame.startswith(CALLBACK)]
    if not starts:  # uvloop
        starts = [i for i, frame in enumerate(stack) if _enters_loop(*frame_parts(frame))]
    return stack[starts[-1] + 1 :] if starts else []


def stage_of(stack: list[str]) -> str:
    """The stage of one busy sample of the loop thread (frames root first)."""
    stack = callback_frames(stack)
    if not stack:
        return "grpc"  # the loop's own bookkeeping between callbacks
    for frame in reversed(stack):
        func, path = frame_parts(frame)
        marker = path.rfind("/sluice/")
        if marker < 0:
            continue
        inside = path[marker + len("/sluice/") :]
        if inside.startswith("transport/interceptors/_wrap.py") and func in DECODE_FUNCTIONS:
            return "decode/encode"
        for fragment, stage in STAGE_OF_PATH:
            if fragment in inside:
                if stage is not None:
                    return stage
                break
    return "grpc" if not any("/sluice/" in f for f in stack) else "other"


def read_samples(raw: Path, pid: int) -> dict[str, Any]:
    """Busy samples of the main thread by stage and by leaf function, and all its samples."""
    stages: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        frames = stack_text.split(";")
        if not frames or not frames[0].startswith(f"thread ({pid})"):
            continue  # another thread: gRPC's poller, the executor, onnxruntime's pool
        count = int(count_text)
        stack = frames[1:]
        total += count
        if not stack or stack[-1].startswith(IDLE_LEAVES):
            idle += count
            continue
        stages[stage_of(stack)] += count
        func, path = frame_parts(stack[-1])
        leaves[f"{func} ({Path(path).name})"] += count
        for name in {
            f"{func} ({Path(path).name})"
            for func, path in map(frame_parts, callback_frames(stack))
            if "/sluice/" in path
        }:
            inclusive[name] += count
    return {
        "total": total,
        "idle": idle,
        "stages": stages,
        "leaves": leaves,
        "inclusive": inclusive,
    }


def thread_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of the process's main thread (the event loop)."""
    seconds = core.stat_cpu_s(Path(f"/proc/{pid}/task/{pid}/stat"))
    if seconds is None:
        raise RuntimeError(f"process {pid} is gone")
    return seconds


def _stat(path: Path) -> tuple[str, int, float] | None:
    """(comm, ppid, CPU seconds) of a /proc stat file, or None once it is gone."""
    try:
        text = path.read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_group(comm: str) -> str:
    """Threads named alike (``sluice-worker_3``, ``sluice-worker_7``) as one group."""
    return comm.rstrip("0123456789").rstrip("_-") or comm


def cpu_by_thread(pid: int) -> dict[str, float]:
    """CPU seconds so far of the server's threads, by process and thread group: the
    server's own (``loop`` is its main thread), its children's (the transport processes,
    all together) and perf_analyzer's, for the CPU each request costs everywhere."""
    out: dict[str, float] = collections.defaultdict(float)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        head = _stat(proc / "stat")
        if head is None:
            continue
        comm, ppid, _ = head
        if int(proc.name) == pid:
            who = "server"
        elif ppid == pid:
            who = "transports"
        elif _is_perf_analyzer(proc):
            who = "perf_analyzer"
        else:
            continue
        for task in (proc / "task").iterdir():
            stat = _stat(task / "stat")
            if stat is not None:
                out[f"{who}: {_thread_label(task.name == proc.name, stat[0], comm)}"] += stat[2]
    return dict(out)


def _is_perf_analyzer(proc: Path) -> bool:
    """perf_analyzer, run directly or through the private loader that
    scripts/get_perf_analyzer.sh sets up (its process is named after the loader)."""
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(arg.decode(errors="replace")).name.startswith("perf_analyzer") for arg in argv)


def _thread_label(main: bool, comm: str, process_comm: str) -> str:
    if main:
        return "loop"
    if comm == process_comm:  # a Python thread (3.11 names none): executors, to_thread
        return "python threads"
    return _thread_group(comm)  # named natively: onnxruntime's pool, grpc's event engine


def profile_one(
    server: core.ServerProcess,
    pa: str,
    c: int,
    seconds: float,
    rate: int,
    work: Path,
    tag: str,
    *,
    native: bool = False,
) -> dict[str, Any]:
    # perf_analyzer: three windows, any spread accepted (so it stops after them); py-spy
    # samples the middle of that load.
    window_ms = int(1000 * (seconds + 3) / 3)
    profile = core.Profile("profile", window_ms, 1000, 3, 100, 0.0, 0)
    raw = work / f"{tag}-c{c}.raw"
    result: dict[str, Any] = {}

    def load() -> None:
        result.update(core.run_perf_analyzer(pa, server.address, c, profile, work, f"{tag}"))

    import threading

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(2.0)
    assert server.pid is not None
    counted = server.name != "null"  # Sluice counts its requests (ModelStatistics)
    stats_before = core.model_statistics(server.address) if counted else None
    cpu_before, wall_before = thread_cpu_s(server.pid), time.monotonic()
    threads_before = cpu_by_thread(server.pid)
    if rate == 0:  # CPU counters only: py-spy stops every thread at each sample (ptrace)
        time.sleep(seconds)
        raw.write_text("")
    spy = subprocess.run(
        ["true"]
        if rate == 0
        else [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "-p",
            str(server.pid),
            "-d",
            str(int(seconds)),
            "-r",
            str(rate),
            "-f",
            "raw",
            "-o",
            str(raw),
            "--threads",
            "--gil",
            "--full-filenames",
            *(["--native"] if native else []),
        ],
        capture_output=True,
        text=True,
    )
    cpu_s, wall_s = thread_cpu_s(server.pid) - cpu_before, time.monotonic() - wall_before
    threads_after = cpu_by_thread(server.pid)
    stats = core.stats_delta(stats_before, core.model_statistics(server.address)) if counted else {}
    loader.join()
    if spy.returncode != 0 or not raw.is_file():
        raise RuntimeError(f"py-spy failed: {spy.stderr[-800:]}")
    if stats:  # the requests served while py-spy sampled, exactly
        throughput = stats["inference_count"] / wall_s
    elif "error" in result:  # perf_analyzer found no stable windows: nothing to count with
        raise RuntimeError(f"perf_analyzer failed: {result['error'][-800:]}")
    else:
        throughput = result["throughput"]
    samples = read_samples(raw, server.pid)
    busy = samples["total"] - samples["idle"]
    # The loop thread's CPU time per request, spread over the stages by their share of the
    # busy samples (wall-clock samples: a thread waiting for a core looks busy too).
    loop_us = cpu_s * 1e6 / (throughput * wall_s)
    per_sample_us = loop_us / max(busy, 1)
    return {
        "concurrency": c,
        "throughput": throughput,
        "p50_us": result.get("p50_us"),
        "avg_batch": stats.get("avg_batch"),
        "samples": samples["total"],
        "busy_fraction": busy / max(samples["total"], 1),
        "loop_cpu_fraction": cpu_s / wall_s,
        "loop_us": loop_us,
        "stages_us": {s: samples["stages"].get(s, 0) * per_sample_us for s in STAGES},
        "top_leaves_us": {
            name: round(n * per_sample_us, 1) for name, n in samples["leaves"].most_common(40)
        },
        "sluice_inclusive_us": {
            name: round(n * per_sample_us, 1) for name, n in samples["inclusive"].most_common(60)
        },
        "raw": str(raw),
        # Every thread's CPU per request (py-spy samples only the loop; these are counters).
        "threads_us": {
            name: round((spent - threads_before.get(name, 0.0)) * 1e6 / (throughput * wall_s), 1)
            for name, spent in sorted(threads_after.items())
            if spent - threads_before.get(name, 0.0) > 0
        },
    }


def table(results: dict[str, list[dict[str, Any]]], concurrencies: list[int]) -> str:
    names = list(results)
    head = "| stage | " + " | ".join(f"{n} c={c}" for c in concurrencies for n in names) + " |"
    lines = [head, "|---" * (1 + len(names) * len(concurrencies)) + "|"]

    def row(label: str, value: Any) -> str:
        cells = []
        for c in concurrencies:
            for n in names:
                r = next((x for x in results[n] if x["concurrency"] == c), None)
                cells.append("" if r is None else value(n, r))
        return f"| {label} | " + " | ".join(cells) + " |"

    for stage in STAGES:
        lines.append(row(stage, lambda n, r, s=stage: f"{r['stages_us'][s]:.0f}"))
    lines.append(row("**loop us / request**", lambda n, r: f"**{r['loop_us']:.0f}**"))

    def share(n: str, r: dict[str, Any]) -> str:
        null = next(
            (x for x in results.get("null", []) if x["concurrency"] == r["concurrency"]), None
        )
        return "" if null is None or n == "null" else f"{r['loop_us'] - null['loop_us']:.0f}"

    lines.append(row("share (minus no-math)", share))
    lines.append(
        row("loop us, each round", lambda n, r: " / ".join(map(str, r.get("rounds_loop_us", []))))
    )
    lines.append(
        row(
            "loop CPU % (busy samples %)",
            lambda n, r: f"{100 * r['loop_cpu_fraction']:.0f} ({100 * r['busy_fraction']:.0f})",
        )
    )
    lines.append(row("throughput (infer/s)", lambda n, r: f"{r['throughput']:.0f}"))
    lines.append(row("p50 (us)", lambda n, r: f"{r['p50_us']:.0f}" if r["p50_us"] else ""))
    lines.append(row("avg batch", lambda n, r: f"{r['avg_batch']}" if r.get("avg_batch") else ""))
    return "\n".join(lines)


def make_server(name: str, repo: Path, work: Path, tree: Path | None) -> core.ServerProcess:
    if name == "null":
        return core.null_server(work)
    if name == "engine":  # two transports in front: the engine's loop is the one profiled
        return core.sluice_server(name, repo, work, {"SLUICE_WORKERS": "2"})
    server = core.sluice_server(name, repo, work, {"SLUICE_WORKERS": "1"})  # the one loop profiled
    if name == "tree" and tree is not None:
        tree = tree.resolve()
        server.env["PYTHONPATH"] = os.pathsep.join(
            [str(tree / "server"), str(tree / "clients" / "python")]
        )
    return server


def least_per_concurrency(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per concurrency, the round whose loop cost the least per request: on a shared
    machine, other work only ever adds to it (cache and core contention), so the least is
    the closest to the code's own cost. Every round's total is kept in ``rounds_loop_us``."""
    best = []
    for rows in zip(*rounds, strict=True):
        chosen = dict(min(rows, key=lambda r: r["loop_us"]))
        chosen["rounds_loop_us"] = [round(r["loop_us"]) for r in rows]
        best.append(chosen)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--seconds", type=float, default=8.0, help="py-spy sampling per row")
    p.add_argument(
        "--rate",
        type=int,
        default=250,
        help="py-spy samples per second (0: none, only the CPU each thread used: py-spy stops "
        "every thread of the process to take a sample, which costs the threads' CPU too)",
    )
    p.add_argument(
        "--servers",
        nargs="+",
        default=["null", "sluice"],
        choices=["null", "sluice", "engine", "tree"],
        help="tree: Sluice served from --tree; engine: Sluice with two transport processes, "
        "the engine's loop profiled (its calls come by the lane: no grpc, interceptors only "
        "from the lane's handler chain)",
    )
    p.add_argument("--tree", type=Path, help="another checkout of Sluice (the 'tree' server)")
    p.add_argument(
        "--rounds", type=int, default=1, help="rounds, servers interleaved; the least kept"
    )
    p.add_argument("--perf-analyzer", help="perf_analyzer binary")
    p.add_argument("--out", type=Path, help="write the JSON result here")
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--top", type=int, default=15, help="leaf functions listed per row")
    p.add_argument("--keep", action="store_true", help="keep the work folder (py-spy raw files)")
    args = p.parse_args()
    pa = core.find_perf_analyzer(args.perf_analyzer)
    work = Path(tempfile.mkdtemp(prefix="sluice-profile-"))
    try:
        model = work / "mlp_bench.onnx"
        core.build_model(model)
        repo = core.make_repository(work / "repo", model, "onnx", max_batch_size=64)
        if "tree" in args.servers and args.tree is None:
            p.error("the 'tree' server needs --tree DIR")
        rounds: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in args.servers}
        for round_no in range(args.rounds):
            order = args.servers if round_no % 2 == 0 else args.servers[::-1]
            for name in order:
                with core.running(make_server(name, repo, work, args.tree)) as server:
                    tag = f"{name}-r{round_no}"
                    rounds[name].append(
                        [
                            profile_one(
                                server,
                                pa,
                                c,
                                args.seconds,
                                args.rate,
                                work,
                                tag,
                                native=args.native,
                            )
                            for c in args.concurrency
                        ]
                    )
        results = {name: least_per_concurrency(rows) for name, rows in rounds.items()}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    out = {
        "environment": core.environment(),
        "tree": str(args.tree) if args.tree else "this checkout",
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(table(results, args.concurrency))
    print_functions(results, args.top)
    return 0


def print_functions(results: dict[str, list[dict[str, Any]]], top: int) -> None:
    """Per row: every thread's CPU, the leaf functions, and Sluice's functions with what they
    call."""
    for name, rows in results.items():
        for r in rows:
            print(f"\n{name} c={r['concurrency']}: CPU by process and thread (us per request)")
            for thread, us in sorted(r["threads_us"].items(), key=lambda kv: -kv[1]):
                print(f"  {us:7.1f}  {thread}")
            print(f"  {sum(r['threads_us'].values()):7.1f}  in all")
            print(f"\n{name} c={r['concurrency']}: top leaf functions (us per request)")
            for leaf, us in list(r["top_leaves_us"].items())[:top]:
                print(f"  {us:7.1f}  {leaf}")
            if name != "null":
                print(f"{name} c={r['concurrency']}: Sluice functions, inclusive (us per request)")
                for func, us in list(r["sluice_inclusive_us"].items())[:top]:
                    print(f"  {us:7.1f}  {func}")


if __name__ == "__main__":
    sys.exit(main())
