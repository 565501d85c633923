#!/usr/bin/env python3
"""What choosing one decode step's tokens costs (``sluice.generation.sampling.sample_many``),
by vocabulary size and sequences per step, on one torch thread.

Every sequence samples (temperature 0.8, its own seed) from random logits. With ``--tree``
another checkout's sampler is timed too, interleaved with this one's in one process, so
drift on a shared machine hits both alike; the ratio is theirs / ours.

    git archive REV server | tar -x -C /tmp/before
    python bench/sampling.py [--tree /tmp/before] [--vocab 1141 32000 128256] [--rows 1 16]

Large fresh allocations cost page faults here (glibc hands blocks above its mmap threshold
back to the kernel on every free): run with ``MALLOC_MMAP_THRESHOLD_=2000000000
MALLOC_TRIM_THRESHOLD_=2000000000`` to time the arithmetic alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from sluice.domain import SamplingParams
from sluice.generation import sampling


def load_sampler(tree: Path) -> ModuleType:
    """The sampling module of another checkout (``tree/server/sluice/...``)."""
    path = tree / "server" / "sluice" / "generation" / "sampling.py"
    spec = importlib.util.spec_from_file_location("sampling_before", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"no sampler at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_us(module: ModuleType, vocab: int, rows: int, repeats: int) -> float:
    """Median microseconds of one ``sample_many`` over ``rows`` sequences."""
    samplers = [
        module.TokenSampler(
            SamplingParams(temperature=0.8, seed=i), prompt_ids=[1], vocab_size=vocab, device="cpu"
        )
        for i in range(rows)
    ]
    logits = torch.randn(rows, vocab)
    for _ in range(3):
        module.sample_many(samplers, logits)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        module.sample_many(samplers, logits)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


Results = dict[tuple[str, int, int], list[float]]


def measure(
    variants: dict[str, ModuleType], vocabs: list[int], rows: list[int], rounds: int
) -> Results:
    """Microseconds per step of every variant, vocabulary and row count, one figure per
    round; within a round the variants run back to back."""
    results: Results = {}
    for _ in range(rounds):
        for vocab in vocabs:
            for count in rows:
                repeats = max(5, min(200, 4_000_000 // (vocab * count)))
                for name, module in variants.items():
                    key = (name, vocab, count)
                    results.setdefault(key, []).append(step_us(module, vocab, count, repeats))
    return results


def table(results: Results, names: list[str], vocabs: list[int], rows: list[int]) -> str:
    """Markdown: the median of each variant's rounds; with two, the first's over the second's."""
    header = ["vocabulary", "sequences", *(f"{name} us per step" for name in names)]
    if len(names) == 2:
        header.append(f"{names[0]} / {names[1]}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for vocab in vocabs:
        for count in rows:
            cells = [statistics.median(results[(name, vocab, count)]) for name in names]
            row = [f"{vocab:,}", str(count), *(f"{us:,.0f}" for us in cells)]
            if len(names) == 2:
                row.append(f"{cells[0] / cells[1]:.1f}x")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, help="another checkout to compare with")
    parser.add_argument("--vocab", type=int, nargs="+", default=[1141, 32000, 128256])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants: dict[str, ModuleType] = {"this tree": sampling}
    if args.tree is not None:
        variants = {"before": load_sampler(args.tree), **variants}
    results = measure(variants, args.vocab, args.rows, args.rounds)
    print(table(results, list(variants), args.vocab, args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
