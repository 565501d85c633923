"""What is loaded and which version of each model serves: the registry's reads.

``get`` is the one way to resolve a model: a name, a version (empty: the serving one), and
whether it must be able to infer now. The data plane and the router read the table and
nothing else of the registry; the transport reads it for metadata, readiness, the index
and statistics.
"""

from __future__ import annotations

from pathlib import Path

from sluice.answer_config import DegradedConfig, ResponseCacheConfig
from sluice.errors import ModelNotFoundError, ModelNotReadyError, SluiceError
from sluice.loader import ModelVersion
from sluice.registry.entry import UNAVAILABLE, IndexEntry, ModelEntry
from sluice.repository import ModelSpec, ShadowConfig, list_models
from sluice.settings import FallbackTarget
from sluice.stats import ModelStats


class ModelTable:
    def __init__(self, repository: Path, *, required_models: list[str]) -> None:
        self._repository = repository
        self._required = required_models
        self._models: dict[str, ModelEntry] = {}
        #: The start-up load has finished.
        self.started = False

    @property
    def repository(self) -> Path:
        return self._repository

    def get(
        self, name: str, version: str = "", *, backend: str = "", healthy: bool = True
    ) -> ModelVersion:
        """The loaded version of ``name`` a call means: ``version``, or the serving one;
        with ``backend``, that backend of it (one a fallback asked to load).

        ``healthy`` (calls): it must be able to infer now (loaded and passing its health
        probe). Otherwise (metadata, config, statistics) any loaded version will do, and no
        version means the serving one or, when that is not loaded, the highest loaded.
        Raises ``ModelNotFoundError`` or ``ModelNotReadyError`` saying why not."""
        entry = self._models.get(name)
        if entry is None:
            if self.in_repository(name):
                raise ModelNotReadyError(
                    f"model '{name}' is in the repository but not loaded; load it "
                    "(RepositoryModelLoad) or call another model"
                )
            raise ModelNotFoundError(
                f"unknown model '{name}'; loaded: {', '.join(self.model_names()) or 'none'}"
            )
        model = entry.version(version, healthy=healthy)
        return entry.backend(model, backend) if backend else model

    def describe(self, name: str, version: str = "") -> ModelSpec:
        """What metadata and config describe: a loaded version, healthy or not."""
        return self.get(name, version, healthy=False).spec

    def is_ready(self, name: str, version: str = "") -> bool:
        """Whether ``get`` finds a version that can infer now."""
        try:
            self.get(name, version)
        except SluiceError:
            return False
        return True

    @property
    def ready(self) -> bool:
        """Start-up loading finished and the required models (or, with none named, at least
        one model) can infer now."""
        if not self.started:
            return False
        if self._required:
            return all(name in self._models and self._models[name].ready for name in self._required)
        return any(entry.ready for entry in self._models.values())

    def has_model(self, name: str) -> bool:
        return name in self._models

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def loaded_versions(self) -> list[ModelVersion]:
        return [v for entry in self._models.values() for v in entry.versions.values()]

    def longest_prompt_bytes(self) -> int:
        """The most UTF-8 bytes of prompt any loaded version takes (0: none generates)."""
        return max(
            (
                version.engine.max_prompt_bytes
                for entry in self._models.values()
                for version in entry.versions.values()
                if version.engine is not None
            ),
            default=0,
        )

    def fallbacks(self, name: str) -> tuple[FallbackTarget, ...]:
        entry = self._models.get(name)
        return entry.fallbacks if entry is not None else ()

    def shadow(self, name: str) -> ShadowConfig | None:
        """Where a sample of the model's calls is mirrored (None: nowhere)."""
        entry = self._models.get(name)
        return entry.shadow if entry is not None else None

    def response_cache(self, name: str) -> ResponseCacheConfig:
        """Whether the model's repeated calls are answered from the response cache."""
        entry = self._models.get(name)
        return entry.response_cache if entry is not None else ResponseCacheConfig()

    def degraded(self, name: str) -> DegradedConfig | None:
        """What the model answers when every candidate failed or is open (None: nothing)."""
        entry = self._models.get(name)
        return entry.degraded if entry is not None else None

    def latency_guardrail_ms(self, name: str) -> float | None:
        """The model's latency guardrail (None: it has none)."""
        entry = self._models.get(name)
        return entry.latency_guardrail_ms if entry is not None else None

    def index(self) -> list[IndexEntry]:
        """Every model in the repository, one row per version (or per failure)."""
        rows: list[IndexEntry] = []
        for name in list_models(self._repository):
            entry = self._models.get(name)
            if entry is None:
                rows.append(IndexEntry(name, "", UNAVAILABLE, "unloaded"))
            else:
                rows.extend(entry.index_rows())
        return rows

    def statistics(self, name: str = "", version: str = "") -> list[tuple[str, str, ModelStats]]:
        """(model, version, statistics) of one version, of a model's loaded versions, or of
        every loaded version."""
        if name and version:
            return [(name, version, self.get(name, version, healthy=False).stats)]
        if name:
            entry = self._models.get(name)
            if entry is None:
                raise ModelNotFoundError(f"unknown model '{name}'")
            return entry.statistics()
        return [row for n in self.model_names() for row in self._models[n].statistics()]

    def in_repository(self, name: str) -> bool:
        """A plain folder name in the repository (never a path that leaves it)."""
        return plain_name(name) and is_dir(self._repository / name)


def plain_name(name: str) -> bool:
    """A name that can only mean a folder directly inside the repository."""
    return (
        bool(name)
        and not name.startswith(".")
        and not any(character in name for character in ("/", "\\", "\0"))
    )


def is_dir(path: Path) -> bool:
    """``path.is_dir()`` that says no, instead of raising, for names the file system
    refuses (too long, undecodable)."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False
