from __future__ import annotations

from pathlib import Path

import pytest

from sluice.generation.causal_lm import CausalLM
from tests.generation.random_models import CONFIGS, write_random_model


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def random_model_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """One folder per architecture, written once per test session."""
    name: str = request.param
    return write_random_model(tmp_path_factory.mktemp(name), CONFIGS[name])


@pytest.fixture
def random_lm(random_model_dir: Path) -> CausalLM:
    return CausalLM.load(random_model_dir)
