"""MetaStrategy's aggregation step on real Flower messages: the meta-update, and the faults that
must never reach the global model (client errors, NaN/Inf, wrong shapes, too few replies)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian

from fedmaml.config import RunConfig
from fedmaml.federated.records import from_record, to_record
from fedmaml.federated.strategy import MetaStrategy
from fedmaml.meta.outer import MetaOptimizer
from fedmaml.results import RunRecorder


@pytest.fixture(autouse=True)
def server_task_identity():
    """Messages are created inside a ServerApp process, whose run and node ids Flower sets."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


THETA = {"w": torch.tensor([[1.0, -2.0], [0.5, 3.0]]), "b": torch.tensor([0.25, -0.75])}


def make_strategy(tmp_path, aggregator=None, *, min_train_nodes=2, kind="sgd", lr=0.5):
    cfg = RunConfig(
        min_train_nodes=min_train_nodes, meta_optimizer=kind, meta_lr=lr, out_dir=str(tmp_path)
    )
    opt = MetaOptimizer(THETA, kind, lr)
    recorder = RunRecorder(tmp_path, cfg.to_mapping())
    updates = []
    strategy = MetaStrategy(
        aggregator or FedAvg(weighted_by_key="task-weight"),
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
    metrics = {"num-examples": 10, "task-weight": 1, "loss-before": 2.0, "loss-after": 1.0}
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
    strategy, _, _, _ = make_strategy(tmp_path, FedMedian(weighted_by_key="task-weight"), lr=1.0)
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
    strategy, _, _, _ = make_strategy(tmp_path, FedAvg(weighted_by_key="num-examples"), lr=1.0)
    g1, g2 = grads_like(1.0), grads_like(-2.0)
    replies = [
        reply(1, g1, extra_metrics={"num-examples": 30}),
        reply(2, g2, extra_metrics={"num-examples": 10}),
    ]
    new = from_record(strategy.aggregate_train(1, replies)[0])
    for k in THETA:
        torch.testing.assert_close(new[k], THETA[k] - (30 * g1[k] + 10 * g2[k]) / 40)
