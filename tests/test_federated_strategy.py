"""MetaStrategy's aggregation step on real Flower messages: the meta-update, and the faults and
attacks that must never reach the global model (client errors, NaN/Inf, wrong shapes, too few
replies, huge finite updates, client-chosen weights, float64 overflow, malformed replies)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg, FedMedian

from fedmaml.config import RunConfig
from fedmaml.errors import NonFiniteError
from fedmaml.federated import keys
from fedmaml.federated.records import from_record, to_record
from fedmaml.federated.replies import BadReply, error_reason, node_info
from fedmaml.federated.strategy import MetaStrategy
from fedmaml.meta.outer import MetaOptimizer
from fedmaml.rundir.recorder import RunRecorder


@pytest.fixture(autouse=True)
def server_task_identity():
    """Messages are created inside a ServerApp process, whose run and node ids Flower sets."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


THETA = {"w": torch.tensor([[1.0, -2.0], [0.5, 3.0]]), "b": torch.tensor([0.25, -0.75])}


def make_strategy(tmp_path, aggregator=None, *, min_train_nodes=2, kind="sgd", lr=0.5, **settings):
    cfg = RunConfig(
        min_train_nodes=min_train_nodes,
        meta_optimizer=kind,
        meta_lr=lr,
        out_dir=str(tmp_path),
        **settings,
    )
    opt = MetaOptimizer(THETA, kind, lr)
    recorder = RunRecorder(tmp_path, cfg.to_mapping())
    updates = []
    strategy = MetaStrategy(
        aggregator or FedAvg(weighted_by_key=keys.WEIGHT),
        opt,
        cfg,
        recorder,
        num_rounds=1,
        on_update=lambda r, p, o: updates.append((r, p)),
    )
    return strategy, opt, recorder, updates


def reply(
    node: int,
    grads: dict[str, torch.Tensor] | None,
    *,
    error: str | None = None,
    extra_metrics: dict | None = None,
) -> Message:
    sent = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    if error is not None:
        return Message(Error(code=0, reason=error), reply_to=sent)
    metrics = {"num-examples": 10, "loss-before": 2.0, "loss-after": 1.0}
    metrics.update(extra_metrics or {})
    content = RecordDict(
        {
            "arrays": to_record({k: -g for k, g in grads.items()}),
            "metrics": MetricRecord(metrics),
        }
    )
    return Message(content, reply_to=sent)


def grads_like(scale: float) -> dict[str, torch.Tensor]:
    return {
        k: torch.full_like(v, scale) + 0.1 * torch.arange(v.numel()).reshape(v.shape)
        for k, v in THETA.items()
    }


def test_sgd_step_is_minus_beta_times_mean_meta_gradient(tmp_path):
    strategy, _, _, updates = make_strategy(tmp_path)
    g1, g2, g3 = grads_like(1.0), grads_like(-3.0), grads_like(0.5)
    arrays, _ = strategy.aggregate_train(1, [reply(1, g1), reply(2, g2), reply(3, g3)])
    new = from_record(arrays)
    for k in THETA:
        expected = THETA[k] - 0.5 * (g1[k] + g2[k] + g3[k]) / 3
        torch.testing.assert_close(new[k], expected)
    assert updates and updates[0][0] == 1


def test_tiny_gradients_survive_exactly(tmp_path):
    """Updates are relative to zero: a gradient 1e-9 of θ's size is not lost to rounding."""
    strategy, _, _, _ = make_strategy(tmp_path, kind="adam", lr=1e-3)
    g = {k: torch.full_like(v, 1e-9) for k, v in THETA.items()}
    arrays, _ = strategy.aggregate_train(1, [reply(1, g), reply(2, g)])
    new = from_record(arrays)
    adam = torch.optim.Adam([p := THETA["w"].clone().requires_grad_()], lr=1e-3)
    p.grad = g["w"].clone()
    adam.step()
    torch.testing.assert_close(new["w"], p.detach())
    assert not torch.equal(new["w"], THETA["w"])


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda: reply(9, None, error="ValueError: boom"), id="client-raised"),
        pytest.param(
            lambda: reply(9, {k: torch.full_like(v, float("nan")) for k, v in THETA.items()}),
            id="nan",
        ),
        pytest.param(
            lambda: reply(9, {k: torch.full_like(v, float("inf")) for k, v in THETA.items()}),
            id="inf",
        ),
        pytest.param(
            lambda: reply(9, {"w": torch.zeros(3, 3), "b": torch.zeros(2)}), id="wrong-shape"
        ),
        pytest.param(lambda: reply(9, {"w": torch.zeros(2, 2)}), id="missing-key"),
        pytest.param(
            lambda: reply(9, grads_like(1.0), extra_metrics={"loss-after": float("nan")}),
            id="nan-metric",
        ),
    ],
)
def test_bad_reply_is_left_out_and_logged(tmp_path, bad):
    strategy, _, recorder, _ = make_strategy(tmp_path)
    g1, g2 = grads_like(1.0), grads_like(2.0)
    arrays, _ = strategy.aggregate_train(1, [reply(1, g1), bad(), reply(2, g2)])
    new = from_record(arrays)
    for k in THETA:
        torch.testing.assert_close(new[k], THETA[k] - 0.5 * (g1[k] + g2[k]) / 2)
        assert torch.isfinite(new[k]).all()
    failed = [r for r in recorder.clients if r["status"] == "failed"]
    assert [r["node_id"] for r in failed] == [9]
    assert failed[0]["reason"]
    assert recorder.rounds[1]["ok"] == 2 and recorder.rounds[1]["failed"] == 1
    assert (tmp_path / "clients.csv").read_text().count("failed") == 1


