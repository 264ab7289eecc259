"""``fedmaml report RUN_DIR`` on run directories written by the real RunRecorder."""

from __future__ import annotations

import pytest

from fedmaml.cli import main
from fedmaml.rundir.recorder import RunRecorder
from fedmaml.rundir.report import client_gains, evaluation_table, load_run


def write_run(path, metric: str) -> None:
    rec = RunRecorder(path, {"task": "demo", "algorithm": "maml"})
    for r in range(1, 5):
        rec.round_values(
            r,
            ok=3,
            failed=0,
            updated=True,
            **{"train-loss-before": 3.0 - 0.1 * r, "train-loss-after": 2.0 - 0.2 * r},
        )
    for r in (2, 4):
        for group in ("seen", "unseen"):
            rec.round_values(r, **{f"{group}-{metric}-{k}": 0.2 + 0.1 * k * r for k in range(4)})
        for client, heldout in ((0, 0), (1, 0), (2, 1)):
            rec.client_row(
                round=r,
                phase="evaluate",
                node_id=10 + client,
                client=client,
                status="ok",
                heldout=heldout,
                **{f"{metric}-{k}": 0.2 + 0.05 * k * (client + 1) for k in range(4)},
            )
    rec.flush()
    rec.write_summary()


@pytest.mark.parametrize("metric", ["loss", "accuracy"])
def test_report_writes_plots_and_summary(tmp_path, capsys, metric):
    write_run(tmp_path, metric)
    assert main(["report", str(tmp_path)]) == 0
    for name in ("learning_curves.png", "client_gains.png", "summary.md"):
        assert (tmp_path / name).stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "seen@3" in summary and "unseen@0" in summary
    rounds, clients, _ = load_run(tmp_path)
    table = evaluation_table(rounds)
    assert list(table["round"]) == [2, 4]
    gains = client_gains(clients, metric)
    assert len(gains) == 3
    # gain is positive when adaptation helped: lower loss, or higher accuracy
    sign = 1 if metric == "accuracy" else -1
    assert (gains["gain"] == sign * (gains["after"] - gains["before"])).all()


def test_report_of_a_folder_without_a_run_is_one_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "rounds.csv" in err and len(err.strip().splitlines()) == 1
