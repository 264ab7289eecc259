"""Per-user evidence of personalization, from runs' ``test_users.csv`` (one row per test user:
the metric of the global model, of the personalized model, the gain, and ``at_k`` after k steps).

* :func:`user_summary`: one method over its runs (e.g. seeds), the test users of all of them
  pooled: mean with a 95% t-interval, the mean of each run, the 10th/50th/90th percentiles over
  users, the share of users the personalization helped (gain > 0) and hurt (gain < 0), and the
  mean metric after k steps;
* :func:`paired_difference`: method A − method B on the same users of the same runs (seeds),
  with its 95% t-interval and the share of users A serves better;
* :func:`compare_users`: the per-user gain and the mean steps curve of several methods side by
  side (one PNG), what ``fedmaml report RUN_DIR RUN_DIR ...`` draws.

The t-interval of n values with mean m and standard deviation s is m ± t_{0.975, n−1} s / √n.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import pandas as pd

from fedmaml.atomic import atomic_write
from fedmaml.errors import FedmamlError
from fedmaml.rundir.names import TEST_USERS

#: two-sided 95% quantiles t_{0.975, df} of Student's t for df = 1..30 (above: the normal's)
T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip

_AT = re.compile(r"^at_(\d+)$")


def t975(df: int) -> float:
    """t_{0.975, df}: the table for df <= 30, else the normal quantile 1.95996 (within 1.5%)."""
    if df < 1:
        return math.nan
    return T975[df - 1] if df <= len(T975) else NormalDist().inv_cdf(0.975)


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its 95% t-interval (NaN bounds for n < 2)."""
    s = pd.Series(list(values), dtype=float).dropna()
    n = len(s)
    mean = float(s.mean()) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    half = t975(n - 1) * float(s.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def read_users(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """The test users of several runs, with a ``run`` column (the run directory's name, e.g.
    ``seed0``: runs of the same name are the same seed, hence the same users)."""
    frames = []
    for d in run_dirs:
        path = Path(d) / TEST_USERS
        if not path.is_file():
            raise FedmamlError(
                f"{d} holds no {TEST_USERS}; give run directories whose test clients were "
                "personalized (a run with num-val-clients > 0, or simulations/benchmark.py)"
            )
        frames.append(pd.read_csv(path, dtype={"user": str}).assign(run=Path(d).name))
    return pd.concat(frames, ignore_index=True)


def steps_columns(df: pd.DataFrame) -> list[tuple[int, str]]:
    """(k, column) of the ``at_k`` columns, by k."""
    return sorted((int(m.group(1)), c) for c in df.columns if (m := _AT.match(c)))


def user_summary(run_dirs: Sequence[str | Path], *, steps: Sequence[int] = ()) -> dict[str, Any]:
    """The summary of one method (see the module docstring). ``steps``: the k of the ``@k``
    columns (default: 0, 1, 5 and the last measured)."""
    df = read_users(run_dirs)
    mean, low, high = mean_interval(df["metric_after"])
    per_run = df.groupby("run", sort=True)["metric_after"].mean()
    out: dict[str, Any] = {
        "users": len(df),
        "mean": mean,
        "95% interval": f"[{low:.3f}, {high:.3f}]",
        "per seed": " / ".join(f"{v:.3f}" for v in per_run),
        "p10": float(df["metric_after"].quantile(0.1)),
        "p50": float(df["metric_after"].quantile(0.5)),
        "p90": float(df["metric_after"].quantile(0.9)),
        "global @0": float(df["metric_before"].mean()),
        "mean gain": float(df["gain"].mean()),
        "helped": f"{(df['gain'] > 0).mean():.0%}",
        "hurt": f"{(df['gain'] < 0).mean():.0%}",
    }
    at = dict(steps_columns(df))
    if at:
        wanted = steps or sorted({0, 1, 5, max(at)} & set(at))
        out.update({f"@{k}": float(df[at[k]].mean()) for k in wanted if k in at})
    return out


def paired_difference(
    a_dirs: Sequence[str | Path], b_dirs: Sequence[str | Path]
) -> dict[str, float]:
    """A − B of the personalized metric on the users both measured (matched by run name and
    user): mean, 95% t-interval, number of pairs and the share of pairs where A is higher."""
    a, b = read_users(a_dirs), read_users(b_dirs)
    both = a.merge(b, on=["run", "user"], suffixes=("_a", "_b"))
    if both.empty:
        raise FedmamlError("the two methods share no (seed, user) pair to compare")
    diff = both["metric_after_a"] - both["metric_after_b"]
    mean, low, high = mean_interval(diff)
    return {
        "mean": mean,
        "low": low,
        "high": high,
        "pairs": len(diff),
        "better": float((diff > 0).mean()),
    }


def compare_users(
    runs: Mapping[str, Sequence[str | Path]], out_dir: str | Path, *, stem: str = "users"
) -> list[Path]:
    """``out_dir/<stem>_gain_steps.png``: per method (name -> its run directories), the
    distribution of the per-user gain from personalization (box plot, one point per user) and
    the mean metric after k = 0..K steps. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = {name: read_users(dirs) for name, dirs in runs.items()}
    if not frames:
        raise FedmamlError("no runs to compare")
    fig, (ax_gain, ax_steps) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(frames)
    ax_gain.boxplot([frames[n]["gain"] for n in names], orientation="horizontal", showfliers=False)
    for i, n in enumerate(names, start=1):
        gains = frames[n]["gain"]
        jitter = [i + 0.15 * (((j * 7919) % 11) / 10 - 0.5) for j in range(len(gains))]
        ax_gain.scatter(gains, jitter, s=8, alpha=0.6)
    ax_gain.set_yticks(range(1, len(names) + 1), names, fontsize=8)
    ax_gain.axvline(0.0, color="black", linewidth=1)
    ax_gain.set(title="per-user gain from personalization", xlabel="gain (positive = helped)")
    for n in names:
        at = steps_columns(frames[n])
        if at:
            ks = [k for k, _ in at]
            ax_steps.plot(ks, [frames[n][c].mean() for _, c in at], marker="o", ms=3, label=n)
    ax_steps.set(
        title="test users: mean metric after k steps", xlabel="adaptation steps k", ylabel="metric"
    )
    if any(steps_columns(f) for f in frames.values()):
        ax_steps.set_xscale("symlog", linthresh=10)
        ax_steps.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / f"{stem}_gain_steps.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return [path]
