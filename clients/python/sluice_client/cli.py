"""Client subcommands of the ``sluice`` command (placeholder until the client lands)."""

from __future__ import annotations

import argparse
from typing import Any


def add_client_commands(sub: Any) -> None:
    del sub
