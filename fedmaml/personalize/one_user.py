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
from fedmaml.personalize.user_data import UserData, UserSplit, prepare_user
from fedmaml.personalize.user_files import load_users
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
    ``user_data``: a :class:`ClientData`, an ``(x, y)`` pair, a table (DataFrame, CSV or
    Parquet path; then ``label_column`` is required unless the checkpoint names it, and
    ``feature_columns`` defaults to every other numeric column; an image model's pixel
    columns are reshaped to its input shape), or any other file of
    :mod:`fedmaml.personalize.user_files` (LEAF JSON, ``.npz``, a folder of images by class),
    prepared by the checkpoint's input preprocessing. ``user`` names the user (default: the
    client id, the LEAF id, the file name, or "user") and picks it from a file of several
    users. ``steps``, ``lr`` and ``adapt`` default to the checkpoint's personalization recipe
    (chosen on validation users) when it has one; otherwise ``steps`` to its ``eval-steps``,
    ``lr`` to its learned step sizes or its ``inner-lr`` (RunConfig's defaults, 5 and 0.01,
    without a run config) and ``adapt`` to the parameters its algorithm adapts (the head for
    ``anil``), else all. ``adapt``: ``"all"``, ``"head"`` (the last layer; the rest stays
    bit-identical) or a collection of parameter names. ``steps=0`` gives the global model.
    """
    g = resolve_global(checkpoint_or_model)
    g.defaults(steps, lr)  # check the settings before reading the data
    columns: dict[str, Any] = {}
    user_data_path = user_data if isinstance(user_data, str | os.PathLike) else None
    if not isinstance(user_data, ClientData | tuple):
        loaded = load_users(
            g, user_data, label_column=label_column, feature_columns=feature_columns
        )
        names = list(loaded.users)
        if len(names) > 1 and user is None:
            raise FedmamlError(
                f"{user_data} holds {len(names)} users; personalize one at a time (user=ID, "
                "--users ID) or use personalize_many"
            )
        if len(names) > 1 and user not in loaded.users:
            shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
            raise FedmamlError(
                f"no user {user!r} in the data (it holds {len(names)} users: {shown}); give an "
                "id the data has"
            )
        name = user if user in loaded.users else names[0]
        default = (
            name
            if isinstance(user_data, str | os.PathLike)
            and Path(user_data).suffix.lower() == ".json"
            else None
        )
        user_data, columns = loaded.users[name], loaded.columns
        user = user or default
    if user is None:
        user = (
            user_data.client_id
            if isinstance(user_data, ClientData)
            else Path(user_data_path).stem
            if user_data_path is not None
            else "user"
        )
    split = prepare_user(
        g, user_data, user=user, support_size=support_size, support_fraction=support_fraction,
        seed=seed,
    )  # fmt: skip
    return adapt_one(g, split, steps=steps, lr=lr, adapt=adapt, columns=columns)


def adapt_one(
    g: GlobalModel,
    split: UserSplit,
    *,
    steps: int | None = None,
    lr: float | None = None,
    adapt: Adapted | None = None,
    columns: dict[str, Any] | None = None,
) -> Personalized:
    """The personalized model of one user's checked support/evaluation split (defaults as in
    :func:`personalize`)."""
    k, rate, scalar = g.defaults(steps, lr)
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
        user=split.user,
        columns=dict(columns or {}),
        source_config=g.config,
        round=g.round,
        inputs=g.inputs.to_dict() if g.inputs is not None else None,
    )
