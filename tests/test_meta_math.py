"""The MAML core's meta-gradients against independent references.

Each algorithm is checked against something computed without ``fedmaml``: central finite
differences of the post-adaptation query loss L_Q(θ'(θ)) (float64), the closed form of MAML on
linear regression, plain autograd / ``torch.optim.SGD`` loops on a deep copy of the model; and the
two engines (per-episode loop, vmap over episodes) against each other.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fedmaml.meta import (
    INNER_LR_PREFIX,
    adapt,
    meta_gradient,
    model_params,
    split_inner_lrs,
    with_inner_lrs,
)
from fedmaml.meta.evaluate import adaptation_curve
from fedmaml.models import build_model

Pair = tuple[Tensor, Tensor]
Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

# --------------------------------------------------------------------------- independent reference


def plain_adapted(
    model: nn.Module,
    theta: Mapping[str, Tensor],
    support: Pair,
    loss_fn: LossFn,
    steps: int,
    lr: float | Mapping[str, Tensor],
) -> Params:
    """θ' by K plain gradient steps θ ← θ − α ⊙ ∇L_S(θ) (no graph kept across steps)."""
    fast = {k: v.detach() for k, v in theta.items()}
    for _ in range(steps):
        leaves = {k: v.clone().requires_grad_() for k, v in fast.items()}
        with torch.enable_grad():
            loss = loss_fn(functional_call(model, leaves, (support[0],)), support[1])
            grads = torch.autograd.grad(loss, list(leaves.values()))
        fast = {
            k: fast[k] - (lr if isinstance(lr, float) else lr[k]) * g
            for k, g in zip(fast, grads, strict=True)
        }
    return fast


def post_adaptation_loss(
    model: nn.Module,
    theta: Mapping[str, Tensor],
    episodes: list[tuple[Pair, Pair]],
    loss_fn: LossFn,
    steps: int,
    lr: float | Mapping[str, Tensor],
) -> float:
    """1/n Σ_i L_Qi(θ'_i(θ)) as a plain number."""
    total = 0.0
    for support, (qx, qy) in episodes:
        fast = plain_adapted(model, theta, support, loss_fn, steps, lr)
        with torch.no_grad():
            total += float(loss_fn(functional_call(model, fast, (qx,)), qy))
    return total / len(episodes)


def directional_fd(f: Callable[[Params], float], at: Params, v: Params, eps: float) -> float:
    """(f(x + εv) − f(x − εv)) / 2ε."""
    plus = {k: at[k] + eps * v[k] for k in at}
    minus = {k: at[k] - eps * v[k] for k in at}
    return (f(plus) - f(minus)) / (2 * eps)


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    return float(sum((a[k] * b[k]).sum() for k in b))


def assert_matches_fd(
    f: Callable[[Params], float], at: Params, grads: Mapping[str, Tensor], seed: int
) -> list[tuple[Params, float]]:
    """<g, v> equals the central difference along 4 random directions and 4 random coordinates.

    Returns the (direction, finite difference) pairs, to check how discriminating the test is."""
    g = torch.Generator().manual_seed(seed)
    directions = [{k: torch.randn(v.shape, generator=g) for k, v in at.items()} for _ in range(4)]
    names = list(at)
    for _ in range(4):
        name = names[int(torch.randint(len(names), (1,), generator=g))]
        index = int(torch.randint(at[name].numel(), (1,), generator=g))
        e = {k: torch.zeros_like(v) for k, v in at.items()}
        e[name].view(-1)[index] = 1.0
        directions.append(e)
    pairs = [(v, directional_fd(f, at, v, eps=1e-5)) for v in directions]
    for v, fd in pairs:
        assert dot(grads, v) == pytest.approx(fd, rel=1e-6, abs=1e-9)
    return pairs


# --------------------------------------------------------------------------- fixtures


def tanh_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(2, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 1)
    )


def bn_convnet(ways: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, kernel_size=3, padding=1),
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, ways),
    )


