"""Settings precedence (flags > environment > YAML file > defaults) and deadline budgets."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluice.deadlines import DeadlinePolicy
from sluice.errors import DeadlineExceededError
from sluice.settings import DeadlineSettings, load_settings
from tests.conftest import FakeClock


def test_flags_beat_environment_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "sluice.yaml"
    config.write_text("grpc_port: 7001\nmetrics_port: 7002\nadmission:\n  pushback_ms: 11\n")
    monkeypatch.setenv("SLUICE_METRICS_PORT", "7102")
    monkeypatch.setenv("SLUICE_ADMISSION__MAX_INFLIGHT_REQUESTS", "9")
    settings = load_settings(config, host="0.0.0.0", grpc_port=None)
    assert settings.host == "0.0.0.0"
    assert settings.grpc_port == 7001  # file (no flag, no env)
    assert settings.metrics_port == 7102  # env beats file
    assert settings.admission.pushback_ms == 11
    assert settings.admission.max_inflight_requests == 9
    assert load_settings(config, grpc_port=7201).grpc_port == 7201


def test_workers_auto_asks_for_the_machines_choice_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A settings file that fixes ``workers`` can be overridden back to the machine's choice
    (None: ``app.serve`` chooses) from the environment or a flag."""
    config = tmp_path / "sluice.yaml"
    config.write_text("workers: 3\n")
    monkeypatch.delenv("SLUICE_WORKERS", raising=False)
    assert load_settings(config).workers == 3
    assert load_settings(config, workers="auto").workers is None
    assert load_settings(config, workers=2).workers == 2
    monkeypatch.setenv("SLUICE_WORKERS", "Auto")
    assert load_settings(config).workers is None
    assert load_settings(config, workers=2).workers == 2  # the flag beats the environment
    monkeypatch.setenv("SLUICE_WORKERS", "many")
    with pytest.raises(ValueError, match="workers"):
        load_settings(config)
    monkeypatch.setenv("SLUICE_WORKERS", "0")
    with pytest.raises(ValueError, match="workers"):
        load_settings(config)


def test_unknown_setting_is_rejected(tmp_path: Path) -> None:
    config = tmp_path / "sluice.yaml"
    config.write_text("grpc_prot: 1\n")
    with pytest.raises(ValueError, match="grpc_prot"):
        load_settings(config)


def test_deadline_budget_default_cap_and_early_rejection() -> None:
    clock = FakeClock()
    policy = DeadlinePolicy(DeadlineSettings(default_deadline_s=5, max_deadline_s=60), clock)
    assert policy.budget_s(None) == 5
    assert policy.budget_s(3600) == 60
    assert policy.budget_s(2.5, timeout_s=1.0) == 1.0
    assert policy.deadline(2.0) == clock.now + 2.0
    with pytest.raises(DeadlineExceededError, match="already passed"):
        policy.budget_s(0.0)
    with pytest.raises(DeadlineExceededError):
        policy.budget_s(-0.5)