def test_too_few_valid_replies_skip_the_update(tmp_path, caplog):
    strategy, opt, recorder, updates = make_strategy(tmp_path, min_train_nodes=2)
    before = opt.current()
    arrays, _ = strategy.aggregate_train(
        1, [reply(1, grads_like(1.0)), reply(2, None, error="died")]
    )
    assert arrays is None and not updates
    for k in THETA:
        assert torch.equal(opt.current()[k], before[k])
    assert recorder.rounds[1]["updated"] is False


def test_robust_aggregator_median_applies_to_meta_gradients(tmp_path):
    strategy, _, _, _ = make_strategy(tmp_path, FedMedian(weighted_by_key=keys.WEIGHT), lr=1.0)
    gs = [grads_like(s) for s in (1.0, 2.0, 100.0)]  # one outlier client
    arrays, _ = strategy.aggregate_train(1, [reply(i + 1, g) for i, g in enumerate(gs)])
    new = from_record(arrays)
    for k in THETA:
        median = torch.from_numpy(np.median(np.stack([g[k].numpy() for g in gs]), axis=0))
        torch.testing.assert_close(new[k], THETA[k] - median)


def test_configure_train_sends_theta_but_aggregates_relative_to_zero(tmp_path):
    """The wrapped strategy's reference is zero; clients receive θ."""
    strategy, _, _, _ = make_strategy(tmp_path)
    assert all(not a.numpy().any() for a in strategy._zero.values())
    record = to_record(THETA)
    assert isinstance(record, ArrayRecord) and set(record.keys()) == set(THETA)


def test_weighted_aggregation_weights_clients_by_query_examples(tmp_path):
    strategy, _, _, _ = make_strategy(tmp_path, lr=1.0, aggregation="weighted", query_size=30)
    g1, g2 = grads_like(1.0), grads_like(-2.0)
    replies = [
        reply(1, g1, extra_metrics={"num-examples": 30}),
        reply(2, g2, extra_metrics={"num-examples": 10}),
    ]
    new = from_record(strategy.aggregate_train(1, replies)[0])
    for k in THETA:
        torch.testing.assert_close(new[k], THETA[k] - (30 * g1[k] + 10 * g2[k]) / 40)


# --------------------------------------------------------------------------- attacks


def honest_pair():
    return grads_like(1.0), grads_like(2.0)


def assert_sane(new, opt_kind_lr=0.5, scale=10.0):
    for k in THETA:
        assert torch.isfinite(new[k]).all()
        assert (new[k] - THETA[k]).abs().max() < scale, k


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_huge_finite_update_is_left_out_under_mean(tmp_path, kind):
    """1e30 is finite: under the mean it would move θ by 1e28 (SGD) or overflow Adam's second
    moment, freezing θ for good. The automatic norm bound leaves it out."""
    strategy, opt, recorder, _ = make_strategy(tmp_path, kind=kind, lr=0.01)
    g1, g2 = honest_pair()
    huge = {k: torch.full_like(v, 1e30) for k, v in THETA.items()}
    arrays, _ = strategy.aggregate_train(1, [reply(1, g1), reply(9, huge), reply(2, g2)])
    assert arrays is not None
    assert_sane(from_record(arrays))
    bad = [r for r in recorder.clients if r["node_id"] == 9]
    assert bad[0]["status"] == "failed" and "norm" in bad[0]["reason"]
    # Adam's state stays finite, so later rounds still move θ
    state = opt.state_dict()["state"]
    assert all(torch.isfinite(t).all() for s in state.values() for t in s.values() if t.dim())
    arrays2, _ = strategy.aggregate_train(2, [reply(1, g1), reply(2, g2)])
    assert not torch.equal(from_record(arrays2)["w"], from_record(arrays)["w"])


