"""A run's personalization recipe, fitted at the end of training on its validation clients and
stored in its checkpoint (:mod:`fedmaml.personalize.recipe` for how it is chosen).

The ServerApp calls :func:`fit_run_recipe` once the last round is done and
:func:`store_recipe` once the last checkpoint is written; the benchmark scripts call the same
functions in-process. Nothing here knows about Flower.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedmaml.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedmaml.errors import NonFiniteError
from fedmaml.meta.algorithms import resolve
from fedmaml.meta.params import Params
from fedmaml.personalize.curves import adapt_users
from fedmaml.personalize.global_model import GlobalModel, Source, resolve_global
from fedmaml.personalize.recipe import LEARNED, Recipe, fit_recipe
from fedmaml.personalize.user_data import prepare_user
from fedmaml.tasks.episodes import ClientData

if TYPE_CHECKING:
    import pandas as pd
from fedmaml.problem import Problem
from fedmaml.rundir.names import RECIPE, TEST_USERS


def run_checkpoint(work: Problem, params: Params) -> Checkpoint:
    """θ of ``work``'s run as a checkpoint (model, run config and input preprocessing)."""
    return Checkpoint(
        params=dict(params),
        model=work.cfg.model_name,
        model_kwargs=work.model_kwargs,
        config=work.cfg.to_mapping(),
        inputs=work.inputs.to_dict(),
    )


def fit_run_recipe(work: Problem, params: Params) -> Recipe | None:
    """The recipe of θ = ``params`` chosen on the run's validation clients (None when the run
    has none): steps 0..eval-steps, the step sizes of ``recipe-lrs`` (and the learned ones of a
    Meta-SGD run, tried first), the parameter sets of ``recipe-adapt``."""
    cfg, source = work.cfg, work.source
    n = source.num_clients("val")
    if n == 0:
        return None
    learned = [None] if resolve(cfg.algorithm).learns_inner_lr else []
    return fit_recipe(
        run_checkpoint(work, params),
        [source.client(i, "val") for i in range(n)],
        max_steps=cfg.eval_steps,
        lrs=[*learned, *cfg.recipe_lr_list],
        adapts=cfg.recipe_adapt_list,
        seed=cfg.seed,
        batching=cfg.batching,
    )


def finish_run(work: Problem, params: Params, out_dir: str | Path) -> Recipe | None:
    """At the end of training: the recipe chosen on the validation clients (None without
    them), and the test (held-out) clients personalized with it, written to
    ``out_dir/test_users.csv``. The recipe goes into the checkpoint with :func:`store_recipe`
    once the last checkpoint is written."""
    recipe = fit_run_recipe(work, params)
    if recipe is None:
        return None
    source = work.source
    tests = [source.client(i, "heldout") for i in range(source.num_clients("heldout"))]
    if tests:
        ckpt = run_checkpoint(work, params)
        ckpt.recipe = recipe.to_dict()
        df = test_users(
            ckpt, tests, max_steps=work.cfg.eval_steps, seed=work.cfg.seed,
            batching=work.cfg.batching,
        )  # fmt: skip
        write_test_users(df, out_dir)
    return recipe


def store_recipe(checkpoint: str | Path, recipe: Recipe, out_dir: str | Path | None = None) -> None:
    """Write ``recipe`` into the checkpoint (atomically; the rest unchanged) and, with
    ``out_dir``, its candidates to ``out_dir/recipe.csv``."""
    ckpt = load_checkpoint(checkpoint)
    ckpt.recipe = recipe.to_dict()
    save_checkpoint(checkpoint, ckpt)
    if out_dir is not None:
        write_candidates(recipe, Path(out_dir) / RECIPE)


def write_candidates(recipe: Recipe, path: Path) -> Path:
    """The candidates as a table: adapted, lr, steps, mean validation metric, chosen."""
    import pandas as pd

    from fedmaml.atomic import atomic_path

    rows = []
    for i, c in enumerate(recipe.candidates):
        lr = None if c["lr"] == LEARNED else c["lr"]
        for k, value in enumerate(c.get("curve", [float("nan")])):
            if recipe.steps == 0:  # the global model: k = 0 is the same for every candidate
                chosen = k == 0 and i == 0
            else:
                chosen = k == recipe.steps and lr == recipe.lr and c["adapt"] == recipe.adapt
            rows.append(
                {
                    "adapt": c["adapt"],
                    "lr": c["lr"],
                    "steps": k,
                    recipe.metric or "metric": value,
                    "diverged": bool(c.get("diverged", False)),
                    "chosen": chosen,
                }
            )
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    return path


def test_users(
    checkpoint_or_model: Source | GlobalModel,
    users: list[ClientData],
    *,
    max_steps: int,
    seed: int = 0,
    batching: str = "auto",
) -> pd.DataFrame:
    """Each user personalized by the checkpoint's recipe (or its defaults): one row per user,
    ``user, n_support, n_eval, metric_before`` (the global model), ``metric_after`` (the
    recipe's steps), ``gain`` (positive = helped), and ``at_0 .. at_K``, the user's metric after
    k steps with the recipe's step size and adapted parameters, K = max(max_steps, the recipe's
    steps). Users adapt on their support set (training pool) and are measured on their query
    set (held-out pool). When adaptation diverges beyond the recipe's steps, the curve stops
    there (``at_k`` empty)."""
    import pandas as pd

    g = resolve_global(checkpoint_or_model)
    steps, rate, _ = g.defaults(None, None)
    adapt = g.adapted(None)
    splits = [prepare_user(g, u, user=u.client_id, seed=seed) for u in users]
    horizon = max(max_steps, steps)
    try:
        done = adapt_users(g, splits, horizon, rate, adapt, batching=batching, chunk_size=256)
    except NonFiniteError:
        horizon = steps
        done = adapt_users(g, splits, horizon, rate, adapt, batching=batching, chunk_size=256)
    key = "accuracy" if splits[0].classification else "loss"
    sign = 1.0 if key == "accuracy" else -1.0
    rows = []
    for r in done:
        curve = [entry[key] for entry in r.curve]
        rows.append(
            {
                "user": r.split.user,
                "n_support": int(r.split.support[0].shape[0]),
                "n_eval": int(r.split.evaluation[0].shape[0]),
                "metric_before": curve[0],
                "metric_after": curve[steps],
                "gain": sign * (curve[steps] - curve[0]),
                **{
                    f"at_{k}": curve[k] if k <= horizon else float("nan")
                    for k in range(max_steps + 1)
                },
            }
        )
    df = pd.DataFrame(rows)
    df.attrs.update(metric="accuracy" if key == "accuracy" else "mse", steps=steps)
    return df


def write_test_users(df: pd.DataFrame, out_dir: str | Path) -> Path:
    """``out_dir/test_users.csv``, atomically."""
    from fedmaml.atomic import atomic_path

    path = Path(out_dir) / TEST_USERS
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path
