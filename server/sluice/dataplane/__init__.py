"""The data plane: infer, generate and count tokens, each on one model version.

* ``plane``: ``DataPlane``, one path per kind of request.
* ``served``: ``ServedGeneration``, a generation being served and what it costs.
* ``tensors``: reply-size checks and decoding of tensor requests.
"""

from sluice.dataplane.plane import DataPlane
from sluice.dataplane.served import Generation, GenerationListener, ServedGeneration

__all__ = ["DataPlane", "Generation", "GenerationListener", "ServedGeneration"]
