"""Per-user evidence: t-intervals checked against scipy, paired differences, the summary's
percentiles and helped/hurt shares, the side-by-side figure."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fedmaml.errors import FedmamlError
from fedmaml.rundir.user_report import (
    compare_users,
    mean_interval,
    paired_difference,
    t975,
    user_summary,
)


def test_t_quantiles_and_intervals_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 9, 29, 30):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4)
    assert t975(200) == pytest.approx(stats.t.ppf(0.975, 200), rel=0.015)
    values = np.random.default_rng(0).normal(0.7, 0.1, 12)
    mean, low, high = mean_interval(values)
    ref = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert mean == pytest.approx(values.mean())
    assert (low, high) == pytest.approx(ref, abs=1e-4)
    assert math.isnan(mean_interval([0.5])[1])


def _run(path, users, before, after):
    path.mkdir(parents=True)
    frame = pd.DataFrame(
        {
            "user": users,
            "n_support": 10,
            "n_eval": 40,
            "metric_before": before,
            "metric_after": after,
            "gain": np.asarray(after) - np.asarray(before),
            "at_0": before,
            "at_1": after,
        }
    )
    frame.to_csv(path / "test_users.csv", index=False)
    return path


def test_summary_and_paired_difference(tmp_path):
    users = ["a", "b", "c", "d"]
    a0 = _run(tmp_path / "a" / "seed0", users, [0.5, 0.5, 0.6, 0.7], [0.6, 0.7, 0.6, 0.6])
    a1 = _run(tmp_path / "a" / "seed1", users, [0.4, 0.5, 0.6, 0.7], [0.5, 0.6, 0.7, 0.8])
    b0 = _run(tmp_path / "b" / "seed0", users, [0.5] * 4, [0.5] * 4)
    b1 = _run(tmp_path / "b" / "seed1", users, [0.5] * 4, [0.55] * 4)
    s = user_summary([a0, a1])
    assert s["users"] == 8 and s["mean"] == pytest.approx(0.6375)
    assert s["per seed"] == "0.625 / 0.650" and (s["helped"], s["hurt"]) == ("75%", "12%")
    assert s["p50"] == pytest.approx(0.6) and s["@1"] == pytest.approx(0.6375)
    d = paired_difference([a0, a1], [b0, b1])
    diffs = [0.1, 0.2, 0.1, 0.1, -0.05, 0.05, 0.15, 0.25]
    assert d["pairs"] == 8 and d["mean"] == pytest.approx(np.mean(diffs))
    assert d["better"] == pytest.approx(7 / 8) and d["low"] < d["mean"] < d["high"]
    [png] = compare_users({"A": [a0, a1], "B": [b0, b1]}, tmp_path / "out", stem="x")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FedmamlError, match=r"holds no test_users\.csv"):
        user_summary([tmp_path])
