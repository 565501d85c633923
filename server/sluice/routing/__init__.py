"""Routing: the name a client calls -> an ordered chain of candidates, and the one retry
layer, which spends the call's deadline and the called name's retry budget.

A call tries the first candidate that is ready, whose breaker is closed and whose expected
service time fits the remaining deadline. On a transient failure it falls back to the next
candidate it has not tried yet: a fallback is not a retry, so it needs no back-off and costs
the budget nothing when it answers (one that fails too is charged, so a total outage still
cannot multiply the load beyond the budget). Once every candidate was tried, it retries the
chain from the top after a back-off with full jitter, while the deadline, ``max_attempts`` and
the budget allow. A fatal error (bad input, unknown model) is returned at once and retried
nowhere. While untried candidates remain, one attempt (a generation: its first token) may use
only ``attempt_share`` of the remaining deadline, so a hung primary leaves time for its
fallback. A candidate passed over (breaker, health, deadline, budget) is logged with the
attempt, counted in ``sluice_fallback_skipped_total`` and named in the error a failed call
gets.

* ``router``: ``Router``, where the transport's data calls enter the core (infer, generate,
  and the breaker check before a call is queued); each attempt runs on the data plane.
* ``candidates``: the chain a name resolves to and which candidate a call tries next.
* ``walk``: one call's walk down its chain, the retry budget, the error it ends with.
* ``report``: each attempt's log record and span attributes.
* ``answers``: answers given without running a model: response cache hits first, and a
  model's degraded tier (cached, then static answers, always marked) when no candidate
  answers.
"""

from sluice.routing.router import Router
from sluice.routing.walk import RetryBudget

__all__ = ["RetryBudget", "Router"]
