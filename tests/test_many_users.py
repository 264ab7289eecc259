"""Many users per node: the server samples users, each node gets one message listing its
users and replies each user's update separately; every user's reply passes the checks a
node's reply passes, and the aggregation strategy acts on users.

The equivalence test runs real Flower simulations, one user per node and three users per
node, and checks both against θ computed here, in this process, from the users the runs
sampled."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian

from fedmaml.checkpoint import load_checkpoint
from fedmaml.config import RunConfig
from fedmaml.federated import keys
from fedmaml.federated.records import from_record, to_record
from fedmaml.federated.simulation import simulate
from fedmaml.federated.strategy import MetaStrategy
from fedmaml.federated.users import Population, User, route
from fedmaml.meta.outer import MetaOptimizer
from fedmaml.problem import Problem
from fedmaml.rundir.recorder import RunRecorder

pytestmark = pytest.mark.timeout(600)


@pytest.fixture()
def server_task_identity():
    """Messages are created inside a ServerApp process, whose run and node ids Flower sets."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


# --------------------------------------------------------------------------- the population


def test_the_population_holds_num_nodes_times_users_per_node_slots():
    cfg = RunConfig(num_train_clients=6, num_heldout_clients=3, users_per_node=4)
    whole = Population.of(cfg, num_nodes=3)
    assert (whole.count("train"), whole.count("heldout")) == (6, 3)
    assert whole.ids("train") == [1, 2, 3, 4, 5, 6] and whole.ids("heldout") == [7, 8, 9]
    assert [whole.user_of(i) for i in (1, 6, 7, 9)] == [
        User("train", 0),
        User("train", 5),
        User("heldout", 0),
        User("heldout", 2),
    ]
    assert all(whole.id_of(whole.user_of(i)) == i for i in range(1, 10))
    small = Population.of(cfg, num_nodes=2)  # 8 slots: every training user, 2 held-out
    assert (small.count("train"), small.count("heldout")) == (6, 2)
    tiny = Population.of(cfg.replace(users_per_node=1), num_nodes=2)
    assert (tiny.count("train"), tiny.count("heldout")) == (2, 0)


def test_users_are_dealt_round_robin_over_the_sorted_nodes():
    assert route([5, 1, 3, 2, 4], [30, 10, 20]) == {10: [1, 4], 20: [2, 5], 30: [3]}
    assert route([7], [30, 10]) == {10: [7]}


def test_a_user_key_that_names_no_user_is_one_clear_error():
    assert User.parse("heldout-12") == User("heldout", 12)
    for bad in ("boss-1", "train-", "train-x", "", "train-1-"):
        with pytest.raises(Exception, match="does not name a user"):
            User.parse(bad)


# --------------------------------------------------------------------------- the server side

THETA = {"w": torch.tensor([[1.0, -2.0], [0.5, 3.0]]), "b": torch.tensor([0.25, -0.75])}


def grads_like(scale: float) -> dict[str, torch.Tensor]:
    return {
        k: torch.full_like(v, scale) + 0.1 * torch.arange(v.numel()).reshape(v.shape)
        for k, v in THETA.items()
    }


def strategy_over_users(tmp_path, aggregator) -> MetaStrategy:
    cfg = RunConfig(
        num_train_clients=4,
        num_heldout_clients=0,
        min_train_nodes=2,
        meta_optimizer="sgd",
        meta_lr=1.0,
        users_per_node=2,
        out_dir=str(tmp_path),
    )
    strategy = MetaStrategy(
        aggregator,
        MetaOptimizer(THETA, "sgd", 1.0),
        cfg,
        RunRecorder(tmp_path, cfg.to_mapping()),
        num_rounds=1,
    )
    strategy.roles.population = Population.of(cfg, num_nodes=2)
    return strategy


def sent_to_two_nodes(strategy: MetaStrategy, participants: tuple[int, ...]) -> list[Message]:
    """The training messages ``strategy`` sends nodes 11 and 12 for ``participants``, by node."""
    per_user = [
        Message(RecordDict({}), dst_node_id=p, message_type=MessageType.TRAIN) for p in participants
    ]
    sent = strategy.dispatch.out("train", per_user, [11, 12])
    return sorted(sent, key=lambda m: m.metadata.dst_node_id)


