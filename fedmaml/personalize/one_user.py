"""Personalize one user: :func:`personalize`, from in-memory data or a table."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmaml.errors import FedmamlError
from fedmaml.meta.adapted import Adapted
from fedmaml.personalize.curves import adapt_user
from fedmaml.personalize.global_model import GlobalModel, Source, resolve_global
from fedmaml.personalize.personalized import Personalized
from fedmaml.personalize.user_data import UserData, prepare_user
from fedmaml.personalize.user_tables import load_table_users
from fedmaml.tasks.episodes import ClientData

if TYPE_CHECKING:
    import pandas as pd


def personalize(
    checkpoint_or_model: Source | GlobalModel,
    user_data: UserData | pd.DataFrame | str | os.PathLike,
    *,
    steps: int | None = None,
    lr: float | None = None,
    support_size: int | None = None,
    support_fraction: float | None = None,
    seed: int = 0,
    user: str | None = None,
    label_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
    adapt: Adapted | None = None,
) -> Personalized:
    """Adapt the global model to one user (see :mod:`fedmaml.personalize` for the math).

    ``checkpoint_or_model``: a checkpoint path, a :class:`Checkpoint` or ``(model, params)``.
    ``user_data``: a :class:`ClientData`, an ``(x, y)`` pair, or a table (DataFrame, CSV or
    Parquet path; then ``label_column`` is required and ``feature_columns`` defaults to every
    other numeric column). ``user`` names the user (default: the client id, the file name, or
    "user"). ``steps`` defaults to the checkpoint's ``eval-steps``, ``lr`` to its learned step
    sizes or its ``inner-lr`` (RunConfig's defaults, 5 and 0.01, without a run config).
    ``adapt``: the parameters to adapt, ``"all"``, ``"head"`` (the last layer; the rest stays
    bit-identical) or a collection of parameter names; default: those the checkpoint's
    algorithm adapts (the head for ``anil``), else all.
    """
    g = resolve_global(checkpoint_or_model)
    k, rate, scalar = g.defaults(steps, lr)
    columns: dict[str, Any] = {}
    if user is None:
        user = (
            user_data.client_id
            if isinstance(user_data, ClientData)
            else Path(user_data).stem
            if isinstance(user_data, str | os.PathLike)
            else "user"
        )
    if not isinstance(user_data, ClientData | tuple):
        tables = load_table_users(
            g, user_data, label_column=label_column, feature_columns=feature_columns
        )
        if len(tables.users) != 1:
            raise FedmamlError(
                f"{user_data} holds {len(tables.users)} users; personalize one file at a time "
                "or use personalize_many"
            )
        user_data, columns = next(iter(tables.users.values())), tables.columns
    split = prepare_user(
        g, user_data, user=user, support_size=support_size, support_fraction=support_fraction,
        seed=seed,
    )  # fmt: skip
    adapted = g.adapted(adapt)
    result, fast = adapt_user(g, split, k, rate, adapted)
    return Personalized(
        model=g.model,
        params=fast,
        model_name=g.name,
        model_kwargs=g.kwargs,
        classification=split.classification,
        input_shape=tuple(split.support[0].shape[1:]),
        curve=result.curve,
        n_support=int(split.support[0].shape[0]),
        n_eval=int(split.evaluation[0].shape[0]),
        steps=k,
        lr=scalar,
        adapted=adapted if isinstance(adapted, str) else sorted(adapted),
        user=user,
        columns=columns,
        source_config=g.config,
        round=g.round,
    )
