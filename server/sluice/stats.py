"""Per model version counters behind the ModelStatistics RPC (Triton's statistics extension).

``inference_count`` counts samples (batch rows) served, ``execution_count`` counts executor
runs, so their ratio shows how well requests batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    dropped: int = 0
    batches: dict[int, BatchStats] = field(default_factory=dict)

    def record_batch(self, *, size: int, input_s: float, infer_s: float, output_s: float) -> None:
        """One executor run of ``size`` rows; per-request shares are added by the caller."""
        self.execution_count += 1
        batch = self.batches.setdefault(size, BatchStats())
        batch.compute_input.add(input_s)
        batch.compute_infer.add(infer_s)
        batch.compute_output.add(output_s)

    def record_request(
        self,
        *,
        rows: int,
        queue_s: float,
        input_s: float,
        infer_s: float,
        output_s: float,
    ) -> None:
        """One request's share of a successful batch (counted as it leaves the queue)."""
        self.inference_count += rows
        self.queue.add(queue_s)
        self.compute_input.add(input_s)
        self.compute_infer.add(infer_s)
        self.compute_output.add(output_s)
        self.last_inference_ms = int(time.time() * 1000)

    def record_unbatched(self, *, queue_s: float, infer_s: float) -> None:
        """A request that ran alone, outside the dynamic batcher (a generation): one
        execution of one row."""
        self.record_batch(size=1, input_s=0.0, infer_s=queue_s + infer_s, output_s=0.0)
        self.record_request(rows=1, queue_s=queue_s, input_s=0.0, infer_s=infer_s, output_s=0.0)

    def record_end(self, *, ok: bool, seconds: float) -> None:
        (self.success if ok else self.fail).add(seconds)
