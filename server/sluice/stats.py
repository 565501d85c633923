"""Per model version counters behind the ModelStatistics RPC (Triton's statistics extension).

``inference_count`` counts samples (batch rows) served, ``execution_count`` counts executor
runs, so their ratio shows how well requests batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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


@dataclass(frozen=True, slots=True)
class BatchRun:
    """One executor run as the dynamic batcher measured it."""

    rows: Sequence[int]
    """Each request's rows, in the batch's order."""
    queue_s: Sequence[float]
    """How long each request waited in the queue."""
    input_s: float
    """Building the batch's inputs."""
    infer_s: float
    """The executor's run."""
    output_s: float
    """Handing each request its rows of the outputs."""
    size: int
    """Rows in the batch (the sum of ``rows``)."""


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
    """Requests the batcher dropped without running them (queue full, caller gone, deadline
    passed), as ``sluice_dropped_requests_total`` counts them."""
    batches: dict[int, BatchStats] = field(default_factory=dict)
    cache_hit: Duration = field(default_factory=Duration)
    """Calls answered from the response cache, and the time their lookups took."""
    cache_miss: Duration = field(default_factory=Duration)
    """Lookups that found nothing, and the time those lookups and the insertions of the
    answers that followed took."""

    def record_run(self, run: BatchRun) -> None:
        """One successful executor run and each request's share of it."""
        self._record_batch(
            size=run.size, input_s=run.input_s, infer_s=run.infer_s, output_s=run.output_s
        )
        for rows, waited in zip(run.rows, run.queue_s, strict=True):
            self._record_request(
                rows=rows,
                queue_s=waited,
                input_s=run.input_s,
                infer_s=run.infer_s,
                output_s=run.output_s,
            )

    def _record_batch(self, *, size: int, input_s: float, infer_s: float, output_s: float) -> None:
        self.execution_count += 1
        batch = self.batches.setdefault(size, BatchStats())
        batch.compute_input.add(input_s)
        batch.compute_infer.add(infer_s)
        batch.compute_output.add(output_s)

    def _record_request(
        self,
        *,
        rows: int,
        queue_s: float,
        input_s: float,
        infer_s: float,
        output_s: float,
    ) -> None:
        self.inference_count += rows
        self.queue.add(queue_s)
        self.compute_input.add(input_s)
        self.compute_infer.add(infer_s)
        self.compute_output.add(output_s)
        self.last_inference_ms = int(time.time() * 1000)

    def record_unbatched(self, *, queue_s: float, infer_s: float) -> None:
        """A request that ran alone, outside the dynamic batcher (a generation): one
        execution of one row."""
        self._record_batch(size=1, input_s=0.0, infer_s=queue_s + infer_s, output_s=0.0)
        self._record_request(rows=1, queue_s=queue_s, input_s=0.0, infer_s=infer_s, output_s=0.0)

    def record_end(self, *, ok: bool, seconds: float) -> None:
        (self.success if ok else self.fail).add(seconds)

    def record_cache_hit(self, seconds: float) -> None:
        """A call answered from the response cache: a success that ran nothing."""
        self.cache_hit.add(seconds)
        self.success.add(seconds)
        self.last_inference_ms = int(time.time() * 1000)

    def record_cache_miss(self, seconds: float) -> None:
        self.cache_miss.add(seconds)

    def record_cache_insert(self, seconds: float) -> None:
        """Storing an answer after a miss (Triton counts it in the miss's time)."""
        self.cache_miss.ns += int(seconds * 1e9)
