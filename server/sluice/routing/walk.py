"""One call's way down its chain of candidates, the retry budget it spends, and the error it
ends with when no candidate answers."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from sluice.clock import Clock
from sluice.errors import DrainingError, OverloadedError, SluiceError, UnavailableError
from sluice.settings import FallbackTarget, RetrySettings


class RetryBudget:
    """Retries allowed: at most ``budget_ratio`` of the calls in the window (plus a floor),
    so retries cannot multiply the load of an outage."""

    def __init__(self, settings: RetrySettings, clock: Clock) -> None:
        self._settings = settings
        self._clock = clock
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()

    def record_call(self) -> None:
        now = self._clock()
        self._calls.append(now)
        self._forget_before(now - self._settings.budget_window_s)

    def has_room(self) -> bool:
        """Whether a retry may be spent now (nothing is spent)."""
        self._forget_before(self._clock() - self._settings.budget_window_s)
        allowed = max(
            self._settings.budget_min_retries, int(self._settings.budget_ratio * len(self._calls))
        )
        return len(self._retries) < allowed

    def try_spend(self) -> bool:
        """Spend one retry, if there is room."""
        if not self.has_room():
            return False
        self._retries.append(self._clock())
        return True

    def charge(self) -> None:
        """Count an extra attempt that was made and failed (a fallback), room or not."""
        self._retries.append(self._clock())

    def _forget_before(self, horizon: float) -> None:
        for stamps in (self._calls, self._retries):
            while stamps and stamps[0] < horizon:
                stamps.popleft()


@dataclass(frozen=True, slots=True)
class Attempt:
    target: FallbackTarget
    index: int
    #: A fallback after a failure: charged to the budget if it fails too.
    hop: bool = False


@dataclass(slots=True)
class Walk:
    """One call's way down its chain: what it tried, what failed, what it passed over."""

    chain: list[FallbackTarget]
    budget: RetryBudget
    #: The first candidate's version is the caller's (any string), not the config's.
    caller_version: bool
    tried: set[int] = field(default_factory=set)
    errors: list[SluiceError] = field(default_factory=list)
    #: Candidates passed over, by index: (metric reason, why).
    skipped: dict[int, tuple[str, SluiceError]] = field(default_factory=dict)
    #: Skips not yet in an attempt's log record.
    unlogged: list[str] = field(default_factory=list)
    attempts: int = 0
    retries: int = 0
    #: Candidates over their latency guardrail: tried after the others.
    demoted: set[int] = field(default_factory=set)

    def around(self, after: int) -> list[int]:
        """Every candidate, down the chain from ``after`` and round to the top."""
        return [(after + 1 + step) % len(self.chain) for step in range(len(self.chain))]

    def untried(self, after: int) -> list[int]:
        """Candidates not tried yet, down the chain from ``after``; demoted ones last."""
        untried = [index for index in self.around(after) if index not in self.tried]
        return sorted(untried, key=self.demoted.__contains__) if self.demoted else untried

    def alone(self, index: int) -> bool:
        """Whether nothing is left to fall back to after the candidate at ``index`` (every
        other one tried or passed over): then it may use the whole remaining deadline."""
        return all(i == index or i in self.skipped for i in self.untried(index))

    @property
    def after_transient_failure(self) -> bool:
        return any(error.transient for error in self.errors)

    def failure(self, name: str) -> SluiceError:
        skipped = {label(self.chain[i]): why for i, (_, why) in self.skipped.items()}
        return combined(name, self.errors, skipped)


class PassOver(Exception):
    """A candidate cannot take a generation; the next one may."""

    def __init__(self, error: SluiceError, reason: str) -> None:
        super().__init__(reason)
        self.error = error
        self.reason = reason


def label(target: FallbackTarget) -> str:
    """A candidate as ListModels names it: ``model[/version][@backend]``, or a remote one
    ``host:port/model[/version]``."""
    version = f"/{target.version}" if target.version else ""
    if target.endpoint:
        return f"{target.endpoint}/{target.model}{version}"
    backend = f"@{target.backend}" if target.backend else ""
    return f"{target.model}{version}{backend}"


def retryable(exc: SluiceError) -> bool:
    """Transient backend trouble is retried; load shedding goes back to the client with its
    pushback (retrying it here would only queue again behind the same limit)."""
    return exc.transient and not isinstance(exc, OverloadedError | DrainingError)


def combined(name: str, errors: list[SluiceError], skipped: dict[str, SluiceError]) -> SluiceError:
    """The error to report: a fatal one as is; a lone one as is; otherwise one naming every
    candidate: what each tried one answered and why each other one was passed over."""
    fatal = [e for e in errors if not e.transient] or [
        e for e in skipped.values() if not e.transient and not errors
    ]
    if fatal:
        return fatal[0]
    if len(errors) + len(skipped) == 1:
        return (errors or list(skipped.values()))[0]
    detail = "; ".join(
        [e.message for e in errors]
        + [f"skipped {where}: {e.message}" for where, e in skipped.items()]
    )
    pushbacks = [e.retry_after_ms for e in errors if e.retry_after_ms is not None]
    return UnavailableError(
        f"no candidate for '{name}' could serve the call: {detail}",
        retry_after_ms=max(pushbacks) if pushbacks else None,
    )