def many_users_reply(
    sent: Message, per_user: dict[str, object], examples: dict[str, int] | None = None
) -> Message:
    """A node's reply in the many-users format: each user's metrics (``examples`` query
    examples, default 10) or its error line, and the users' updates stacked a row per user."""
    content = RecordDict()
    errors, rows = {}, {}
    for user, grads in per_user.items():
        if isinstance(grads, str):
            errors[user] = grads
            continue
        rows[user] = {k: -g for k, g in grads.items()}
        content[keys.user_record(keys.METRICS, user)] = MetricRecord(
            {
                keys.NUM_EXAMPLES: (examples or {}).get(user, 10),
                "loss-before": 2.0 + len(rows),
                "loss-after": 1.0,
            }
        )
    content[keys.USER_ERRORS] = ConfigRecord(errors)
    content[keys.USER_NAMES] = ConfigRecord({u: f"data-{u}" for u in per_user})
    if rows:
        stacked = {k: torch.stack([r[k] for r in rows.values()]) for k in THETA}
        content[keys.USER_ARRAYS] = to_record(stacked)
        content[keys.USER_ROWS] = ConfigRecord({keys.USERS: list(rows)})
    return Message(content, reply_to=sent)


@pytest.mark.usefixtures("server_task_identity")
def test_each_users_reply_is_checked_and_aggregated_as_a_nodes_would_be(tmp_path):
    strategy = strategy_over_users(tmp_path, FedAvg(weighted_by_key=keys.WEIGHT))
    config = ConfigRecord({keys.META_ROUND: 1})
    per_user = [
        Message(RecordDict({keys.CONFIG: config}), dst_node_id=p, message_type=MessageType.TRAIN)
        for p in (1, 2, 3, 4)
    ]
    sent = strategy.dispatch.out("train", per_user, [12, 11])
    assert sorted(m.metadata.dst_node_id for m in sent) == [11, 12]
    listed = {m.metadata.dst_node_id: list(m.content[keys.CONFIG][keys.USERS]) for m in sent}
    assert listed == {11: ["train-0", "train-2"], 12: ["train-1", "train-3"]}
    assert all(m.content[keys.CONFIG][keys.META_ROUND] == 1 for m in sent)
    g0, g1, g2 = grads_like(1.0), grads_like(-2.0), grads_like(0.5)
    nan = {k: torch.full_like(v, float("nan")) for k, v in THETA.items()}
    node11, node12 = sorted(sent, key=lambda m: m.metadata.dst_node_id)
    replies = [
        many_users_reply(node11, {"train-0": g0, "train-2": g2}),
        many_users_reply(node12, {"train-1": g1, "train-3": nan}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    new = from_record(arrays)
    for k in THETA:
        torch.testing.assert_close(new[k], THETA[k] - (g0[k] + g1[k] + g2[k]) / 3)
    rows = {r["client"]: r for r in strategy.recorder.clients if r["phase"] == "train"}
    assert rows[3]["status"] == "failed" and "NaN or Inf" in rows[3]["reason"]
    assert rows[3]["node_id"] == 12 and rows[2]["node_id"] == 11
    assert rows[0]["client_id"] == "data-train-0" and rows[0]["status"] == "ok"
    assert strategy.recorder.rounds[1]["ok"] == 3 and strategy.recorder.rounds[1]["failed"] == 1


@pytest.mark.usefixtures("server_task_identity")
def test_a_robust_aggregator_acts_on_users_not_on_nodes(tmp_path):
    """Two users on one node, one outlier user on the other: the median is over the users."""
    strategy = strategy_over_users(tmp_path, FedMedian(weighted_by_key=keys.WEIGHT))
    node11, node12 = sent_to_two_nodes(strategy, (1, 2, 3))
    gs = {"train-0": grads_like(1.0), "train-1": grads_like(100.0), "train-2": grads_like(2.0)}
    replies = [
        many_users_reply(node11, {"train-0": gs["train-0"], "train-2": gs["train-2"]}),
        many_users_reply(node12, {"train-1": gs["train-1"]}),
    ]
    new = from_record(strategy.aggregate_train(1, replies)[0])
    for k in THETA:
        median = torch.from_numpy(np.median(np.stack([g[k].numpy() for g in gs.values()]), 0))
        torch.testing.assert_close(new[k], THETA[k] - median)


@pytest.mark.usefixtures("server_task_identity")
def test_a_node_that_fails_as_a_whole_fails_each_of_its_users(tmp_path):
    from flwr.app import Error

    strategy = strategy_over_users(tmp_path, FedAvg(weighted_by_key=keys.WEIGHT))
    node11, node12 = sent_to_two_nodes(strategy, (1, 2, 3))
    g0, g2 = grads_like(1.0), grads_like(3.0)
    replies = [
        many_users_reply(node11, {"train-0": g0, "train-2": g2}),
        Message(Error(code=0, reason="MemoryError on the node"), reply_to=node12),
    ]
    new = from_record(strategy.aggregate_train(1, replies)[0])
    for k in THETA:
        torch.testing.assert_close(new[k], THETA[k] - (g0[k] + g2[k]) / 2)
    failed = [r for r in strategy.recorder.clients if r["status"] == "failed"]
    assert [r["client"] for r in failed] == [1] and "MemoryError" in failed[0]["reason"]


class SubclassedFedAvg(FedAvg):
    """FedAvg by inheritance: aggregated by Flower's own ``aggregate_train``, not in place."""


@pytest.mark.usefixtures("server_task_identity")
def test_fedavg_computed_in_place_is_bit_identical_to_flowers_fedavg(tmp_path):
    """MetaStrategy averages for a plain FedAvg itself, on the checked arrays; θ and the
    metrics must be exactly what Flower's FedAvg.aggregate_train gives (weighted by examples)."""
    results = {}
    for aggregator in (FedAvg, SubclassedFedAvg):
        strategy = strategy_over_users(tmp_path / aggregator.__name__, aggregator(
            weighted_by_key=keys.WEIGHT))  # fmt: skip
        strategy.cfg = strategy.cfg.replace(aggregation="weighted")
        node11, node12 = sent_to_two_nodes(strategy, (1, 2, 3, 4))
        gs = {f"train-{i}": grads_like(s) for i, s in enumerate((0.3, -1.7, 2.9, 0.01))}
        examples = {"train-0": 3, "train-1": 7, "train-2": 10, "train-3": 1}
        replies = [
            many_users_reply(node11, {u: gs[u] for u in ("train-0", "train-2")}, examples),
            many_users_reply(node12, {u: gs[u] for u in ("train-1", "train-3")}, examples),
        ]
        arrays, metrics = strategy.aggregate_train(1, replies)
        results[aggregator] = (from_record(arrays), dict(metrics))
    (fast, fast_metrics), (flower, flower_metrics) = results[FedAvg], results[SubclassedFedAvg]
    for k in THETA:
        assert torch.equal(fast[k], flower[k]), k
    assert fast_metrics == flower_metrics and "loss-before" in fast_metrics
    weighted = sum(examples[u] * gs[u]["w"] for u in gs) / sum(examples.values())
    torch.testing.assert_close(fast["w"], THETA["w"] - weighted)


@pytest.mark.usefixtures("server_task_identity")
def test_a_plain_fedavg_with_its_own_metrics_function_gets_it_called(tmp_path):
    def count(records, by):
        weight = sum(r[keys.METRICS][by] for r in records)
        return MetricRecord({"replies": len(records), "weight": weight})

    strategy = strategy_over_users(tmp_path, FedAvg(weighted_by_key=keys.WEIGHT,
                                                    train_metrics_aggr_fn=count))  # fmt: skip
    node11, node12 = sent_to_two_nodes(strategy, (1, 2, 3, 4))
    replies = [
        many_users_reply(node11, {u: grads_like(1.0) for u in ("train-0", "train-2")}),
        many_users_reply(node12, {u: grads_like(2.0) for u in ("train-1", "train-3")}),
    ]
    _, metrics = strategy.aggregate_train(1, replies)
    assert dict(metrics) == {"replies": 4, "weight": 4}


@pytest.mark.usefixtures("server_task_identity")
def test_a_stack_that_cannot_be_read_fails_its_nodes_users_and_a_missing_row_one_user(tmp_path):
    strategy = strategy_over_users(tmp_path, FedAvg(weighted_by_key=keys.WEIGHT))
    node11, node12 = sent_to_two_nodes(strategy, (1, 2, 3, 4))
    g0, g2 = grads_like(1.0), grads_like(2.0)
    good = many_users_reply(node11, {"train-0": g0, "train-2": g2})
    good.content[keys.USER_ROWS] = ConfigRecord({keys.USERS: ["train-0", "train-9"]})
    bad = many_users_reply(node12, {"train-1": g0, "train-3": g2})
    bad.content[keys.USER_ARRAYS] = to_record(
        {k: torch.zeros(3, *v.shape) for k, v in THETA.items()}
    )
    arrays, _ = strategy.aggregate_train(1, [good, bad])
    assert arrays is None  # one valid reply, fewer than min-train-nodes = 2
    rows = {r["client"]: r for r in strategy.recorder.clients if r["phase"] == "train"}
    assert rows[0]["status"] == "ok"
    assert rows[2]["status"] == "failed" and "no update for this user" in rows[2]["reason"]
    for client in (1, 3):
        assert rows[client]["status"] == "failed"
        assert "has shape (3, 2, 2), expected (2, 2, 2)" in rows[client]["reason"]


# --------------------------------------------------------------------------- real simulations


def test_three_users_per_node_move_theta_exactly_as_one_node_per_user(tmp_path):
    """The same users are sampled, and θ moves the same (to float32 rounding), with 1 or 3
    users per node; both equal θ computed here from the users the runs sampled."""
    base = RunConfig(
        num_train_clients=6,
        num_heldout_clients=1,
        fraction_train=0.5,
        min_train_nodes=2,
        num_rounds=2,
        eval_every=100,
        eval_clients=1,
        meta_optimizer="sgd",
        meta_lr=0.1,
    )
    runs = {}
    for per_node in (1, 3):
        cfg = base.replace(users_per_node=per_node, out_dir=str(tmp_path / f"u{per_node}"))
        out = simulate(cfg)
        clients = pd.read_csv(out / "clients.csv")
        train = clients[clients["phase"] == "train"]
        assert (train["status"] == "ok").all()
        assert (train[keys.COMPUTE_S] > 0).all()  # each user's seconds, reported by its node
        rounds = pd.read_csv(out / "rounds.csv").set_index("round")
        assert (rounds.loc[1:, "train-compute-s"] > 0).all()  # round 0: no training
        sampled = {r: sorted(g["client"]) for r, g in train.groupby("round")}
        nodes = train["node_id"].nunique()
        runs[per_node] = (load_checkpoint(out / "checkpoint.pt").params, sampled, nodes)
    (theta1, sampled1, nodes1), (theta3, sampled3, nodes3) = runs[1], runs[3]
    assert sampled1 == sampled3 and all(len(s) == 3 for s in sampled1.values())
    assert nodes1 >= 3 and nodes3 <= 3  # one user per node, and users batched on 3 nodes
    for k in theta1:
        torch.testing.assert_close(theta3[k], theta1[k], rtol=1e-5, atol=1e-7)
    # independent: the sampled users' mean meta-gradients, step by step, in this process
    work = Problem.from_config(base)
    theta = work.initial_params()
    for meta_round in (1, 2):
        grads = [
            work.client_meta_gradient(theta, work.source.client(i), i, meta_round)[0]
            for i in sampled1[meta_round]
        ]
        theta = {k: v - 0.1 * torch.stack([g[k] for g in grads]).mean(0) for k, v in theta.items()}
    for k in theta:
        torch.testing.assert_close(theta1[k], theta[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theta3[k], theta[k], rtol=1e-5, atol=1e-6)


def to_simulated_node(content: RecordDict, message_type: str, cfg: RunConfig):
    """A message with ``content`` to simulated node 7 of a one-node federation, and that
    node's Context for the run ``cfg``: the arguments of a ClientApp handler."""
    from flwr.app import Context

    msg = Message(content, dst_node_id=7, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = f"to-7-{message_type}"
    node_config = {"partition-id": 0, "num-partitions": 1}
    return msg, Context(1, 7, node_config, RecordDict(), cfg.to_mapping())


@pytest.mark.usefixtures("server_task_identity")
def test_a_node_personalizes_its_listed_users_with_the_recipe_the_server_sent(tmp_path):
    """The recipe travels in its own record beside the users list; each listed user's device
    model is personalized by it (not by the run's defaults)."""
    from fedmaml.federated import client_app
    from fedmaml.personalize import load_personalized

    cfg = RunConfig(num_train_clients=2, num_heldout_clients=0, out_dir=str(tmp_path))
    theta = Problem.from_config(cfg).initial_params()
    content = RecordDict(
        {
            keys.ARRAYS: to_record(theta),
            keys.RECIPE: ConfigRecord({"steps": 2, "adapt": "head", "lr": 0.05}),
            keys.CONFIG: ConfigRecord({keys.USERS: ["train-0", "train-1"]}),
        }
    )
    client_app.personalize(*to_simulated_node(content, keys.PERSONALIZE_TYPE, cfg))
    for user in ("train-0", "train-1"):
        model = load_personalized(tmp_path / "personalized" / f"{user}.pt")
        assert (model.steps, model.adapted) == (2, "head")


@pytest.mark.usefixtures("server_task_identity")
def test_each_listed_user_clips_its_update_on_the_device_like_a_node_does(tmp_path):
    """Under dp-clip every user's Δ leaves the node clipped to C, and says so."""
    import math

    from fedmaml.federated import client_app

    cfg = RunConfig(num_train_clients=2, num_heldout_clients=0, dp_clip=1e-4, out_dir=str(tmp_path))
    theta = Problem.from_config(cfg).initial_params()
    content = RecordDict(
        {
            keys.ARRAYS: to_record(theta),
            keys.CONFIG: ConfigRecord({keys.USERS: ["train-0", "train-1"], keys.META_ROUND: 1}),
        }
    )
    reply = client_app.train(*to_simulated_node(content, MessageType.TRAIN, cfg))
    assert list(reply.content[keys.USER_ROWS][keys.USERS]) == ["train-0", "train-1"]
    stacked = from_record(reply.content[keys.USER_ARRAYS])
    for row, user in enumerate(("train-0", "train-1")):
        norm = math.sqrt(sum(float((v[row].double() ** 2).sum()) for v in stacked.values()))
        assert norm == pytest.approx(1e-4, rel=1e-4)
        assert reply.content[keys.user_record(keys.METRICS, user)][keys.CLIPPED_ON_DEVICE] == 1.0


@pytest.mark.usefixtures("server_task_identity")
def test_a_train_reply_says_how_long_the_meta_gradient_took_for_one_user_or_each_of_many():
    """``compute-s``: the node's seconds for the meta-gradient; a batch's users share them."""
    import time

    from fedmaml.federated import client_app

    cfg = RunConfig(num_train_clients=3, num_heldout_clients=0, out_dir="unused")
    theta = to_record(Problem.from_config(cfg).initial_params())
    one = RecordDict({keys.ARRAYS: theta, keys.CONFIG: ConfigRecord({keys.META_ROUND: 1})})
    started = time.perf_counter()
    reply = client_app.train(*to_simulated_node(one, MessageType.TRAIN, cfg))
    took = time.perf_counter() - started
    assert 0 < reply.content[keys.METRICS][keys.COMPUTE_S] < took

    users = ["train-0", "train-1", "train-2"]
    many = RecordDict(
        {keys.ARRAYS: theta, keys.CONFIG: ConfigRecord({keys.USERS: users, keys.META_ROUND: 1})}
    )
    started = time.perf_counter()
    reply = client_app.train(*to_simulated_node(many, MessageType.TRAIN, cfg))
    took = time.perf_counter() - started
    shares = {u: reply.content[keys.user_record(keys.METRICS, u)][keys.COMPUTE_S] for u in users}
    assert len(set(shares.values())) == 1 and 0 < 3 * shares["train-0"] < took
