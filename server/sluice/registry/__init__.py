"""The control plane: the model registry.

* ``table``: ``ModelTable``, what is loaded and which version serves; ``get`` resolves a
  model for a call (the data plane and the router read nothing else).
* ``registry``: ``ModelRegistry``, the table plus every change: load, unload, versions,
  promote, rollback, rescan, history, health verdicts and readiness listeners.
* ``entry``: one model's versions and the rules that pick the version a call gets.
* ``building``: a model's entry built from its folder; ``states``: its serving pointer and
  history (``lifecycle.ModelState``).
"""

from sluice.registry.entry import READY, UNAVAILABLE, IndexEntry
from sluice.registry.readiness import ReadinessListener
from sluice.registry.registry import ModelRegistry
from sluice.registry.states import state_root
from sluice.registry.table import ModelTable

__all__ = [
    "READY",
    "UNAVAILABLE",
    "IndexEntry",
    "ModelRegistry",
    "ModelTable",
    "ReadinessListener",
    "state_root",
]
