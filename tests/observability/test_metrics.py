"""Prometheus metrics as an operator sees them: scraped from the real /metrics endpoint of a
real server after real calls (each test with its own registry)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from sluice.metrics import Metrics
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import REPO_ROOT, FakeClock, RunningServer, StartServer
from tests.fakes import Behaviour, fake_backends, fake_repository
from tests.observability.conftest import Scrape
from tests.test_routing import simple_request, with_backup

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "sluice.json"


def fake_request(value: float) -> pb.ModelInferRequest:
    x = np.full((1, 4), value, dtype=np.float32)
    return pb.ModelInferRequest(
        model_name="fake",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[x.tobytes()],
    )


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, keyed by name and label set."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


@pytest.fixture
def behaviour() -> Behaviour:
    return Behaviour()


@pytest.fixture
async def fake_server(
    start_server: StartServer, tmp_path: Path, behaviour: Behaviour
) -> AsyncIterator[tuple[RunningServer, int]]:
    """The fake backend behind a real server, with its metrics endpoint on a free port."""
    server = await start_server(
        repository=fake_repository(tmp_path, "max_batch_size: 8\n"),
        backends=fake_backends(behaviour),
        clock=FakeClock(),
        breaker={"fail_max": 2, "reset_timeout_s": 60.0},
        admission={"max_inflight_requests": 3},
    )
    endpoint = server.metrics.serve_http("127.0.0.1", 0)
    yield server, endpoint.port
    endpoint.close()


async def test_calls_latency_queue_compute_and_batch_size_are_scraped(
    fake_server: tuple[RunningServer, int], behaviour: Behaviour, scrape: Scrape
) -> None:
    server, port = fake_server
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        behaviour.hold()
        first = asyncio.ensure_future(stub.ModelInfer(fake_request(0)))
        await behaviour.started.wait()
        queued = [asyncio.ensure_future(stub.ModelInfer(fake_request(i))) for i in (1, 2)]
        batcher = server.service.get("fake").batcher
        while batcher.queue_depth < 2:
            await asyncio.sleep(0)
        busy = await scrape(port)
        behaviour.release()
        await asyncio.gather(first, *queued)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ModelInfer(simple_request("nope"))
    text = await scrape(port)

    assert value(busy, "sluice_queue_depth", model="fake", version="1") == 2
    assert value(busy, "sluice_model_inflight_requests", model="fake", version="1") == 3
    assert value(busy, "sluice_inflight_requests") == 3
    assert value(text, "sluice_model_inflight_requests", model="fake", version="1") == 0
    assert value(text, "sluice_queue_depth", model="fake", version="1") == 0
    ok = {"method": "ModelInfer", "model": "fake", "code": "OK"}
    assert value(text, "sluice_requests_total", **ok) == 3
    # An unknown model is not a label value (callers must not grow the label set).
    assert value(text, "sluice_requests_total", method="ModelInfer", model="", code="NOT_FOUND")
    assert value(text, "sluice_request_duration_seconds_count", method="ModelInfer", model="fake")
    assert value(text, "sluice_queue_duration_seconds_count", model="fake", version="1") == 3
    assert value(text, "sluice_compute_duration_seconds_count", model="fake", version="1") == 2
    assert value(text, "sluice_batch_size_count", model="fake", version="1") == 2
    assert value(text, "sluice_batch_size_sum", model="fake", version="1") == 3
    assert value(text, "sluice_model_ready", model="fake", version="1") == 1
    assert value(text, "sluice_model_load_duration_seconds_count", model="fake", backend="fake")


async def test_rejections_by_reason_and_breaker_state_and_transitions(
    fake_server: tuple[RunningServer, int], behaviour: Behaviour, scrape: Scrape
) -> None:
    server, port = fake_server
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        behaviour.hold()
        held = [asyncio.ensure_future(stub.ModelInfer(fake_request(i))) for i in range(3)]
        while server.server.admission.inflight < 3:
            await asyncio.sleep(0)
        with pytest.raises(grpc.aio.AioRpcError) as shed:
            await stub.ModelInfer(fake_request(9))
        assert shed.value.code() == grpc.StatusCode.UNAVAILABLE
        behaviour.fail = True
        behaviour.release()
        await asyncio.gather(*held, return_exceptions=True)
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # the breaker is open now
            await stub.ModelInfer(fake_request(1))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    text = await scrape(port)

    assert value(text, "sluice_rejected_requests_total", reason="overload") == 1
    assert value(text, "sluice_rejected_requests_total", reason="breaker") == 1
    backend = {"model": "fake", "version": "1", "backend": "fake"}
    assert value(text, "sluice_breaker_state", **backend) == 2
    assert value(text, "sluice_breaker_transitions_total", **backend, state="open") == 1


async def test_fallbacks_and_skipped_candidates_are_counted(
    start_server: StartServer, example_repository: Path, scrape: Scrape
) -> None:
    repository = with_backup(
        example_repository, "faults: {mode: fail}\nfallbacks: [{model: simple_b}]\n"
    )
    server = await start_server(repository=repository, breaker={"fail_max": 1})
    endpoint = server.metrics.serve_http("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await stub.ModelInfer(simple_request("simple"))  # fails, opens, falls back
            await stub.ModelInfer(simple_request("simple"))  # passed over: breaker open
        text = await scrape(endpoint.port)
    finally:
        endpoint.close()
    assert value(text, "sluice_fallbacks_total", model="simple", target="simple_b/1") == 2
    skipped = {"model": "simple", "target": "simple", "reason": "breaker"}
    assert value(text, "sluice_fallback_skipped_total", **skipped) == 1
    assert value(text, "sluice_retries_total", model="simple") is None  # a fallback is no retry
    assert value(
        text, "sluice_model_load_duration_seconds_count", model="simple", backend="onnxruntime"
    )


async def test_generation_metrics_the_generation_path_reports(
    fake_server: tuple[RunningServer, int], scrape: Scrape
) -> None:
    server, port = fake_server
    observer = server.metrics.generation_observer("tiny")
    observer.prompt(7)
    observer.first_token(0.030)
    observer.finished(tokens=5, decode_s=0.040)  # 4 intervals after the first token
    observer.finished(tokens=1, decode_s=0.0)  # one token: no interval to time
    text = await scrape(port)
    assert value(text, "sluice_prompt_tokens_total", model="tiny") == 7
    assert value(text, "sluice_generated_tokens_total", model="tiny") == 6
    assert value(text, "sluice_time_to_first_token_seconds_sum", model="tiny") == pytest.approx(
        0.03
    )
    assert value(text, "sluice_time_per_output_token_seconds_count", model="tiny") == 1
    assert value(text, "sluice_time_per_output_token_seconds_sum", model="tiny") == pytest.approx(
        0.01
    )


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs.append(dashboard["templating"]["list"][1]["query"]["query"])
    return {name for expr in exprs for name in re.findall(r"\bsluice_[a-z_]+", expr)}


async def test_every_metric_the_dashboard_queries_is_exported(
    fake_server: tuple[RunningServer, int], scrape: Scrape
) -> None:
    server, port = fake_server
    # Children appear once used: touch every labelled family the way serving does.
    server.metrics.generation_observer("tiny").finished(tokens=3, decode_s=0.1)
    server.metrics.generation_observer("tiny").first_token(0.1)
    server.metrics.generation_observer("tiny").prompt(1)
    server.metrics.rejected.labels("overload").inc()
    server.metrics.retries.labels("fake").inc()
    server.metrics.fallbacks.labels("fake", "fake/1").inc()
    server.metrics.fallback_skipped.labels("fake", "fake", "breaker").inc()
    server.metrics.breaker_changed("fake", "1", "fake", "open")
    server.metrics.dropped.labels("fake", "1", "deadline").inc()
    server.metrics.shadow_requests.labels("fake", "compared").inc()
    server.metrics.shadow_max_abs_diff.labels("fake").set(0.0)
    server.metrics.shadow_max_rel_diff.labels("fake").set(0.0)
    for counter in (
        server.metrics.shadow_exact_matches,
        server.metrics.shadow_tokens,
        server.metrics.shadow_agreeing_tokens,
    ):
        counter.labels("fake").inc()
    async with grpc.aio.insecure_channel(server.address) as channel:
        await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(fake_request(1))
    exported = {name for name, _ in samples(await scrape(port))}
    wanted = dashboard_metrics()
    assert len(wanted) >= 20
    assert wanted <= exported, sorted(wanted - exported)


def test_metric_names_follow_prometheus_conventions(fake_server: tuple[RunningServer, int]) -> None:
    server, _ = fake_server
    for family in server.metrics.registry.collect():
        assert family.name.startswith("sluice_"), family.name
        assert not family.name.endswith("_ms"), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "histogram" and "batch_size" not in family.name:
            assert family.name.endswith("_seconds"), family.name


def readme_metrics() -> dict[str, frozenset[str]]:
    """README's metric table: exported name -> label names."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("**Metrics**") : text.index("**Traces**")]
    rows = re.findall(r"^\| `(sluice_\w+)` \| ([^|]*) \|", section, re.MULTILINE)
    table = {name: frozenset(re.findall(r"\w+", labels)) for name, labels in rows}
    assert len(table) == len(rows), "a metric is listed twice"
    return table


def test_the_readme_lists_every_metric_with_its_labels() -> None:
    metrics = Metrics()
    listed = readme_metrics()
    exported = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in metrics.registry.collect()
    }
    assert set(listed) == exported, (
        f"not in README: {sorted(exported - set(listed))}; "
        f"not registered: {sorted(set(listed) - exported)}"
    )
    for metric in vars(metrics).values():
        if not isinstance(metric, Counter | Gauge | Histogram):
            continue
        family = metric.describe()[0]
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = listed[name]
        if labels:  # prometheus_client refuses any other set of label names
            metric.labels(**dict.fromkeys(labels, "x"))
        elif isinstance(metric, Histogram):
            metric.observe(0)  # refused if the metric had labels
        else:
            metric.inc(0)
