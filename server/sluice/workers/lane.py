"""The engine lane: calls from the transport workers to the engine over a Unix socket.

``sluice serve --workers N`` runs N transport processes on the public port and one engine
process with the models. A transport worker forwards each unary call (its method, request
bytes, metadata, deadline and the caller's identity) to the engine through a
``LaneClient``; the engine's ``LaneServer`` runs it through exactly the handler chain the
engine's own grpc server runs (``transport.server.MethodTable``: the interceptors, then
the servicer) with a ``LaneContext``, and sends back the status, details, metadata and
response bytes a grpc call would have given. A call costs the engine one small frame each
way instead of a full grpc call.

A call whose responses stream (one request: ``Generate``, health ``Watch``) is a call
frame that names its window (``LaneSettings.stream_window_bytes``); its responses come back
as MESSAGE frames and its status as the REPLY that ends it, no more than the window of
response bytes ahead of what the transport has handed on to its caller
(``LaneClient.stream``, ``lane_stream``; ``frames`` has the format).

Many calls share one connection (frames carry a call id), each in its own task. A caller
that goes away sends a cancel frame and its call's task is cancelled, as grpc cancels a
handler; a closed connection cancels all of its calls. A call past its deadline is
answered DEADLINE_EXCEEDED by the client and ended in the engine by its deadline hook
(a backstop cancels it ``deadline_grace_s`` later). Everything is bounded: a frame by the
server's message limit plus a metadata allowance, the calls of one connection by
``LaneSettings.max_calls_per_connection`` and its streams, apart, by
``max_streams_per_connection`` (more are refused with RESOURCE_EXHAUSTED), and
what waits to be written by ``max_backlog_bytes`` (a connection whose peer does not read
stops being read). Requests of ``shared_min_bytes`` or more cross in shared memory
(``workers.shm``).

Parts: ``frames`` (the wire format), ``outbox`` (ordered, batched, chunked writes),
``context`` (the servicer context), ``lane_engine``, ``lane_run`` (how the engine runs a
call's handler), ``lane_client``, ``lane_stream``, ``lane_settings``.
bench/README.md ("Engine lane") has what a call costs the engine each way.
"""

from sluice.workers.frames import Reply
from sluice.workers.lane_client import LaneClient
from sluice.workers.lane_engine import LaneServer
from sluice.workers.lane_settings import LaneMetrics, LaneSettings

__all__ = ["LaneClient", "LaneMetrics", "LaneServer", "LaneSettings", "Reply"]
