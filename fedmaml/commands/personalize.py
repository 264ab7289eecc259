"""fedmaml personalize: adapt a trained global model to one user, or to every user of a table.

One user (a table, an .npz file, a folder of images by class, or one user of a LEAF JSON
file): prints the metric before and after K steps on the user's held-out examples and, with
--out, writes the personalized model. Many users (--out-dir: a table with --user-column, a
LEAF JSON file, or a folder of one file per user): writes DIR/personalization.csv (one row per
user) and DIR/gain.png (the distribution of the gain), and with --save-models each user's
model as DIR/models/USER.pt. Steps, step size and adapted parameters default to the
checkpoint's personalization recipe (chosen on validation users at the end of training).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmaml.config import column_names
from fedmaml.errors import FedmamlError
from fedmaml.meta.choices import ADAPTED, BATCHING


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "personalize",
        help="adapt a trained global model to one user's data, or to every user of a table",
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="global checkpoint (.pt)")
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="one user's table (.csv/.parquet; an image model's pixel columns are reshaped to "
        "its input shape), a table with --user-column, a LEAF .json file (users by LEAF id), an "
        ".npz file with arrays x and y, a folder of class folders of images, or a folder of one "
        "such file per user; images are prepared as in training (e.g. FEMNIST's ink = 1 - grey)",
    )
    p.add_argument(
        "--users",
        type=column_names,
        help="comma-separated ids of the users to personalize (LEAF ids, or values of "
        "--user-column); default: every user",
    )
    p.add_argument(
        "--label-column", help="label column (default: the checkpoint's; y for sinusoids)"
    )
    p.add_argument(
        "--feature-columns",
        type=column_names,
        help="comma-separated feature columns (default: the checkpoint's; x for sinusoids; "
        "else every other numeric column)",
    )
    p.add_argument("--user-column", help="column naming the user of each row (many users)")
    p.add_argument(
        "--steps",
        type=int,
        help="adaptation steps K, 0 = the global model (default: the checkpoint's recipe, else "
        "its eval-steps)",
    )
    p.add_argument(
        "--adapt",
        choices=ADAPTED,
        help="the parameters that adapt: all, or the head (the last layer; the body stays as "
        "trained) (default: the checkpoint's recipe, else what its algorithm adapts: the head "
        "for anil, else all)",
    )
    p.add_argument(
        "--lr",
        type=float,
        help="step size (default: the checkpoint's recipe, else its learned step sizes, else its "
        "inner-lr)",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--support-size", type=int, help="rows per user to adapt on")
    size.add_argument(
        "--support-fraction", type=float, help="share of each user's rows to adapt on (0.5)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the support/evaluation split")
    p.add_argument("--batching", choices=BATCHING, default="auto", help="many users: vmap or loop")
    p.add_argument("--out", type=Path, help="one user: write the personalized model here")
    p.add_argument("--out-dir", type=Path, help="many users: write the per-user table and plot")
    p.add_argument(
        "--save-models",
        action="store_true",
        help="many users: also write each user's personalized model to OUT_DIR/models/USER.pt",
    )
    p.add_argument(
        "--progress", action="store_true", help="show a progress bar (default: on a terminal)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    per_user_folder = args.data.is_dir() and not _image_folder(args.data)
    many = bool(args.user_column) or per_user_folder or args.out_dir is not None
    if many and args.out:
        raise FedmamlError(
            "--out writes one user's model; with --user-column or a folder give --out-dir"
        )
    if many and not args.out_dir:
        raise FedmamlError("many users: give --out-dir for personalization.csv and gain.png")
    if args.save_models and not many:
        raise FedmamlError("--save-models is for many users (--out-dir); for one user give --out")
    if args.out and args.out.resolve() == args.checkpoint.resolve():
        raise FedmamlError("--out would overwrite the global checkpoint; choose another path")
    options = dict(
        label_column=args.label_column,
        feature_columns=args.feature_columns,
        steps=args.steps,
        lr=args.lr,
        adapt=args.adapt,
        support_size=args.support_size,
        support_fraction=args.support_fraction,
        seed=args.seed,
    )
    if many:
        return _many(args, options)
    from fedmaml.personalize import personalize
    from fedmaml.personalize.global_model import resolve_global

    if args.users and len(args.users) > 1:
        raise FedmamlError("--users names several users; give --out-dir (many users)")
    g = resolve_global(args.checkpoint)
    result = personalize(g, args.data, user=args.users[0] if args.users else None, **options)
    lr = "learned step sizes" if result.lr is None else f"lr {result.lr:g}"
    lr += "" if result.adapted == "all" else f", {result.adapted} adapted"
    print(
        f"{result.user}: {result.metric} {result.metric_before:.4g} before, "
        f"{result.metric_after:.4g} after {result.steps} steps ({lr}; gain {result.gain:.4g}); "
        f"adapted on {result.n_support} rows, evaluated on {result.n_eval}"
    )
    if g.recipe is not None:
        print(f"the checkpoint's recipe: {g.recipe.describe()}")
    print(
        "curve, k = 0.."
        + str(result.steps)
        + ": "
        + " ".join(
            f"{e['accuracy' if result.classification else 'loss']:.4g}" for e in result.curve
        )
    )
    if args.out:
        result.save(args.out)
        print(f"wrote the personalized model to {args.out}")
    return 0


def _image_folder(path: Path) -> bool:
    """A folder of class folders (one user's images), not a folder of one file per user."""
    from fedmaml.personalize.user_files import PER_USER_FILES

    entries = list(path.iterdir())
    files = [p for p in entries if p.is_file() and p.suffix.lower() in PER_USER_FILES]
    return any(p.is_dir() for p in entries) and not files


def _many(args: argparse.Namespace, options: dict) -> int:
    from fedmaml.atomic import atomic_path
    from fedmaml.personalize import personalize_many, plot_gain

    models = args.out_dir / "models" if args.save_models else None
    df = personalize_many(
        args.checkpoint,
        args.data,
        user_column=args.user_column,
        batching=args.batching,
        progress=args.progress or sys.stderr.isatty(),
        save_dir=models,
        only=args.users,
        **options,
    )
    table, plot = args.out_dir / "personalization.csv", args.out_dir / "gain.png"
    with atomic_path(table) as tmp_table, atomic_path(plot) as tmp_plot:
        df.to_csv(tmp_table, index=False)
        plot_gain(df, tmp_plot)
    metric, gain = df.attrs["metric"], df["gain"]
    print(
        f"personalized {len(df)} users in {df.attrs['steps']} steps: mean {metric} "
        f"{df['metric_before'].mean():.4g} before, {df['metric_after'].mean():.4g} after; "
        f"mean gain {gain.mean():.4g}, {(gain > 0).mean():.0%} of users improved"
    )
    print(f"wrote {table} and {plot}" + (f", and {len(df)} models to {models}" if models else ""))
    return 0
