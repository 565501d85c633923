"""``sluice serve --workers N``: N transport processes in front of one engine process.

The engine is the whole server (``transport.server.create_server`` over ``core.build_core``)
listening on a private Unix socket instead of the public port; each transport process
serves the public port (``SO_REUSEPORT``, so the kernel spreads connections over them) and
forwards every call to the engine as raw bytes. ``docs/workers.md`` says where each promise
is kept.

* ``topology``: the engine's side: the private socket, starting, supervising and stopping
  the transport processes;
* ``transport``: a transport process (``python -m sluice.workers.transport``);
* ``forward``: the hop from a transport to the engine (the unary interface and its
  grpc-over-Unix-socket implementation, and the stream relay);
* ``lane``: the unary fast path of that hop (``lane_client`` in the transports,
  ``lane_engine`` in the engine, the wire format in ``frames``, large requests through
  ``shm``); the caller's identity crosses as ``transport.identity`` says.
"""
