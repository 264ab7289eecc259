"""fedmaml predict: predictions of a personalized model for a table or a file of images.

A table: reads the feature columns the model was personalized on (an image model's pixel
columns, reshaped to its input shape) and writes the table with a prediction column added (the
predicted value, or the class id for a classifier). A LEAF JSON file, an .npz file (x, y) or a
folder of images by class: writes one row per example (user, example, label, prediction).
Images are prepared as in training (the preprocessing the model records).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict with a personalized model (written by `fedmaml personalize --out`)",
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--model", required=True, type=Path, help="personalized model (.pt)")
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="inputs: a table (.csv/.parquet), a LEAF .json file, an .npz file (x, y) or a folder "
        "of class folders of images",
    )
    p.add_argument("--out", required=True, type=Path, help="predictions table (.csv, or .parquet)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedmaml.atomic import atomic_path
    from fedmaml.personalize import load_personalized
    from fedmaml.personalize.predictions import predict_data

    model = load_personalized(args.model)
    df = predict_data(model, args.data)
    with atomic_path(args.out) as tmp:
        if args.out.suffix.lower() in (".parquet", ".pq"):
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
    print(f"wrote {len(df)} predictions to {args.out}")
    return 0
