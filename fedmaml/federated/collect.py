"""Replies collected as soon as they arrive, in simulation and when deployed.

Flower's ``Grid.send_and_receive`` pulls the replies, then sleeps a fixed interval before it
pulls again: 0.1 s in simulation (``InMemoryGrid.pull_interval``) and 3 s when deployed
(``GrpcGrid``, ``flwr/superlink/grid/http_grid.py``), so a round lasts up to that long after its
last reply exists. Here the messages are pushed once with the public ``Grid.push_messages`` and
their replies pulled with ``Grid.pull_messages`` after short waits that grow with the time
already waited:

    wait = clamp(WAIT_FRACTION × (time since the push), MIN_WAIT, MAX_WAIT)

so a reply is picked up at most 10 % of the round's own duration after it exists (1 ms for a
10 ms round, never more than MAX_WAIT), and a long wait costs a few pulls a second.

:class:`PromptGrid` is a Grid whose ``send_and_receive`` works this way (everything else is the
wrapped grid's); it keeps the :class:`Exchange` timing of its last call. :func:`pull_until` is
the same loop for callers that push themselves (role discovery).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

MIN_WAIT = 0.001
MAX_WAIT = 0.2
WAIT_FRACTION = 0.1


def next_wait(waited: float) -> float:
    """Seconds to sleep before the next pull, after ``waited`` seconds without all replies."""
    return min(MAX_WAIT, max(MIN_WAIT, WAIT_FRACTION * waited))


def pull_until(
    grid: Grid,
    pending: Iterable[str],
    deadline: float,
    on_reply: Callable[[Message], None],
    *,
    started: float | None = None,
) -> set[str]:
    """Pull the replies to the ``pending`` message ids until all came or ``time.monotonic()``
    passes ``deadline`` (one pull at least); ``on_reply`` gets each reply as it is pulled.
    Returns the ids still unanswered. ``started`` (monotonic) is when the messages were pushed
    (default: now), which sets the waits (:func:`next_wait`)."""
    open_ids = set(pending)
    begin = time.monotonic() if started is None else started
    while open_ids:
        for reply in grid.pull_messages(list(open_ids)):
            open_ids.discard(reply.metadata.reply_to_message_id)
            on_reply(reply)
        now = time.monotonic()
        if not open_ids or now >= deadline:
            break
        time.sleep(min(next_wait(now - begin), max(0.0, deadline - now)))
    return open_ids


@dataclass
class Exchange:
    """The timing of one ``send_and_receive``: wall-clock seconds (``time.time()``) when the
    messages were pushed, when the first and the last reply were created on their nodes (Flower
    stamps ``created_at``), and when the last reply was in; and how many were sent and came
    back."""

    sent: int = 0
    received: int = 0
    pushed_at: float = 0.0
    first_created_at: float = 0.0
    last_created_at: float = 0.0
    done_at: float = 0.0
    reply_times: list[float] = field(default_factory=list)

    @property
    def wait_s(self) -> float:
        """From the push to the last reply's creation: dispatch and the nodes' work."""
        return max(0.0, self.last_created_at - self.pushed_at) if self.received else 0.0

    @property
    def first_s(self) -> float:
        """From the push to the first reply's creation: dispatch and one node's work."""
        return max(0.0, self.first_created_at - self.pushed_at) if self.received else 0.0

    @property
    def pickup_s(self) -> float:
        """From the last reply's creation to the server having it: the poll's lag."""
        return max(0.0, self.done_at - self.last_created_at) if self.received else 0.0


class PromptGrid(Grid):
    """A Grid that collects replies as they arrive (module docstring); the rest is ``grid``'s."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.last = Exchange()

    # the Grid interface, delegated
    def set_run(self, run_id):  # type: ignore[no-untyped-def,override]
        return self.grid.set_run(run_id)

    @property
    def run(self):  # type: ignore[no-untyped-def,override]
        return self.grid.run

    def create_message(  # type: ignore[no-untyped-def,override]
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl=None
    ):
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def __getattr__(self, name: str) -> object:
        return getattr(self.grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then pull their replies as they come, for at most ``timeout``
        seconds (None: until every reply is in)."""
        messages = list(messages)
        exchange = Exchange(sent=len(messages), pushed_at=time.time())
        self.last = exchange
        if not messages:
            return []
        started = time.monotonic()
        ids = [i for i in self.grid.push_messages(messages) if i]
        replies: list[Message] = []
        deadline = float("inf") if timeout is None else started + timeout
        pull_until(self.grid, ids, deadline, replies.append, started=started)
        exchange.done_at = time.time()
        exchange.received = len(replies)
        exchange.reply_times = [m.metadata.created_at for m in replies]
        exchange.first_created_at = min(exchange.reply_times, default=0.0)
        exchange.last_created_at = max(exchange.reply_times, default=0.0)
        return replies


def unwrapped(grid: Grid) -> Grid:
    """The Grid Flower gave, under fedmaml's wrappers."""
    while isinstance(grid, PromptGrid):
        grid = grid.grid
    return grid
