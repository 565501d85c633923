"""Who the caller is, as it crosses from a transport process to the engine.

A transport terminates TLS, so the engine's own ``auth_context`` describes the Unix-socket
hop, not the caller. The transport therefore sends the caller's identity as internal
metadata: ``sluice-internal-identity`` once per name of the verified client certificate
(subject CN first, then the subject alternative names) and ``sluice-internal-peer`` (the
caller's address). It first strips every ``sluice-internal-`` key the caller sent, and the
engine honours these keys only on calls that arrive on its private Unix socket (a 0700
directory only the server's user can enter): sent over the public port, they are dropped
by the transport, and a single-process server (no Unix socket) ignores them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

INTERNAL_PREFIX = "sluice-internal-"
IDENTITY_KEY = f"{INTERNAL_PREFIX}identity"
PEER_KEY = f"{INTERNAL_PREFIX}peer"
TRANSPORT_KEY = f"{INTERNAL_PREFIX}transport"

CERTIFICATE_NAMES = ("x509_common_name", "x509_subject_alternative_name")
"""The ``auth_context`` keys that name a verified client certificate, in the order used."""

_NOT_FORWARDED = frozenset({"user-agent", "content-type", "te", "host"})
"""Request headers grpc sets on every call itself."""

Metadatum = tuple[str, str | bytes]


def certificate_names(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """The names of the verified client certificate in ``auth_context`` (none: no mTLS)."""
    return [
        value.decode(errors="replace")
        for key in CERTIFICATE_NAMES
        for value in auth_context.get(key, ())
    ]


def outgoing(
    metadata: Iterable[tuple[str, str | bytes]],
    *,
    peer: str,
    names: Sequence[str],
    transport: int,
) -> list[Metadatum]:
    """The caller's metadata as the engine gets it: the caller's own ``sluice-internal-``
    keys (and grpc's per-call headers) removed, the caller's identity added."""
    kept: list[Metadatum] = [
        (key, value)
        for key, value in metadata
        if not key.startswith((INTERNAL_PREFIX, ":", "grpc-")) and key not in _NOT_FORWARDED
    ]
    kept.append((PEER_KEY, peer))
    kept.extend((IDENTITY_KEY, name) for name in names)
    kept.append((TRANSPORT_KEY, str(transport)))
    return kept


def from_transport(peer: str) -> bool:
    """Whether a call whose peer is ``peer`` came over the engine's private Unix socket."""
    return peer.startswith("unix:")


def forwarded_names(peer: str, metadata: Iterable[tuple[str, str | bytes]]) -> list[str]:
    """The caller's certificate names a transport forwarded, or none when the call did not
    come over the private socket (then such keys are a caller's, and ignored)."""
    if not from_transport(peer):
        return []
    return [value for key, value in metadata if key == IDENTITY_KEY and isinstance(value, str)]
