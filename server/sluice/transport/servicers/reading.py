"""What a stream does when reading its requests fails: it stops reading, answers what it
has accepted, and then ends with the failure's status (never OK: the client must learn
that the rest of what it sent was not served)."""

from __future__ import annotations

import logging

from sluice.errors import SluiceError

log = logging.getLogger(__name__)


def read_failure(exc: Exception, *, after: int) -> SluiceError:
    """The error that ends a stream whose reading failed after ``after`` good messages."""
    if isinstance(exc, SluiceError):
        log.warning(
            "stream stopped reading after %d message(s), answering those first: %s",
            after,
            exc.message,
        )
        return exc
    log.error("stream stopped reading after %d message(s)", after, exc_info=exc)
    return SluiceError(  # no more specific class: INTERNAL
        f"the server could not read the stream after its message {after} "
        f"({type(exc).__name__}); the requests before it were answered"
    )
