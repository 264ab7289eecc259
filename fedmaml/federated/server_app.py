"""fedmaml's Flower ServerApp: one federated meta-learning run.

Validates the run config before round 1, builds (or resumes) θ and the meta-optimizer,
composes the Flower aggregation strategy (``aggregator``) inside :class:`MetaStrategy` (with
``dp-noise``, the privacy ledger of :mod:`fedmaml.federated.privacy`; with
``secure-aggregation``, SecAgg+), evaluates centrally on held-out tasks where the server can
open the data, and writes the run directory: ``checkpoint.pt`` after every meta-update (atomic,
with the privacy ledger), ``rounds.csv``, ``clients.csv``, ``summary.json``. Training stops
before a round that would spend more than ``dp-max-epsilon``.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from fedmaml.checkpoint import Checkpoint, CheckpointSaver
from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.federated import keys
from fedmaml.federated.app_logging import through_flower
from fedmaml.federated.collect import PromptGrid
from fedmaml.federated.privacy import BudgetExhausted, PrivacyAccount
from fedmaml.federated.records import from_record, run_config, to_record
from fedmaml.federated.strategy import MetaStrategy
from fedmaml.meta.evaluate import mean_curve
from fedmaml.meta.outer import MetaOptimizer
from fedmaml.meta.params import Params
from fedmaml.personalize.recipe import Recipe
from fedmaml.personalize.run_recipe import finish_run, store_recipe
from fedmaml.problem import Problem
from fedmaml.run_start import start
from fedmaml.rundir.lock import locked
from fedmaml.rundir.names import CHECKPOINT, CLIENTS, SPLIT
from fedmaml.rundir.recorder import RunRecorder
from fedmaml.rundir.state import check_run_dir, prepare_run_dir
from fedmaml.tasks.protocol import group_counts, write_groups

app = ServerApp()
through_flower()

AGGREGATORS: dict[str, type[FedAvg]] = {
    "mean": FedAvg,
    "median": FedMedian,
    "trimmed-mean": FedTrimmedAvg,
    "krum": Krum,
}


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = run_config(context)
        run(PromptGrid(grid), cfg)
    except FedmamlError as exc:
        log(ERROR, "fedmaml: %s", exc)
        raise


def build_aggregator(cfg: RunConfig) -> Strategy:
    """The Flower strategy that aggregates client updates, as configured. (Clipping to
    ``dp-clip`` and the DP noise are MetaStrategy's: the noise is calibrated to the number of
    updates actually averaged, and is added after unmasking under secure aggregation.)"""
    return AGGREGATORS[cfg.aggregator](
        fraction_train=cfg.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.min_train_nodes,
        min_available_nodes=cfg.min_train_nodes,
        weighted_by_key=keys.WEIGHT,  # written by MetaStrategy into each checked reply
    )


def privacy_account(cfg: RunConfig, ledger: dict | None) -> PrivacyAccount | None:
    """The run's privacy ledger (resumed from the checkpoint's) when ε is accounted; a budget
    that no round fits in is refused here, before round 1."""
    if not cfg.accounted:
        if cfg.dp_noise > 0:
            log(
                WARNING,
                "fedmaml: ε is not accounted with aggregator %s (the noise is calibrated to the "
                "mean's sensitivity); use aggregator = mean for a privacy budget",
                cfg.aggregator,
            )
        return None
    account = PrivacyAccount(cfg, ledger)
    account.check_feasible()
    return account


def run(grid: Grid, cfg: RunConfig) -> None:
    """The whole run, holding its run directory; ``summary.json`` says how it ended (finished,
    complete already, or failed with the error)."""
    out_dir = Path(cfg.out_dir)
    check_run_dir(cfg)
    with locked(out_dir):
        prepare_run_dir(cfg)
        log(INFO, "fedmaml: loading the data and building the model (task %s)", cfg.task)
        work = Problem.from_config(cfg)
        recorder = RunRecorder(out_dir, cfg.to_mapping())
        _record_protocol(cfg, work, recorder)
        try:
            _run(grid, cfg, work, recorder)
        except FedmamlError as exc:
            recorder.write_summary(status="failed", error=str(exc))
            raise


def _run(grid: Grid, cfg: RunConfig, work: Problem, recorder: RunRecorder) -> None:
    out_dir = Path(cfg.out_dir)
    begin = start(cfg, work)
    params, optimizer, offset = begin.params, begin.optimizer, begin.round
    if begin.resumed_from:
        log(INFO, "fedmaml: resuming from %s at round %d", begin.resumed_from, offset)
    recorder.truncate_after(offset)
    remaining = cfg.num_rounds - offset
    if remaining <= 0:
        log(INFO, "fedmaml: checkpoint is at round %d of %d; nothing to do", offset, cfg.num_rounds)
        recorder.write_summary(status="complete", checkpoint=str(out_dir / CHECKPOINT))
        return

    saver = CheckpointSaver(out_dir / CHECKPOINT)
    account = privacy_account(cfg, begin.privacy)

    def save(meta_round: int, new_params: Params, opt: MetaOptimizer) -> None:
        saver.save(
            Checkpoint(
                params=new_params,
                model=cfg.model_name,
                model_kwargs=work.model_kwargs,
                config=cfg.to_mapping(),
                round=meta_round,
                optimizer_state=opt.state_dict(),
                privacy=account.state_dict() if account is not None else None,
                inputs=work.inputs.to_dict(),
            )
        )

    try:
        recipe = _train(grid, cfg, work, recorder, params, optimizer, offset, save, account)
    finally:
        saver.close()
    if recipe is not None:
        store_recipe(out_dir / CHECKPOINT, recipe, out_dir)
    if account is not None:
        recorder.facts["privacy"] = account.summary(**recorder.facts.get("privacy", {}))
    stopped = recorder.facts.get("privacy", {}).get("stopped_by_budget")
    if not recorder.updated_rounds(after=offset) and not stopped:
        raise FedmamlError(
            f"no round updated θ in {remaining} round(s): every round had too few valid client "
            f"replies (the reasons are in {out_dir / CLIENTS} and the log); e.g. lower inner-lr "
            "if the clients' adaptation diverges"
        )
    recorder.write_summary(status="finished", checkpoint=str(out_dir / CHECKPOINT))
    last = max((r for r, row in recorder.rounds.items() if "updated" in row), default=offset)
    log(
        INFO,
        "fedmaml: finished round %d of %d (%d updated θ) in %s",
        last,
        cfg.num_rounds,
        recorder.updated_rounds(after=offset),
        out_dir,
    )


def _train(
    grid: Grid,
    cfg: RunConfig,
    work: Problem,
    recorder: RunRecorder,
    params: Params,
    optimizer: MetaOptimizer,
    offset: int,
    save: Callable[[int, Params, MetaOptimizer], None],
    account: PrivacyAccount | None = None,
) -> Recipe | None:
    """Rounds offset+1..num-rounds: the meta-strategy, central evaluation, tables (training ends
    early when the privacy budget would be exceeded); then the personalization recipe
    (returned) and on-device personalization."""
    remaining = cfg.num_rounds - offset
    if offset == 0:
        save(0, params, optimizer)
    strategy = MetaStrategy(
        build_aggregator(cfg),
        optimizer,
        cfg,
        recorder,
        round_offset=offset,
        num_rounds=remaining,
        on_update=save,
        timeout=cfg.round_timeout,
        account=account,
    )

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Held-out tasks evaluated on the server (0..eval-steps adaptation steps)."""
        if server_round and not strategy.is_eval_round(server_round):
            return None
        n = min(cfg.eval_clients, work.source.num_clients("heldout"))
        if n == 0:
            return None
        theta = from_record(arrays)
        curves, failed = [], 0
        for i in range(n):
            try:
                curves.append(work.evaluation_curve(theta, work.source.client(i, "heldout"), i)[0])
            except FedmamlError as exc:  # e.g. adaptation diverged on this task
                failed += 1
                log(WARNING, "fedmaml: central evaluation of held-out task %d failed: %s", i, exc)
        summary = {
            f"central-{name}-{k}": value
            for k, entry in enumerate(mean_curve(curves))
            for name, value in entry.items()
        }
        summary["central-failed"] = failed
        recorder.round_values(offset + server_round, **summary)
        recorder.flush()
        return MetricRecord(summary)

    try:
        strategy.start(
            grid=grid,
            initial_arrays=to_record(params),
            num_rounds=remaining,
            timeout=cfg.round_timeout,
            train_config=ConfigRecord({}),
            evaluate_config=ConfigRecord({}),
            evaluate_fn=central_evaluation if _server_can_open_data(cfg) else None,
        )
    except BudgetExhausted as exc:
        _stop_for_budget(recorder, exc)
    recorder.flush()
    recipe = _fit_recipe(cfg, work, optimizer.current(), recorder)
    if cfg.personalize:
        summary = strategy.personalize(
            grid, to_record(optimizer.current()), recipe.settings() if recipe else None
        )
        recorder.round_values(
            cfg.num_rounds, **{f"personalized-{k}": v for k, v in summary.items()}
        )
        recorder.flush()
        log(INFO, "fedmaml: personalized on the devices: %s", summary)
    return recipe


