"""The core's one adaptation path: curves of one or many episodes (vmapped or looped), their
mean, the shared engine choice, and the registry of algorithm names that every entry point
reads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmaml.commands.simulate import register
from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError, NonFiniteError
from fedmaml.meta import (
    ALGORITHMS,
    adaptation_curve,
    adaptation_curves,
    mean_curve,
    meta_gradient,
    model_params,
    with_inner_lrs,
)
from fedmaml.meta.algorithms import resolve
from fedmaml.meta.algorithms.base import Algorithm
from fedmaml.meta.engines import loop_engine, uses_vmap, vmap_engine
from fedmaml.meta.evaluate import AdaptationDiverged
from fedmaml.models import build_model

Pair = tuple[Tensor, Tensor]


def pairs(n: int, size: int, seed: int, features: int = 1) -> list[Pair]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, features, generator=g), torch.randn(size, 1, generator=g))
        for _ in range(n)
    ]


@pytest.fixture
def sine():
    torch.manual_seed(0)
    model = build_model("sine_mlp")
    return model, model_params(model)


# --------------------------------------------------------------------------- curves


@pytest.mark.parametrize("batching", ["auto", "vmap", "loop"])
def test_many_curves_equal_one_curve_per_episode(sine, batching):
    model, theta = sine
    supports = pairs(5, 10, seed=1) + pairs(2, 7, seed=2)  # two shapes: grouped for vmap
    queries = pairs(5, 6, seed=3) + pairs(2, 6, seed=4)
    done: list[int] = []
    curves = adaptation_curves(
        model, theta, supports, queries, loss_fn=F.mse_loss, steps=3, inner_lr=0.05,
        batching=batching, chunk_size=3, progress=done.append,
    )  # fmt: skip
    assert sum(done) == 7
    assert done == ([1] * 7 if batching == "loop" else [3, 2, 2])
    for curve, s, q in zip(curves, supports, queries, strict=True):
        one, _ = adaptation_curve(model, theta, s, q, loss_fn=F.mse_loss, steps=3, inner_lr=0.05)
        assert len(curve) == 4 and curve[0].keys() == {"loss"}
        assert [e["loss"] for e in curve] == pytest.approx([e["loss"] for e in one], rel=1e-5)


def test_classification_curves_hold_accuracy_and_learned_step_sizes_are_used():
    torch.manual_seed(1)
    model = build_model("mlp", in_features=2, out_features=3)
    theta = model_params(model)
    g = torch.Generator().manual_seed(2)
    episodes = [
        (torch.randn(9, 2, generator=g), torch.randint(0, 3, (9,), generator=g)) for _ in range(6)
    ]
    learned = with_inner_lrs(theta, 0.3)
    kw = dict(loss_fn=F.cross_entropy, steps=2)
    vmapped = adaptation_curves(model, learned, episodes[:3], episodes[3:], batching="vmap", **kw)
    looped = adaptation_curves(model, theta, episodes[:3], episodes[3:], inner_lr=0.3, **kw)
    for a, b in zip(vmapped, looped, strict=True):
        assert [e.keys() for e in a] == [{"loss", "accuracy"}] * 3
        for ea, eb in zip(a, b, strict=True):
            assert ea == pytest.approx(eb, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_the_first_diverged_episode_is_named(sine, batching):
    model, theta = sine
    supports = pairs(4, 8, seed=5)
    supports[2] = (100 * supports[2][0], 1e4 * supports[2][1])
    supports[3] = (100 * supports[3][0], 1e4 * supports[3][1])
    with pytest.raises(AdaptationDiverged, match="episode 2") as info:
        adaptation_curves(
            model, theta, supports, pairs(4, 5, seed=6), loss_fn=F.mse_loss, steps=5,
            inner_lr=0.05, batching=batching,
        )  # fmt: skip
    assert info.value.episode == 2 and isinstance(info.value, NonFiniteError)


def test_bad_batching_and_chunk_size_are_refused(sine):
    model, theta = sine
    args = (model, theta, pairs(2, 5, seed=7), pairs(2, 5, seed=8))
    with pytest.raises(FedmamlError, match="unknown batching 'threads'"):
        adaptation_curves(*args, loss_fn=F.mse_loss, steps=1, batching="threads")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(FedmamlError, match="chunk_size"):
            adaptation_curves(*args, loss_fn=F.mse_loss, steps=1, chunk_size=bad)


def test_a_model_with_buffers_is_looped_and_keeps_its_statistics():
    model = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    theta = model_params(model)
    curves = adaptation_curves(
        model, theta, pairs(3, 6, seed=9), pairs(3, 6, seed=10), loss_fn=F.mse_loss, steps=2
    )
    assert len(curves) == 3
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    with pytest.raises(FedmamlError, match="buffers"):
        adaptation_curves(
            model, theta, pairs(3, 6, seed=9), pairs(3, 6, seed=10), loss_fn=F.mse_loss,
            steps=2, batching="vmap",
        )  # fmt: skip


def test_mean_curve_is_the_entrywise_mean():
    a = [{"loss": 1.0, "accuracy": 0.5}, {"loss": 0.5, "accuracy": 0.75}]
    b = [{"loss": 3.0, "accuracy": 0.0}, {"loss": 1.5, "accuracy": 0.25}]
    assert mean_curve([a, b]) == [{"loss": 2.0, "accuracy": 0.25}, {"loss": 1.0, "accuracy": 0.5}]
    assert mean_curve([a]) == a
    assert mean_curve([]) == []


# --------------------------------------------------------------------------- engine choice


def test_one_engine_choice_serves_gradients_and_curves():
    sine, conv = build_model("sine_mlp"), build_model("conv4", ways=5)
    bn = nn.Sequential(nn.Linear(1, 2), nn.BatchNorm1d(2))
    buffers = dict(bn.named_buffers())
    assert uses_vmap(sine, {}, "auto") and not uses_vmap(conv, {}, "auto")
    assert not uses_vmap(bn, buffers, "auto") and not uses_vmap(sine, {}, "loop")
    assert uses_vmap(conv, {}, "vmap")
    with pytest.raises(FedmamlError, match="buffers"):
        uses_vmap(bn, buffers, "vmap")


def test_a_custom_algorithm_runs_on_both_engines(sine):
    """An Algorithm object (here: plain SGD on the query set at θ) goes where a name goes."""
    from fedmaml.meta.batch import EpisodeBatch, leaves

    class QueryGradient(Algorithm):
        name = "query-gradient"

        def meta_gradient(self, batch: EpisodeBatch):
            start = leaves(batch.theta)
            return {
                k: g / batch.n
                for k, g in zip(
                    start,
                    torch.autograd.grad(
                        batch.query_loss(batch.expand(start)), list(start.values())
                    ),
                    strict=True,
                )
            }

    model, theta = sine
    supports, queries = pairs(3, 5, seed=11), pairs(3, 5, seed=12)
    grads = {}
    for batching in ("loop", "vmap"):
        grads[batching], metrics = meta_gradient(
            model, theta, supports, queries, loss_fn=F.mse_loss, algorithm=QueryGradient(),
            batching=batching,
        )  # fmt: skip
        assert metrics["loss_after"] == pytest.approx(metrics["loss_before"])
    torch.testing.assert_close(grads["vmap"], grads["loop"])
    with pytest.raises(FedmamlError, match="algorithm must be a name"):
        meta_gradient(model, theta, supports, queries, loss_fn=F.mse_loss, algorithm=3)  # type: ignore[arg-type]
    assert {vmap_engine, loop_engine}  # both engines are public


# --------------------------------------------------------------------------- the registry


def test_registry_is_the_one_list_of_names():
    assert ALGORITHMS == ("maml", "fomaml", "metasgd", "reptile", "fedavg", "anil", "perfedavg")
    for name in ALGORITHMS:
        algorithm = resolve(name)
        assert isinstance(algorithm, Algorithm) and algorithm.name == name
        assert RunConfig(algorithm=name).algorithm == name
    assert resolve("anil").adapted == "head" and resolve("maml").adapted == "all"
    assert resolve("metasgd").learns_inner_lr and not resolve("perfedavg").learns_inner_lr
    with pytest.raises(FedmamlError, match=r"algorithm.*'mamll'.*anil.*perfedavg"):
        RunConfig(algorithm="mamll")


def test_simulate_accepts_every_registered_algorithm():
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    for name in ALGORITHMS:
        assert parser.parse_args(["simulate", "--algorithm", name]).algorithm == name
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate", "--algorithm", "mamll"])


def test_reading_the_names_does_not_import_torch():
    code = (
        "import sys, fedmaml.config, fedmaml.meta, fedmaml.meta.algorithms as a; "
        "assert len(a.ALGORITHMS) == 7; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
