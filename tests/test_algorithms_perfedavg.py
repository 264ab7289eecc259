"""Per-FedAvg (HF): the Hessian-free meta-gradient against its exact formula.

With D the support set and D', D'' the even- and odd-numbered query examples, the exact value is
g = ∇L_D'(θ') − α H_D''(θ) ∇L_D'(θ') (K = 1; the chain of K such factors for K > 1), here with
the Hessian-vector products from double backward in float64. fedmaml's finite-difference
estimate must converge to it as the probe distance h → 0, quadratically, and match it at the
default h; both engines must agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fedmaml.centralized import meta_train
from fedmaml.errors import FedmamlError
from fedmaml.meta import INNER_LR_PREFIX, meta_gradient, model_params
from fedmaml.meta.algorithms.perfedavg import PerFedAvg
from fedmaml.models import build_model
from fedmaml.tasks import EpisodeSpec
from fedmaml.tasks.episodes import training_episodes
from fedmaml.tasks.sine import SineFamily

Pair = tuple[Tensor, Tensor]
Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def tanh_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def episodes(n: int, seed: int, query: int = 8) -> list[tuple[Pair, Pair]]:
    g = torch.Generator().manual_seed(seed)

    def pair(size: int) -> Pair:
        x = torch.randn(size, 2, generator=g)
        return x, torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(size, 1, generator=g)

    return [(pair(6), pair(query)) for _ in range(n)]


def loss_at(model: nn.Module, p: Mapping[str, Tensor], data: Pair) -> Tensor:
    return F.mse_loss(functional_call(model, dict(p), (data[0],)), data[1])


def grad_at(model: nn.Module, p: Mapping[str, Tensor], data: Pair) -> Params:
    leaves = {k: v.detach().requires_grad_() for k, v in p.items()}
    grads = torch.autograd.grad(loss_at(model, leaves, data), list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def exact_hvp(model: nn.Module, p: Mapping[str, Tensor], u: Mapping[str, Tensor], data: Pair):
    """H_data(p) u by double backward."""
    leaves = {k: v.detach().requires_grad_() for k, v in p.items()}
    grads = torch.autograd.grad(
        loss_at(model, leaves, data), list(leaves.values()), create_graph=True
    )
    inner = sum((g * u[k]).sum() for g, k in zip(grads, leaves, strict=True))
    return dict(zip(leaves, torch.autograd.grad(inner, list(leaves.values())), strict=True))


def exact_perfedavg(model, theta, eps_, steps: int, lr: float | Mapping[str, Tensor]) -> Params:
    """1/n Σ_i of v_0, where v_K = ∇L_D'(θ'_K) and v_k = v_{k+1} − H_D''(θ'_k)(α ⊙ v_{k+1})."""

    def alpha(k: str) -> float | Tensor:
        return lr if isinstance(lr, float) else lr[k]

    total: Params = {}
    for support, (qx, qy) in eps_:
        d1, d2 = (qx[0::2], qy[0::2]), (qx[1::2], qy[1::2])
        path = [{k: v.detach() for k, v in theta.items()}]
        for _ in range(steps):
            g = grad_at(model, path[-1], support)
            path.append({k: v - alpha(k) * g[k] for k, v in path[-1].items()})
        v = grad_at(model, path.pop(), d1)
        for point in reversed(path):
            hv = exact_hvp(model, point, {k: alpha(k) * g for k, g in v.items()}, d2)
            v = {k: v[k] - hv[k] for k in v}
        total = v if not total else {k: total[k] + v[k] for k in total}
    return {k: t / len(eps_) for k, t in total.items()}


def run(model, params, eps_, **kwargs) -> tuple[Params, dict[str, float]]:
    return meta_gradient(
        model, params, [s for s, _ in eps_], [q for _, q in eps_], loss_fn=F.mse_loss, **kwargs
    )


def error(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("steps", [1, 2])
def test_converges_to_the_exact_formula_as_the_probe_shrinks(float64, steps, batching):
    torch.manual_seed(0)
    model = tanh_mlp()
    theta = model_params(model)
    data = episodes(3, seed=1)
    exact = exact_perfedavg(model, theta, data, steps, 0.3)
    scale = max(float(v.abs().max()) for v in exact.values())
    errors = []
    for h in (1e-1, 1e-2, 1e-3):
        grads, _ = run(
            model, theta, data, algorithm=PerFedAvg(fd_step=h), inner_steps=steps,
            inner_lr=0.3, batching=batching,
        )  # fmt: skip
        errors.append(error(grads, exact) / scale)
    assert errors[0] > 1e-5  # the check discriminates: a coarse probe is visibly off
    assert errors[1] < 0.03 * errors[0] and errors[2] < 0.03 * errors[1]  # O(h²)
    default, _ = run(
        model, theta, data, algorithm="perfedavg", inner_steps=steps, inner_lr=0.3,
        batching=batching,
    )  # fmt: skip
    torch.testing.assert_close(default, exact, rtol=1e-8, atol=1e-9 * scale)


def test_paper_formula_with_one_step(float64):
    """K = 1 spelt out: g = ∇L_D'(θ') − α H_D''(θ) ∇L_D'(θ'), θ' = θ − α ∇L_D(θ)."""
    torch.manual_seed(2)
    model = tanh_mlp()
    theta = model_params(model)
    [(support, (qx, qy))] = episodes(1, seed=3, query=7)
    alpha = 0.2
    g_s = grad_at(model, theta, support)
    adapted = {k: theta[k] - alpha * g_s[k] for k in theta}
    v = grad_at(model, adapted, (qx[0::2], qy[0::2]))  # D': 4 examples
    hv = exact_hvp(model, theta, v, (qx[1::2], qy[1::2]))  # D'': 3 examples
    expected = {k: v[k] - alpha * hv[k] for k in v}
    grads, metrics = meta_gradient(
        model, theta, support, (qx, qy), loss_fn=F.mse_loss, algorithm="perfedavg",
        inner_lr=alpha,
    )  # fmt: skip
    torch.testing.assert_close(grads, expected, rtol=1e-8, atol=1e-10)
    assert metrics["loss_after"] == pytest.approx(float(loss_at(model, adapted, (qx, qy))))
    assert metrics["loss_before"] == pytest.approx(float(loss_at(model, theta, (qx, qy))))
    assert metrics["num_query"] == 7


def test_learned_step_sizes_enter_the_hessian_vector_product(float64):
    """With α per parameter (a Meta-SGD checkpoint): v_0 = v_1 − H(α ⊙ v_1)."""
    torch.manual_seed(4)
    model = tanh_mlp()
    theta = model_params(model)
    g = torch.Generator().manual_seed(5)
    alpha = {k: 0.05 + 0.3 * torch.rand(v.shape, generator=g) for k, v in theta.items()}
    params = {**theta, **{INNER_LR_PREFIX + k: v for k, v in alpha.items()}}
    data = episodes(2, seed=6)
    grads, _ = run(model, params, data, algorithm="perfedavg", inner_steps=2)
    assert set(grads) == set(theta)
    exact = exact_perfedavg(model, theta, data, 2, alpha)
    scale = max(float(v.abs().max()) for v in exact.values())
    torch.testing.assert_close(grads, exact, rtol=1e-8, atol=1e-9 * scale)


@pytest.mark.parametrize(
    "setup", [("sine_mlp", {}, 0.01), ("conv4", {"ways": 5}, 0.4)], ids=["sine_mlp", "conv4"]
)
def test_vmap_and_loop_engines_agree(setup):
    name, kwargs, lr = setup
    torch.manual_seed(7)
    model = build_model(name, **kwargs)
    g = torch.Generator().manual_seed(8)
    if name == "sine_mlp":
        support = [(torch.randn(10, 1, generator=g), torch.randn(10, 1, generator=g))] * 4
        query = [(torch.randn(10, 1, generator=g), torch.randn(10, 1, generator=g)) for _ in "abcd"]
        loss_fn = F.mse_loss
    else:
        y = torch.arange(5).repeat_interleave(2)  # class by class, as N-way episodes are
        support = [(torch.randn(10, 1, 28, 28, generator=g), y) for _ in "ab"]
        query = [(torch.randn(10, 1, 28, 28, generator=g), y) for _ in "ab"]
        loss_fn = F.cross_entropy
    kw = dict(loss_fn=loss_fn, algorithm="perfedavg", inner_steps=2, inner_lr=lr)
    params = model_params(model)
    looped, m_loop = meta_gradient(model, params, support, query, batching="loop", **kw)
    batched, m_vmap = meta_gradient(model, params, support, query, batching="vmap", **kw)
    scale = max(float(v.abs().max()) for v in looped.values())
    for k in looped:
        torch.testing.assert_close(batched[k], looped[k], rtol=1e-3, atol=1e-4 * scale)
    for k in m_loop:
        assert m_vmap[k] == pytest.approx(m_loop[k], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_a_query_set_of_one_example_is_refused(batching):
    model = build_model("sine_mlp")
    one = (torch.randn(1, 1), torch.randn(1, 1))
    support = (torch.randn(5, 1), torch.randn(5, 1))
    with pytest.raises(FedmamlError, match="at least 2 query examples"):
        meta_gradient(
            model, model_params(model), [support, support], [one, one], loss_fn=F.mse_loss,
            algorithm="perfedavg", batching=batching,
        )  # fmt: skip


@pytest.mark.parametrize("h", [0.0, -1e-3, float("nan"), float("inf")])
def test_bad_probe_distance_is_refused(h):
    with pytest.raises(FedmamlError, match="fd_step"):
        PerFedAvg(fd_step=h)


@pytest.mark.parametrize("algorithm", ["perfedavg", "anil"])
def test_meta_train_runs_the_new_algorithms(algorithm):
    """meta_train with fixed clients and SGD is θ_t = θ_{t−1} − β · mean_i g_i."""
    model = build_model("sine_mlp")
    theta = model_params(model)
    source = SineFamily(seed=3, num_train=6)
    spec = EpisodeSpec(support=10, query=10)
    result = meta_train(
        model, theta, source, spec, loss_fn=F.mse_loss, meta_steps=3, meta_batch=3,
        algorithm=algorithm, meta_optimizer="sgd", meta_lr=0.1, seed=3, clients=[0, 2, 5],
        inner_steps=2,
    )  # fmt: skip
    expected = dict(theta)
    for step in (1, 2, 3):
        tasks = [
            t for i in (0, 2, 5) for t in training_episodes(source.client(i), spec, seed=3,
                                                            step=step, index=i)
        ]  # fmt: skip
        grads, metrics = meta_gradient(
            model, expected, [t.support for t in tasks], [t.query for t in tasks],
            loss_fn=F.mse_loss, algorithm=algorithm, inner_steps=2,
        )  # fmt: skip
        expected = {k: v - 0.1 * grads[k] for k, v in expected.items()}
        assert result.history[step - 1] == pytest.approx({"step": float(step), **metrics})
    torch.testing.assert_close(result.params, expected)
