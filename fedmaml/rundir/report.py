"""Tables and plots from a run directory (``rounds.csv``, ``clients.csv``, ``summary.json``).

* learning curves per round: the training clients' query loss before and after adaptation, and
  the held-out evaluation before adaptation (0 steps) and after 1 and K steps;
* the per-client gain histogram at the last evaluation: metric after K steps minus before
  (loss: lower is better, so gain = before − after; accuracy: after − before);
* a short markdown summary.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from fedmaml.atomic import atomic_write
from fedmaml.errors import FedmamlError
from fedmaml.rundir.names import CLIENTS, CURVES_PNG, GAINS_PNG, ROUNDS, SUMMARY, SUMMARY_MD


def load_run(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """The run's per-round table, per-client table and summary."""
    run_dir = Path(run_dir)
    if not (run_dir / ROUNDS).is_file():
        raise FedmamlError(
            f"{run_dir} holds no {ROUNDS}; give the directory of a fedmaml run "
            "(the --out of fedmaml simulate, or out-dir in the run config)"
        )
    try:
        rounds = pd.read_csv(run_dir / ROUNDS)
        clients = pd.read_csv(run_dir / CLIENTS) if (run_dir / CLIENTS).is_file() else None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise FedmamlError(f"{run_dir} has an unreadable results table ({exc})") from None
    summary = {}
    if (run_dir / SUMMARY).is_file():
        summary = json.loads((run_dir / SUMMARY).read_text())
    return rounds, clients if clients is not None else pd.DataFrame(), summary


def metric_name(rounds: pd.DataFrame) -> str:
    """``accuracy`` for classification runs, ``loss`` otherwise."""
    return "accuracy" if any(c.startswith("unseen-accuracy-") for c in rounds.columns) else "loss"


def steps_evaluated(rounds: pd.DataFrame, prefix: str, metric: str) -> list[int]:
    pattern = re.compile(rf"^{prefix}-{metric}-(\d+)$")
    return sorted(int(m.group(1)) for c in rounds.columns if (m := pattern.match(c)))


def evaluation_table(rounds: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluated round: the held-out query metric before adaptation (``@0``), after
    1 and after K steps (``@K``), for seen (training clients' held-out data), unseen (held-out
    clients, federated) and central (held-out tasks evaluated on the server)."""
    metric = metric_name(rounds)
    table = pd.DataFrame({"round": rounds["round"]})
    for prefix in ("seen", "unseen", "central"):
        steps = steps_evaluated(rounds, prefix, metric)
        for k in sorted({steps[0], min(1, steps[-1]), steps[-1]} if steps else ()):
            table[f"{prefix}@{k}"] = rounds[f"{prefix}-{metric}-{k}"]
    evaluated = table.drop(columns="round").notna().any(axis=1)
    return table[evaluated].reset_index(drop=True)


def plot_learning_curves(rounds: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric_name(rounds)
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    window = max(1, len(rounds) // 30)
    for col, label in (
        ("train-loss-before", "before adaptation"),
        ("train-loss-after", "after adaptation"),
    ):
        if col in rounds:
            (line,) = ax_train.plot(rounds["round"], rounds[col], alpha=0.25)
            smooth = rounds[col].rolling(window, min_periods=1).mean()
            ax_train.plot(rounds["round"], smooth, color=line.get_color(), label=label)
    ax_train.set(
        title=f"training clients: query loss (mean of {window} rounds)",
        xlabel="round",
        ylabel="loss",
    )
    ax_train.legend()
    for prefix, style in (("seen", "-"), ("unseen", "--"), ("central", ":")):
        steps = steps_evaluated(rounds, prefix, metric)
        for k in sorted({steps[0], steps[-1]} if steps else ()):
            data = rounds[["round", f"{prefix}-{metric}-{k}"]].dropna()
            ax_eval.plot(
                data["round"],
                data.iloc[:, 1],
                style,
                marker="o",
                markersize=3,
                label=f"{prefix}, {k} steps",
            )
    ax_eval.set(title=f"evaluation: held-out query {metric}", xlabel="round", ylabel=metric)
    ax_eval.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return path


def client_gains(clients: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per-client gain at the last evaluated round (positive = adaptation helped)."""
    if clients.empty or "phase" not in clients:
        return pd.DataFrame()
    ev = clients[(clients["phase"] == "evaluate") & (clients["status"] == "ok")]
    if ev.empty:
        return pd.DataFrame()
    ev = ev[ev["round"] == ev["round"].max()]
    pattern = re.compile(rf"^{metric}-(\d+)$")
    steps = sorted(int(m.group(1)) for c in ev.columns if (m := pattern.match(c)))
    before, after = ev[f"{metric}-{steps[0]}"], ev[f"{metric}-{steps[-1]}"]
    gain = after - before if metric == "accuracy" else before - after
    return pd.DataFrame(
        {
            "client": ev["client"],
            "heldout": ev.get("heldout", 0),
            "before": before,
            "after": after,
            "gain": gain,
        }
    )


def plot_gains(gains: pd.DataFrame, metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for heldout, label in ((0, "seen clients"), (1, "unseen clients")):
        data = gains[gains["heldout"] == heldout]["gain"]
        if len(data):
            ax.hist(data, bins=20, alpha=0.6, label=label)
    ax.set(title=f"per-client gain from adaptation ({metric})", xlabel="gain", ylabel="clients")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return path


def markdown_table(df: pd.DataFrame) -> str:
    """A pipe table of ``df`` (floats with 4 decimals)."""

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [[str(c) for c in df.columns], ["---"] * len(df.columns)]
    rows += [[cell(v) for v in row] for row in df.itertuples(index=False)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def report(run_dir: str | Path) -> list[Path]:
    """Write the plots and ``summary.md`` for a run; return the files written."""
    run_dir = Path(run_dir)
    rounds, clients, summary = load_run(run_dir)
    metric = metric_name(rounds)
    written = [plot_learning_curves(rounds, run_dir / CURVES_PNG)]
    gains = client_gains(clients, metric)
    if not gains.empty:
        written.append(plot_gains(gains, metric, run_dir / GAINS_PNG))
    table = evaluation_table(rounds)
    config = summary.get("config", {})
    lines = [
        f"# fedmaml run `{run_dir.name}`",
        "",
        f"- task: {config.get('task', '?')}, algorithm: {config.get('algorithm', '?')}, "
        f"rounds: {len(rounds)}, wall time: {summary.get('wall_time_s', '?')} s",
        f"- failed client replies: {int(rounds['failed'].sum()) if 'failed' in rounds else 0}",
        "",
        "## Evaluation (held-out query data)",
        "",
        markdown_table(table) if not table.empty else "(none)",
    ]
    if not gains.empty:
        lines += [
            "",
            f"## Per-client gain at the last evaluation ({metric})",
            "",
            markdown_table(gains.groupby("heldout")["gain"].describe().reset_index()),
        ]
    lines += ["", f"![learning curves]({CURVES_PNG})"]
    md = "\n".join(lines) + "\n"
    atomic_write(run_dir / SUMMARY_MD, lambda f: f.write(md))
    return [*written, run_dir / SUMMARY_MD]
