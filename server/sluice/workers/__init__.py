"""Transport worker processes and the engine they forward calls to (``sluice serve
--workers N``); ``lane`` is the unary fast path between them."""