def _record_protocol(cfg: RunConfig, work: Problem, recorder: RunRecorder) -> None:
    """The client groups (and the clients dropped as too small) in the run directory."""
    if not _server_can_open_data(cfg):
        return
    write_groups(work.source, Path(cfg.out_dir) / SPLIT)
    counts = group_counts(work.source)
    recorder.facts["protocol"] = {**counts, "support-fraction": cfg.support_fraction}
    if counts["dropped"]:
        log(
            WARNING,
            "fedmaml: %d clients were dropped as too small for the episodes before the client "
            "counts were fixed (reasons in %s)",
            counts["dropped"],
            SPLIT,
        )


def _fit_recipe(
    cfg: RunConfig, work: Problem, params: Params, recorder: RunRecorder
) -> Recipe | None:
    """The personalization recipe chosen on the validation clients (None without them), and
    the test clients personalized with it (``test_users.csv``)."""
    if not cfg.num_val_clients or not _server_can_open_data(cfg):
        return None
    log(INFO, "fedmaml: choosing the personalization recipe on %d validation clients",
        cfg.num_val_clients)  # fmt: skip
    recipe = finish_run(work, params, cfg.out_dir)
    if recipe is not None:
        recorder.facts["recipe"] = {"steps": recipe.steps, "lr": recipe.lr, "adapt": recipe.adapt}
        log(INFO, "fedmaml: personalization recipe: %s", recipe.describe())
    return recipe


def _stop_for_budget(recorder: RunRecorder, exc: BudgetExhausted) -> None:
    """The privacy budget ends training: the last checkpoint (the last update's) is final."""
    log(WARNING, "fedmaml: privacy budget reached: %s", exc)
    recorder.facts["privacy"] = {
        **recorder.facts.get("privacy", {}),
        "stopped_by_budget": True,
        "stop_reason": str(exc),
    }


def _server_can_open_data(cfg: RunConfig) -> bool:
    """Central evaluation needs the held-out tasks on the server: synthetic families always,
    file-based ones when the data path exists on the server."""
    return cfg.task == "sine" or (bool(cfg.data_path) and Path(cfg.data_path).exists())
