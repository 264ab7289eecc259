"""Which connected node is a training client, a held-out client, or broken (and why).

Nodes are asked once who they are (``query.describe``); nodes that join later are asked when
they appear. A question is pushed once and its answer pulled whenever it comes (a slow node, a
deployed device starting a process per message on a busy machine, is asked once and waited for,
never written off for being slow). The answers are checked against the run config: a simulated
federation that is too small for ``num-train-clients + num-heldout-clients`` is an error when
it has no held-out client the run needs, a warning when it has fewer training clients.
"""

from __future__ import annotations

import time
from collections import Counter
from logging import INFO, WARNING

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.federated import keys
from fedmaml.federated.replies import BadReply, NodeInfo, node_info
from fedmaml.rundir.recorder import RunRecorder


class NodeRoles:
    """The roles and identities of the nodes seen so far, and the broken ones with a reason."""

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, timeout: float) -> None:
        self.cfg = cfg
        self.info: dict[int, NodeInfo] = {}
        self.broken: dict[int, str] = {}
        #: questions asked and not answered yet: message id -> node
        self.pending: dict[str, int] = {}
        self.recorder = recorder
        self.timeout = timeout
        self._checked = False

    def refresh(self, grid: Grid, meta_round: int, wait: float | None = None) -> None:
        """Ask the nodes not seen before who they are, and take the answers that came; wait at
        most ``wait`` seconds (default: the round timeout) for the questions still open. An
        error or a malformed answer makes the node broken; no answer yet leaves it open."""
        asked = set(self.pending.values())
        new = [
            n
            for n in grid.get_node_ids()
            if n not in self.info and n not in self.broken and n not in asked
        ]
        if new:
            log(INFO, "fedmaml: asking %d new node(s) who they are", len(new))
            messages = [
                Message(RecordDict(), dst_node_id=n, message_type=keys.DESCRIBE_TYPE) for n in new
            ]
            pushed = set(grid.push_messages(messages))
            self.pending.update(
                {m.metadata.message_id: n for m, n in zip(messages, new, strict=True)}
            )
            for message_id in set(self.pending) - pushed:  # refused by the SuperLink
                self.pending.pop(message_id)
        deadline = time.monotonic() + (self.timeout if wait is None else wait)
        interval = 0.01
        while self.pending:
            for reply in grid.pull_messages(list(self.pending)):
                node = self.pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                try:
                    self.info[node] = node_info(reply)
                except BadReply as exc:
                    self._broken(node, meta_round, str(exc))
            if not self.pending or time.monotonic() >= deadline:
                break
            time.sleep(interval)
            interval = min(2 * interval, 0.5)
        self._warn_duplicates(new)

    def _broken(self, node: int, meta_round: int, reason: str) -> None:
        self.broken[node] = reason
        log(WARNING, "fedmaml: node %d cannot take part: %s", node, reason)
        self.recorder.client_row(
            round=meta_round, phase="describe", node_id=node, status="error", reason=reason
        )

    def _warn_duplicates(self, new: list[int]) -> None:
        seen = Counter((i.role, i.index) for i in self.info.values())
        for node in new:
            info = self.info.get(node)
            if info is not None and seen[(info.role, info.index)] > 1:
                log(
                    WARNING,
                    "fedmaml: %d nodes say they are %s client %d; give each device its own "
                    "client-index",
                    seen[(info.role, info.index)],
                    info.role,
                    info.index,
                )

    def nodes(self, role: str, grid: Grid | None = None) -> list[int]:
        """The nodes of ``role`` (those still connected, when ``grid`` is given)."""
        connected = set(grid.get_node_ids()) if grid is not None else None
        return sorted(
            n
            for n, i in self.info.items()
            if i.role == role and (connected is None or n in connected)
        )

    def identity(self, node: int) -> dict[str, object]:
        """The columns that name a node's client in the tables: index and data identity."""
        info = self.info.get(node)
        if info is None:
            return {"client": -1, "client_id": ""}
        return {"client": info.index, "client_id": info.client_id}

    def complete(self, grid: Grid) -> bool:
        """Whether no more nodes are to be expected: a simulated federation (its size known from
        the nodes' ``num-partitions``) whose every node is connected and has answered."""
        connected = set(grid.get_node_ids())
        sizes = {i.num_partitions for i in self.info.values()}
        return (
            bool(sizes)
            and 0 not in sizes
            and len(connected) >= max(sizes)
            and connected <= set(self.info) | set(self.broken)
        )

    def wait_for_training(self, grid: Grid, meta_round: int, needed: int) -> list[int]:
        """The connected training nodes, once every connected node has said who it is and
        ``needed`` of them are training nodes; waits at most the round timeout (less when the
        federation is complete and cannot grow). Checks the population against the run config
        the first time."""
        deadline = time.monotonic() + self.timeout
        while True:
            self.refresh(grid, meta_round, wait=max(0.0, deadline - time.monotonic()))
            nodes = self.nodes("train", grid)
            settled = not self.pending and len(nodes) >= needed
            if settled or self.complete(grid) or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        if not self._checked:
            self._checked = True
            self.check_population(grid)
            log(
                INFO,
                "fedmaml: %d training and %d held-out clients connected; training starts",
                len(nodes),
                len(self.nodes("heldout", grid)),
            )
        return nodes

    def check_population(self, grid: Grid) -> None:
        """Compare the nodes with ``num-train-clients`` + ``num-heldout-clients``: no held-out
        node when the run needs some is an error; fewer training nodes a warning."""
        cfg = self.cfg
        train, heldout = len(self.nodes("train", grid)), len(self.nodes("heldout", grid))
        sizes = {i.num_partitions for i in self.info.values()} - {0}
        size = max(sizes) if sizes else 0
        wanted = cfg.num_train_clients + cfg.num_heldout_clients
        fix = (
            f'run with --federation-config "num-supernodes={wanted}" (flwr run), or lower '
            "num-train-clients / num-heldout-clients to the federation's size"
            if size
            else "start the missing SuperNodes, or lower num-train-clients / num-heldout-clients"
        )
        where = f"the federation has {size} simulated SuperNodes" if size else "connected"
        if cfg.num_heldout_clients and not heldout and train:
            raise FedmamlError(
                f"no held-out client: {where}, {train} training and 0 held-out clients, but the "
                f"run config asks for {cfg.num_train_clients} training + "
                f"{cfg.num_heldout_clients} held-out clients; {fix}"
            )
        if train < cfg.num_train_clients or heldout < cfg.num_heldout_clients:
            log(
                WARNING,
                "fedmaml: only %d of %d training and %d of %d held-out clients (%s); %s",
                train,
                cfg.num_train_clients,
                heldout,
                cfg.num_heldout_clients,
                where,
                fix,
            )
        self.recorder.facts["clients"] = {
            "train": train,
            "heldout": heldout,
            "configured": wanted,
            "broken": len(self.broken),
        }
        if self.broken and not train:
            reasons = Counter(self.broken.values()).most_common(1)[0][0]
            raise FedmamlError(
                f"no node can train: {len(self.broken)} node(s) failed to describe themselves "
                f"(e.g. {reasons})"
            )
