"""The ServerApp's background checkpoint writer: ordered saves of snapshots, errors raised."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from fedmaml.checkpoint import Checkpoint, CheckpointSaver, load_checkpoint
from fedmaml.errors import FedmamlError
from fedmaml.meta.outer import MetaOptimizer

THETA = {"w": torch.tensor([[1.0, -2.0], [0.5, 3.0]]), "b": torch.tensor([0.25, -0.75])}


def checkpoint(opt: MetaOptimizer, meta_round: int) -> Checkpoint:
    return Checkpoint(
        params=opt.current(),
        model="mlp",
        model_kwargs={"in_features": 2, "out_features": 2},
        round=meta_round,
        optimizer_state=opt.state_dict(),
    )


def step(opt: MetaOptimizer) -> None:
    opt.step({k: torch.ones_like(v) for k, v in THETA.items()})


def test_saves_in_order_and_each_holds_the_state_at_save_time(tmp_path):
    opt = MetaOptimizer(THETA, "adam", 0.1)
    saver = CheckpointSaver(tmp_path / "checkpoint.pt")
    for meta_round in (1, 2):
        step(opt)
        saver.save(checkpoint(opt, meta_round))
    step(opt)
    expected_params = opt.current()
    expected_state = copy.deepcopy(opt.state_dict())
    blocker = threading.Event()
    saver._pool.submit(blocker.wait, 10)  # keep the writer busy: round 3's save has to queue
    saver.save(checkpoint(opt, 3))
    step(opt)  # θ and Adam's moments change in place while round 3's save waits
    blocker.set()
    saver.close()
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved.round == 3
    for k in THETA:
        torch.testing.assert_close(saved.params[k], expected_params[k], rtol=0, atol=0)
    for i, moments in expected_state["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(
                saved.optimizer_state["state"][i][name], moments[name], rtol=0, atol=0
            )
    assert not torch.equal(
        saved.optimizer_state["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


def test_a_failed_save_is_raised_once_by_the_next_save_or_by_close(tmp_path):
    opt = MetaOptimizer(THETA, "sgd", 0.1)
    (tmp_path / "checkpoint.pt").mkdir()  # a folder where the file should go
    saver = CheckpointSaver(tmp_path / "checkpoint.pt")
    saver.save(checkpoint(opt, 1))
    with pytest.raises(FedmamlError, match="is a folder"):
        saver.save(checkpoint(opt, 2))
    saver.close()  # already raised: the run stops with that error, not a second one

    saver = CheckpointSaver(tmp_path / "checkpoint.pt")
    saver.save(checkpoint(opt, 1))
    with pytest.raises(FedmamlError, match="is a folder"):
        saver.close()
