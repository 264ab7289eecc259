"""ANIL (head-only inner loop, second-order outer gradient) and head-only adaptation.

The meta-gradient is checked against central finite differences of the post-adaptation query
loss L_Q(θ'(θ)) over body and head coordinates (float64) and against a plain per-task autograd
ANIL written here; both engines must agree, and adapting the head must leave the body's
parameters bit-identical everywhere it is offered (adapt, curves, personalization).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fedmaml.centralized import meta_train
from fedmaml.checkpoint import Checkpoint
from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.meta import adapt, adaptation_curve, head_names, meta_gradient, model_params
from fedmaml.meta.adapted import adapted_names
from fedmaml.meta.inner import autograd_grad_fn
from fedmaml.models import build_model
from fedmaml.personalize import personalize, personalize_many
from fedmaml.tasks import EpisodeSpec
from fedmaml.tasks.sine import SineFamily

Pair = tuple[Tensor, Tensor]
Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def tanh_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def bn_convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, kernel_size=3, padding=1),
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 3),
    )


def regression(n: int, seed: int) -> list[tuple[Pair, Pair]]:
    g = torch.Generator().manual_seed(seed)

    def pair(size: int) -> Pair:
        x = torch.randn(size, 2, generator=g)
        y = torch.stack([torch.sin(x.sum(1)), torch.cos(x[:, 0]), x[:, 1] ** 2], 1)
        return x, y + 0.1 * torch.randn(size, 3, generator=g)

    return [(pair(6), pair(5)) for _ in range(n)]


def images(n: int, seed: int) -> list[tuple[Pair, Pair]]:
    g = torch.Generator().manual_seed(seed)

    def pair() -> Pair:
        y = torch.arange(3).repeat(2)
        return torch.randn(len(y), 1, 6, 6, generator=g) + y.view(-1, 1, 1, 1), y

    return [(pair(), pair()) for _ in range(n)]


CASES = {
    "mlp": (tanh_mlp, regression, F.mse_loss, 0.3),
    "convbn": (bn_convnet, images, F.cross_entropy, 0.5),
}


def head_adapted(
    model: nn.Module, theta: Mapping[str, Tensor], support: Pair, loss_fn: LossFn, steps: int,
    lr: float, head: tuple[str, ...],
) -> Params:  # fmt: skip
    """θ' by K plain gradient steps on the head only (no graph kept)."""
    fast = {k: v.detach() for k, v in theta.items()}
    for _ in range(steps):
        leaves = {k: fast[k].clone().requires_grad_() for k in head}
        with torch.enable_grad():
            loss = loss_fn(functional_call(model, {**fast, **leaves}, (support[0],)), support[1])
            grads = torch.autograd.grad(loss, list(leaves.values()))
        fast.update({k: fast[k] - lr * g for k, g in zip(head, grads, strict=True)})
    return fast


def post_adaptation_loss(model, theta, episodes, loss_fn, steps, lr, head) -> float:
    total = 0.0
    for support, (qx, qy) in episodes:
        fast = head_adapted(model, theta, support, loss_fn, steps, lr, head)
        with torch.no_grad():
            total += float(loss_fn(functional_call(model, fast, (qx,)), qy))
    return total / len(episodes)


