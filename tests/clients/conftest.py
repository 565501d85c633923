"""Servers for the TypeScript and Go clients' own test runners, which run as subprocesses
(the servers share the test's event loop) and learn the addresses from the environment."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from sluice_client import AsyncClient
from tests.certs import ADMIN_CN, Certificates
from tests.conftest import RunningServer, StartServer

#: The bundled causal LM in the example repository.
GENERATION_MODEL = "tiny_llama"
GENERATION_PROMPT = "Once upon a time"
#: Sluice's suggested back-off on the draining server: long enough that honouring it shows.
PUSHBACK_MS = 300
#: What a client's default RetryPolicy sends in all before giving up.
RETRY_ATTEMPTS = 4


@dataclass
class ClientServers:
    """The servers a client test suite drives."""

    main: RunningServer
    holding: RunningServer
    draining: RunningServer
    #: Requires client certificates; the admin certificate may make admin calls.
    mtls: RunningServer
    certificates: Certificates
    generation_model: str
    expected_text: str

    def env(self) -> dict[str, str]:
        certificates = self.certificates
        env = {
            "SLUICE_ADDRESS": self.main.address,
            "SLUICE_HOLDING_ADDRESS": self.holding.address,
            "SLUICE_DRAINING_ADDRESS": self.draining.address,
            "SLUICE_PUSHBACK_MS": str(PUSHBACK_MS),
            "SLUICE_GENERATION_MODEL": self.generation_model,
            "SLUICE_GENERATION_PROMPT": GENERATION_PROMPT,
            "SLUICE_TLS_ADDRESS": self.mtls.address,
            "SLUICE_TLS_CA_FILE": str(certificates.ca),
            "SLUICE_TLS_CLIENT_CERT_FILE": str(certificates.client_cert),
            "SLUICE_TLS_CLIENT_KEY_FILE": str(certificates.client_key),
            "SLUICE_TLS_ADMIN_CERT_FILE": str(certificates.admin_cert),
            "SLUICE_TLS_ADMIN_KEY_FILE": str(certificates.admin_key),
        }
        if self.generation_model:
            env["SLUICE_EXPECTED_TEXT"] = self.expected_text
        return env

    def shed_calls(self) -> float:
        """Calls the draining server has turned away."""
        value = self.draining.metrics.registry.get_sample_value(
            "sluice_rejected_requests_total", {"reason": "draining"}
        )
        return value or 0.0


async def served_generation_model(address: str) -> str:
    """GENERATION_MODEL when the server serves it ready, else ""."""
    async with AsyncClient(address) as client:
        ready = {m.name for m in await client.models() if m.state == "READY"}
    return GENERATION_MODEL if GENERATION_MODEL in ready else ""


@pytest.fixture
async def client_servers(
    start_server: StartServer, example_repository: Path, certificates: Certificates
) -> ClientServers:
    main = await start_server()
    mtls = await start_server(tls=certificates.server_settings(), admin={"identities": [ADMIN_CN]})
    # `simple` waits a minute to fill a batch of 32: every call to it outlives its deadline.
    (example_repository / "simple" / "config.yaml").write_text(
        "max_batch_size: 32\n"
        "dynamic_batching:\n  max_queue_delay_us: 60000000\n  preferred_batch_sizes: [32]\n"
    )
    shutil.rmtree(example_repository / GENERATION_MODEL, ignore_errors=True)
    holding = await start_server(repository=example_repository)
    draining = await start_server(admission={"pushback_ms": PUSHBACK_MS})
    draining.server.admission.begin_drain()
    model = await served_generation_model(main.address)
    expected = ""
    if model:
        async with AsyncClient(main.address) as client:
            result = await client.generate_text(model, GENERATION_PROMPT, max_new_tokens=8)
        expected = result.text
    return ClientServers(main, holding, draining, mtls, certificates, model, expected)
