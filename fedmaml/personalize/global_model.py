"""The global model to personalize: a checkpoint (or model and θ) opened and checked, with the
defaults for the number of steps K, the step size α and the parameters that adapt: those of the
checkpoint's personalization recipe (chosen on validation users, :mod:`.recipe`) when it has
one, else those its run configuration gives."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from fedmaml.checkpoint import Checkpoint, load_checkpoint
from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.meta import validate
from fedmaml.meta.adapted import Adapted
from fedmaml.meta.algorithms import resolve
from fedmaml.meta.params import INNER_LR_PREFIX, InnerLR, Params, split_inner_lrs
from fedmaml.personalize.personalized import SECTION
from fedmaml.tasks.inputs import InputSpec, input_spec

if TYPE_CHECKING:
    from fedmaml.personalize.recipe import Recipe

Source = str | os.PathLike | Checkpoint | tuple[nn.Module, Mapping[str, Tensor]]


@dataclass(frozen=True)
class GlobalModel:
    """The model to personalize: architecture, θ, learned α (maybe empty) and its provenance."""

    model: nn.Module
    theta: Params
    alpha: Params
    name: str | None
    kwargs: dict[str, int]
    config: dict[str, Any]
    round: int
    #: the personalization recipe stored with the checkpoint (a dict; see :attr:`recipe`)
    recipe_record: dict[str, Any] | None = None
    #: how raw examples become model inputs (a dict; see :attr:`inputs`)
    inputs_record: dict[str, Any] | None = None

    @cached_property
    def recipe(self) -> Recipe | None:
        """The checkpoint's personalization recipe, or None."""
        from fedmaml.personalize.recipe import Recipe

        return None if self.recipe_record is None else Recipe.from_dict(self.recipe_record)

    @cached_property
    def inputs(self) -> InputSpec | None:
        """How raw examples become the model's inputs: the checkpoint's record, else what its
        run's task trains with (older checkpoints), else None (a model given in memory)."""
        if self.inputs_record is not None:
            return InputSpec.from_dict(self.inputs_record)
        if self.run is not None:
            return input_spec(self.run.task, self.kwargs, self.run.input_dims)
        return None

    @cached_property
    def num_outputs(self) -> int | None:
        """Outputs of the last linear layer: 1 means regression, C > 1 a C-class classifier."""
        last = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        return last[-1].out_features if last else None

    @cached_property
    def in_features(self) -> int | None:
        """Features the first layer takes when it is linear (tabular models), else None."""
        first = next((m for m in self.model.modules() if list(m.parameters(recurse=False))), None)
        return first.in_features if isinstance(first, nn.Linear) else None

    @cached_property
    def run(self) -> RunConfig | None:
        """The run configuration the checkpoint was trained with (None for a model given in
        memory, or a checkpoint saved without one), checked like every run config."""
        if not self.config:
            return None
        try:
            return RunConfig.from_mapping(self.config)
        except FedmamlError as exc:
            raise FedmamlError(
                f"the checkpoint's run configuration is damaged ({exc}); use another "
                "checkpoint or re-run training"
            ) from None

    def defaults(self, steps: int | None, lr: float | None) -> tuple[int, InnerLR, float | None]:
        """(K, α as used, the scalar lr or None when learned step sizes are used). Those given
        win; the others come from the checkpoint's recipe, else K from the run's ``eval-steps``
        and α from the learned step sizes or the run's ``inner-lr`` (RunConfig's defaults
        without a run). K = 0 is the global model itself."""
        run = self.run or RunConfig()
        recipe = self.recipe
        k = steps if steps is not None else recipe.steps if recipe else run.eval_steps
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise FedmamlError(
                f"the number of adaptation steps must be an integer >= 0 (got {k!r})"
            )
        if lr is None and recipe is not None and recipe.lr is not None:
            lr = recipe.lr
        if lr is None and self.alpha:
            return k, self.alpha, None
        rate = run.inner_lr if lr is None else lr
        validate.check_inner_lr(rate)
        return k, float(rate), float(rate)

    def adapted(self, adapt: Adapted | None) -> Adapted:
        """The parameters to adapt: ``adapt`` when given, else the recipe's, else those the
        checkpoint's algorithm adapts (the head for ``anil``), else all."""
        if adapt is not None:
            return adapt
        if self.recipe is not None:
            return self.recipe.adapt
        return resolve(self.run.algorithm).adapted if self.run else "all"


def resolve_global(source: Source | GlobalModel) -> GlobalModel:
    """Open a checkpoint path, a :class:`Checkpoint` or a ``(model, params)`` pair, and check
    that the parameters fit the architecture. Personalization runs on the CPU: a user's few
    steps are cheap, and the result must load anywhere."""
    if isinstance(source, GlobalModel):
        return source
    if isinstance(source, str | os.PathLike):
        where = f"checkpoint {source}"
        source = load_checkpoint(source)
    elif isinstance(source, Checkpoint):
        where = f"checkpoint of model {source.model!r}"
    else:
        where = "the given (model, params)"
    if isinstance(source, Checkpoint):
        if SECTION in source.config:
            raise FedmamlError(
                f"{where} is already a personalized model; personalize from the global "
                "checkpoint written by training (e.g. RUN_DIR/checkpoint.pt)"
            )
        model, params = source.build_model(), source.params
        name, kwargs, config, rnd = (
            source.model,
            dict(source.model_kwargs),
            source.config,
            source.round,
        )
        records = (source.recipe, source.inputs)
    elif (
        isinstance(source, tuple)
        and len(source) == 2
        and isinstance(source[0], nn.Module)
        and isinstance(source[1], Mapping)
    ):
        model, params = source
        name, kwargs, config, rnd = None, {}, {}, 0
        records = (None, None)
    else:
        raise FedmamlError(
            "checkpoint_or_model must be a checkpoint path, a Checkpoint or a (model, params) "
            f"pair (got {type(source).__name__})"
        )
    theta, alpha = split_inner_lrs(params)
    try:
        validate.check_params(model, theta)
    except FedmamlError as exc:
        raise FedmamlError(f"{where}: {exc}") from None
    wrong = [k for k, a in alpha.items() if k not in theta or a.shape != theta[k].shape]
    if wrong:
        raise FedmamlError(
            f"{where}: learned step sizes {[INNER_LR_PREFIX + k for k in wrong]} do not match the "
            "model's parameters; the checkpoint is damaged, use another one"
        )
    return GlobalModel(
        model=model,
        theta={k: v.detach().cpu() for k, v in theta.items()},
        alpha={k: v.detach().cpu() for k, v in alpha.items()},
        name=name,
        kwargs=kwargs,
        config=dict(config),
        round=int(rnd),
        recipe_record=records[0],
        inputs_record=records[1],
    )
