"""The histogram of the per-user gain of :func:`fedmaml.personalize.personalize_many`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from fedmaml.atomic import atomic_path

if TYPE_CHECKING:
    import pandas as pd


def plot_gain(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """A histogram of the per-user gain (matplotlib's Agg canvas, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = df.attrs.get("metric", "metric")
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(df["gain"], bins=min(30, max(5, len(df) // 5)), color="tab:blue", alpha=0.8)
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_xlabel(f"gain in {metric} (positive = personalization helped)")
    ax.set_ylabel("users")
    ax.set_title(
        f"{len(df)} users, {df.attrs.get('steps', '?')} steps: mean gain {df['gain'].mean():.3g}, "
        f"{(df['gain'] > 0).mean():.0%} improved"
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)