def test_an_explicit_max_update_norm_clips(tmp_path):
    strategy, _, recorder, _ = make_strategy(tmp_path, lr=1.0, max_update_norm=1.0)
    g = {k: torch.full_like(v, 3.0) for k, v in THETA.items()}  # norm 3·√6
    small = {k: torch.full_like(v, 0.1) for k, v in THETA.items()}  # norm 0.1·√6 < 1
    new = from_record(strategy.aggregate_train(1, [reply(1, g), reply(2, small)])[0])
    norm = float(torch.sqrt(sum((v**2).sum() for v in g.values())))
    for k in THETA:
        clipped = g[k] / norm
        torch.testing.assert_close(new[k], THETA[k] - (clipped + small[k]) / 2)
    assert recorder.rounds[1]["clipped"] == 1


def test_an_unbounded_huge_update_under_adam_is_rolled_back(tmp_path):
    """With the bound switched off, Adam's second moment overflows: the step is undone."""
    strategy, opt, recorder, updates = make_strategy(
        tmp_path, kind="adam", lr=0.01, max_update_norm=float("inf")
    )
    before = opt.current()
    huge = {k: torch.full_like(v, 1e30) for k, v in THETA.items()}
    arrays, _ = strategy.aggregate_train(1, [reply(1, huge), reply(2, huge)])
    assert arrays is None and not updates and recorder.rounds[1]["updated"] is False
    for k in THETA:
        assert torch.equal(opt.current()[k], before[k])
    assert opt.state_dict()["state"] == {}  # as before the undone step


@pytest.mark.parametrize("weight", [1e9, -2.999, 0])
def test_client_chosen_weights_are_ignored_under_uniform(tmp_path, weight):
    """A node's own task-weight never reaches the aggregation: the server gives each task 1."""
    strategy, _, recorder, _ = make_strategy(tmp_path, lr=1.0)
    g1, g2 = honest_pair()
    replies = [
        reply(1, g1, extra_metrics={"task-weight": 1}),
        reply(2, g2, extra_metrics={"task-weight": weight}),
    ]
    new = from_record(strategy.aggregate_train(1, replies)[0])
    for k in THETA:
        torch.testing.assert_close(new[k], THETA[k] - (g1[k] + g2[k]) / 2)
    assert recorder.rounds[1]["ok"] == 2


@pytest.mark.parametrize("aggregator", ["mean", "median", "trimmed-mean"])
@pytest.mark.parametrize("count", [0, -5, 1e9, 2.5])
def test_unbounded_example_counts_are_refused_under_weighted(tmp_path, aggregator, count):
    """Counts the server cannot have asked for (0, negative, inflated, fractional) leave the node
    out; zero-sum weights can never reach the aggregation (no ZeroDivisionError)."""
    from fedmaml.federated.server_app import build_aggregator

    strategy, _, recorder, _ = make_strategy(tmp_path, lr=1.0, aggregation="weighted")
    strategy.aggregator = build_aggregator(strategy.cfg.replace(aggregator=aggregator))
    g1, g2 = honest_pair()
    replies = [
        reply(1, g1),
        reply(2, g2),
        reply(9, g2, extra_metrics={"num-examples": count}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    bad = next(r for r in recorder.clients if r["node_id"] == 9)
    assert bad["status"] == "failed" and "num-examples" in bad["reason"]
    # every reply claiming zero examples: nothing to aggregate, the round is skipped cleanly
    strategy2, _, recorder2, _ = make_strategy(tmp_path / "all", aggregation="weighted")
    zero = [reply(n, g1, extra_metrics={"num-examples": 0}) for n in (1, 2, 3)]
    assert strategy2.aggregate_train(1, zero) == (None, None)
    assert recorder2.rounds[1]["updated"] is False


def test_a_float64_reply_that_overflows_float32_is_left_out(tmp_path):
    strategy, _, recorder, _ = make_strategy(tmp_path, lr=1.0)
    g1, g2 = honest_pair()
    sent = Message(RecordDict({}), dst_node_id=9, message_type=MessageType.TRAIN)
    overflow = {k: np.full(v.shape, -1e300, dtype=np.float64) for k, v in THETA.items()}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in overflow.items()}),
            "metrics": MetricRecord({"num-examples": 10, "loss-before": 1.0, "loss-after": 1.0}),
        }
    )
    arrays, _ = strategy.aggregate_train(
        1, [reply(1, g1), Message(content, reply_to=sent), reply(2, g2)]
    )
    new = from_record(arrays)
    for k in THETA:
        torch.testing.assert_close(new[k], THETA[k] - (g1[k] + g2[k]) / 2)
        assert new[k].dtype == torch.float32
    bad = next(r for r in recorder.clients if r["node_id"] == 9)
    assert "NaN or Inf" in bad["reason"]


