"""The meta-learning problem a run configuration names, and what every process computes on it.

:class:`Problem` is built once from a :class:`~fedmaml.config.RunConfig`: the data source (its
clients), the model and its initial θ, the loss, the episode shape and the device. Every caller
that turns a configuration into computation goes through it: the Flower client (the
meta-gradient of its own episodes, evaluation curves), the Flower server (initial θ, central
evaluation), the run's pre-flight checks and the centralized reference trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor, nn

from fedmaml.centralized import MetaTrainResult, meta_train
from fedmaml.config import RunConfig
from fedmaml.device import resolve_device
from fedmaml.errors import FedmamlError
from fedmaml.meta import (
    adaptation_curves,
    mean_curve,
    meta_gradient,
    meta_gradients,
    model_params,
    with_inner_lrs,
)
from fedmaml.meta.algorithms import resolve
from fedmaml.meta.params import Params
from fedmaml.models import build_model
from fedmaml.tasks.episodes import (
    ClientData,
    EpisodeSpec,
    Task,
    episode_generator,
    sample_episode,
    training_episodes,
)
from fedmaml.tasks.inputs import InputSpec, input_spec
from fedmaml.tasks.registry import episode_spec, loss_function, open_source
from fedmaml.tasks.source import TaskSource

EVAL_STREAM = 1


@dataclass
class Problem:
    """Data source, model, loss, episode shape and device of one run configuration."""

    cfg: RunConfig
    source: TaskSource
    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    spec: EpisodeSpec
    device: torch.device

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Problem:
        source = open_source(cfg)
        device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model_name, **source.model_kwargs()).to(device)
        return cls(cfg, source, model, loss_function(source), episode_spec(cfg), device)

    @property
    def model_kwargs(self) -> dict[str, int]:
        return self.source.model_kwargs()

    @property
    def inputs(self) -> InputSpec:
        """How raw examples become this run's model inputs (recorded in its checkpoints)."""
        return input_spec(self.cfg.task, self.model_kwargs, self.cfg.input_dims)

    def initial_params(self) -> Params:
        """θ from the seeded model initialisation (∪ α = inner-lr for Meta-SGD)."""
        theta = model_params(self.model)
        if resolve(self.cfg.algorithm).learns_inner_lr:
            return with_inner_lrs(theta, self.cfg.inner_lr)
        return theta

    def train_centrally(self, steps: int, *, clients: list[int] | None = None) -> MetaTrainResult:
        """The centralized reference of this configuration: ``steps`` meta-updates of
        ``clients_per_round`` clients each (or of exactly ``clients``), in one process."""
        cfg = self.cfg
        return meta_train(
            self.model,
            self.initial_params(),
            self.source,
            self.spec,
            loss_fn=self.loss_fn,
            meta_steps=steps,
            meta_batch=cfg.clients_per_round,
            algorithm=cfg.algorithm,
            inner_steps=cfg.inner_steps,
            inner_lr=cfg.inner_lr,
            meta_optimizer=cfg.meta_optimizer,
            meta_lr=cfg.meta_lr,
            seed=cfg.seed,
            batching=cfg.batching,
            clients=clients,
        )

    def to_device(self, params: Params) -> Params:
        return {k: v.to(self.device) for k, v in params.items()}

    def client_meta_gradient(
        self, params: Params, client: ClientData, index: int, meta_round: int
    ) -> tuple[Params, dict[str, float]]:
        """The client's meta-gradient, averaged over its local episodes, and its metrics."""
        tasks = self.training_tasks(client, index, meta_round)
        return meta_gradient(
            self.model,
            self.to_device(params),
            [t.support for t in tasks],
            [t.query for t in tasks],
            loss_fn=self.loss_fn,
            algorithm=self.cfg.algorithm,
            inner_steps=self.cfg.inner_steps,
            inner_lr=self.cfg.inner_lr,
            batching=self.cfg.batching,
        )

    def users_meta_gradients(
        self, params: Params, users: Sequence[tuple[ClientData, int]], meta_round: int
    ) -> list[tuple[Params, dict[str, float]] | FedmamlError]:
        """:meth:`client_meta_gradient` of each (client, index) in ``users``, computed together
        (:func:`fedmaml.meta.gradient.meta_gradients`: one vmap batch where the model runs under
        vmap); a user that fails is its own error in the list."""
        tasks = [self.training_tasks(client, index, meta_round) for client, index in users]
        return meta_gradients(
            self.model,
            self.to_device(params),
            [[t.support for t in mine] for mine in tasks],
            [[t.query for t in mine] for mine in tasks],
            loss_fn=self.loss_fn,
            algorithm=self.cfg.algorithm,
            inner_steps=self.cfg.inner_steps,
            inner_lr=self.cfg.inner_lr,
            batching=self.cfg.batching,
        )

    def training_tasks(self, client: ClientData, index: int, meta_round: int) -> list[Task]:
        """The local episodes client ``index`` trains on in round ``meta_round``."""
        return training_episodes(
            client,
            self.spec,
            seed=self.cfg.seed,
            step=meta_round,
            index=index,
            count=self.cfg.local_episodes,
        )

    def evaluation_curve(
        self, params: Params, client: ClientData, index: int, meta_round: int = 0
    ) -> tuple[list[dict[str, float]], int]:
        """Held-out query metrics after 0..eval-steps adaptation steps on the client's support,
        and the number of query examples.

        Each of the ``eval-episodes`` episodes takes its support set from the client's training
        pool and its query set from its held-out pool; the curve is their mean (every episode
        has the same number of queries). The episodes are a fixed function of (seed, client)
        unless ``meta_round`` differs. The algorithm's adapted parameters adapt (ANIL: the head).
        """
        [result] = self.evaluation_curves(params, [(client, index)], meta_round)
        if isinstance(result, FedmamlError):
            raise result
        return result

    def evaluation_curves(
        self, params: Params, users: Sequence[tuple[ClientData, int]], meta_round: int = 0
    ) -> list[tuple[list[dict[str, float]], int] | FedmamlError]:
        """:meth:`evaluation_curve` of each (client, index) in ``users``: all their episodes in
        one call of :func:`fedmaml.meta.evaluate.adaptation_curves` (vmap where the model runs
        under it); when adaptation diverges there, each user is evaluated on its own, so that
        only the users whose adaptation diverges fail."""
        tasks = [self._evaluation_tasks(client, index, meta_round) for client, index in users]
        flat = [t for mine in tasks for t in mine]
        try:
            curves = self._curves(params, flat)
        except FedmamlError:
            if len(users) == 1:
                raise
            return [self._one_evaluation(params, mine) for mine in tasks]
        results: list[tuple[list[dict[str, float]], int] | FedmamlError] = []
        begin = 0
        for mine in tasks:
            results.append(
                (mean_curve(curves[begin : begin + len(mine)]), sum(t.num_query for t in mine))
            )
            begin += len(mine)
        return results

    def _one_evaluation(
        self, params: Params, tasks: list[Task]
    ) -> tuple[list[dict[str, float]], int] | FedmamlError:
        try:
            return mean_curve(self._curves(params, tasks)), sum(t.num_query for t in tasks)
        except FedmamlError as exc:
            return exc

    def _evaluation_tasks(self, client: ClientData, index: int, meta_round: int) -> list[Task]:
        g = episode_generator(self.cfg.seed, meta_round, index, stream=EVAL_STREAM)
        return [
            sample_episode(client, self.spec, g, held_out=True)
            for _ in range(self.cfg.eval_episodes)
        ]

    def _curves(self, params: Params, tasks: list[Task]) -> list[list[dict[str, float]]]:
        return adaptation_curves(
            self.model,
            self.to_device(params),
            [t.support for t in tasks],
            [t.query for t in tasks],
            loss_fn=self.loss_fn,
            steps=self.cfg.eval_steps,
            inner_lr=self.cfg.inner_lr,
            adapted=resolve(self.cfg.algorithm).adapted,
            batching=self.cfg.batching,
        )


@lru_cache(maxsize=4)
def problem_for(cfg: RunConfig) -> Problem:
    """The workload of ``cfg``, built once per process (a simulation actor serves many rounds)."""
    return Problem.from_config(cfg)
