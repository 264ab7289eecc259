"""RunRecorder's CSV tables: written incrementally, they read back exactly as the DataFrame
pandas would have written from the same rows, after every flush of a run."""

from __future__ import annotations

import csv
import math

import numpy as np
import pandas as pd
import pytest

from fedmaml.rundir.names import CLIENTS, ROUNDS
from fedmaml.rundir.recorder import RunRecorder


def assert_as_pandas_wrote(path, rows: list[dict], tmp_path) -> None:
    """``path`` reads back as the table ``DataFrame(rows).to_csv`` writes (the same text when
    there is nothing to read)."""
    expected = tmp_path / "expected.csv"
    pd.DataFrame(rows).to_csv(expected, index=False)
    if not rows:
        assert path.read_text() == expected.read_text()
        return
    pd.testing.assert_frame_equal(pd.read_csv(path), pd.read_csv(expected), check_exact=True)
    with open(path, newline="") as f:
        assert len({len(line) for line in csv.reader(f)}) == 1  # every line has every field


def assert_same_tables(recorder: RunRecorder, tmp_path) -> None:
    recorder.flush()
    rounds = [recorder.rounds[r] for r in sorted(recorder.rounds)]
    assert_as_pandas_wrote(recorder.out_dir / ROUNDS, rounds, tmp_path)
    assert_as_pandas_wrote(recorder.out_dir / CLIENTS, recorder.clients, tmp_path)


def play_rounds(recorder: RunRecorder, tmp_path, first: int, last: int, rng) -> None:
    """What a run records: central evaluation, sampling, replies (some failing, some with
    awkward values), round summaries, periodic evaluation; the tables checked after each."""
    for r in range(first, last + 1):
        recorder.round_values(r, sampled=3)
        assert_same_tables(recorder, tmp_path)
        for node in range(3):
            if rng.random() < 0.2:
                reason = 'client error: ValueError("bad, very bad")\nline two'
                recorder.client_row(
                    round=r, phase="train", node_id=node, status="failed", reason=reason
                )
            else:
                recorder.client_row(
                    round=r,
                    phase="train",
                    node_id=node,
                    client=int(rng.integers(100)),
                    status="ok",
                    **{"num-examples": 10, "loss-before": float(rng.normal()) * 1e5},
                    **{"loss-after": float(rng.choice([1 / 3, 1e-300, 5e-324, 1e16, 0.1 + 0.2]))},
                )
        values = {"elapsed_s": round(rng.random() * 100, 3), "ok": 3, "updated": r % 4 != 1}
        if r % 4 != 1:
            values["train-loss-after"] = np.float64(rng.normal())
        recorder.round_values(r, **values)
        assert_same_tables(recorder, tmp_path)
        if r % 3 == 0:
            recorder.round_values(r, **{"seen-loss-0": float("nan"), "central-loss-1": 0.25})
            recorder.client_row(round=r, phase="evaluate", node_id=9, status="ok", heldout=True)
            assert_same_tables(recorder, tmp_path)


def test_tables_read_back_as_pandas_wrote_them_through_a_run_and_its_resume(tmp_path):
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    recorder = RunRecorder(run, {})
    assert_same_tables(recorder, tmp_path)  # nothing recorded yet
    recorder.round_values(0, **{"central-loss-0": 4.5, "central-loss-1": math.inf})
    assert_same_tables(recorder, tmp_path)
    play_rounds(recorder, tmp_path, 1, 9, rng)

    resumed = RunRecorder(run, {})  # a crash after round 9; the checkpoint is at round 6
    resumed.truncate_after(6)
    assert max(resumed.rounds) == 6 and all(c["round"] <= 6 for c in resumed.clients)
    assert_same_tables(resumed, tmp_path)
    play_rounds(resumed, tmp_path, 7, 11, rng)
    assert list(pd.read_csv(run / ROUNDS)["round"]) == list(range(12))


@pytest.mark.parametrize("value", [1 / 3, 1e-7, 123456789.125, -0.0, 2.5e300, -math.inf])
def test_floats_keep_full_precision(tmp_path, value):
    recorder = RunRecorder(tmp_path, {})
    recorder.round_values(1, x=value)
    recorder.flush()
    assert pd.read_csv(tmp_path / ROUNDS)["x"].iloc[0] == value


def test_resume_after_a_run_that_stopped_before_round_one(tmp_path):
    """Tables written before any row exist hold no columns; a resumed run starts empty."""
    first = RunRecorder(tmp_path, {})
    first.flush()
    resumed = RunRecorder(tmp_path, {})
    assert resumed.rounds == {} and resumed.clients == []
    resumed.round_values(1, ok=3)
    resumed.flush()
    assert RunRecorder(tmp_path, {}).rounds[1]["ok"] == 3


def client(r: int, node: int, **extra) -> dict:
    return {"round": r, "phase": "train", "node_id": node, "status": "ok", "loss": r / 3, **extra}


def test_clients_csv_grows_by_appending_and_is_rewritten_only_for_new_columns(tmp_path):
    """Each round appends its rows to the same file; a row with a new column rewrites it; the
    text is always the whole table's."""
    recorder = RunRecorder(tmp_path, {})
    path = tmp_path / CLIENTS
    inodes = []
    for r in range(1, 5):
        for node in range(3):
            extra = {"reason": "late"} if (r, node) == (3, 1) else {}
            recorder.client_row(**client(r, node, **extra))
        recorder.flush()
        inodes.append(path.stat().st_ino)
        assert path.read_text() == recorder._clients_csv.text(enumerate(recorder.clients))
        assert_as_pandas_wrote(path, recorder.clients, tmp_path)
    assert inodes[1] == inodes[0]  # round 2 appended
    assert inodes[2] != inodes[1]  # round 3 brought the column "reason": rewritten
    assert inodes[3] == inodes[2]  # round 4 appended again


def test_a_clients_csv_changed_behind_the_runs_back_is_rewritten_whole(tmp_path):
    recorder = RunRecorder(tmp_path, {})
    recorder.client_row(**client(1, 0))
    recorder.flush()
    (tmp_path / CLIENTS).write_text("something else\n")
    recorder.client_row(**client(2, 0))
    recorder.flush()
    assert_as_pandas_wrote(tmp_path / CLIENTS, recorder.clients, tmp_path)


def test_a_last_line_cut_short_by_a_crash_is_dropped_on_resume(tmp_path, caplog):
    recorder = RunRecorder(tmp_path, {})
    for r in (1, 2):
        recorder.client_row(**client(r, 0))
    recorder.flush()
    path = tmp_path / CLIENTS
    path.write_text(path.read_text() + "3,train,0,o")  # an append the crash cut short
    resumed = RunRecorder(tmp_path, {})
    assert [c["round"] for c in resumed.clients] == [1, 2]
    assert "cut short" in caplog.text
    resumed.client_row(**client(3, 0))
    resumed.flush()
    assert_as_pandas_wrote(path, resumed.clients, tmp_path)
