"""Cached greedy generations over a real server, on a copy of the example ``tiny_llama``
with ``response_cache: {enabled: true, generations: true}``: a greedy request repeated is
replayed from the response cache, chunk for chunk, marked ``sluice-cache: hit``, without
running the model; any other sampling parameter or prompt is another key; sampled requests
are never cached; ``generations`` on a tensor model is a load error."""

from __future__ import annotations

from pathlib import Path

import grpc

from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_api.sluice.v1 import generation_service_pb2_grpc as gen_grpc
from tests.conftest import StartServer
from tests.test_degraded_generation import generate, sample
from tests.test_generation_service import repository_with, request, stats

CACHED = {"config": "response_cache: {enabled: true, generations: true}\n"}


async def test_a_repeated_greedy_generation_is_replayed_from_the_cache(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await start_server(repository=repository_with(tmp_path, cached_llama=CACHED))
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
        greedy = request(model="cached_llama", max_new_tokens=10)
        made, trailers = await generate(stub, greedy)
        assert "sluice-cache" not in trailers
        prefills = stats(server, "cached_llama").prefills
        replayed, trailers = await generate(stub, greedy)
        assert trailers["sluice-cache"] == "hit"
        assert stats(server, "cached_llama").prefills == prefills  # the model never ran
        assert [(c.text, list(c.token_ids)) for c in replayed] == [
            (c.text, list(c.token_ids)) for c in made
        ]
        assert replayed[-1].finish_reason == made[-1].finish_reason == gen.FINISH_REASON_LENGTH
        assert replayed[-1].usage == made[-1].usage
        assert {c.model_name for c in replayed} == {"cached_llama"}

        # Every sampling parameter and the prompt are in the key.
        for other in (
            request(model="cached_llama", max_new_tokens=9),
            request(model="cached_llama", max_new_tokens=10, repetition_penalty=2),
            request("Once upon a dog", model="cached_llama", max_new_tokens=10),
        ):
            _, trailers = await generate(stub, other)
            assert "sluice-cache" not in trailers
        stop = request(model="cached_llama", max_new_tokens=10)
        stop.parameters.stop_sequences.append("zzz")
        _, trailers = await generate(stub, stop)
        assert "sluice-cache" not in trailers

        # A sampled request is never cached, even with a seed.
        sampled = request(model="cached_llama", max_new_tokens=10, seed=3)
        sampled.parameters.temperature = 0.8
        for _ in range(2):
            _, trailers = await generate(stub, sampled)
            assert "sluice-cache" not in trailers

        # A model without generations in its response_cache config runs every time.
        for _ in range(2):
            _, trailers = await generate(stub, request(max_new_tokens=4))
            assert "sluice-cache" not in trailers

    assert sample(server, "sluice_cache_hits_total", model="cached_llama") == 1
    assert sample(server, "sluice_cache_misses_total", model="cached_llama") == 5


async def test_generations_on_a_tensor_model_is_a_load_error(
    start_server: StartServer, tmp_path: Path
) -> None:
    repository = repository_with(tmp_path)
    (repository / "simple" / "config.yaml").write_text(str(CACHED["config"]))
    server = await start_server(repository=repository)
    reasons = [row.reason for row in server.service.index() if row.name == "simple"]
    says = "field 'response_cache.generations': only a generation model's generations"
    assert any(says in reason for reason in reasons), reasons
    assert not server.service.is_ready("simple")


async def test_a_generation_cached_in_one_dtype_is_not_replayed_after_a_reload_in_another(
    start_server: StartServer, tmp_path: Path
) -> None:
    # The model's type is part of its cached answers' key: its tokens differ from one type
    # to another, so a reload with another ``generation.dtype`` runs the model again (and
    # caches under the new key) rather than replaying what the old type generated.
    repository = repository_with(tmp_path, cached_llama=CACHED)
    server = await start_server(repository=repository)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
        greedy = request(model="cached_llama", max_new_tokens=6)
        await generate(stub, greedy)
        _, trailers = await generate(stub, greedy)
        assert trailers["sluice-cache"] == "hit"
        config = repository / "cached_llama" / "config.yaml"
        config.write_text(f"{CACHED['config']}generation: {{dtype: bfloat16}}\n")
        await server.service.load("cached_llama")
        _, trailers = await generate(stub, greedy)
        assert "sluice-cache" not in trailers
        assert stats(server, "cached_llama").prefills == 1  # the reloaded model ran
        _, trailers = await generate(stub, greedy)
        assert trailers["sluice-cache"] == "hit"
