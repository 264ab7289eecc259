"""fedmaml's own log lines inside Flower's apps.

The core, the data sources and the run set-up log with Python's ``logging`` under ``fedmaml``
(they know nothing of Flower). Inside a ServerApp or ClientApp process those lines go where
Flower's own lines go (its console handler: ``flwr log``, ``flower.log``), at INFO and above.
"""

from __future__ import annotations

import logging


def through_flower() -> None:
    """Send the ``fedmaml`` logger's records to the ``flwr`` logger's handlers (idempotent)."""
    ours, flower = logging.getLogger("fedmaml"), logging.getLogger("flwr")
    for handler in flower.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
