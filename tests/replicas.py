"""Sluice replicas as separate hosts, and steady load on them, for tests/test_replicas.py.

Each replica is ``python -m sluice serve`` in its own network namespace (tests/netns.py),
with its own address; replicas share breaker state and serving versions through one Redis
in the test's namespace. The load is 32 callers on one channel that balances over the
three addresses with ``round_robin`` (a headless Service gives a client the same list),
with Sluice's client retry policy, each calling without pause until told to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from sluice_client import RetryPolicy, channel_options
from sluice_client.aio import AsyncClient
from sluice_client.errors import SluiceClientError
from tests.netns import Host
from tests.serve_process import workers_env

GRPC_PORT = 8001
METRICS_PORT = 8002
ADMIN_TOKEN = "replica-test-admin-token"
MLP_INPUT = {"input": np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)}
CALLERS = 32
DEADLINE_S = 5.0
#: Upper bound on the calls one load run makes (it stops sooner, when told).
MAX_CALLS = 500_000
#: The client notices a dead connection (no reset, as in a partition) by keepalive pings.
KEEPALIVE = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 1000)]
#: Reconnection attempts to a replica that went away are at most this far apart.
RECONNECT = [("grpc.max_reconnect_backoff_ms", 1000)]


@dataclass
class Replica:
    host: Host
    repository: Path
    log: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host.address}:{GRPC_PORT}"

    def start(self) -> None:
        argv = [sys.executable, "-m", "sluice", "serve", "--host", self.host.address]
        argv += ["--grpc-port", str(GRPC_PORT), "--metrics-port", str(METRICS_PORT)]
        argv += ["--model-repository", str(self.repository)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.host.command(*argv), env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Until its overall health is SERVING (models loaded); fails if it exits."""
        assert self.process is not None
        give_up = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < give_up:
                if self.process.poll() is not None:
                    raise AssertionError(f"replica {self.address} exited: {self.tail()}")
                with contextlib.suppress(grpc.RpcError):
                    answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.1)
        raise AssertionError(f"replica {self.address} not ready in {timeout_s}s: {self.tail()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self) -> int:
        """SIGTERM, and the exit status once it has drained."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    def calls_answered(self) -> float | None:
        """ModelInfer calls this replica has answered OK (its Prometheus endpoint); None
        when it does not answer within a second."""
        url = f"http://{self.host.address}:{METRICS_PORT}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                text = response.read().decode()
        except OSError:  # URLError, a timeout, a reset
            return None
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "sluice_requests_total"
            and sample.labels.get("model") == "mlp"
            and sample.labels.get("code") == "OK"
        )

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def replica_env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.update(
        SLUICE_BREAKER__REDIS_URL=redis_url,
        SLUICE_LIFECYCLE__REDIS_URL=redis_url,
        SLUICE_ADMIN__TOKEN=ADMIN_TOKEN,
        # Only the test's calls move breakers (no background probe inference).
        SLUICE_PROBE__INTERVAL_S="0",
        SLUICE_EXECUTOR__TORCH_THREADS="1",
        SLUICE_EXECUTOR__INTRA_OP_THREADS="1",
        SLUICE_LOG_FORMAT="json",
    )
    env.update(workers_env())
    return env


def make_repository(root: Path, examples: Path, *, failing: bool) -> Path:
    """``mlp`` with both versions loaded, and ``flaky`` (mlp's version 1) whose backend
    fails every batch when ``failing``."""
    root.mkdir(parents=True)
    (root / "mlp").mkdir()
    for version in ("1", "2"):
        (root / "mlp" / version).symlink_to(examples / "mlp" / version)
    config = (examples / "mlp" / "config.yaml").read_text()
    (root / "mlp" / "config.yaml").write_text(config + "version_policy: {all: true}\n")
    (root / "flaky").mkdir()
    (root / "flaky" / "1").symlink_to(examples / "mlp" / "1")
    faults = "faults: {mode: fail, probability: 1.0}\n" if failing else ""
    (root / "flaky" / "config.yaml").write_text(faults)
    return root


# -- load -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    start: float
    end: float
    code: str
    version: str
    details: str = ""


@dataclass
class Load:
    """32 callers on one round_robin channel over every replica, until ``stop``."""

    addresses: list[str]
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Sluice's client retry policy (its defaults unless a test says otherwise)."""
    calls: list[Call] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _client: AsyncClient | None = None

    async def start(self) -> Load:
        options = channel_options(load_balancing="round_robin", retry=self.retry)
        options += KEEPALIVE + RECONNECT
        channel = grpc.aio.insecure_channel("ipv4:" + ",".join(self.addresses), options=options)
        self._client = AsyncClient(channel, timeout_s=DEADLINE_S)
        self._channel = channel
        self._tasks = [asyncio.create_task(self._caller()) for _ in range(CALLERS)]
        return self

    async def _caller(self) -> None:
        assert self._client is not None
        while not self._stopping.is_set() and len(self.calls) < MAX_CALLS:
            started = time.monotonic()
            try:
                result = await self._client.infer("mlp", MLP_INPUT)
            except SluiceClientError as exc:
                self.calls.append(Call(started, time.monotonic(), exc.code.name, "", exc.details))
            else:
                self.calls.append(Call(started, time.monotonic(), "OK", result.version))

    async def run_for(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def stop(self) -> list[Call]:
        self._stopping.set()
        await asyncio.gather(*self._tasks)
        await self._channel.close()
        return self.calls


def failed(calls: list[Call]) -> list[Call]:
    return [call for call in calls if call.code != "OK"]


def released_after(calls: list[Call], *, at: float, until: float, slow_s: float = 1.0) -> float:
    """Seconds from ``at`` until every call it held up had ended (answered elsewhere, or
    failed): the calls in flight at ``at``, and those started before ``until`` that took
    longer than ``slow_s`` (sent to a replica that could not answer)."""
    held = [
        c
        for c in calls
        if c.start <= at < c.end or (at <= c.start < until and c.end - c.start > slow_s)
    ]
    return max(c.end for c in held) - at if held else 0.0


async def serving_versions(replicas: list[Replica]) -> list[str]:
    """The version each replica answers a call that names none with (directly)."""

    async def one(replica: Replica) -> str:
        async with AsyncClient(replica.address, timeout_s=DEADLINE_S) as client:
            return (await client.infer("mlp", MLP_INPUT)).version

    return list(await asyncio.gather(*(one(replica) for replica in replicas)))


async def until_all_serve(replicas: list[Replica], version: str, timeout_s: float) -> float:
    """Seconds until every replica answers with ``version`` (polled every 20 ms)."""
    started = time.monotonic()
    async with asyncio.timeout(timeout_s):
        while set(await serving_versions(replicas)) != {version}:
            await asyncio.sleep(0.02)
    return time.monotonic() - started


def summary(numbers: dict[str, Any]) -> str:
    return ", ".join(
        f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
        for key, value in numbers.items()
    )


@contextlib.contextmanager
def replicas_running(replicas: list[Replica]) -> Iterator[list[Replica]]:
    for replica in replicas:
        replica.start()
    try:
        for replica in replicas:
            replica.wait_ready()
        yield replicas
    finally:
        for replica in replicas:
            replica.stop()


async def until_answering_again(replica: Replica, timeout_s: float) -> None:
    """Until the replica answers calls again: its count of answered calls grows."""
    first: float | None = None
    async with asyncio.timeout(timeout_s):
        while True:
            now = await asyncio.to_thread(replica.calls_answered)
            if first is None:
                first = now
            elif now is not None and now > first:
                return
            await asyncio.sleep(0.05)
