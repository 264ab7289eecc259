"""Where a training round's time goes, as columns of ``rounds.csv`` (seconds):

* ``configure-s``: ``configure_train``: waiting for the training nodes (role discovery, in
  round 1), sampling, building the messages;
* ``wait-s``: from pushing the messages to the creation of the last reply on its node
  (Flower's dispatch to the nodes and the nodes' own work); ``first-s`` the same to the first
  reply (dispatch and one node's work);
* ``pickup-s``: from the last reply's creation to the server holding it (the polling);
* ``aggregate-s``: from holding the replies to the round's row: reply checks, aggregation, the
  meta-step (not the tables' write nor the checkpoint hand-off).

``wait-s`` and ``pickup-s`` come from the :class:`~fedmaml.federated.collect.PromptGrid` that
sent the round (reply creation times are stamped by Flower on the nodes; in a simulation they
share the server's clock, when deployed they are the devices' clocks).
"""

from __future__ import annotations

import time

from flwr.serverapp import Grid

from fedmaml.federated.collect import PromptGrid


class RoundTiming:
    def __init__(self) -> None:
        self._grid: Grid | None = None
        self._start = self._configured = self._replied = 0.0

    def start(self, grid: Grid) -> None:
        """``configure_train`` begins."""
        self._grid = grid
        self._start = time.perf_counter()

    def configured(self) -> None:
        """The round's messages are built."""
        self._configured = time.perf_counter()

    def replied(self) -> None:
        """``aggregate_train`` has the replies."""
        self._replied = time.perf_counter()

    def values(self) -> dict[str, float]:
        """The round's columns (none when the round was not timed from its start)."""
        if not (self._start and self._configured and self._replied):
            return {}
        values = {
            "configure-s": round(self._configured - self._start, 6),
            "aggregate-s": round(time.perf_counter() - self._replied, 6),
        }
        if isinstance(self._grid, PromptGrid) and self._grid.last.received:
            values["first-s"] = round(self._grid.last.first_s, 6)
            values["wait-s"] = round(self._grid.last.wait_s, 6)
            values["pickup-s"] = round(self._grid.last.pickup_s, 6)
        self._start = self._configured = self._replied = 0.0
        return values