def regression_episodes(n: int, seed: int, features: int = 2) -> list[tuple[Pair, Pair]]:
    g = torch.Generator().manual_seed(seed)

    def pair(size: int) -> Pair:
        x = torch.randn(size, features, generator=g)
        return x, torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(size, 1, generator=g)

    return [(pair(6), pair(5)) for _ in range(n)]


def image_episodes(n: int, seed: int, ways: int = 3, size: int = 6) -> list[tuple[Pair, Pair]]:
    g = torch.Generator().manual_seed(seed)

    def pair(shots: int) -> Pair:
        y = torch.arange(ways).repeat(shots)
        return torch.randn(len(y), 1, size, size, generator=g) + y.view(-1, 1, 1, 1), y

    return [(pair(2), pair(2)) for _ in range(n)]


CASES = {
    "mlp": (tanh_mlp, regression_episodes, F.mse_loss, 0.3),
    "convbn": (bn_convnet, image_episodes, F.cross_entropy, 0.5),
}


def run(
    model: nn.Module,
    params: Mapping[str, Tensor],
    episodes: list[tuple[Pair, Pair]],
    loss_fn: LossFn,
    **kwargs,
) -> tuple[Params, dict[str, float]]:
    return meta_gradient(
        model, params, [s for s, _ in episodes], [q for _, q in episodes], loss_fn=loss_fn, **kwargs
    )


# --------------------------------------------------------------------------- 1. maml vs FD


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("case", list(CASES))
def test_maml_equals_finite_differences_of_post_adaptation_loss(float64, case, batching):
    build, make_episodes, loss_fn, lr = CASES[case]
    torch.manual_seed(0)
    model = build()
    theta = model_params(model)
    episodes = make_episodes(3, seed=1)
    steps = 3
    grads, _ = run(
        model,
        theta,
        episodes,
        loss_fn,
        algorithm="maml",
        inner_steps=steps,
        inner_lr=lr,
        batching=batching,
    )
    assert set(grads) == set(theta)

    def f(p: Params) -> float:
        return post_adaptation_loss(model, p, episodes, loss_fn, steps, lr)

    pairs = assert_matches_fd(f, theta, grads, seed=2)
    # the check discriminates: the first-order approximation misses these derivatives
    fo, _ = run(
        model,
        theta,
        episodes,
        loss_fn,
        algorithm="fomaml",
        inner_steps=steps,
        inner_lr=lr,
        batching=batching,
    )
    assert max(abs(dot(fo, v) - fd) for v, fd in pairs) > 1e-3


# --------------------------------------------------------------------------- 2. closed form


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_equals_closed_form_on_linear_regression(float64, steps):
    """L(w) = mean((Xw − y)²); one step is w ← A w + (2α/n) Xᵀy with A = I − (2α/n) XᵀX, so
    dθ'_K/dθ = A^K and the meta-gradient is (A^K)ᵀ ∇L_Q(θ'_K)."""
    rng = np.random.default_rng(3)
    d, n_s, n_q, alpha = 4, 7, 9, 0.05
    xs, ys = rng.normal(size=(n_s, d)), rng.normal(size=n_s)
    xq, yq = rng.normal(size=(n_q, d)), rng.normal(size=n_q)
    w0 = rng.normal(size=d)

    w = w0.copy()
    for _ in range(steps):
        w = w - alpha * (2 / n_s) * xs.T @ (xs @ w - ys)
    a = np.eye(d) - (2 * alpha / n_s) * xs.T @ xs
    expected = np.linalg.matrix_power(a, steps).T @ ((2 / n_q) * xq.T @ (xq @ w - yq))

    model = nn.Linear(d, 1, bias=False)
    theta = {"weight": torch.tensor(w0).view(1, d)}
    support = (torch.tensor(xs), torch.tensor(ys).view(-1, 1))
    query = (torch.tensor(xq), torch.tensor(yq).view(-1, 1))
    grads, metrics = meta_gradient(
        model, theta, support, query, loss_fn=F.mse_loss, inner_steps=steps, inner_lr=alpha
    )
    np.testing.assert_allclose(grads["weight"].view(-1).numpy(), expected, rtol=1e-10, atol=1e-12)
    assert metrics["loss_after"] == pytest.approx(np.mean((xq @ w - yq) ** 2), rel=1e-10)
    assert metrics["loss_before"] == pytest.approx(np.mean((xq @ w0 - yq) ** 2), rel=1e-10)


