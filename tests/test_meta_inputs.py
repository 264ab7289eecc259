"""Bad input to the MAML core: one FedmamlError naming the problem, and nothing modified."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fedmaml.errors import FedmamlError, NonFiniteError
from fedmaml.meta import ALGORITHMS, adapt, meta_gradient, model_params, with_inner_lrs
from fedmaml.meta.evaluate import adaptation_curve
from fedmaml.models import build_model


def data(n: int = 6, features: int = 1, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randn(n, 1, generator=g)


@pytest.fixture
def sine():
    model = build_model("sine_mlp")
    return model, model_params(model)


def call(model, params, support, query, **kwargs):
    return meta_gradient(model, params, support, query, loss_fn=F.mse_loss, **kwargs)


@pytest.mark.parametrize(
    ("support", "query", "words"),
    [
        ((torch.randn(5, 1), torch.randn(4, 1)), data(), ["5 inputs", "4 labels"]),
        (data(), (torch.randn(6, 1), torch.randn(7, 1)), ["query", "labels"]),
        (data(features=1), data(features=2), ["differ in shape"]),
        ((torch.randn(0, 1), torch.randn(0, 1)), data(), ["support", "empty"]),
        (data(), (torch.randn(0, 1), torch.randn(0, 1)), ["query", "empty"]),
        ((torch.tensor(1.0), torch.tensor(2.0)), data(), ["dimension"]),
        ([data(), data()], [data()], ["2 support sets but 1 query"]),
        ([], [], ["no episodes"]),
        ((torch.randn(3, 1), [1.0, 2.0, 3.0]), data(), ["must hold tensors", "list"]),
    ],
    ids=[
        "support-lengths",
        "query-lengths",
        "feature-shapes",
        "empty-support",
        "empty-query",
        "scalar",
        "episode-count",
        "no-episodes",
        "list-labels",
    ],
)
def test_malformed_episodes_are_named(sine, support, query, words):
    model, params = sine
    with pytest.raises(FedmamlError) as info:
        call(model, params, support, query)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("where", ["support-x", "support-y", "query-x", "query-y"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_data_is_refused(sine, where, bad):
    model, params = sine
    support, query = data(seed=1), data(seed=2)
    part = support if where.startswith("support") else query
    part[0 if where.endswith("x") else 1][2] = bad
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        call(model, params, support, query)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_divergent_inner_loop_raises_non_finite(sine, algorithm):
    model, params = sine
    support = (100 * torch.randn(8, 1), 100 * torch.randn(8, 1))
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        call(model, params, support, data(), algorithm=algorithm, inner_steps=3, inner_lr=1e30)


def test_divergent_adaptation_raises_non_finite(sine):
    model, params = sine
    support = (100 * torch.randn(8, 1), 100 * torch.randn(8, 1))
    with pytest.raises(NonFiniteError):
        adapt(model, params, support, loss_fn=F.mse_loss, inner_steps=3, inner_lr=1e30)
    with pytest.raises(NonFiniteError):
        adaptation_curve(model, params, support, data(), loss_fn=F.mse_loss, steps=3, inner_lr=1e30)


def test_non_finite_learned_step_size_is_refused(sine):
    model, params = sine
    learned = with_inner_lrs(params, 0.01)
    learned["inner_lr.0.weight"][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"0\.weight"):
        call(model, learned, data(), data(seed=1), algorithm="metasgd")


@pytest.mark.parametrize("lr", [0, 0.0, -0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_inner_lr(sine, lr):
    model, params = sine
    for algorithm in ("maml", "metasgd"):
        with pytest.raises(FedmamlError, match="inner_lr"):
            call(model, params, data(), data(seed=1), algorithm=algorithm, inner_lr=lr)
    with pytest.raises(FedmamlError, match="inner_lr"):
        adapt(model, params, data(), loss_fn=F.mse_loss, inner_lr=lr)


@pytest.mark.parametrize("steps", [0, -1, 1.5, 2.0, True, "2"])
def test_bad_inner_steps(sine, steps):
    model, params = sine
    with pytest.raises(FedmamlError, match="inner_steps"):
        call(model, params, data(), data(seed=1), inner_steps=steps)
    with pytest.raises(FedmamlError, match="inner_steps"):
        adapt(model, params, data(), loss_fn=F.mse_loss, inner_steps=steps)


@pytest.mark.parametrize(("key", "value"), [("algorithm", "mamll"), ("batching", "threads")])
def test_unknown_choices_list_the_allowed_ones(sine, key, value):
    model, params = sine
    with pytest.raises(FedmamlError) as info:
        call(model, params, data(), data(seed=1), **{key: value})
    assert value in str(info.value) and key in str(info.value)
    assert ("fomaml" if key == "algorithm" else "vmap") in str(info.value)


def test_unknown_model_name():
    with pytest.raises(FedmamlError, match=r"unknown model 'resnet'.*sine_mlp"):
        build_model("resnet")
    with pytest.raises(FedmamlError, match="sine_mlp"):
        build_model("sine_mlp", width=3)


def test_vmap_refuses_ragged_episodes(sine):
    model, params = sine
    with pytest.raises(FedmamlError, match="same shapes"):
        call(model, params, [data(4), data(6)], [data(5), data(5)], batching="vmap")
    grads, _ = call(model, params, [data(4), data(6)], [data(5), data(5)], batching="auto")
    assert set(grads) == set(params)


def test_params_of_another_architecture(sine):
    model, _ = sine
    narrower = model_params(build_model("sine_mlp", hidden=20))
    with pytest.raises(FedmamlError, match=r"shape \(20, 1\).*\(40, 1\).*architecture"):
        call(model, narrower, data(), data(seed=1))
    other = model_params(build_model("mlp", in_features=1, out_features=1))
    del other["4.bias"]
    with pytest.raises(FedmamlError, match=r"missing: \['4.bias'\]"):
        adapt(model, other, data(), loss_fn=F.mse_loss)
    with pytest.raises(FedmamlError, match="unexpected"):
        call(model, {**model_params(model), "head.weight": torch.zeros(1)}, data(), data())


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_input_of_wrong_shape_names_the_shape(sine, batching):
    model, params = sine
    support, query = data(5, features=3), data(5, features=3, seed=1)
    with pytest.raises(FedmamlError, match=r"\(5, 3\)"):
        call(model, params, [support, support], [query, query], batching=batching)


def test_wrong_shape_in_adapt_and_curve_is_a_fedmaml_error(sine):
    model, params = sine
    support, query = data(5, features=3), data(5, features=3, seed=1)
    with pytest.raises(FedmamlError, match=r"\(5, 3\)"):
        adapt(model, params, support, loss_fn=F.mse_loss)
    with pytest.raises(FedmamlError, match=r"\(5, 3\)"):
        adaptation_curve(model, params, support, query, loss_fn=F.mse_loss, steps=2)


def test_conv_input_of_wrong_shape_names_the_shape():
    model = build_model("conv4", ways=5)
    x, y = torch.randn(5, 28, 28), torch.arange(5)  # channel dimension missing
    with pytest.raises(FedmamlError, match=r"\(5, 28, 28\)"):
        meta_gradient(model, model_params(model), (x, y), (x, y), loss_fn=F.cross_entropy)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_inputs_are_not_modified_in_place(sine, algorithm, batching):
    model, _ = sine
    params = dict(model.named_parameters())  # live parameters, requiring grad
    if algorithm == "metasgd":
        params = with_inner_lrs(params, 0.05)
    before = {k: v.detach().clone() for k, v in params.items()}
    supports, queries = [data(seed=1), data(seed=2)], [data(seed=3), data(seed=4)]
    data_before = [t.clone() for pair in supports + queries for t in pair]
    call(model, params, supports, queries, algorithm=algorithm, inner_steps=2, batching=batching)
    adapt(model, params, supports[0], loss_fn=F.mse_loss, inner_steps=2)
    adaptation_curve(model, params, supports[0], queries[0], loss_fn=F.mse_loss, steps=2)
    for k, v in params.items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    for t, t0 in zip((t for pair in supports + queries for t in pair), data_before, strict=True):
        assert torch.equal(t, t0)


def test_running_statistics_of_the_model_are_not_touched():
    """A model with BatchNorm running buffers runs on the loop engine and keeps its buffers."""
    model = torch.nn.Sequential(
        torch.nn.Linear(1, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    )
    params = model_params(model)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    supports, queries = [data(seed=1), data(seed=2)], [data(seed=3), data(seed=4)]
    for algorithm in ALGORITHMS:
        call(model, params, supports, queries, algorithm=algorithm, batching="auto")
    adapt(model, params, supports[0], loss_fn=F.mse_loss, inner_steps=2)
    adaptation_curve(model, params, supports[0], queries[0], loss_fn=F.mse_loss, steps=2)
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    with pytest.raises(FedmamlError, match="buffers"):
        call(model, params, supports, queries, batching="vmap")