def test_a_float64_reply_in_range_is_cast_and_used(tmp_path):
    strategy, _, _, _ = make_strategy(tmp_path, lr=1.0)
    g1, g2 = honest_pair()
    sent = Message(RecordDict({}), dst_node_id=2, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(-v.double().numpy()) for k, v in g2.items()}),
            "metrics": MetricRecord({"num-examples": 10, "loss-before": 1.0, "loss-after": 1.0}),
        }
    )
    new = from_record(
        strategy.aggregate_train(1, [reply(1, g1), Message(content, reply_to=sent)])[0]
    )
    for k in THETA:
        assert new[k].dtype == torch.float32
        torch.testing.assert_close(new[k], THETA[k] - (g1[k] + g2[k]) / 2)


def describe_reply(node: int, content: RecordDict | None = None, error: str | None = None):
    sent = Message(RecordDict({}), dst_node_id=node, message_type=keys.DESCRIBE_TYPE)
    if error is not None:
        return Message(Error(code=2, reason=error), reply_to=sent)
    return Message(content, reply_to=sent)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (RecordDict({}), "lacks"),
        (RecordDict({"describe": ConfigRecord({"role": "train", "client-index": "abc"})}), "abc"),
        (RecordDict({"describe": ConfigRecord({"role": "boss", "client-index": 1})}), "boss"),
        (RecordDict({"describe": ConfigRecord({"role": "train", "client-index": -3})}), "-3"),
    ],
)
def test_a_malformed_describe_reply_is_that_nodes_failure(content, words):
    with pytest.raises(BadReply, match=words):
        node_info(describe_reply(4, content))


def test_a_good_describe_reply_names_the_client():
    record = ConfigRecord(
        {
            "role": "heldout",
            "client-index": 3,
            "client-id": "writer f0123",
            "num-examples": 7,
            "num-partitions": 12,
        }
    )
    info = node_info(describe_reply(4, RecordDict({"describe": record})))
    assert (info.role, info.index, info.client_id, info.num_partitions) == (
        "heldout",
        3,
        "writer f0123",
        12,
    )


def test_a_ray_traceback_becomes_one_plain_line():
    reason = (
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\x1b[36mray::Actor\x1b[39m "
        '(pid=1)\n  File "x.py", line 3\nfedmaml.errors.FedmamlError: train writer 81 does '
        "not exist (0..80)'>"
    )
    line = error_reason(describe_reply(4, error=reason))
    assert "\x1b" not in line and "\n" not in line
    assert line.endswith("train writer 81 does not exist (0..80)")


def test_malformed_evaluate_replies_leave_only_their_node_out(tmp_path):
    strategy, _, recorder, _ = make_strategy(tmp_path)
    sent = [
        Message(RecordDict({}), dst_node_id=n, message_type=MessageType.EVALUATE)
        for n in (1, 2, 3, 4)
    ]
    good = Message(
        RecordDict({"metrics": MetricRecord({"loss-0": 2.0, "loss-1": 1.0})}), reply_to=sent[0]
    )
    missing = Message(RecordDict({}), reply_to=sent[1])
    nan = Message(RecordDict({"metrics": MetricRecord({"loss-0": float("nan")})}), reply_to=sent[2])
    text = Message(RecordDict({"metrics": ConfigRecord({"loss-0": "abc"})}), reply_to=sent[3])
    summary = strategy.log.per_group(1, "evaluate", [good, missing, nan, text])
    assert summary == {"seen-loss-0": 2.0, "seen-loss-1": 1.0}
    status = {r["node_id"]: r["status"] for r in recorder.clients}
    assert status == {1: "ok", 2: "failed", 3: "failed", 4: "failed"}


def test_metaoptimizer_undoes_a_step_that_overflows_adam():
    opt = MetaOptimizer(THETA, "adam", 1e-3)
    opt.step({k: torch.ones_like(v) for k, v in THETA.items()})
    before, state = opt.current(), copy.deepcopy(opt.state_dict())
    with pytest.raises(NonFiniteError, match="undone"):
        opt.step({k: torch.full_like(v, 1e30) for k, v in THETA.items()})
    after = opt.state_dict()
    for k in THETA:
        assert torch.equal(opt.current()[k], before[k])
    for i, s in state["state"].items():
        for name, t in s.items():
            assert torch.equal(after["state"][i][name], t)