# --------------------------------------------------------------------------- 3-4. first order


def manual_first_order(
    model: nn.Module, episodes: list[tuple[Pair, Pair]], loss_fn: LossFn, steps: int, lr: float
) -> Params:
    """FOMAML by hand: SGD steps on a deep copy, then ∇ of the query loss at θ'."""
    total: Params = {}
    for (sx, sy), (qx, qy) in episodes:
        clone = copy.deepcopy(model)
        for _ in range(steps):
            grads = torch.autograd.grad(loss_fn(clone(sx), sy), list(clone.parameters()))
            with torch.no_grad():
                for p, g in zip(clone.parameters(), grads, strict=True):
                    p -= lr * g
        grads = torch.autograd.grad(loss_fn(clone(qx), qy), list(clone.parameters()))
        for (name, _), g in zip(clone.named_parameters(), grads, strict=True):
            total[name] = total.get(name, 0) + g / len(episodes)
    return total


def sgd_delta(model: nn.Module, data: list[Pair], loss_fn: LossFn, steps: int, lr: float) -> Params:
    """1/n Σ_i (θ − θ'_i) with θ'_i from ``torch.optim.SGD`` on a deep copy over data_i."""
    total: Params = {}
    for x, y in data:
        clone = copy.deepcopy(model)
        opt = torch.optim.SGD(clone.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(clone(x), y).backward()
            opt.step()
        for (name, p), (_, q) in zip(
            model.named_parameters(), clone.named_parameters(), strict=True
        ):
            total[name] = total.get(name, 0) + (p - q).detach() / len(data)
    return total


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("case", list(CASES))
def test_fomaml_equals_detached_autograd(float64, case, batching):
    build, make_episodes, loss_fn, lr = CASES[case]
    torch.manual_seed(4)
    model = build()
    episodes = make_episodes(3, seed=5)
    grads, _ = run(
        model,
        model_params(model),
        episodes,
        loss_fn,
        algorithm="fomaml",
        inner_steps=3,
        inner_lr=lr,
        batching=batching,
    )
    torch.testing.assert_close(grads, manual_first_order(model, episodes, loss_fn, 3, lr))


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("algorithm", ["reptile", "fedavg"])
@pytest.mark.parametrize("case", list(CASES))
def test_reptile_and_fedavg_equal_sgd_displacement(float64, case, algorithm, batching):
    build, make_episodes, loss_fn, lr = CASES[case]
    torch.manual_seed(6)
    model = build()
    episodes = make_episodes(3, seed=7)
    grads, metrics = run(
        model,
        model_params(model),
        episodes,
        loss_fn,
        algorithm=algorithm,
        inner_steps=3,
        inner_lr=lr,
        batching=batching,
    )
    data = [
        s if algorithm == "reptile" else (torch.cat([s[0], q[0]]), torch.cat([s[1], q[1]]))
        for s, q in episodes
    ]
    torch.testing.assert_close(grads, sgd_delta(model, data, loss_fn, 3, lr))
    assert metrics["num_episodes"] == 3


# --------------------------------------------------------------------------- 5. Meta-SGD


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_metasgd_gradients_equal_finite_differences(float64, batching):
    torch.manual_seed(8)
    model = tanh_mlp()
    theta = model_params(model)
    g = torch.Generator().manual_seed(9)
    alpha = {k: 0.05 + 0.3 * torch.rand(v.shape, generator=g) for k, v in theta.items()}
    params = {**theta, **{INNER_LR_PREFIX + k: v for k, v in alpha.items()}}
    episodes = regression_episodes(3, seed=10)
    grads, _ = run(
        model, params, episodes, F.mse_loss, algorithm="metasgd", inner_steps=2, batching=batching
    )
    assert set(grads) == set(theta) | {INNER_LR_PREFIX + k for k in theta}
    assert all(grads[k].shape == params[k].shape for k in params)

    def f(p: Params) -> float:
        th, lr = split_inner_lrs(p)
        return post_adaptation_loss(model, th, episodes, F.mse_loss, 2, lr)

    assert_matches_fd(f, params, grads, seed=11)
    assert sum(float(grads[INNER_LR_PREFIX + k].abs().sum()) for k in theta) > 1e-3


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_metasgd_with_constant_step_has_maml_theta_gradient(float64, batching):
    torch.manual_seed(12)
    model = tanh_mlp()
    theta = model_params(model)
    episodes = regression_episodes(3, seed=13)
    kw = dict(inner_steps=3, batching=batching)
    maml, _ = run(model, theta, episodes, F.mse_loss, algorithm="maml", inner_lr=0.2, **kw)
    learned, _ = run(
        model, with_inner_lrs(theta, 0.2), episodes, F.mse_loss, algorithm="metasgd", **kw
    )
    implicit, _ = run(model, theta, episodes, F.mse_loss, algorithm="metasgd", inner_lr=0.2, **kw)
    for sgd in (learned, implicit):
        torch.testing.assert_close(split_inner_lrs(sgd)[0], maml)
    torch.testing.assert_close(learned, implicit)


# --------------------------------------------------------------------------- 6. engines agree


def sine_setup() -> tuple[nn.Module, list[tuple[Pair, Pair]], LossFn, float]:
    g = torch.Generator().manual_seed(14)

    def pair(n: int, amp: float, phase: float) -> Pair:
        x = 10 * torch.rand(n, 1, generator=g) - 5
        return x, amp * torch.sin(x - phase)

    episodes = [(pair(10, 1.0 + i, 0.5 * i), pair(10, 1.0 + i, 0.5 * i)) for i in range(4)]
    return build_model("sine_mlp"), episodes, F.mse_loss, 0.01


def conv4_setup() -> tuple[nn.Module, list[tuple[Pair, Pair]], LossFn, float]:
    g = torch.Generator().manual_seed(15)

    def pair() -> Pair:
        y = torch.arange(5)
        return torch.randn(5, 1, 28, 28, generator=g) + 0.5 * y.view(-1, 1, 1, 1), y

    return build_model("conv4", ways=5), [(pair(), pair()) for _ in range(3)], F.cross_entropy, 0.4


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd", "reptile", "fedavg"])
@pytest.mark.parametrize("setup", [sine_setup, conv4_setup], ids=["sine_mlp", "conv4"])
def test_vmap_and_loop_engines_agree(setup, algorithm):
    torch.manual_seed(16)
    model, episodes, loss_fn, lr = setup()
    theta = model_params(model)
    kw = dict(algorithm=algorithm, inner_steps=2, inner_lr=lr)
    looped, m_loop = run(model, theta, episodes, loss_fn, batching="loop", **kw)
    batched, m_vmap = run(model, theta, episodes, loss_fn, batching="vmap", **kw)
    assert set(looped) == set(batched)
    scale = max(float(v.abs().max()) for v in looped.values())
    assert scale > 0
    for k in looped:
        torch.testing.assert_close(batched[k], looped[k], rtol=1e-4, atol=1e-5 * scale)
    assert m_loop.keys() == m_vmap.keys()
    for k in m_loop:
        assert m_vmap[k] == pytest.approx(m_loop[k], rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------- 7. adapt, curves


def test_adapt_equals_manual_loop_and_is_differentiable(float64):
    torch.manual_seed(17)
    model = tanh_mlp()
    theta = model_params(model)
    [(support, (qx, qy))] = regression_episodes(1, seed=18)
    fast = adapt(model, theta, support, loss_fn=F.mse_loss, inner_steps=3, inner_lr=0.3)
    torch.testing.assert_close(fast, plain_adapted(model, theta, support, F.mse_loss, 3, 0.3))

    maml, _ = meta_gradient(
        model, theta, support, (qx, qy), loss_fn=F.mse_loss, inner_steps=3, inner_lr=0.3
    )
    fomaml, _ = meta_gradient(
        model,
        theta,
        support,
        (qx, qy),
        loss_fn=F.mse_loss,
        algorithm="fomaml",
        inner_steps=3,
        inner_lr=0.3,
    )
    for first_order, expected in ((False, maml), (True, fomaml)):
        leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
        fast = adapt(
            model,
            leaves,
            support,
            loss_fn=F.mse_loss,
            inner_steps=3,
            inner_lr=0.3,
            first_order=first_order,
        )
        loss = F.mse_loss(functional_call(model, fast, (qx,)), qy)
        got = torch.autograd.grad(loss, list(leaves.values()))
        torch.testing.assert_close(dict(zip(leaves, got, strict=True)), expected)


def test_adapt_uses_learned_step_sizes(float64):
    torch.manual_seed(19)
    model = tanh_mlp()
    theta = model_params(model)
    alpha = {k: torch.full_like(v, 0.1 * (i + 1)) for i, (k, v) in enumerate(theta.items())}
    [(support, _)] = regression_episodes(1, seed=20)
    params = {**theta, **{INNER_LR_PREFIX + k: v for k, v in alpha.items()}}
    fast = adapt(model, params, support, loss_fn=F.mse_loss, inner_steps=2, inner_lr=0.9)
    torch.testing.assert_close(fast, plain_adapted(model, theta, support, F.mse_loss, 2, alpha))


@pytest.mark.parametrize("case", list(CASES))
def test_adaptation_curve_ends_agree_with_loss_at_theta_and_adapt(case):
    build, make_episodes, loss_fn, lr = CASES[case]
    torch.manual_seed(21)
    model = build()
    theta = model_params(model)
    [(support, (qx, qy))] = make_episodes(1, seed=22)
    curve, fast = adaptation_curve(
        model, theta, support, (qx, qy), loss_fn=loss_fn, steps=4, inner_lr=lr
    )
    assert len(curve) == 5
    with torch.no_grad():
        out0 = model(qx)
    assert curve[0]["loss"] == pytest.approx(float(loss_fn(out0, qy)), rel=1e-6)
    adapted = adapt(model, theta, support, loss_fn=loss_fn, inner_steps=4, inner_lr=lr)
    torch.testing.assert_close(fast, {k: v.detach() for k, v in adapted.items()})
    with torch.no_grad():
        out = functional_call(model, fast, (qx,))
    assert curve[-1]["loss"] == pytest.approx(float(loss_fn(out, qy)), rel=1e-6)
    assert curve[-1]["loss"] < curve[0]["loss"]
    if case == "convbn":
        acc = float((out.argmax(-1) == qy).float().mean())
        assert curve[-1]["accuracy"] == pytest.approx(acc)
    else:
        assert "accuracy" not in curve[0]


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_metrics_before_can_be_skipped_without_changing_the_gradient(batching, algorithm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
    params = dict(model.named_parameters())
    support = [(torch.randn(6, 3), torch.randint(0, 4, (6,))) for _ in range(3)]
    query = [(torch.randn(5, 3), torch.randint(0, 4, (5,))) for _ in range(3)]
    kwargs = dict(loss_fn=F.cross_entropy, algorithm=algorithm, batching=batching, inner_lr=0.1)
    g_full, m_full = meta_gradient(model, params, support, query, **kwargs)
    g_lean, m_lean = meta_gradient(model, params, support, query, metrics_before=False, **kwargs)
    for k in g_full:
        torch.testing.assert_close(g_lean[k], g_full[k])
    assert "loss_before" in m_full and "accuracy_before" in m_full
    assert not any(k.endswith("_before") for k in m_lean)
    assert m_lean["loss_after"] == pytest.approx(m_full["loss_after"])
    assert m_lean["accuracy_after"] == pytest.approx(m_full["accuracy_after"])
