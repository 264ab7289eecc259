"""Personalize a population: :func:`personalize_many`, one row per user, batching users of equal
data shapes with ``torch.vmap``, with an optional progress bar and gain histogram."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmaml.errors import FedmamlError
from fedmaml.meta import validate
from fedmaml.meta.adapted import Adapted
from fedmaml.meta.choices import BATCHING
from fedmaml.meta.evaluate import mean_curve
from fedmaml.personalize.curves import adapt_users
from fedmaml.personalize.global_model import GlobalModel, Source, resolve_global
from fedmaml.personalize.plot import plot_gain
from fedmaml.personalize.user_data import UserData, prepare_user
from fedmaml.personalize.user_tables import load_table_users
from fedmaml.tasks.episodes import ClientData

if TYPE_CHECKING:
    import pandas as pd


def personalize_many(
    checkpoint_or_model: Source | GlobalModel,
    users: Mapping[str, UserData] | Sequence[ClientData] | pd.DataFrame | str | os.PathLike,
    *,
    user_column: str | None = None,
    label_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
    steps: int | None = None,
    lr: float | None = None,
    support_size: int | None = None,
    support_fraction: float | None = None,
    seed: int = 0,
    adapt: Adapted | None = None,
    batching: str = "auto",
    chunk_size: int = 256,
    plot: str | os.PathLike | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Personalize every user and return one row per user: ``user, n_support, n_eval,
    metric_before, metric_after, gain`` (plus ``loss_before, loss_after`` for classification).

    ``users``: in-memory clients (a mapping user -> ClientData or (x, y), or a list of
    ClientData), a table with ``user_column`` (DataFrame or path), or a folder of one table per
    user. Each user is split as in :func:`personalize` with the same ``seed``, so a row equals
    ``personalize(..., user_data=that user)``. ``adapt`` as in :func:`personalize`.
    ``batching``: ``vmap`` adapts users of equal data shapes together in chunks of
    ``chunk_size`` (``auto`` does so for models without buffers or convolutions), ``loop`` one
    user at a time (:func:`fedmaml.meta.evaluate.adaptation_curves`). ``plot``: write a
    histogram of the gains there (PNG). ``df.attrs`` holds ``metric``, ``steps``, ``lr`` and the
    mean curve over users.
    """
    import pandas as pd

    validate.check_choice("batching", batching, BATCHING)
    validate.check_chunk_size(chunk_size)
    g = resolve_global(checkpoint_or_model)
    k, rate, scalar = g.defaults(steps, lr)
    data = _user_mapping(g, users, user_column, label_column, feature_columns)
    splits = [
        prepare_user(
            g, d, user=u, support_size=support_size, support_fraction=support_fraction, seed=seed
        )
        for u, d in data.items()
    ]
    with _progress(progress, len(splits), "personalizing") as advance:
        done = adapt_users(
            g,
            splits,
            k,
            rate,
            g.adapted(adapt),
            batching=batching,
            chunk_size=chunk_size,
            progress=advance,
        )
    df = pd.DataFrame([r.row() for r in done])
    df.attrs.update(
        metric=done[0].metric,
        steps=k,
        lr=scalar if scalar is not None else "learned",
        curve=mean_curve([r.curve for r in done]),
    )
    if plot is not None:
        plot_gain(df, plot)
    return df


def _user_mapping(
    g: GlobalModel,
    users: Any,
    user_column: str | None,
    label_column: str | None,
    feature_columns: Sequence[str] | None,
) -> dict[str, UserData]:
    if isinstance(users, Mapping):
        data = {str(u): d for u, d in users.items()}
    elif isinstance(users, Sequence) and not isinstance(users, str | bytes):
        if not all(isinstance(c, ClientData) for c in users):
            raise FedmamlError("a list of users must hold ClientData; use a dict for (x, y) pairs")
        data = {c.client_id: c for c in users}
        if len(data) < len(users):
            raise FedmamlError("two clients share a client_id; give every user its own id")
    else:
        if not user_column and not (isinstance(users, str | os.PathLike) and Path(users).is_dir()):
            raise FedmamlError(
                "a table of many users needs its user column (user_column / --user-column); "
                "for a single user use personalize"
            )
        data = dict(
            load_table_users(
                g,
                users,
                label_column=label_column,
                feature_columns=feature_columns,
                user_column=user_column,
            ).users
        )
    if not data:
        raise FedmamlError("no users to personalize; give at least one")
    return data


@contextmanager
def _progress(enabled: bool, total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (``advance(n)``), or a no-op when disabled."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)
