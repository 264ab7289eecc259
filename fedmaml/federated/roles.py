"""Which connected node is a training client, a held-out client, or broken (and why); in a
simulation, which users the federation holds.

A simulated federation (Flower's simulation runtime, whose ServerApp gets an ``InMemoryGrid``)
is not asked node by node: one node describes the first training user, which shows that the
app and the data work and gives the federation's size (``num-partitions``); the users it holds
follow from the run config (:class:`fedmaml.federated.users.Population`), and any node can
compute any of them. The server's *participants* are then these users (ids, see
:mod:`fedmaml.federated.users`), dealt to the nodes round by round.

Deployed nodes serve their own data: each is asked once who it is (``query.describe``) and is
its own participant (its node id); nodes that join later are asked when they appear. A
question is pushed once and its answer pulled whenever it comes (a slow node, a deployed device
starting a process per message on a busy machine, is asked once and waited for, never written
off for being slow). The answers are checked against the run config: a federation that is too
small for ``num-train-clients + num-heldout-clients`` is an error when it has no held-out client
the run needs, a warning when it has fewer training clients.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid

from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.federated import keys
from fedmaml.federated.collect import pull_until, unwrapped
from fedmaml.federated.replies import BadReply, NodeInfo, node_info
from fedmaml.federated.users import Population, User, route, user_replies
from fedmaml.rundir.recorder import RunRecorder

#: round timeouts the server waits, before the first round, for enough training clients
STARTUP_TIMEOUTS = 3


class NodeRoles:
    """The roles and identities of the nodes seen so far, and the broken ones with a reason."""

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, timeout: float) -> None:
        self.cfg = cfg
        #: the users a simulated federation holds (None: deployed nodes, or not known yet)
        self.population: Population | None = None
        #: data identities of simulated users, as their replies name them
        self.names: dict[int, str] = {}
        self.info: dict[int, NodeInfo] = {}
        self.broken: dict[int, str] = {}
        #: questions asked and not answered yet: message id -> node
        self.pending: dict[str, int] = {}
        self._user_questions: set[str] = set()
        self.recorder = recorder
        self.timeout = timeout
        self._checked = False

    def refresh(self, grid: Grid, meta_round: int, wait: float | None = None) -> None:
        """Ask the nodes not seen before who they are (in a simulation: one node, once), and
        take the answers that came; wait at most ``wait`` seconds (default: the round timeout)
        for the questions still open. An error or a malformed answer makes the node broken; no
        answer yet leaves it open."""
        asked = set(self.pending.values())
        connected = sorted(grid.get_node_ids())
        if self.serves_users(grid):
            seen = self.population is not None or self.broken or asked
            new = [] if seen or not connected else connected[:1]
            question = RecordDict({keys.CONFIG: ConfigRecord({keys.USERS: ["train-0"]})})
        else:
            new = [
                n
                for n in connected
                if n not in self.info and n not in self.broken and n not in asked
            ]
            question = RecordDict()
        if new:
            log(INFO, "fedmaml: asking %d new node(s) who they are", len(new))
            messages = [
                Message(question, dst_node_id=n, message_type=keys.DESCRIBE_TYPE) for n in new
            ]
            pushed = set(grid.push_messages(messages))
            self.pending.update(
                {m.metadata.message_id: n for m, n in zip(messages, new, strict=True)}
            )
            for message_id in set(self.pending) - pushed:  # refused by the SuperLink
                self.pending.pop(message_id)
            if self.serves_users(grid):
                self._user_questions.update(pushed)
        deadline = time.monotonic() + (self.timeout if wait is None else wait)
        if self.pending:
            pull_until(grid, list(self.pending), deadline, lambda r: self._answer(r, meta_round))
        self._warn_duplicates(new)

    def serves_users(self, grid: Grid) -> bool:
        """Whether the server routes users to nodes (a simulation) rather than asking each node
        who it is (deployed nodes, and a simulation under secure aggregation, where every node
        masks its own user's update with its own keys)."""
        return simulated(grid) and not self.cfg.secure_aggregation

    def _answer(self, reply: Message, meta_round: int) -> None:
        """A node's answer to ``query.describe``: who it is, or why it cannot take part; a
        simulated node's answer (for the user it was asked about) gives the population."""
        node = self.pending.pop(reply.metadata.reply_to_message_id, None)
        if node is None:
            return
        try:
            if reply.metadata.reply_to_message_id not in self._user_questions:
                self.info[node] = node_info(reply)
                return
            sent = Message(RecordDict(), dst_node_id=node, message_type=keys.DESCRIBE_TYPE)
            [answer] = user_replies(reply, {"train-0": sent}, (keys.DESCRIBE,)).values()
            info = node_info(answer)
            if info.num_partitions < 1:
                raise BadReply("a simulated node must give the federation's num-partitions")
            self.population = Population.of(self.cfg, info.num_partitions)
        except BadReply as exc:
            self._broken(node, meta_round, str(exc))

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
        """The deployed nodes of ``role`` (those still connected, when ``grid`` is given)."""
        connected = set(grid.get_node_ids()) if grid is not None else None
        return sorted(
            n
            for n, i in self.info.items()
            if i.role == role and (connected is None or n in connected)
        )

    def participants(self, role: str, grid: Grid | None = None) -> list[int]:
        """Who the server can ask for ``role``: the simulated federation's users of that role
        (their ids), or the deployed nodes of that role (still connected, when ``grid`` is
        given)."""
        if self.population is not None:
            return self.population.ids(role)
        return self.nodes(role, grid)

    def route(self, participants: list[int], nodes: Iterable[int]) -> dict[int, list[int]]:
        """The node that computes each participant: simulated users dealt round-robin over the
        connected ``nodes``; a deployed node computes itself."""
        if self.population is None:
            return {p: [p] for p in participants}
        return route(participants, list(nodes))

    def user(self, participant: int) -> User | None:
        """A simulated participant's user (None for a deployed node)."""
        return None if self.population is None else self.population.user_of(participant)

    def role(self, participant: int) -> str | None:
        """The role the server knows for a participant (never the node's own word)."""
        user = self.user(participant)
        if user is not None:
            return user.role
        info = self.info.get(participant)
        return None if info is None else info.role

    def identity(self, participant: int) -> dict[str, object]:
        """The columns that name a participant's client in the tables: index, data identity."""
        user = self.user(participant)
        if user is not None:
            return {"client": user.index, "client_id": self.names.get(participant, user.key)}
        info = self.info.get(participant)
        if info is None:
            return {"client": -1, "client_id": ""}
        return {"client": info.index, "client_id": info.client_id}

    def complete(self, grid: Grid) -> bool:
        """Whether no more nodes are to be expected: a simulated federation (its size known from
        the nodes' ``num-partitions``) whose every node is connected and has answered."""
        connected = set(grid.get_node_ids())
        if self.population is not None:
            return len(connected) >= self.population.num_nodes
        sizes = {i.num_partitions for i in self.info.values()}
        return (
            bool(sizes)
            and 0 not in sizes
            and len(connected) >= max(sizes)
            and connected <= set(self.info) | set(self.broken)
        )

    def wait_for_training(self, grid: Grid, meta_round: int, needed: int) -> list[int]:
        """The training participants, once every connected node has said who it is (in a
        simulation: the one node asked) and ``needed`` of them are there; waits at most the
        round timeout (less when the federation is complete and cannot grow), before the first
        round ``STARTUP_TIMEOUTS`` of them: devices are still connecting and a deployed node
        starts a process per message, and a wait that long would stop the run anyway
        (``MAX_STARVED_ROUNDS``). Checks the population against the run config the first
        time."""
        waits = 1 if self._checked else STARTUP_TIMEOUTS
        deadline = time.monotonic() + waits * self.timeout
        while True:
            self.refresh(grid, meta_round, wait=max(0.0, deadline - time.monotonic()))
            found = self.participants("train", grid)
            settled = not self.pending and len(found) >= needed
            if settled or self.complete(grid) or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        if not self._checked:
            self._checked = True
            self.check_population(grid)
            log(
                INFO,
                "fedmaml: %d training and %d held-out clients %s; training starts",
                len(found),
                len(self.participants("heldout", grid)),
                "in the simulated federation" if self.population is not None else "connected",
            )
        return found

    def check_population(self, grid: Grid) -> None:
        """Compare the clients with ``num-train-clients`` + ``num-heldout-clients``: no held-out
        client when the run needs some is an error; fewer training clients a warning."""
        cfg = self.cfg
        train = len(self.participants("train", grid))
        heldout = len(self.participants("heldout", grid))
        wanted = cfg.num_train_clients + cfg.num_heldout_clients
        if self.population is not None:
            size = self.population.num_nodes
        else:
            sizes = {i.num_partitions for i in self.info.values()} - {0}
            size = max(sizes) if sizes else 0
        per_node = cfg.users_per_node
        fix = (
            f'run with --federation-config "num-supernodes={-(-wanted // per_node)}" (flwr '
            "run), or lower num-train-clients / num-heldout-clients to the federation's size"
            if size
            else "start the missing SuperNodes, or lower num-train-clients / num-heldout-clients"
        )
        where = (
            f"the federation has {size} simulated SuperNodes"
            + (f" of {per_node} users each" if per_node > 1 else "")
            if size
            else "connected"
        )
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


def simulated(grid: Grid) -> bool:
    """Whether ``grid`` is Flower's simulation runtime (its ServerApp gets an InMemoryGrid)."""
    return isinstance(unwrapped(grid), InMemoryGrid)
