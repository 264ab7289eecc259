"""Personalize a population: :func:`personalize_many`, one row per user, batching users of equal
data shapes with ``torch.vmap``, with an optional progress bar and gain histogram."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmaml.errors import FedmamlError
from fedmaml.meta import validate
from fedmaml.meta.adapted import Adapted
from fedmaml.meta.choices import BATCHING
from fedmaml.meta.evaluate import mean_curve
from fedmaml.meta.params import InnerLR
from fedmaml.personalize.curves import UserResult, adapt_users
from fedmaml.personalize.global_model import GlobalModel, Source, resolve_global
from fedmaml.personalize.plot import plot_gain
from fedmaml.personalize.user_data import UserData, UserSplit, prepare_user
from fedmaml.personalize.user_files import TABLES, load_users
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
    save_dir: str | os.PathLike | None = None,
    only: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Personalize every user and return one row per user: ``user, n_support, n_eval,
    metric_before, metric_after, gain`` (plus ``loss_before, loss_after`` for classification).

    ``users``: in-memory clients (a mapping user -> ClientData or (x, y), or a list of
    ClientData), a table with ``user_column`` (DataFrame or path), a LEAF JSON file (users by
    LEAF id), or a folder of one file per user (:mod:`fedmaml.personalize.user_files`);
    ``only``: personalize these users only. Each user is split as in :func:`personalize`
    with the same ``seed``, so a row equals
    ``personalize(..., user_data=that user)``. ``adapt`` as in :func:`personalize`.
    ``batching``: ``vmap`` adapts users of equal data shapes together in chunks of
    ``chunk_size`` (``auto`` does so for models without buffers or convolutions), ``loop`` one
    user at a time (:func:`fedmaml.meta.evaluate.adaptation_curves`). ``plot``: write a
    histogram of the gains there (PNG). ``save_dir``: also write each user's personalized model
    there, ``<user>.pt`` (users are then adapted one at a time; the numbers are the same).
    ``df.attrs`` holds ``metric``, ``steps``, ``lr``, ``adapted`` and the mean curve over users.
    """
    import pandas as pd

    validate.check_choice("batching", batching, BATCHING)
    validate.check_chunk_size(chunk_size)
    g = resolve_global(checkpoint_or_model)
    k, rate, scalar = g.defaults(steps, lr)
    data = _user_mapping(g, users, user_column, label_column, feature_columns, only)
    splits = [
        prepare_user(
            g, d, user=u, support_size=support_size, support_fraction=support_fraction, seed=seed
        )
        for u, d in data.items()
    ]
    adapted = g.adapted(adapt)
    if save_dir is not None:
        done = _adapt_and_save(g, splits, k, rate, adapted, Path(save_dir), progress)
    else:
        with _progress(progress, len(splits), "personalizing") as advance:
            done = adapt_users(
                g,
                splits,
                k,
                rate,
                adapted,
                batching=batching,
                chunk_size=chunk_size,
                progress=advance,
            )
    df = pd.DataFrame([r.row() for r in done])
    df.attrs.update(
        metric=done[0].metric,
        steps=k,
        lr=scalar if scalar is not None else "learned",
        adapted=adapted if isinstance(adapted, str) else ",".join(sorted(adapted)),
        curve=mean_curve([r.curve for r in done]),
    )
    if plot is not None:
        plot_gain(df, plot)
    return df


def _adapt_and_save(
    g: GlobalModel,
    splits: Sequence[UserSplit],
    steps: int,
    rate: InnerLR,
    adapted: Adapted,
    save_dir: Path,
    progress: bool,
) -> list[UserResult]:
    """Adapt the users one at a time and save each one's model as ``save_dir/<user>.pt``."""
    from fedmaml.personalize.one_user import adapt_one

    names = [_file_name(s.user) for s in splits]
    if len(set(names)) < len(names):
        raise FedmamlError(
            "two users' names give the same file name in the output folder; give users "
            "distinct names (letters, digits, '-', '_' and '.')"
        )
    save_dir.mkdir(parents=True, exist_ok=True)
    lr = rate if isinstance(rate, float) else None
    done = []
    with _progress(progress, len(splits), "personalizing") as advance:
        for split, name in zip(splits, names, strict=True):
            one = adapt_one(g, split, steps=steps, lr=lr, adapt=adapted)
            one.save(save_dir / f"{name}.pt")
            done.append(UserResult(split, one.curve))
            advance(1)
    return done


def _file_name(user: str) -> str:
    """A user's name as a file name: characters other than letters, digits, '-', '_' and '.'
    become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", user).lstrip(".") or "_"


def _user_mapping(
    g: GlobalModel,
    users: Any,
    user_column: str | None,
    label_column: str | None,
    feature_columns: Sequence[str] | None,
    only: Sequence[str] | None,
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
        one_table = not isinstance(users, str | os.PathLike) or (
            Path(users).suffix.lower() in TABLES and not Path(users).is_dir()
        )
        if one_table and not user_column:
            raise FedmamlError(
                "a table of many users needs its user column (user_column / --user-column); "
                "for a single user use personalize"
            )
        data = dict(
            load_users(
                g,
                users,
                label_column=label_column,
                feature_columns=feature_columns,
                user_column=user_column,
                users=only,
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
