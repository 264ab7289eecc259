"""``meta_gradients``: many users' meta-gradients in one batch (one copy of θ per episode)
against each user's own ``meta_gradient`` on the per-episode loop engine, for every algorithm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedmaml.errors import NonFiniteError
from fedmaml.meta import ALGORITHMS, meta_gradient, meta_gradients, with_inner_lrs
from fedmaml.models import build_model


def users(n_users: int, episodes: list[int], dtype=torch.float64, seed: int = 0):
    """Sinusoid-like regression episodes: user u has ``episodes[u % len(episodes)]`` of them."""
    g = torch.Generator().manual_seed(seed)
    supports, queries = [], []
    for u in range(n_users):
        s, q = [], []
        for _ in range(episodes[u % len(episodes)]):
            x = torch.rand(20, 1, generator=g, dtype=dtype) * 10 - 5
            y = (1 + u) * torch.sin(x - 0.3 * u)
            s.append((x[:10], y[:10]))
            q.append((x[10:], y[10:]))
        supports.append(s)
        queries.append(q)
    return supports, queries


def model_and_theta(algorithm: str, dtype=torch.float64):
    torch.manual_seed(1)
    model = build_model("sine_mlp").to(dtype)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    if algorithm == "metasgd":  # learned step sizes that differ per parameter
        theta = with_inner_lrs(theta, 0.01)
        theta = {
            k: v * 1.5 if k.startswith("inner_lr.") and "bias" in k else v for k, v in theta.items()
        }
    return model, theta


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_every_users_meta_gradient_equals_its_own_call(algorithm, inner_steps):
    model, theta = model_and_theta(algorithm)
    supports, queries = users(5, [1, 2, 3])
    settings = dict(loss_fn=F.mse_loss, algorithm=algorithm, inner_steps=inner_steps)
    batched = meta_gradients(model, theta, supports, queries, **settings)
    assert len(batched) == 5
    for u, result in enumerate(batched):
        grads, metrics = result
        own, own_metrics = meta_gradient(
            model, theta, supports[u], queries[u], batching="loop", **settings
        )
        assert set(grads) == set(own)
        for k in own:
            torch.testing.assert_close(grads[k], own[k], rtol=1e-9, atol=1e-12)
        assert metrics.keys() == own_metrics.keys()
        for k in own_metrics:
            assert metrics[k] == pytest.approx(own_metrics[k], rel=1e-9, abs=1e-12), k


def test_chunks_and_the_loop_fallback_agree():
    model, theta = model_and_theta("maml")
    supports, queries = users(7, [2, 1])
    settings = dict(loss_fn=F.mse_loss, inner_steps=1)
    whole = meta_gradients(model, theta, supports, queries, **settings)
    chunked = meta_gradients(model, theta, supports, queries, chunk=3, **settings)
    looped = meta_gradients(model, theta, supports, queries, batching="loop", **settings)
    for a, b, c in zip(whole, chunked, looped, strict=True):
        for k in a[0]:
            torch.testing.assert_close(a[0][k], b[0][k], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(a[0][k], c[0][k], rtol=1e-9, atol=1e-12)


def test_float32_users_match_their_own_calls_to_rounding():
    model, theta = model_and_theta("maml", torch.float32)
    supports, queries = users(16, [1], torch.float32)
    batched = meta_gradients(model, theta, supports, queries, loss_fn=F.mse_loss)
    for u, (grads, _) in enumerate(batched):
        own, _ = meta_gradient(model, theta, supports[u], queries[u], loss_fn=F.mse_loss)
        for k in own:
            torch.testing.assert_close(grads[k], own[k], rtol=1e-5, atol=1e-6)


def test_a_user_whose_loss_is_not_finite_fails_alone():
    model, theta = model_and_theta("maml")
    supports, queries = users(3, [1])
    x, y = queries[1][0]
    queries[1] = [(x, torch.full_like(y, float("inf")))]
    results = meta_gradients(model, theta, supports, queries, loss_fn=F.mse_loss)
    assert isinstance(results[1], NonFiniteError)
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)
    own, _ = meta_gradient(model, theta, supports[2], queries[2], loss_fn=F.mse_loss)
    for k in own:
        torch.testing.assert_close(results[2][0][k], own[k], rtol=1e-9, atol=1e-12)


def test_a_user_with_malformed_episodes_fails_alone():
    model, theta = model_and_theta("maml")
    supports, queries = users(3, [1])
    supports[0] = [(supports[0][0][0][:, :0], supports[0][0][1])]  # no features
    results = meta_gradients(model, theta, supports, queries, loss_fn=F.mse_loss)
    assert isinstance(results[0], Exception)
    assert all(isinstance(r, tuple) for r in results[1:])
