"""Tables and plots from a run directory (``rounds.csv``, ``clients.csv``, ``summary.json``).

* learning curves per round: the training clients' query loss before and after adaptation, and
  the held-out evaluation before adaptation (0 steps) and after K steps;
* the per-client gain histogram at the last evaluation: metric after K steps minus before
  (loss: lower is better, so gain = before − after; accuracy: after − before);
* a markdown summary: how the run ended, what failed, the evaluation table, the gain per group;
* :func:`compare`: several runs (e.g. MAML and the FedAvg + fine-tuning baseline on the same
  clients) in one table and one plot; :func:`compare_runs` adds their test users side by side
  (per-user gain and steps curve, :mod:`fedmaml.rundir.user_report`);
* the test users personalized by the run's recipe (``test_users.csv``, written when the run
  has validation clients): a per-user summary in ``summary.md`` and ``test_users_gain_steps.png``.

Evaluation groups: *seen* are the training clients' held-out data, *unseen* the held-out
clients. The server also evaluates the held-out clients itself when it can open their data
(``central-*`` columns of ``rounds.csv``: the same tasks, so the same numbers); the reports show
one *unseen* series, the federated evaluation where there is one, else the server's (round 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from fedmaml.atomic import atomic_write
from fedmaml.errors import FedmamlError
from fedmaml.rundir.names import (
    CLIENTS,
    COMPARISON_MD,
    COMPARISON_PNG,
    CURVES_PNG,
    GAINS_PNG,
    ROUNDS,
    SUMMARY,
    SUMMARY_MD,
    TEST_USERS,
)
from fedmaml.rundir.user_report import compare_users, user_summary

GROUPS = ("seen", "unseen")


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
    return unseen_merged(rounds), clients if clients is not None else pd.DataFrame(), summary


def unseen_merged(rounds: pd.DataFrame) -> pd.DataFrame:
    """``rounds`` with the server's evaluation of the held-out clients (``central-*``) folded
    into the federated one (``unseen-*``) where that is missing, and the central columns
    dropped: one series per group in every table and plot."""
    rounds = rounds.copy()
    for column in [c for c in rounds.columns if c.startswith("central-")]:
        target = "unseen-" + column.removeprefix("central-")
        if column != "central-failed":
            rounds[target] = (
                rounds[target].fillna(rounds[column]) if target in rounds else rounds[column]
            )
        rounds = rounds.drop(columns=column)
    return rounds


def metric_name(rounds: pd.DataFrame) -> str:
    """``accuracy`` for classification runs, ``loss`` otherwise."""
    return "accuracy" if any(c.startswith("unseen-accuracy-") for c in rounds.columns) else "loss"


def steps_evaluated(rounds: pd.DataFrame, prefix: str, metric: str) -> list[int]:
    pattern = re.compile(rf"^{prefix}-{metric}-(\d+)$")
    return sorted(int(m.group(1)) for c in rounds.columns if (m := pattern.match(c)))


def evaluation_table(rounds: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluated round: the held-out query metric before adaptation (``@0``), after
    1 and after K steps (``@K``), for seen (training clients' held-out data) and unseen
    (held-out clients)."""
    metric = metric_name(rounds)
    table = pd.DataFrame({"round": rounds["round"]})
    for prefix in GROUPS:
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
    for prefix, style in zip(GROUPS, ("-", "--"), strict=True):
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
        if isinstance(v, float) and v != v:
            return ""
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [[str(c) for c in df.columns], ["---"] * len(df.columns)]
    rows += [[cell(v) for v in row] for row in df.itertuples(index=False)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def gain_table(gains: pd.DataFrame) -> pd.DataFrame:
    """Per group: clients, mean, sd and quartiles of the gain, and the share of clients helped
    (gain > 0) and hurt (gain < 0) by adaptation."""
    rows = []
    for heldout, group in ((0, "seen"), (1, "unseen")):
        gain = gains[gains["heldout"] == heldout]["gain"]
        if len(gain):
            rows.append(
                {
                    "group": group,
                    "clients": len(gain),
                    "mean": float(gain.mean()),
                    "sd": float(gain.std()) if len(gain) > 1 else float("nan"),
                    "p10": float(gain.quantile(0.1)),
                    "median": float(gain.median()),
                    "p90": float(gain.quantile(0.9)),
                    "helped": f"{(gain > 0).mean():.0%}",
                    "hurt": f"{(gain < 0).mean():.0%}",
                }
            )
    return pd.DataFrame(rows)


def outcome_lines(
    rounds: pd.DataFrame, clients: pd.DataFrame, summary: dict[str, Any]
) -> list[str]:
    """How the run ended and everything that did not go as asked, counted."""
    config = summary.get("config", {})
    status = summary.get("status", "running or stopped")
    if summary.get("error"):
        status += f": {summary['error']}"
    trained = rounds[rounds["round"] > 0] if "round" in rounds else rounds
    updated = trained.get("updated", pd.Series(False, index=trained.index)).astype(str) == "True"
    phases = clients.get("phase", pd.Series(dtype=str))
    statuses = clients.get("status", pd.Series(dtype=str))
    broken = int(((phases == "describe") & (statuses == "error")).sum())
    total, server = summary.get("total_time_s"), summary.get("wall_time_s", "?")
    wall = f"{total} s ({server} s in the ServerApp)" if total is not None else f"{server} s"
    lines = [
        f"- task: {config.get('task', '?')}, algorithm: {config.get('algorithm', '?')}, "
        f"rounds: {summary.get('rounds', int(rounds['round'].max()) if len(rounds) else 0)} of "
        f"{config.get('num-rounds', '?')}, status: {status}",
        f"- wall time: {wall}",
        f"- rounds that updated θ: {int(updated.sum())}; skipped: {int((~updated).sum())}",
        f"- failed training replies: {int(trained['failed'].sum()) if 'failed' in trained else 0}"
        f"; no reply: {int((statuses == 'no-reply').sum())}"
        f"; nodes that could not take part: {broken}"
        f"; clipped updates: {int(trained['clipped'].sum()) if 'clipped' in trained else 0}",
    ]
    protocol = summary.get("protocol")
    if protocol:
        lines.append(
            f"- client groups: {protocol.get('train')} training, {protocol.get('validation')} "
            f"validation, {protocol.get('test')} test; {protocol.get('dropped', 0)} dropped as "
            "too small before the counts were fixed (clients_split.csv)"
        )
    recipe = summary.get("recipe")
    if recipe:
        lines.append(
            f"- personalization recipe (chosen on the validation clients): {recipe.get('steps')} "
            f"steps, lr {recipe.get('lr') or 'learned'}, {recipe.get('adapt')} adapted "
            "(recipe.csv)"
        )
    found = summary.get("clients")
    if found:
        lines.append(
            f"- clients: {found['train']} training and {found['heldout']} held-out connected, "
            f"{found['configured']} configured"
        )
    return lines


def privacy_lines(summary: dict[str, Any]) -> list[str]:
    """The run's privacy: secure aggregation, and the (ε, δ) its releases spent."""
    config = summary.get("config", {})
    lines = []
    if config.get("secure-aggregation"):
        lines.append(
            "- secure aggregation (SecAgg+): the server saw only the sum of each round's "
            "clients' meta-gradients"
        )
    privacy = summary.get("privacy")
    if privacy:
        budget = privacy.get("max_epsilon")
        lines.append(
            f"- differential privacy: ε = {privacy['epsilon']:.4g} at δ = {privacy['delta']:g} "
            f"after {privacy['releases']} release(s) (σ = {privacy['noise_multiplier']:g}, "
            f"C = {privacy['clip_norm']:g}, sampling rate {privacy['sampling_rate']:.3g}"
            + (f", budget ε ≤ {budget:g}" if budget else "")
            + "); personalization after training is local and spends no budget"
        )
        if privacy.get("stopped_by_budget"):
            lines.append(f"- training stopped at the privacy budget: {privacy['stop_reason']}")
    elif float(config.get("dp-noise", 0) or 0) > 0:
        lines.append("- differential privacy: noise added, ε not accounted (aggregator not mean)")
    return lines


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
    lines = [
        f"# fedmaml run `{run_dir.name}`",
        "",
        *outcome_lines(rounds, clients, summary),
        *privacy_lines(summary),
        "",
        f"## Evaluation: held-out query {metric} after k adaptation steps (`@k`)",
        "",
        "seen: the training clients' held-out data; unseen: clients never trained on.",
        "",
        markdown_table(table) if not table.empty else "(none)",
    ]
    if not gains.empty:
        lines += [
            "",
            f"## Per-client gain from adaptation at the last evaluation ({metric})",
            "",
            markdown_table(gain_table(gains)),
        ]
    if (run_dir / TEST_USERS).is_file():
        written += compare_users({run_dir.name: [run_dir]}, run_dir, stem="test_users")
        lines += [
            "",
            "## Test users personalized by the recipe chosen on the validation users",
            "",
            markdown_table(pd.DataFrame([user_summary([run_dir])])),
            "",
            "![per-user gain and steps curve](test_users_gain_steps.png)",
        ]
    lines += ["", f"![learning curves]({CURVES_PNG})"]
    md = "\n".join(lines) + "\n"
    atomic_write(run_dir / SUMMARY_MD, lambda f: f.write(md))
    return [*written, run_dir / SUMMARY_MD]


def compare_runs(run_dirs: list[Path], out_dir: Path | None = None) -> list[Path]:
    """Several runs side by side in ``out_dir`` (default: their common parent): the learning
    curves (:func:`compare`) when every run has unseen evaluations, and the test users
    (``users_gain_steps.png``, ``users.md``) of the runs that personalized them."""
    dirs = [Path(d) for d in run_dirs]
    out = Path(out_dir) if out_dir else Path(os.path.commonpath([d.resolve() for d in dirs]))
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with contextlib.suppress(FedmamlError):  # runs without unseen evaluations: users only
        written += compare(dirs, out)[1]
    users = {d.name: [d] for d in dirs if (d / TEST_USERS).is_file()}
    if users:
        written += compare_users(users, out, stem="users")
        table = pd.DataFrame([{"run": n, **user_summary(ds)} for n, ds in users.items()])
        md = (
            "# Test users personalized by each run's recipe\n\n"
            f"{markdown_table(table)}\n\n![per-user gain and steps](users_gain_steps.png)\n"
        )
        atomic_write(out / "users.md", lambda f: f.write(md))
        written.append(out / "users.md")
    if not written:
        raise FedmamlError(
            "none of the runs has evaluations of unseen clients or personalized test users to "
            "compare"
        )
    return written


def compare(
    run_dirs: list[Path], out_dir: Path, *, plot: bool = True
) -> tuple[pd.DataFrame, list[Path]]:
    """Several runs on the same clients side by side: a table of each run's final held-out
    metric before and after adaptation (``comparison.md``) and a plot (``comparison.png``) of
    the unseen clients' metric after K steps over the rounds, and of the final adaptation curve
    @0..K. Returns the table and the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, curves = [], {}
    fig, (ax_rounds, ax_steps) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir in run_dirs:
        rounds, _, summary = load_run(run_dir)
        metric = metric_name(rounds)
        name = summary.get("config", {}).get("algorithm", run_dir.name)
        steps = steps_evaluated(rounds, "unseen", metric)
        if not steps:
            raise FedmamlError(f"{run_dir} has no evaluation of unseen clients to compare")
        last = rounds.dropna(subset=[f"unseen-{metric}-{steps[-1]}"]).iloc[-1]
        row: dict[str, Any] = {"run": name, "round": int(last["round"])}
        for k in sorted({steps[0], min(1, steps[-1]), steps[-1]}):
            row[f"unseen@{k}"] = float(last[f"unseen-{metric}-{k}"])
        seen = steps_evaluated(rounds, "seen", metric)
        if seen:
            row[f"seen@{seen[-1]}"] = float(last[f"seen-{metric}-{seen[-1]}"])
        row["wall s"] = summary.get("total_time_s", summary.get("wall_time_s", float("nan")))
        rows.append(row)
        series = rounds[["round", f"unseen-{metric}-{steps[-1]}"]].dropna()
        ax_rounds.plot(series["round"], series.iloc[:, 1], marker="o", markersize=3, label=name)
        curves[name] = [float(last[f"unseen-{metric}-{k}"]) for k in steps]
        ax_steps.plot(steps, curves[name], marker="o", label=name)
    ax_rounds.set(
        title=f"unseen clients: {metric} after {steps[-1]} steps", xlabel="round", ylabel=metric
    )
    ax_steps.set(
        title=f"unseen clients at the last round: {metric} after k steps",
        xlabel="adaptation steps k",
        ylabel=metric,
    )
    for ax in (ax_rounds, ax_steps):
        ax.legend()
    fig.tight_layout()
    if plot:
        atomic_write(
            out_dir / COMPARISON_PNG, lambda f: fig.savefig(f, format="png", dpi=110), "wb"
        )
    plt.close(fig)
    table = pd.DataFrame(rows)
    better = "lower" if metric == "loss" else "higher"
    md = (
        f"# Comparison: held-out query {metric} ({better} is better)\n\n"
        f"unseen@k: clients never trained on, after k adaptation steps on their support data; "
        f"the same clients and episodes for every run.\n\n{markdown_table(table)}\n\n"
        f"![comparison]({COMPARISON_PNG})\n"
    )
    atomic_write(out_dir / COMPARISON_MD, lambda f: f.write(md))
    return table, [out_dir / COMPARISON_MD, *([out_dir / COMPARISON_PNG] if plot else [])]