def plain_anil(model, theta, episodes, loss_fn, steps, lr, head) -> Params:
    """ANIL per task with torch.autograd: head steps with create_graph, one backward to θ."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
    total = torch.zeros(())
    for (sx, sy), (qx, qy) in episodes:
        fast = dict(leaves)
        for _ in range(steps):
            loss = loss_fn(functional_call(model, fast, (sx,)), sy)
            grads = torch.autograd.grad(loss, [fast[k] for k in head], create_graph=True)
            fast.update({k: fast[k] - lr * g for k, g in zip(head, grads, strict=True)})
        total = total + loss_fn(functional_call(model, fast, (qx,)), qy)
    grads = torch.autograd.grad(total / len(episodes), list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def run(model, params, episodes, loss_fn, **kwargs) -> tuple[Params, dict[str, float]]:
    return meta_gradient(
        model, params, [s for s, _ in episodes], [q for _, q in episodes], loss_fn=loss_fn, **kwargs
    )


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    return float(sum((a[k] * b[k]).sum() for k in b))


# --------------------------------------------------------------------------- the meta-gradient


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("case", list(CASES))
def test_anil_equals_finite_differences_over_body_and_head(float64, case, batching):
    build, make, loss_fn, lr = CASES[case]
    torch.manual_seed(0)
    model = build()
    theta = model_params(model)
    head = head_names(model)
    episodes = make(3, seed=1)
    grads, _ = run(
        model, theta, episodes, loss_fn, algorithm="anil", inner_steps=3, inner_lr=lr,
        batching=batching,
    )  # fmt: skip
    assert set(grads) == set(theta)

    def f(p: Params) -> float:
        return post_adaptation_loss(model, p, episodes, loss_fn, 3, lr, head)

    g = torch.Generator().manual_seed(2)
    body = [k for k in theta if k not in head]
    directions = [{k: torch.randn(v.shape, generator=g) for k, v in theta.items()}]
    for name in (body[0], body[-1], head[0], head[-1]):  # coordinates of the body and the head
        for index in (0, theta[name].numel() - 1):
            e = {k: torch.zeros_like(v) for k, v in theta.items()}
            e[name].view(-1)[index] = 1.0
            directions.append(e)
    eps = 1e-5
    for v in directions:
        plus = {k: theta[k] + eps * v[k] for k in theta}
        minus = {k: theta[k] - eps * v[k] for k in theta}
        fd = (f(plus) - f(minus)) / (2 * eps)
        assert dot(grads, v) == pytest.approx(fd, rel=1e-6, abs=1e-9)
    # the body's gradient flows through the head's inner steps: first order would miss it
    maml, _ = run(model, theta, episodes, loss_fn, inner_steps=3, inner_lr=lr, batching=batching)
    assert max(float((maml[k] - grads[k]).abs().max()) for k in body) > 1e-4


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("case", list(CASES))
def test_anil_equals_plain_autograd_anil(float64, case, batching):
    build, make, loss_fn, lr = CASES[case]
    torch.manual_seed(3)
    model = build()
    theta = model_params(model)
    episodes = make(4, seed=4)
    grads, metrics = run(
        model, theta, episodes, loss_fn, algorithm="anil", inner_steps=2, inner_lr=lr,
        batching=batching,
    )  # fmt: skip
    expected = plain_anil(model, theta, episodes, loss_fn, 2, lr, head_names(model))
    torch.testing.assert_close(grads, expected)
    after = post_adaptation_loss(model, theta, episodes, loss_fn, 2, lr, head_names(model))
    assert metrics["loss_after"] == pytest.approx(after, rel=1e-10)


@pytest.mark.parametrize(
    "setup", [("sine_mlp", {}, 0.01), ("conv4", {"ways": 5}, 0.4)], ids=["sine_mlp", "conv4"]
)
def test_vmap_and_loop_engines_agree(setup):
    name, kwargs, lr = setup
    torch.manual_seed(5)
    model = build_model(name, **kwargs)
    g = torch.Generator().manual_seed(6)
    if name == "sine_mlp":
        episodes = [((torch.randn(10, 1, generator=g), torch.randn(10, 1, generator=g)),
                     (torch.randn(10, 1, generator=g), torch.randn(10, 1, generator=g)))
                    for _ in range(4)]  # fmt: skip
        loss_fn = F.mse_loss
    else:
        y = torch.arange(5)
        episodes = [((torch.randn(5, 1, 28, 28, generator=g), y),
                     (torch.randn(5, 1, 28, 28, generator=g), y)) for _ in range(2)]  # fmt: skip
        loss_fn = F.cross_entropy
    kw = dict(algorithm="anil", inner_steps=2, inner_lr=lr)
    looped, m_loop = run(model, model_params(model), episodes, loss_fn, batching="loop", **kw)
    batched, m_vmap = run(model, model_params(model), episodes, loss_fn, batching="vmap", **kw)
    scale = max(float(v.abs().max()) for v in looped.values())
    for k in looped:
        torch.testing.assert_close(batched[k], looped[k], rtol=1e-4, atol=1e-5 * scale)
    for k in m_loop:
        assert m_vmap[k] == pytest.approx(m_loop[k], rel=1e-5, abs=1e-6)


def test_anil_meta_trains_centrally():
    torch.manual_seed(0)
    model = build_model("sine_mlp")
    theta = model_params(model)
    result = meta_train(
        model, theta, SineFamily(seed=0, num_train=20), EpisodeSpec(support=10, query=10),
        loss_fn=F.mse_loss, meta_steps=30, meta_batch=5, algorithm="anil", inner_lr=0.01,
        meta_lr=0.01,
    )  # fmt: skip
    assert len(result.history) == 30
    assert all(torch.isfinite(v).all() for v in result.params.values())
    assert all(not torch.equal(result.params[k], theta[k]) for k in theta)  # body learns too
    first = sum(h["loss_after"] for h in result.history[:5])
    assert sum(h["loss_after"] for h in result.history[-5:]) < first


# --------------------------------------------------------------------------- head-only adaptation


def test_head_names_of_the_built_in_models():
    assert head_names(build_model("sine_mlp")) == ("4.weight", "4.bias")
    assert head_names(build_model("conv4", ways=5)) == ("13.weight", "13.bias")
    assert head_names(build_model("femnist_cnn")) == ("9.weight", "9.bias")
    nested = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Tanh(), nn.Linear(3, 1, bias=False)))
    assert head_names(nested) == ("1.1.weight",)
    with pytest.raises(FedmamlError, match="no parameters"):
        head_names(nn.Tanh())


def test_adapted_names_are_checked():
    model = build_model("sine_mlp")
    assert adapted_names(model, "all") is None
    assert adapted_names(model, {"4.bias", "0.weight"}) == ("0.weight", "4.bias")
    assert adapted_names(model, [k for k, _ in model.named_parameters()]) is None
    with pytest.raises(FedmamlError, match=r"choose one of all, head"):
        adapted_names(model, "body")
    with pytest.raises(FedmamlError, match=r"no parameter\(s\) \['9.weight'\]"):
        adapted_names(model, ["9.weight"])
    with pytest.raises(FedmamlError, match="no parameters to adapt"):
        adapted_names(model, [])


def test_inner_gradients_cover_the_adapted_parameters_only():
    model = build_model("sine_mlp")
    grad = autograd_grad_fn(model, {}, F.mse_loss, create_graph=False)
    x, y = torch.randn(5, 1), torch.randn(5, 1)
    theta = model_params(model)
    assert set(grad(theta, x, y, ("4.weight", "4.bias"))) == {"4.weight", "4.bias"}
    full = grad(theta, x, y, None)
    head = grad(theta, x, y, ("4.weight", "4.bias"))
    torch.testing.assert_close(head["4.weight"], full["4.weight"])


@pytest.mark.parametrize("first_order", [False, True])
def test_head_only_adapt_leaves_the_body_bit_identical(first_order):
    torch.manual_seed(7)
    model = build_model("sine_mlp")
    theta = model_params(model)
    support = (torch.randn(10, 1), torch.randn(10, 1))
    fast = adapt(
        model, theta, support, loss_fn=F.mse_loss, inner_steps=3, inner_lr=0.1,
        first_order=first_order, adapted="head",
    )  # fmt: skip
    head = head_names(model)
    for k in theta:
        assert torch.equal(fast[k], theta[k]) != (k in head), k
    full = adapt(model, theta, support, loss_fn=F.mse_loss, inner_steps=3, inner_lr=0.1)
    assert not torch.equal(full["0.weight"], theta["0.weight"])
    expected = head_adapted(model, theta, support, F.mse_loss, 3, 0.1, head)
    torch.testing.assert_close(fast, expected)


def test_head_only_curve_and_personalization_leave_the_body_bit_identical():
    torch.manual_seed(8)
    model = build_model("sine_mlp")
    theta = model_params(model)
    family = SineFamily(seed=0, num_heldout=6)
    user = family.client(0, "heldout")
    curve, fast = adaptation_curve(
        model, theta, (user.x[:10], user.y[:10]), (user.x_test, user.y_test), loss_fn=F.mse_loss,
        steps=4, adapted="head",
    )  # fmt: skip
    body = [k for k in theta if k not in head_names(model)]
    assert all(torch.equal(fast[k], theta[k]) for k in body)
    assert curve[-1]["loss"] < curve[0]["loss"]

    one = personalize((model, theta), user, steps=4, support_size=10, adapt="head")
    assert all(torch.equal(one.params[k], theta[k]) for k in body)
    assert not torch.equal(one.params["4.weight"], theta["4.weight"])
    assert one.metric_after < one.metric_before
    everyone = personalize((model, theta), user, steps=4, support_size=10)
    assert not torch.equal(everyone.params["0.weight"], theta["0.weight"])

    users = [family.client(i, "heldout") for i in range(6)]
    kw = dict(steps=4, support_size=10, adapt="head")
    vmapped = personalize_many((model, theta), users, batching="vmap", **kw)
    looped = personalize_many((model, theta), users, batching="loop", **kw)
    assert vmapped["metric_after"].iloc[0] == pytest.approx(one.metric_after, rel=1e-5)
    assert (vmapped["metric_after"] - looped["metric_after"]).abs().max() < 1e-5


def test_an_anil_checkpoint_personalizes_and_evaluates_its_head():
    torch.manual_seed(9)
    cfg = RunConfig(algorithm="anil", eval_steps=3, num_train_clients=4, num_heldout_clients=2)
    theta = model_params(build_model("sine_mlp"))
    ckpt = Checkpoint(theta, "sine_mlp", {}, cfg.to_mapping())
    user = SineFamily(seed=0, num_heldout=2).client(1, "heldout")
    result = personalize(ckpt, user, support_size=10)
    assert torch.equal(result.params["0.weight"], theta["0.weight"])
    overridden = personalize(ckpt, user, support_size=10, adapt="all")
    assert not torch.equal(overridden.params["0.weight"], theta["0.weight"])

    from fedmaml.problem import Problem

    work = Problem.from_config(cfg)
    client = work.source.client(1, "heldout")
    curve, _ = work.evaluation_curve(work.initial_params(), client, 1)
    task_curve = _first_eval_curve(work, client, adapted="head")
    assert [e["loss"] for e in curve] == pytest.approx([e["loss"] for e in task_curve])
    assert [e["loss"] for e in curve] != pytest.approx(
        [e["loss"] for e in _first_eval_curve(work, client, adapted="all")]
    )


def _first_eval_curve(work, client, adapted: str) -> list[dict[str, float]]:
    from fedmaml.problem import EVAL_STREAM
    from fedmaml.tasks import sample_episode
    from fedmaml.tasks.episodes import episode_generator

    task = sample_episode(
        client, work.spec, episode_generator(work.cfg.seed, 0, 1, stream=EVAL_STREAM),
        held_out=True,
    )  # fmt: skip
    curve, _ = adaptation_curve(
        work.model, work.initial_params(), task.support, task.query, loss_fn=work.loss_fn,
        steps=work.cfg.eval_steps, inner_lr=work.cfg.inner_lr, adapted=adapted,
    )  # fmt: skip
    return curve
