"""Centralized meta-training: the reference the federated run must match.

At meta-step t (1-based), ``meta_batch`` training clients are drawn, each gives one episode from
``episode_generator(seed, t, client)``, and θ ← MetaOptimizer(θ, mean_i g_i). This is MAML's
training loop; with every client in every step it is exactly what a federated round computes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fedmaml.meta import meta_gradient
from fedmaml.meta.outer import MetaOptimizer
from fedmaml.meta.params import Params
from fedmaml.tasks.episodes import EpisodeSpec, training_episodes
from fedmaml.tasks.source import TaskSource


@dataclass
class MetaTrainResult:
    params: Params
    optimizer: MetaOptimizer
    history: list[dict[str, float]] = field(default_factory=list)


def meta_train(
    model: nn.Module,
    params: Mapping[str, Tensor],
    source: TaskSource,
    spec: EpisodeSpec,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    meta_steps: int,
    meta_batch: int,
    algorithm: str = "maml",
    inner_steps: int = 1,
    inner_lr: float = 0.01,
    meta_optimizer: str = "adam",
    meta_lr: float = 1e-3,
    seed: int = 0,
    batching: str = "auto",
    clients: list[int] | None = None,
) -> MetaTrainResult:
    """Run ``meta_steps`` outer updates from ``params``; ``clients`` fixes the clients of every
    step (all of them take part), else ``meta_batch`` are drawn per step from the training split."""
    opt = MetaOptimizer(params, meta_optimizer, meta_lr)
    n_train = source.num_clients("train")
    picker = torch.Generator().manual_seed(seed)
    history = []
    for step in range(1, meta_steps + 1):
        chosen = clients or torch.randperm(n_train, generator=picker)[:meta_batch].tolist()
        tasks = [
            task
            for i in chosen
            for task in training_episodes(source.client(i), spec, seed=seed, step=step, index=i)
        ]
        grads, metrics = meta_gradient(
            model,
            opt.current(),
            [t.support for t in tasks],
            [t.query for t in tasks],
            loss_fn=loss_fn,
            algorithm=algorithm,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            batching=batching,
        )
        opt.step(grads)
        history.append({"step": float(step), **metrics})
    return MetaTrainResult(params=opt.current(), optimizer=opt, history=history)
